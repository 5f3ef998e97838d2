//! The cluster queue: a Redis Stream with one consumer group shared by every instance.
//!
//! Every instance's workers read from the group `workers` of the stream `<prefix>:tasks`, so
//! each entry goes to one worker. An entry stays in the group's pending list until it is
//! acknowledged; one left there longer than `reclaim_idle` (its worker or instance died) is
//! claimed by the next worker that asks. Delivery is therefore at least once: a worker must
//! look at the task's state in the store before running it.
//!
//! Acknowledged entries are deleted, so the stream holds only tasks waiting or in flight.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::time::Instant;

use super::{Delivery, QueueError, TaskQueue};

const GROUP: &str = "workers";
const TASK_FIELD: &str = "task";

/// A connection attempt to a Redis that is down or unreachable fails after this, so callers
/// get `Unavailable` in bounded time instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds every non-blocking command; generous because a busy Redis is not a dead one.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Few reconnect attempts per call: a worker asks again on its next loop anyway, and an HTTP
/// request pushing a task should fail fast rather than wait through a long backoff.
const RECONNECT_RETRIES: usize = 2;
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);
/// Slack over the BLOCK time before a blocking read is declared lost (a network stall).
const READ_GRACE: Duration = Duration::from_secs(2);
/// XAUTOCLAIM looks at up to 10 × COUNT pending entries per call; this many calls per pop
/// keeps a pop cheap while a cursor kept across pops still covers a long pending list.
const RECLAIM_ROUNDS: usize = 4;
/// A blocked read stops this often at least to look for reclaimable entries again.
const MIN_RECLAIM_CHECK: Duration = Duration::from_millis(50);
/// Idle blocking connections kept; above it, one is closed after use rather than kept, so a
/// caller inventing consumer names cannot grow the map without bound.
const MAX_IDLE_READERS: usize = 64;

pub struct RedisQueue {
    /// Opens the dedicated blocking-read connections.
    client: Client,
    /// Shared, auto-reconnecting connection for every command that does not block.
    manager: ConnectionManager,
    /// One connection per consumer for XREADGROUP BLOCK: a blocked command holds its
    /// connection until it returns, so it must not share one with other commands.
    readers: Mutex<HashMap<String, MultiplexedConnection>>,
    reader_config: AsyncConnectionConfig,
    stream: String,
    /// How long an entry stays with a consumer that does not acknowledge it before another
    /// consumer may take it over.
    reclaim_idle: Duration,
    reclaim_idle_ms: u64,
    /// Where the next XAUTOCLAIM scan of the pending list starts, so successive pops walk the
    /// whole list however long it is.
    reclaim_cursor: Mutex<String>,
}

impl RedisQueue {
    /// Connects and creates the group (XGROUP CREATE … MKSTREAM; BUSYGROUP is fine).
    ///
    /// Workers call `keep_alive` while they run a task; otherwise `reclaim_idle` would have to
    /// exceed the longest time a worker holds a task before acknowledging
    /// it: a task still running after that long is handed to another worker as well.
    pub async fn connect(
        url: &str,
        prefix: &str,
        reclaim_idle: Duration,
    ) -> Result<Self, QueueError> {
        let client = Client::open(url).map_err(unavailable)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let manager = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(unavailable)?;
        // The blocking read bounds itself by its BLOCK time plus `READ_GRACE`.
        let reader_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let queue = Self {
            client,
            manager,
            readers: Mutex::new(HashMap::new()),
            reader_config,
            stream: format!("{prefix}:tasks"),
            reclaim_idle,
            reclaim_idle_ms: u64::try_from(reclaim_idle.as_millis()).unwrap_or(u64::MAX),
            reclaim_cursor: Mutex::new("0-0".to_owned()),
        };
        queue.ensure_group().await?;
        Ok(queue)
    }

