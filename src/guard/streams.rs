//! Concurrent client streams per instance and per key: beyond either limit a new stream is
//! refused (503 with Retry-After) instead of queued, so load sheds early and visibly.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct StreamLimits {
    instance: Arc<Semaphore>,
    per_key: Arc<DashMap<String, usize>>,
    max_per_key: usize,
}

/// Which limit refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Instance,
    Key,
}

/// Holds one stream's place; released on drop.
pub struct StreamPermit {
    _instance: OwnedSemaphorePermit,
    key: Option<(Arc<DashMap<String, usize>>, String)>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some((map, key)) = self.key.take() {
            map.remove_if_mut(&key, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

impl StreamLimits {
    pub fn new(max_streams: usize, max_per_key: usize) -> Self {
        Self {
            instance: Arc::new(Semaphore::new(max_streams)),
            per_key: Arc::new(DashMap::new()),
            max_per_key,
        }
    }

    /// A place for one more stream of `key` (`None`: a caller without a key, counted only
    /// against the instance).
    pub fn try_acquire(&self, key: Option<&str>) -> Result<StreamPermit, Limit> {
        let instance = self
            .instance
            .clone()
            .try_acquire_owned()
            .map_err(|_| Limit::Instance)?;
        let key = match key {
            None => None,
            Some(k) => {
                let mut n = self.per_key.entry(k.to_owned()).or_insert(0);
                if *n >= self.max_per_key {
                    return Err(Limit::Key);
                }
                *n += 1;
                Some((self.per_key.clone(), k.to_owned()))
            }
        };
        Ok(StreamPermit {
            _instance: instance,
            key,
        })
    }

    pub fn in_use(&self, key: &str) -> usize {
        self.per_key.get(key).map(|n| *n).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_and_key_limits_release_on_drop() {
        let l = StreamLimits::new(3, 2);
        let a = l.try_acquire(Some("k")).unwrap();
        let b = l.try_acquire(Some("k")).unwrap();
        assert_eq!(l.try_acquire(Some("k")).err(), Some(Limit::Key));
        let c = l.try_acquire(Some("other")).unwrap();
        assert_eq!(l.try_acquire(None).err(), Some(Limit::Instance));
        drop(a);
        assert_eq!(l.in_use("k"), 1);
        let _d = l.try_acquire(Some("k")).unwrap();
        drop((b, c));
        assert_eq!(l.in_use("other"), 0);
    }
}
