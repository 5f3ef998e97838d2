//! The Redis bus: pub/sub for live events, one Stream per generation as the replay log, and
//! a sorted set of leases so a generation whose instance died is ended.
//!
//! Keys, all under `<prefix>:`:
//! - `gen:<generation>` — Stream; entry id `<seq>-1`, fields `k` (event kind) and `d` (JSON
//!   data). Explicit ids make every write idempotent-checkable and order by sequence;
//!   `MAXLEN ~ SLUICE_REPLAY_MAX_EVENTS`, expiry `SLUICE_REPLAY_TTL`.
//! - `gm:<generation>` — hash: `s` session, `o` owning user, `m` message, `i` instance,
//!   `a` start time (unix ms).
//! - `cur:<session>` — the session's latest generation, so a new watcher finds it.
//! - `live` — sorted set of running generations scored by lease expiry (unix ms).
//! - channel `ch:<session>` — batches of events of the session's generations.
//!
//! Each instance holds one subscriber connection, subscribed to the sessions it has
//! watchers for, and one multiplexed connection for everything else; never one per client.
//! Events are copied into the local hub, which fans them out; subscribers there dedup and
//! order by sequence number, and fill any gap from the Stream, so a watcher on any
//! instance reads exactly the same events.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use futures::StreamExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, Client, RedisError, Value};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Bus, BusStatus, Follow};
use crate::hub::{Applied, Channel, End, Event, EventKind, Hub};
use crate::store::{MessageStatus, MessageUpdate, Store};

/// How long a generation's owner may go silent before it is presumed dead.
const LEASE: Duration = Duration::from_secs(3);
/// Leases are renewed, and expired ones looked for, this often.
const BEAT: Duration = Duration::from_secs(1);
/// A published message carries events up to about this size; a bigger event goes by
/// reference (subscribers read it from the Stream), so pub/sub never carries a huge one.
const MAX_MESSAGE: usize = 16 * 1024;
/// Entries read per XRANGE call.
const PAGE: usize = 1000;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Sessions nobody watches any more are unsubscribed this often.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

