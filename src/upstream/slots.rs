//! Provider slots: how many upstream calls a provider takes at once.
//!
//! A provider's limit belongs to its account, not to an instance: with Redis the slots are
//! shared by the cluster, so uneven hashing of sessions cannot leave one instance refusing
//! while the others idle. Each provider's holders are a sorted set scored by lease expiry
//! (Redis server time); one task per instance renews the leases of every slot it holds, so
//! the slots of a killed instance come back within [`LEASE`]. When Redis does not answer,
//! the instance's own semaphore applies, as without Redis: streams never wait on the bus.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a slot stays taken without renewal: what a killed instance costs.
pub const LEASE: Duration = Duration::from_secs(5);
/// Leases are renewed this often, several times per lease, so a slow round trip is no loss.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A Redis that takes longer is treated as away for this call.
const REDIS_WAIT: Duration = Duration::from_millis(500);
/// After a failure, calls go straight to the local semaphore this long.
const AWAY_FOR: Duration = Duration::from_secs(2);
/// The pauses between attempts to take a full shared slot.
const FIRST_POLL: Duration = Duration::from_millis(20);
const MAX_POLL: Duration = Duration::from_millis(250);
/// Releases waiting for the renewal task; past this, the lease frees the slot.
const RELEASES: usize = 4096;

/// Expired holders go, then a slot is taken if one is free. KEYS[1]: the set; ARGV: the
/// limit, the holder, the lease (ms). Returns 1 when taken.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
  return 1
end
return 0
";

/// Pushes back the leases of the holders in ARGV[2..] by ARGV[1] ms. A holder whose lease
/// lapsed while Redis was away is added back: its stream still runs.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return #ARGV - 1
";

/// One provider's limit: the local semaphore, and the cluster's when Redis is configured.
pub struct Slots {
    provider: String,
    local: Arc<Semaphore>,
    shared: Option<Arc<Shared>>,
    limit: usize,
    /// 1 while the cluster-wide limit applies, 0 while the local one stands in.
    mode: metrics::Gauge,
}

/// A slot held until the stream ends.
pub enum Permit {
    Local(#[allow(dead_code)] OwnedSemaphorePermit),
    Shared(SharedPermit),
}

impl Slots {
    pub fn local(provider: &str, limit: usize, mode: metrics::Gauge) -> Self {
        Self {
            provider: provider.to_owned(),
            local: Arc::new(Semaphore::new(limit)),
            shared: None,
            limit,
            mode,
        }
    }

    pub fn share(&mut self, shared: Arc<Shared>) {
        self.mode.set(1.0);
        self.shared = Some(shared);
    }

    /// A slot within `wait`, or `None` when the limit stayed full.
    pub async fn acquire(&self, wait: Duration) -> Option<Permit> {
        let deadline = Instant::now() + wait;
        if let Some(shared) = &self.shared {
            let mut pause = FIRST_POLL;
            while shared.is_up() {
                match shared.try_acquire(&self.provider, self.limit).await {
                    Ok(Some(p)) => {
                        self.mode.set(1.0);
                        return Some(Permit::Shared(p));
                    }
                    Ok(None) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return None;
                        }
                        tokio::time::sleep(pause.min(deadline - now)).await;
                        pause = (pause * 2).min(MAX_POLL);
                    }
                    Err(e) => {
                        self.mode.set(0.0);
                        shared.went_away(&e);
                    }
                }
            }
        }
        tokio::time::timeout_at(deadline, self.local.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .map(Permit::Local)
    }
}

/// The cluster-wide slots of every provider of this instance, and the task renewing them.
pub struct Shared {
    conn: ConnectionManager,
    acquire: redis::Script,
    /// `<prefix>:slots:` followed by the provider's name.
    namespace: String,
    server_id: String,
    next: AtomicU64,
    /// Held slots by holder id: their provider, for renewals.
    held: Mutex<HashMap<u64, String>>,
    releases: mpsc::Sender<(String, String)>,
    /// Until when Redis counts as away after a failure.
    away_until: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
}