    /// Creates the group unless it exists. It starts at `0`, not `$`: entries pushed while the
    /// group did not exist (a Redis restarted without persistence, then a push) are still
    /// delivered.
    async fn ensure_group(&self) -> Result<(), QueueError> {
        let mut create = redis::cmd("XGROUP");
        create
            .arg("CREATE")
            .arg(&self.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.query::<()>(&create).await {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(unavailable(e)),
            _ => Ok(()),
        }
    }

    /// Takes over one entry that a consumer left unacknowledged for `reclaim_idle`.
    async fn reclaim(&self, consumer: &str) -> Result<Option<Delivery>, QueueError> {
        let mut cursor = self.reclaim_cursor.lock().clone();
        let mut found = None;
        for _ in 0..RECLAIM_ROUNDS {
            let reply: StreamAutoClaimReply = self
                .with_group(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&self.stream)
                        .arg(GROUP)
                        .arg(consumer)
                        .arg(self.reclaim_idle_ms)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            cursor = reply.next_stream_id;
            // Entries deleted meanwhile come back in `deleted_ids` (Redis 7) or as nil entries
            // the parser drops (Redis 6.2), never in `claimed`: nothing to do for them.
            if let Some(entry) = reply.claimed.into_iter().next() {
                found = self.delivery(entry).await?;
                if found.is_some() {
                    break;
                }
            }
            if cursor == "0-0" {
                break;
            }
        }
        *self.reclaim_cursor.lock() = cursor;
        if let Some(delivery) = &found {
            tracing::info!(
                task_id = %delivery.task_id,
                entry = %delivery.receipt,
                consumer,
                "reclaimed a task its consumer left unacknowledged"
            );
        }
        Ok(found)
    }

    /// Reads one new entry, blocking up to `block`.
    async fn read_new(
        &self,
        consumer: &str,
        block: Duration,
    ) -> Result<Option<Delivery>, QueueError> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1);
        let block_ms = u64::try_from(block.as_millis()).unwrap_or(u64::MAX);
        // BLOCK 0 would wait forever; below a millisecond, just look.
        if block_ms > 0 {
            read.arg("BLOCK").arg(block_ms);
        }
        read.arg("STREAMS").arg(&self.stream).arg(">");

        let mut reply = self.blocking_read(consumer, &read, block).await;
        if matches!(&reply, Err(e) if e.code() == Some("NOGROUP")) {
            self.ensure_group().await?;
            reply = self.blocking_read(consumer, &read, block).await;
        }
        let entry = reply
            .map_err(unavailable)?
            .and_then(|r| r.keys.into_iter().next())
            .and_then(|k| k.ids.into_iter().next());
        match entry {
            Some(entry) => self.delivery(entry).await,
            None => Ok(None),
        }
    }

    /// Runs `read` on the consumer's own connection, opening one if it has none.
    async fn blocking_read(
        &self,
        consumer: &str,
        read: &redis::Cmd,
        block: Duration,
    ) -> Result<Option<StreamReadReply>, RedisError> {
        let held = self.readers.lock().remove(consumer);
        if let Some(conn) = held {
            match self.read_on(consumer, conn, read, block).await {
                // A kept connection may have died while idle (Redis restarted): one retry on a
                // fresh one. Harmless even if the read did reach Redis: an entry whose reply
                // was lost stays pending and is reclaimed.
                Err(e) if e.is_connection_dropped() => {}
                other => return other,
            }
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.reader_config)
            .await?;
        self.read_on(consumer, conn, read, block).await
    }

    async fn read_on(
        &self,
        consumer: &str,
        mut conn: MultiplexedConnection,
        read: &redis::Cmd,
        block: Duration,
    ) -> Result<Option<StreamReadReply>, RedisError> {
        let reply =
            match tokio::time::timeout(block + READ_GRACE, read.query_async(&mut conn)).await {
                Ok(reply) => reply,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "blocking read got no answer",
                ))),
            };
        // A connection that failed or timed out may be broken or still owe a reply: dropped,
        // and the next read opens a fresh one (that is the reconnect).
        if reply.is_ok() {
            let mut readers = self.readers.lock();
            if readers.len() < MAX_IDLE_READERS {
                readers.entry(consumer.to_owned()).or_insert(conn);
            }
        }
        reply
    }

    /// Runs a group command on the shared connection, recreating the group once if it is gone
    /// (Redis restarted without persistence, or the stream was deleted).
    async fn with_group<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, QueueError> {
        match self.query(cmd).await {
            Err(e) if e.code() == Some("NOGROUP") => {
                self.ensure_group().await?;
                self.query(cmd).await.map_err(unavailable)
            }
            other => other.map_err(unavailable),
        }
    }

    /// Runs a command on the shared connection. A refused connection means the command was
    /// never sent and the manager has just started reconnecting, so one retry, which waits for
    /// that reconnection, is safe and makes the first call after Redis came back succeed.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let mut conn = self.manager.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if e.is_connection_refusal() => cmd.query_async(&mut conn).await,
            other => other,
        }
    }

    /// The delivery for a stream entry; an entry without a task id (not written by `push`) can
    /// never be run, so it is removed instead of being handed out again and again.
    async fn delivery(&self, entry: StreamId) -> Result<Option<Delivery>, QueueError> {
        let receipt = entry.id.clone();
        match entry.get::<String>(TASK_FIELD) {
            Some(task_id) => Ok(Some(Delivery { task_id, receipt })),
            None => {
                tracing::warn!(
                    stream = %self.stream,
                    entry = %receipt,
                    "dropping a queue entry without a task id"
                );
                self.ack_entry(&receipt).await?;
                Ok(None)
            }
        }
    }

    async fn ack_entry(&self, entry_id: &str) -> Result<(), QueueError> {
        // One transaction: an entry acked but not deleted would linger in `depth` forever.
        let mut ack = redis::pipe();
        ack.atomic()
            .cmd("XACK")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(entry_id)
            .ignore()
            .cmd("XDEL")
            .arg(&self.stream)
            .arg(entry_id)
            .ignore();
        let mut conn = self.manager.clone();
        // Retried on refusal for the same reason as `query`.
        match ack.exec_async(&mut conn).await {
            Err(e) if e.is_connection_refusal() => ack.exec_async(&mut conn).await,
            other => other,
        }
        .map_err(unavailable)
    }
}