pub struct RedisBus {
    inner: Arc<Inner>,
    /// The subscriber loop and the lease keeper.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

pub struct Settings {
    pub url: String,
    pub prefix: String,
    pub server_id: String,
    pub replay_ttl: Duration,
    pub replay_max_events: usize,
}

struct Inner {
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    server_id: String,
    ttl_secs: u64,
    max_events: usize,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    /// Watchers per followed session.
    interest: DashMap<String, usize>,
    /// The live subscriber connection's command side; `None` while reconnecting.
    sink: Mutex<Option<PubSubSink>>,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Generations exported from here, whose leases this instance renews, with their
    /// sessions.
    exporting: DashMap<String, String>,
    /// Fired when the drain window is over: an export that cannot reach Redis gives up.
    stop: CancellationToken,
}

enum Written {
    All,
    /// The generation's Stream was gone: nothing of this batch was written.
    LogLost,
}

/// A published batch of one generation's events.
#[derive(Serialize, Deserialize)]
struct Wire {
    /// Generation, session, owning user, instance.
    g: String,
    s: String,
    o: String,
    i: String,
    /// `(seq, kind, data)`.
    #[serde(default)]
    e: Vec<(u64, String, String)>,
    /// Set instead of `e` for an event too big to publish: read up to this sequence from
    /// the Stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upto: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl RedisBus {
    pub async fn connect(
        settings: Settings,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        stop: CancellationToken,
    ) -> Result<Self, RedisError> {
        let client = Client::open(settings.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = client.get_connection_manager_with_config(config).await?;
        let inner = Arc::new(Inner {
            client,
            conn,
            prefix: settings.prefix,
            server_id: settings.server_id,
            ttl_secs: settings.replay_ttl.as_secs().max(1),
            max_events: settings.replay_max_events.max(16),
            hub,
            store,
            interest: DashMap::new(),
            sink: Mutex::new(None),
            connected: AtomicBool::new(false),
            last_error: Mutex::new(Some("connecting".into())),
            exporting: DashMap::new(),
            stop,
        });
        let bus = Self {
            inner,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        };
        bus.tasks
            .spawn(subscriber(bus.inner.clone(), bus.cancel.clone()));
        bus.tasks
            .spawn(leases(bus.inner.clone(), bus.cancel.clone()));
        Ok(bus)
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn export(&self, channel: Arc<Channel>) -> BoxFuture<'static, ()> {
        Box::pin(export(self.inner.clone(), channel))
    }

    async fn follow(&self, session_id: &str) -> Follow {
        let inner = &self.inner;
        let first = {
            let mut n = inner.interest.entry(session_id.to_owned()).or_insert(0);
            *n += 1;
            *n == 1
        };
        let guard = Box::new(Interest {
            inner: inner.clone(),
            session_id: session_id.to_owned(),
        });
        // Subscribe before reading the Stream: whatever is published meanwhile arrives
        // twice at worst, and copies drop what they hold already.
        let sink = inner.sink.lock().clone();
        if let (true, Some(mut sink)) = (first, sink) {
            let channel = inner.key("ch", session_id);
            if let Err(e) = timeout(sink.subscribe(channel)).await {
                tracing::warn!(error = %e, "cannot subscribe; the next reconnect will");
            }
        }
        inner.load_current(session_id).await;
        guard
    }

    async fn fetch(&self, generation_id: &str) -> Option<Arc<Channel>> {
        if let Some(ch) = self.inner.hub.get(generation_id) {
            return Some(ch);
        }
        self.inner.load(generation_id, None).await
    }

    async fn last_kind(&self, generation_id: &str) -> Option<EventKind> {
        self.inner
            .last_entry(generation_id)
            .await
            .ok()
            .flatten()
            .map(|(_, kind)| kind)
    }

    async fn running(&self) -> Option<Vec<super::Running>> {
        let inner = &self.inner;
        // Every running generation holds a lease in `live`, and its meta names its instance.
        let live: Vec<String> = match timeout(
            redis::cmd("ZRANGE")
                .arg(inner.key("live", ""))
                .arg(0)
                .arg(-1)
                .query_async(&mut inner.conn.clone()),
        )
        .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the cluster's generations");
                return None;
            }
        };
        if live.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        for g in &live {
            pipe.hgetall(inner.key("gm", g));
        }
        let metas: Vec<HashMap<String, String>> =
            match timeout(pipe.query_async(&mut inner.conn.clone())).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the cluster's generations");
                    return None;
                }
            };
        Some(
            live.into_iter()
                .zip(metas)
                .filter_map(|(g, mut m)| {
                    Some(super::Running {
                        generation_id: g,
                        session_id: m.remove("s")?,
                        owner: m.remove("o").unwrap_or_default(),
                        instance: m.remove("i").unwrap_or_default(),
                        started_at: m.get("a").and_then(|a| a.parse().ok()),
                    })
                })
                .collect(),
        )
    }

    fn status(&self) -> BusStatus {
        let ok = self.inner.connected.load(Ordering::Relaxed);
        BusStatus {
            backend: "redis",
            ok,
            error: if ok {
                None
            } else {
                self.inner.last_error.lock().clone()
            },
        }
    }

    async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A session's watcher count, decremented on drop; the subscriber loop unsubscribes
/// sessions left with none.
struct Interest {
    inner: Arc<Inner>,
    session_id: String,
}

impl Drop for Interest {
    fn drop(&mut self) {
        if let Some(mut n) = self.inner.interest.get_mut(&self.session_id) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn timeout<T>(f: impl Future<Output = Result<T, RedisError>>) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("Redis did not answer in time".into()),
    }
}