/// Stops the renewal task when the server shuts down; dropping it does too.
pub struct Renewal {
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Renewal {
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Shared {
    /// Shared slots on the Redis at `url`; connects lazily, so a Redis away now only means
    /// the local limit applies until it answers.
    pub fn connect(
        url: &str,
        prefix: &str,
        server_id: &str,
    ) -> Result<(Arc<Self>, Renewal), redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_WAIT))
            .set_response_timeout(Some(REDIS_WAIT))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(redis::Client::open(url)?, config)?;
        let (tx, rx) = mpsc::channel(RELEASES);
        let shared = Arc::new(Self {
            conn,
            acquire: redis::Script::new(ACQUIRE),
            namespace: format!("{prefix}:slots:"),
            server_id: server_id.to_owned(),
            next: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            releases: tx,
            away_until: Mutex::new(None),
            last_warning: Mutex::new(None),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(renew(shared.clone(), rx, cancel.clone()));
        Ok((
            shared,
            Renewal {
                cancel,
                task: Some(task),
            },
        ))
    }

    fn is_up(&self) -> bool {
        let mut away = self.away_until.lock();
        match *away {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *away = None;
                true
            }
            None => true,
        }
    }

    fn went_away(&self, e: &redis::RedisError) {
        *self.away_until.lock() = Some(Instant::now() + AWAY_FOR);
        let mut last = self.last_warning.lock();
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            *last = Some(Instant::now());
            tracing::warn!(error = %e, "Redis unreachable: provider limits apply per instance until it answers");
        }
    }

    async fn try_acquire(
        self: &Arc<Self>,
        provider: &str,
        limit: usize,
    ) -> Result<Option<SharedPermit>, redis::RedisError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let holder = format!("{}:{id}", self.server_id);
        let key = format!("{}{provider}", self.namespace);
        let mut conn = self.conn.clone();
        let taken = tokio::time::timeout(
            REDIS_WAIT,
            self.acquire
                .key(&key)
                .arg(limit)
                .arg(&holder)
                .arg(LEASE.as_millis() as u64)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .unwrap_or_else(|_| Err(timed_out()));
        match taken {
            Ok(1) => {
                self.held.lock().insert(id, provider.to_owned());
                Ok(Some(SharedPermit {
                    shared: self.clone(),
                    id,
                    key,
                    holder,
                }))
            }
            other => {
                // The script may have run even though its answer was lost.
                if other.is_err() {
                    let _ = self.releases.try_send((key, holder));
                }
                other.map(|_| None)
            }
        }
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// A cluster-wide slot; released when dropped (or, if that cannot reach Redis, when its
/// lease runs out).
pub struct SharedPermit {
    shared: Arc<Shared>,
    id: u64,
    key: String,
    holder: String,
}

impl Drop for SharedPermit {
    fn drop(&mut self) {
        self.shared.held.lock().remove(&self.id);
        let _ = self.shared.releases.try_send((
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
        ));
    }
}

/// The one task that renews this instance's leases and sends its releases.
async fn renew(
    shared: Arc<Shared>,
    mut releases: mpsc::Receiver<(String, String)>,
    cancel: CancellationToken,
) {
    let script = redis::Script::new(RENEW);
    let mut ticks = tokio::time::interval(RENEW_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some((key, holder)) = releases.recv() => {
                let mut conn = shared.conn.clone();
                let _ = tokio::time::timeout(
                    REDIS_WAIT,
                    redis::cmd("ZREM").arg(&key).arg(&holder).query_async::<i64>(&mut conn),
                )
                .await;
            }
            _ = ticks.tick() => {
                let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
                for (id, provider) in shared.held.lock().iter() {
                    by_key
                        .entry(format!("{}{provider}", shared.namespace))
                        .or_default()
                        .push(format!("{}:{id}", shared.server_id));
                }
                for (key, holders) in by_key {
                    let mut conn = shared.conn.clone();
                    let mut call = script.key(&key);
                    call.arg(LEASE.as_millis() as u64);
                    for h in &holders {
                        call.arg(h);
                    }
                    let renewed =
                        tokio::time::timeout(REDIS_WAIT, call.invoke_async::<i64>(&mut conn)).await;
                    if !matches!(renewed, Ok(Ok(_))) {
                        tracing::debug!(key, "slot leases not renewed; retrying at the next tick");
                    }
                }
            }
        }
    }
    // Slots still held at shutdown are given back now rather than at their lease's end.
    while let Ok((key, holder)) = releases.try_recv() {
        let mut conn = shared.conn.clone();
        let _ = tokio::time::timeout(
            REDIS_WAIT,
            redis::cmd("ZREM")
                .arg(&key)
                .arg(&holder)
                .query_async::<i64>(&mut conn),
        )
        .await;
    }
}
