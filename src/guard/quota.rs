//! Cluster-wide per-key quotas in Redis: requests and streamed tokens per minute.
//!
//! Every instance counts into the same Redis hash `<prefix>:quota:{<key id>}:<minute>`
//! (fields `r` for requests, `t` for tokens; it expires after the minute), so N instances
//! enforce a quota once, not N times. One Lua script reads and updates it, so two instances
//! cannot both let the last allowed request through; the minute comes from the Redis clock,
//! so instances with skewed clocks still share one window.
//!
//! When Redis cannot be reached the quota is not known: with `quota_fail_open` (the
//! default) requests pass and a warning is logged at most every 10 s; otherwise they are
//! refused with 503 `quota_unavailable`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use tokio_util::task::TaskTracker;

use crate::domain::{METER_EVERY, TokenMeter};

use crate::config::GuardConfig;

/// Checks (`mode` "req") or adds tokens to (`mode` "tok") one key's current window.
/// Returns `{verdict, seconds left in the window}`; verdict 0 = allowed, 1 = over the
/// request quota, 2 = over the token quota. A refused request is not counted.
const SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local secs = tonumber(now[1])
local key = KEYS[1] .. ':' .. math.floor(secs / 60)
local left = 60 - (secs % 60)
local rpm, tpm, mode, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if mode == 'tok' then
  redis.call('HINCRBY', key, 't', n)
  redis.call('EXPIRE', key, 120)
  return {0, left}
end
local counts = redis.call('HMGET', key, 'r', 't')
local r, t = tonumber(counts[1] or '0'), tonumber(counts[2] or '0')
if rpm > 0 and r >= rpm then return {1, left} end
if tpm > 0 and t >= tpm then return {2, left} end
redis.call('HINCRBY', key, 'r', 1)
redis.call('EXPIRE', key, 120)
return {0, left}
";

/// Longest a request waits for Redis before the quota counts as unavailable.
const REDIS_WAIT: Duration = Duration::from_millis(500);
/// Fewest milliseconds between two "Redis unreachable" warnings.
const WARN_EVERY_MS: u64 = 10_000;

/// Why a request was refused, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter {
    pub secs: u64,
    pub reason: Refusal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Requests,
    Tokens,
    /// Redis could not be asked and the quota fails closed.
    Unavailable,
}

impl RetryAfter {
    /// A spent quota (429), as opposed to an unknown one (503).
    pub fn is_over_quota(&self) -> bool {
        self.reason != Refusal::Unavailable
    }
}

pub struct Quota {
    conn: ConnectionManager,
    script: redis::Script,
    /// `<prefix>:quota:`.
    namespace: String,
    rpm: u64,
    tpm: u64,
    fail_open: bool,
    /// Milliseconds since the epoch of the last "unreachable" warning.
    last_warning: AtomicU64,
    /// Counts sent in the background (the rest of a dropped reply), waited for at shutdown.
    flushes: TaskTracker,
}

