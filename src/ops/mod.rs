//! Operations: lifecycle (drain and shutdown), health and metrics: what the services report
//! and the operator reads.

pub mod health;
pub mod lifecycle;
pub mod metrics;

pub use lifecycle::Lifecycle;
