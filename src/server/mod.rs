//! Serving HTTP: the router, the accept loop with its head and body deadlines, and the
//! drain at shutdown.

mod accept;
mod deadline;
mod drain;
mod router;

pub use drain::serve;
pub use router::{LogsAtEnd, router};