/// Waits `d`, or less if `cancel` fires; false when it fired.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Writes a channel's events to the Stream and publishes them, in order, until its final
/// event is out. It reads the channel like any subscriber, so a Redis outage costs no
/// memory beyond the channel's own log: the export catches up when Redis is back.
async fn export(inner: Arc<Inner>, channel: Arc<Channel>) {
    let gid = channel.generation_id.clone();
    inner
        .exporting
        .insert(gid.clone(), channel.session_id.clone());
    let mut sub = channel.subscribe(None);
    let mut batch: Vec<Event> = Vec::with_capacity(64);
    let mut first = true;
    'batches: loop {
        match sub.next_batch(&mut batch).await {
            Ok(()) => {}
            Err(End::Finished) => break,
            Err(End::Lagged) => {
                tracing::error!(generation_id = %gid, "Redis was away longer than the replay log reaches; other instances miss events of this generation");
                break;
            }
        }
        let mut backoff = BACKOFF_START;
        let mut tries_after_stop = 0;
        loop {
            match inner.write(&channel, &batch, first).await {
                Ok(Written::All) => break,
                Ok(Written::LogLost) => {
                    // Redis restarted without its data: write the whole log again, so
                    // replay and late watchers still get every event.
                    tracing::warn!(generation_id = %gid, "replay log lost by Redis; exporting again from the start");
                    sub = channel.subscribe(None);
                    first = true;
                    continue 'batches;
                }
                Err(e) => {
                    tracing::warn!(generation_id = %gid, error = %e, "cannot export events; retrying");
                    if inner.stop.is_cancelled() {
                        tries_after_stop += 1;
                        if tries_after_stop > 3 {
                            break 'batches;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    // Part of the batch may have landed: write only what did not.
                    match inner.last_entry(&gid).await {
                        Ok(Some((_, kind))) if kind.is_final() => {
                            // Ended elsewhere (presumed dead while Redis was away).
                            break 'batches;
                        }
                        Ok(Some((seq, _))) => batch.retain(|e| e.seq > seq),
                        Ok(None) | Err(_) => {}
                    }
                    if batch.is_empty() {
                        break;
                    }
                }
            }
        }
        first = false;
    }
    inner.exporting.remove(&gid);
    let _: Result<(), _> = timeout(inner.conn.clone().zrem(inner.key("live", ""), &gid)).await;
}

impl Inner {
    fn key(&self, kind: &str, id: &str) -> String {
        if id.is_empty() {
            format!("{}:{kind}", self.prefix)
        } else {
            format!("{}:{kind}:{id}", self.prefix)
        }
    }

    /// One round trip: the events into the Stream, then published; the first batch also
    /// records the generation (meta, the session's latest, the lease). Later batches add
    /// to the Stream only if it exists (`NOMKSTREAM`): a missing one means Redis lost it.
    async fn write(&self, ch: &Channel, events: &[Event], first: bool) -> Result<Written, String> {
        let gid = &ch.generation_id;
        let stream = self.key("gen", gid);
        let mut pipe = redis::pipe();
        if first {
            let message = events
                .iter()
                .find(|e| e.kind == EventKind::Start)
                .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.data()).ok())
                .and_then(|v| v["message_id"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let meta = self.key("gm", gid);
            let started = now_ms().to_string();
            pipe.hset_multiple(
                &meta,
                &[
                    ("s", ch.session_id.as_str()),
                    ("o", ch.owner.as_str()),
                    ("m", message.as_str()),
                    ("i", self.server_id.as_str()),
                    ("a", started.as_str()),
                ],
            )
            .ignore()
            .expire(&meta, self.ttl_secs as i64)
            .ignore()
            .set_ex(self.key("cur", &ch.session_id), gid, self.ttl_secs)
            .ignore()
            .zadd(
                self.key("live", ""),
                gid,
                now_ms() + LEASE.as_millis() as u64,
            )
            .ignore();
        }
        let mut finished = false;
        for e in events {
            let xadd = pipe.cmd("XADD").arg(&stream);
            if !first {
                xadd.arg("NOMKSTREAM");
            }
            xadd.arg("MAXLEN")
                .arg("~")
                .arg(self.max_events)
                .arg(format!("{}-1", e.seq))
                .arg("k")
                .arg(e.kind.as_str())
                .arg("d")
                .arg(&e.data()[..]);
            finished |= e.kind.is_final();
        }
        pipe.expire(&stream, self.ttl_secs as i64).ignore();
        if finished {
            pipe.zrem(self.key("live", ""), gid).ignore();
        }
        for msg in messages(&self.server_id, ch, events) {
            pipe.publish(self.key("ch", &ch.session_id), msg).ignore();
        }
        // Only the XADDs answer: each with its id, or nil when the Stream was missing.
        let ids: Vec<Value> = timeout(pipe.query_async(&mut self.conn.clone())).await?;
        Ok(if ids.iter().any(|v| matches!(v, Value::Nil)) {
            Written::LogLost
        } else {
            Written::All
        })
    }

    /// The last entry of a generation's Stream: its sequence and kind.
    async fn last_entry(&self, gid: &str) -> Result<Option<(u64, EventKind)>, String> {
        let reply: StreamRangeReply = timeout(
            redis::cmd("XREVRANGE")
                .arg(self.key("gen", gid))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut self.conn.clone()),
        )
        .await?;
        Ok(reply.ids.first().and_then(|id| {
            let (seq, kind, _) = entry(id)?;
            Some((seq, kind))
        }))
    }

    /// Entries from sequence `from` on, up to `upto` when given.
    async fn range(
        &self,
        gid: &str,
        from: u64,
        upto: Option<u64>,
    ) -> Result<Vec<(u64, EventKind, Vec<u8>)>, String> {
        let key = self.key("gen", gid);
        let mut out = Vec::new();
        let mut start = format!("{from}-1");
        loop {
            let reply: StreamRangeReply = timeout(
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg(upto.map_or("+".to_owned(), |u| format!("{u}-1")))
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
            let n = reply.ids.len();
            let mut last = None;
            for id in &reply.ids {
                if let Some(e) = entry(id) {
                    last = Some(e.0);
                    out.push(e);
                }
            }
            match last {
                Some(seq) if n == PAGE => start = format!("{}-1", seq + 1),
                _ => return Ok(out),
            }
        }
    }

    /// Makes the local copy of a generation from its replay log. `meta` is `(session,
    /// owner)` when already known.
    async fn load(&self, gid: &str, meta: Option<(&str, &str)>) -> Option<Arc<Channel>> {
        let (session, owner) = match meta {
            Some((s, o)) => (s.to_owned(), o.to_owned()),
            None => {
                let m: HashMap<String, String> =
                    timeout(self.conn.clone().hgetall(self.key("gm", gid)))
                        .await
                        .ok()?;
                (m.get("s")?.clone(), m.get("o")?.clone())
            }
        };
        let events = match self.range(gid, 0, None).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(generation_id = %gid, error = %e, "cannot read the replay log");
                return None;
            }
        };
        let first = events.first().map_or(0, |e| e.0);
        let ch = self.hub.mirror(gid, &session, &owner, first);
        if ch.remote {
            for (seq, kind, data) in events {
                ch.apply(seq, kind, &data);
            }
        }
        Some(ch)
    }

    /// Reads what a copy misses from the Stream.
    async fn fill(&self, ch: &Channel, upto: Option<u64>) {
        match self.range(&ch.generation_id, ch.next_seq(), upto).await {
            Ok(events) => {
                for (seq, kind, data) in events {
                    ch.apply(seq, kind, &data);
                }
            }
            Err(e) => {
                tracing::warn!(generation_id = %ch.generation_id, error = %e, "cannot fill a gap from the replay log")
            }
        }
    }

    async fn on_message(&self, payload: &[u8]) {
        let Ok(w) = serde_json::from_slice::<Wire>(payload) else {
            tracing::warn!("unreadable bus message ignored");
            return;
        };
        if w.i == self.server_id {
            return;
        }
        let ch = match self.hub.get(&w.g) {
            Some(ch) => ch,
            None => match self.load(&w.g, Some((&w.s, &w.o))).await {
                Some(ch) => ch,
                None => return,
            },
        };
        if !ch.remote {
            return;
        }
        if let Some(upto) = w.upto {
            self.fill(&ch, Some(upto)).await;
        }
        for (seq, kind, data) in &w.e {
            let Some(kind) = EventKind::parse(kind) else {
                continue;
            };
            if let Applied::Gap { .. } = ch.apply(*seq, kind, data.as_bytes()) {
                self.fill(&ch, Some(*seq)).await;
                ch.apply(*seq, kind, data.as_bytes());
            }
        }
    }

    /// After a reconnect: whatever was published while the subscription was down is read
    /// from the Streams, and generations started meanwhile are found.
    async fn resync(&self) {
        for ch in self.hub.channels() {
            if ch.remote && !ch.is_finished() {
                self.fill(&ch, None).await;
            }
        }
        let sessions: Vec<String> = self
            .interest
            .iter()
            .filter(|e| *e.value() > 0)
            .map(|e| e.key().clone())
            .collect();
        for s in sessions {
            self.load_current(&s).await;
        }
    }

    /// Copies the session's latest generation into the hub unless it is there already.
    async fn load_current(&self, session_id: &str) {
        let current: Result<Option<String>, _> =
            timeout(self.conn.clone().get(self.key("cur", session_id))).await;
        if let Ok(Some(generation)) = current {
            if self.hub.get(&generation).is_none() {
                self.load(&generation, None).await;
            }
        }
    }

    fn set_down(&self, error: String) {
        if self.connected.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %error, "lost the Redis bus; reconnecting");
        }
        *self.last_error.lock() = Some(error);
    }

    /// Unsubscribes sessions nobody here watches any more, and forgets their unfinished
    /// copies, which nothing would end.
    async fn prune(&self, sink: &mut PubSubSink) {
        let idle: Vec<String> = self
            .interest
            .iter()
            .filter(|e| *e.value() == 0)
            .map(|e| e.key().clone())
            .collect();
        for s in idle {
            if self.interest.remove_if(&s, |_, n| *n == 0).is_some() {
                let _ = timeout(sink.unsubscribe(self.key("ch", &s))).await;
                self.hub.drop_mirrors(&s);
            }
        }
    }

    /// Ends a generation whose instance stopped renewing its lease: `interrupted` goes to
    /// the replay log and to watchers, and the reply is stored with the text it had.
    async fn end_orphan(&self, gid: &str) -> Result<(), String> {
        let meta: HashMap<String, String> =
            timeout(self.conn.clone().hgetall(self.key("gm", gid))).await?;
        let (Some(session), Some(owner)) = (meta.get("s"), meta.get("o")) else {
            return Ok(());
        };
        let events = self.range(gid, 0, None).await?;
        let Some(&(last, last_kind, _)) = events.last() else {
            return Ok(());
        };
        if last_kind.is_final() {
            return Ok(());
        }
        let joined = |kind: EventKind| -> String {
            events
                .iter()
                .filter(|(_, k, _)| *k == kind)
                .filter_map(|(_, _, d)| serde_json::from_slice::<serde_json::Value>(d).ok())
                .filter_map(|v| v["text"].as_str().map(str::to_owned))
                .collect()
        };
        let text = joined(EventKind::Token);
        let reasoning = Some(joined(EventKind::Reasoning)).filter(|r| !r.is_empty());
        let seq = last + 1;
        let data = serde_json::json!({
            "reason": "instance_lost",
            "message": "the instance running this generation stopped",
        })
        .to_string();
        let wire = Wire {
            g: gid.to_owned(),
            s: session.clone(),
            o: owner.clone(),
            i: self.server_id.clone(),
            e: vec![(seq, "interrupted".into(), data.clone())],
            upto: None,
        };
        // The Stream's next id is the claim: an XADD refused because the owner wrote after
        // all means it is alive, and everything stops here.
        let mut append = redis::cmd("XADD");
        append
            .arg(self.key("gen", gid))
            .arg(format!("{seq}-1"))
            .arg("k")
            .arg("interrupted")
            .arg("d")
            .arg(&data);
        timeout(append.query_async::<String>(&mut self.conn.clone())).await?;
        // Stored before watchers hear of it, as the owner would: a client that reads the
        // history on `interrupted` sees the final state.
        if let Some(message) = meta.get("m").filter(|m| !m.is_empty()) {
            let still_streaming = self
                .store
                .list_messages(session)
                .await
                .map(|ms| {
                    ms.iter()
                        .any(|m| &m.id == message && m.status == MessageStatus::Streaming)
                })
                .unwrap_or(false);
            if still_streaming {
                let update = MessageUpdate {
                    content: text,
                    reasoning,
                    status: MessageStatus::Interrupted,
                    prompt_tokens: None,
                    completion_tokens: None,
                    error: Some("the instance running this generation stopped".into()),
                };
                if let Err(e) = self
                    .store
                    .update_message(message, &update, crate::store::now_millis())
                    .await
                {
                    tracing::error!(generation_id = %gid, error = %e, "cannot store the lost generation's reply");
                }
            }
        }
        // The session is free as soon as watchers hear `interrupted`: a Retry then starts
        // at once instead of waiting for the hold to lapse.
        if let Err(e) = self.store.release_generation(session, gid).await {
            tracing::warn!(generation_id = %gid, error = %e, "cannot free the lost generation's session");
        }
        let published = timeout(self.conn.clone().publish::<_, _, i64>(
            self.key("ch", session),
            serde_json::to_string(&wire).unwrap_or_default(),
        ))
        .await;
        if let Some(ch) = self.hub.get(gid).filter(|c| c.remote) {
            ch.apply(seq, EventKind::Interrupted, data.as_bytes());
        }
        // Watchers that missed the message find the event in the Stream on their resync.
        published?;
        tracing::warn!(generation_id = %gid, "generation of a lost instance ended as interrupted");
        Ok(())
    }
}

