//! L2: replies shared by every instance in Redis, with a TTL. Clearing walks the keys with
//! SCAN and removes them with UNLINK — never KEYS, which would block Redis.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::{CachedReply, ResponseCache};

pub struct RedisCache {
    conn: ConnectionManager,
    /// `<prefix>:cache:`; every key of this cache starts with it.
    namespace: String,
    ttl: Duration,
}

impl RedisCache {
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            conn,
            namespace: format!("{prefix}:cache:"),
            ttl,
        })
    }
}

#[async_trait]
impl ResponseCache for RedisCache {
    async fn get(&self, key: &str) -> Option<CachedReply> {
        let mut c = self.conn.clone();
        // A cache that cannot be read is a miss, never an error for the client.
        let raw: Option<Vec<u8>> = c.get(format!("{}{key}", self.namespace)).await.ok()?;
        serde_json::from_slice(&raw?).ok()
    }

    async fn put(&self, key: &str, reply: &CachedReply) {
        let Ok(body) = serde_json::to_vec(reply) else {
            return;
        };
        let mut c = self.conn.clone();
        let r: Result<(), _> = c
            .set_ex(
                format!("{}{key}", self.namespace),
                body,
                self.ttl.as_secs().max(1),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot write the response cache");
        }
    }

    async fn clear(&self, prefix: Option<&str>) -> u64 {
        let pattern = format!("{}{}*", self.namespace, escape_glob(prefix.unwrap_or("")));
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let r: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await;
            let Ok((next, keys)) = r else { break };
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut c)
                    .await
                    .unwrap_or(0);
                removed += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        removed
    }

    async fn size(&self) -> u64 {
        0
    }
}

/// A prefix is matched literally, not as a glob.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