#[async_trait]
impl TaskQueue for RedisQueue {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn push(&self, task_id: &str) -> Result<(), QueueError> {
        // Never MAXLEN: trimming would drop tasks nobody acknowledged yet.
        let mut add = redis::cmd("XADD");
        add.arg(&self.stream).arg("*").arg(TASK_FIELD).arg(task_id);
        self.query::<String>(&add)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn pop(&self, consumer: &str, wait: Duration) -> Result<Option<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        // A long wait is cut into slices so an entry that becomes reclaimable meanwhile is
        // taken over while this consumer waits, not only at its next pop.
        let slice = (self.reclaim_idle / 2).max(MIN_RECLAIM_CHECK);
        loop {
            if let Some(delivery) = self.reclaim(consumer).await? {
                return Ok(Some(delivery));
            }
            let block = deadline
                .saturating_duration_since(Instant::now())
                .min(slice);
            if let Some(delivery) = self.read_new(consumer, block).await? {
                return Ok(Some(delivery));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.ack_entry(&delivery.receipt).await
    }

    /// `XCLAIM … 0 <id> JUSTID` by the holder resets the entry's idle time, so a task that
    /// runs longer than the reclaim time is not handed to a second worker.
    async fn keep_alive(&self, delivery: &Delivery, consumer: &str) -> Result<(), QueueError> {
        let mut claim = redis::cmd("XCLAIM");
        claim
            .arg(&self.stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(&delivery.receipt)
            .arg("JUSTID");
        let _: Vec<String> = self.query(&claim).await.map_err(unavailable)?;
        Ok(())
    }

    /// XLEN: acknowledged entries are deleted, so this counts tasks waiting plus tasks in
    /// flight (delivered, not yet acknowledged), not only the waiting ones.
    fn reclaim_after(&self) -> Option<Duration> {
        Some(self.reclaim_idle)
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let mut len = redis::cmd("XLEN");
        len.arg(&self.stream);
        self.query(&len).await.map_err(unavailable)
    }
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No client or URL: it may carry a password.
        f.debug_struct("RedisQueue")
            .field("stream", &self.stream)
            .field("reclaim_idle", &self.reclaim_idle)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}