/// Splits a batch into published messages of at most about [`MAX_MESSAGE`] bytes; an
/// event bigger than that goes as a reference to the Stream.
fn messages(server_id: &str, ch: &Channel, events: &[Event]) -> Vec<String> {
    let wire = |e: Vec<(u64, String, String)>, upto: Option<u64>| Wire {
        g: ch.generation_id.clone(),
        s: ch.session_id.clone(),
        o: ch.owner.clone(),
        i: server_id.to_owned(),
        e,
        upto,
    };
    let mut out = Vec::new();
    let mut part = Vec::new();
    let mut size = 0;
    let flush = |part: &mut Vec<(u64, String, String)>, out: &mut Vec<String>| {
        if !part.is_empty() {
            out.extend(serde_json::to_string(&wire(std::mem::take(part), None)).ok());
        }
    };
    for e in events {
        let data = e.data();
        if data.len() > MAX_MESSAGE {
            flush(&mut part, &mut out);
            size = 0;
            out.extend(serde_json::to_string(&wire(Vec::new(), Some(e.seq))).ok());
            continue;
        }
        if size + data.len() > MAX_MESSAGE {
            flush(&mut part, &mut out);
            size = 0;
        }
        size += data.len() + 32;
        part.push((
            e.seq,
            e.kind.as_str().to_owned(),
            String::from_utf8_lossy(&data).into_owned(),
        ));
    }
    flush(&mut part, &mut out);
    out
}