impl Quota {
    /// `None` when the config sets no quota. Redis is connected lazily, so an instance
    /// starts (and fails open or closed) while Redis is down.
    pub async fn connect(url: &str, prefix: &str, cfg: &GuardConfig) -> Option<Self> {
        if cfg.quota_rpm == 0 && cfg.quota_tpm == 0 {
            return None;
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_WAIT))
            .set_response_timeout(Some(REDIS_WAIT))
            .set_number_of_retries(1);
        let conn = match redis::Client::open(url)
            .and_then(|c| ConnectionManager::new_lazy_with_config(c, config))
        {
            Ok(c) => c,
            Err(e) => {
                // A malformed URL: the queue and cache on the same URL fail loudly first.
                tracing::error!(error = %e, "quota: bad Redis URL; quotas are off");
                return None;
            }
        };
        Some(Self {
            conn,
            script: redis::Script::new(SCRIPT),
            namespace: format!("{prefix}:quota:"),
            rpm: cfg.quota_rpm,
            tpm: cfg.quota_tpm,
            fail_open: cfg.quota_fail_open,
            last_warning: AtomicU64::new(0),
            flushes: TaskTracker::new(),
        })
    }

    /// The background counts still being sent; each ends within the Redis wait.
    pub fn tasks(&self) -> &TaskTracker {
        &self.flushes
    }

    fn key(&self, key_id: &str) -> String {
        // The braces are a Redis Cluster hash tag: every window of a key on one node.
        format!("{}{{{key_id}}}", self.namespace)
    }

    async fn run(&self, key_id: &str, mode: &str, n: u64) -> redis::RedisResult<(u8, u64)> {
        let mut conn = self.conn.clone();
        let mut call = self.script.key(self.key(key_id));
        call.arg(self.rpm).arg(self.tpm).arg(mode).arg(n);
        match tokio::time::timeout(REDIS_WAIT, call.invoke_async(&mut conn)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "quota: Redis did not answer in time",
            ))),
        }
    }

    fn warn_unreachable(&self, e: &redis::RedisError) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_warning.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                error = %e,
                fail_open = self.fail_open,
                "quota: Redis unreachable; {}",
                if self.fail_open {
                    "requests pass unchecked"
                } else {
                    "requests are refused"
                }
            );
        }
    }

    /// Counts one request of `key_id` (the key's id, as in `Principal::key_id`), or refuses
    /// it when the key's request or token quota for this minute is spent.
    pub async fn check_request(&self, key_id: &str) -> Result<(), RetryAfter> {
        match self.run(key_id, "req", 0).await {
            Ok((0, _)) => Ok(()),
            Ok((verdict, left)) => Err(RetryAfter {
                secs: left.max(1),
                reason: if verdict == 1 {
                    Refusal::Requests
                } else {
                    Refusal::Tokens
                },
            }),
            Err(e) => {
                self.warn_unreachable(&e);
                if self.fail_open {
                    Ok(())
                } else {
                    Err(RetryAfter {
                        secs: 1,
                        reason: Refusal::Unavailable,
                    })
                }
            }
        }
    }

    /// Counts streamed tokens of `key_id` (the key's id, as in `Principal::key_id`) against
    /// its tokens-per-minute quota; a key past it is refused from its next request on. A
    /// failure is logged (rate-limited) and the tokens go uncounted.
    pub async fn add_tokens(&self, key_id: &str, n: u64) {
        if self.tpm == 0 || n == 0 {
            return;
        }
        if let Err(e) = self.run(key_id, "tok", n).await {
            self.warn_unreachable(&e);
        }
    }
}

#[async_trait::async_trait]
impl TokenMeter for Quota {
    async fn add_tokens(&self, key_id: &str, n: u64) {
        Quota::add_tokens(self, key_id, n).await
    }

    fn add_tokens_later(self: Arc<Self>, key_id: String, n: u64) {
        if self.tpm == 0 || n == 0 {
            return;
        }
        let tracker = self.flushes.clone();
        tracker.spawn(async move { self.add_tokens(&key_id, n).await });
    }
}

/// The tokens one reply has streamed and its key has not been charged for yet. They are
/// counted a batch at a time as the reply streams, and whatever is left when the tally is
/// dropped — the reply completed, failed, was cancelled or lost its client — is counted
/// then, so every streamed token is charged.
pub struct Tally {
    meter: Arc<dyn TokenMeter>,
    key_id: String,
    unmetered: u64,
}

impl Tally {
    pub fn new(meter: Arc<dyn TokenMeter>, key_id: String) -> Self {
        Self {
            meter,
            key_id,
            unmetered: 0,
        }
    }

    /// One more token streamed: a full batch is counted before the reply goes on, so a
    /// runaway reply is stopped on time.
    pub async fn token(&mut self) {
        self.unmetered += 1;
        if self.unmetered >= METER_EVERY {
            self.flush().await;
        }
    }

    /// Counts what is left now, rather than in the background at drop.
    pub async fn flush(&mut self) {
        let n = self.unmetered;
        if n > 0 {
            self.meter.add_tokens(&self.key_id, n).await;
            // After the count: a reply dropped while it is sent still charges these at drop.
            self.unmetered -= n;
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if self.unmetered > 0 {
            self.meter
                .clone()
                .add_tokens_later(std::mem::take(&mut self.key_id), self.unmetered);
        }
    }
}
