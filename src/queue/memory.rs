//! The embedded queue: a bounded in-process FIFO. Durability comes from the store, which
//! keeps every task; after a restart the unfinished ones are pushed again.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{Delivery, QueueError, TaskQueue};

pub struct MemoryQueue {
    items: Mutex<VecDeque<String>>,
    /// Wakes one waiting worker per push.
    ready: Notify,
    /// Most tasks held; beyond it, new tasks are refused rather than queued without bound.
    max: usize,
}

impl MemoryQueue {
    pub fn new(max: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            max: max.max(1),
        }
    }
}

#[async_trait]
impl TaskQueue for MemoryQueue {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn push(&self, task_id: &str) -> Result<(), QueueError> {
        {
            let mut items = self.items.lock();
            if items.len() >= self.max {
                return Err(QueueError::Full);
            }
            items.push_back(task_id.to_owned());
        }
        self.ready.notify_one();
        Ok(())
    }

    async fn pop(&self, _consumer: &str, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before checking, so a push between the check and the wait wakes us.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(task_id) = self.items.lock().pop_front() {
                return Ok(Some(Delivery {
                    task_id,
                    receipt: String::new(),
                }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn ack(&self, _delivery: &Delivery) -> Result<(), QueueError> {
        Ok(())
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        Ok(self.items.lock().len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_bounded_and_wakes_waiters() {
        let q = std::sync::Arc::new(MemoryQueue::new(2));
        q.push("a").await.unwrap();
        q.push("b").await.unwrap();
        assert!(matches!(q.push("c").await, Err(QueueError::Full)));
        assert_eq!(q.depth().await.unwrap(), 2);
        let d = q.pop("w", Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(d.task_id, "a");
        q.pop("w", Duration::from_secs(1)).await.unwrap().unwrap();
        assert!(
            q.pop("w", Duration::from_millis(10))
                .await
                .unwrap()
                .is_none()
        );
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.pop("w", Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        q.push("d").await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().unwrap().task_id, "d");
    }
}