/// `(seq, kind, data)` of a Stream entry with id `<seq>-1`.
fn entry(id: &redis::streams::StreamId) -> Option<(u64, EventKind, Vec<u8>)> {
    let seq = id.id.split_once('-')?.0.parse().ok()?;
    let field = |name: &str| match id.map.get(name)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let kind = EventKind::parse(std::str::from_utf8(&field("k")?).ok()?)?;
    Some((seq, kind, field("d")?))
}

/// The one subscriber connection: (re)connects with capped exponential backoff,
/// re-subscribes every followed session, catches up from the Streams, then copies
/// published events into the hub.
async fn subscriber(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_START;
    while !cancel.is_cancelled() {
        let (mut sink, mut messages) = match subscribe_all(&inner).await {
            Ok(pair) => pair,
            Err(e) => {
                inner.set_down(e);
                if !pause(backoff, &cancel).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        inner.resync().await;
        inner.connected.store(true, Ordering::Relaxed);
        *inner.last_error.lock() = None;
        tracing::info!("Redis bus connected");
        backoff = BACKOFF_START;
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = messages.next() => match msg {
                    Some(m) => inner.on_message(m.get_payload_bytes()).await,
                    None => break,
                },
                _ = prune.tick() => inner.prune(&mut sink).await,
            }
        }
        *inner.sink.lock() = None;
        inner.set_down("subscriber connection closed".into());
    }
}

