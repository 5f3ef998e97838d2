//! Serving HTTP: start-up, the router, the accept loop with its head and body deadlines,
//! systemd notifications and the drain at shutdown.

mod accept;
mod deadline;
mod drain;
mod router;
pub mod startup;
pub mod systemd;

pub use drain::serve;
pub use router::router;
