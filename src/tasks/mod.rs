//! Asynchronous prompt jobs: a queue delivers task ids to a bounded pool of workers, which
//! run them against the upstreams and publish their progress to the hub.
//!
//! The store holds each task's state and is the source of truth; the queue
//! (`crate::queue`) only delivers.

pub mod service;

pub use crate::queue::{Delivery, QueueError, TaskQueue};
