//! Operations: lifecycle (drain and shutdown), health and what start-up tells the operator.

pub mod health;
pub mod lifecycle;
pub mod metrics;
pub mod startup;
pub mod systemd;

pub use lifecycle::Lifecycle;
