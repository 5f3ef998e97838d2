//! The state's former path, still named by `guard` and `transport`.

pub use crate::state::AppState;
