//! Operations: lifecycle (drain and shutdown) and health.

pub mod health;
pub mod lifecycle;
pub mod metrics;
pub mod systemd;

pub use lifecycle::Lifecycle;
