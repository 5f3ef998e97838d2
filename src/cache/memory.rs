//! L1: an in-process cache bounded by entries and time to live.

use std::time::Duration;

use async_trait::async_trait;

use super::{CachedReply, ResponseCache};

pub struct MemoryCache {
    inner: moka::future::Cache<String, CachedReply>,
}

impl MemoryCache {
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        Self {
            inner: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
        }
    }
}

#[async_trait]
impl ResponseCache for MemoryCache {
    async fn get(&self, key: &str) -> Option<CachedReply> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, reply: &CachedReply) {
        self.inner.insert(key.to_owned(), reply.clone()).await;
    }

    async fn clear(&self, prefix: Option<&str>) -> u64 {
        let keys: Vec<String> = self
            .inner
            .iter()
            .map(|(k, _)| k.as_ref().clone())
            .filter(|k| prefix.is_none_or(|p| k.starts_with(p)))
            .collect();
        for k in &keys {
            self.inner.invalidate(k).await;
        }
        keys.len() as u64
    }

    async fn size(&self) -> u64 {
        // moka counts lazily; settle pending work so the number is current.
        self.inner.run_pending_tasks().await;
        self.inner.entry_count()
    }
}