/// Opens the subscriber connection, subscribes every followed session and publishes the
/// sink for `follow` to add more.
async fn subscribe_all(inner: &Inner) -> Result<(PubSubSink, PubSubStream), String> {
    let pubsub = match tokio::time::timeout(CONNECT_TIMEOUT, inner.client.get_async_pubsub()).await
    {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => return Err("Redis did not answer in time".into()),
    };
    let (mut sink, messages) = pubsub.split();
    let followed = |inner: &Inner| -> Vec<String> {
        inner
            .interest
            .iter()
            .map(|e| inner.key("ch", e.key()))
            .collect()
    };
    let channels = followed(inner);
    if !channels.is_empty() {
        timeout(sink.subscribe(&channels)).await?;
    }
    *inner.sink.lock() = Some(sink.clone());
    // A session may have been followed between the snapshot above and the sink being
    // published; subscribing twice is harmless.
    let late: Vec<String> = followed(inner)
        .into_iter()
        .filter(|c| !channels.contains(c))
        .collect();
    if !late.is_empty() {
        let _ = timeout(sink.subscribe(&late)).await;
    }
    Ok((sink, messages))
}

/// Renews the leases of generations running here, and ends those of lost instances.
async fn leases(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = beat.tick() => {}
        }
        let live = inner.key("live", "");
        let mine: Vec<String> = inner.exporting.iter().map(|e| e.key().clone()).collect();
        if !mine.is_empty() {
            let expiry = now_ms() + LEASE.as_millis() as u64;
            let mut pipe = redis::pipe();
            for g in &mine {
                // XX: a lease already taken as lost is not revived.
                pipe.cmd("ZADD")
                    .arg(&live)
                    .arg("XX")
                    .arg(expiry)
                    .arg(g)
                    .ignore();
            }
            if let Err(e) = timeout(pipe.query_async::<()>(&mut inner.conn.clone())).await {
                tracing::warn!(error = %e, "cannot renew generation leases");
            }
        }
        let expired: Result<Vec<String>, _> = timeout(
            redis::cmd("ZRANGEBYSCORE")
                .arg(&live)
                .arg("-inf")
                .arg(now_ms())
                .arg("LIMIT")
                .arg(0)
                .arg(20)
                .query_async(&mut inner.conn.clone()),
        )
        .await;
        for g in expired.unwrap_or_default() {
            // ZREM decides which instance ends it.
            let won: Result<i64, _> = timeout(inner.conn.clone().zrem(&live, &g)).await;
            if won == Ok(1) {
                if let Err(e) = inner.end_orphan(&g).await {
                    tracing::warn!(generation_id = %g, error = %e, "cannot end a lost generation");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_batches_and_big_events_are_never_one_huge_message() {
        let hub = Hub::new(10_000, Duration::from_secs(60));
        let ch = hub.create("g", "s", "u");
        let small = serde_json::json!({"text": "x".repeat(100)});
        for _ in 0..500 {
            ch.publish_json(EventKind::Token, &small);
        }
        let huge = serde_json::json!({"text": "y".repeat(100_000)});
        ch.publish_json(EventKind::Token, &huge);
        ch.publish_json(EventKind::Done, &serde_json::json!({}));
        let mut sub = ch.subscribe(None);
        let mut events = Vec::new();
        let mut batch = Vec::new();
        while sub.now_batch(&mut batch) {
            events.append(&mut batch);
        }
        assert_eq!(events.len(), 502);

        let out = messages("i", &ch, &events);
        assert!(out.len() > 3);
        assert!(
            out.iter().all(|m| m.len() < 2 * MAX_MESSAGE),
            "a message too big"
        );
        let wires: Vec<Wire> = out
            .iter()
            .map(|m| serde_json::from_str(m).unwrap())
            .collect();
        // Every event once, in order; the huge one by reference.
        let mut seqs = Vec::new();
        for w in &wires {
            if let Some(upto) = w.upto {
                assert!(w.e.is_empty());
                seqs.push(upto);
            }
            seqs.extend(w.e.iter().map(|e| e.0));
        }
        assert_eq!(seqs, (0..502).collect::<Vec<u64>>());
        assert_eq!(wires.iter().filter(|w| w.upto == Some(500)).count(), 1);
    }
}
