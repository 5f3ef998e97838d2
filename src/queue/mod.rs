//! Task queues: one trait, two backends — in-process (embedded; tasks left unfinished by a
//! restart are queued again from the store) and Redis Streams with a consumer group
//! (cluster; entries of a crashed consumer are reclaimed after an idle time).

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue holds as many tasks as it may.
    #[error("the task queue is full")]
    Full,
    #[error("task queue unavailable: {0}")]
    Unavailable(String),
}

/// One task handed to one consumer; acknowledged once the task reached a final state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub task_id: String,
    /// Backend-specific handle for `ack` (the Redis stream entry id).
    pub receipt: String,
}

#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn push(&self, task_id: &str) -> Result<(), QueueError>;
    /// The next task for `consumer`, waiting at most `wait`; `None` when none came.
    async fn pop(&self, consumer: &str, wait: Duration) -> Result<Option<Delivery>, QueueError>;
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError>;
    /// Tells the queue `consumer` still works on `delivery`, so it is not reclaimed. Called
    /// at a third of the reclaim time while a task runs.
    async fn keep_alive(&self, _delivery: &Delivery, _consumer: &str) -> Result<(), QueueError> {
        Ok(())
    }
    /// How long a delivery may go without `keep_alive` before it is reclaimed, if ever.
    fn reclaim_after(&self) -> Option<Duration> {
        None
    }
    /// Tasks waiting for a worker.
    async fn depth(&self) -> Result<u64, QueueError>;
}
