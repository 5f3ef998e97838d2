//! The stream hub: one channel per running generation, shared by every subscriber.
//!
//! A channel is an append-only log of encoded events (bounded: the oldest are evicted past
//! `capacity`) plus a `watch` of the latest sequence number. Subscribers hold only a cursor
//! into the log: a slow subscriber costs no memory of its own — it resyncs from the replay
//! log when it is ready — and one whose cursor has been evicted is told it lagged. The same
//! log serves live fan-out and `Last-Event-ID` resume, so both see exactly the same events
//! in the same order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::watch;

/// The event types of generations and tasks (docs/api.md: chat sessions, prompt jobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Start,
    /// A piece of a reasoning model's thinking, streamed before (or between) its answer.
    Reasoning,
    Token,
    Usage,
    Done,
    Error,
    Interrupted,
    Queued,
    Running,
    Progress,
    Succeeded,
    Failed,
    Cancelled,
    /// An event of a stored response (`/v1/responses`); its data is the event as the
    /// client reads it, `type` and `sequence_number` included.
    Response,
    /// A response's last event (`response.completed`, `.failed`, `.incomplete`, or its
    /// cancel).
    ResponseEnd,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Reasoning => "reasoning",
            Self::Token => "token",
            Self::Usage => "usage",
            Self::Done => "done",
            Self::Error => "error",
            Self::Interrupted => "interrupted",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Progress => "progress",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Response => "response",
            Self::ResponseEnd => "response_end",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "start" => Self::Start,
            "reasoning" => Self::Reasoning,
            "token" => Self::Token,
            "usage" => Self::Usage,
            "done" => Self::Done,
            "error" => Self::Error,
            "interrupted" => Self::Interrupted,
            "queued" => Self::Queued,
            "running" => Self::Running,
            "progress" => Self::Progress,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "response" => Self::Response,
            "response_end" => Self::ResponseEnd,
            _ => return None,
        })
    }

    /// Whether the event ends its generation or task.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done
                | Self::Error
                | Self::Interrupted
                | Self::Succeeded
                | Self::Failed
                | Self::Cancelled
                | Self::ResponseEnd
        )
    }
}

/// One event, encoded once at publish time for every subscriber. Held by value: a clone is
/// a reference count on the frame (the log, every subscriber and every transport share its
/// one buffer), so the event needs no `Arc` of its own.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    /// The whole SSE frame: `id: <generation>.<seq>\nevent: <kind>\ndata: <json>\n\n`.
    pub sse: Bytes,
    /// Where the JSON payload sits inside `sse`, so other transports reuse it uncopied.
    data_at: (usize, usize),
    /// End of the `<generation>.<seq>` id, which starts right after `id: `.
    id_end: usize,
}

impl Event {
    #[cfg(test)]
    fn encode(generation_id: &str, seq: u64, kind: EventKind, data: &[u8]) -> Self {
        Self::encode_with(generation_id, seq, kind, data.len(), |buf| {
            buf.extend_from_slice(data)
        })
    }

    /// Builds the frame in one buffer of exactly its size, `write` putting `data_len`
    /// bytes of payload in place: a `Vec` filled to its capacity becomes `Bytes` with no
    /// further allocation, and the payload needs no buffer of its own.
    fn encode_with(
        generation_id: &str,
        seq: u64,
        kind: EventKind,
        data_len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Self {
        const ID: &[u8] = b"id: ";
        const EVENT: &[u8] = b"\nevent: ";
        const DATA: &[u8] = b"\ndata: ";
        let digits = seq.checked_ilog10().map_or(1, |d| d as usize + 1);
        let len = ID.len()
            + generation_id.len()
            + 1
            + digits
            + EVENT.len()
            + kind.as_str().len()
            + DATA.len()
            + data_len
            + 2;
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(ID);
        buf.extend_from_slice(generation_id.as_bytes());
        buf.push(b'.');
        // Writing a number into a Vec cannot fail, and allocates nothing.
        let _ = std::io::Write::write_fmt(&mut buf, format_args!("{seq}"));
        let id_end = buf.len();
        buf.extend_from_slice(EVENT);
        buf.extend_from_slice(kind.as_str().as_bytes());
        buf.extend_from_slice(DATA);
        let start = buf.len();
        write(&mut buf);
        let end = buf.len();
        buf.extend_from_slice(b"\n\n");
        debug_assert_eq!(buf.len(), len, "the frame's size was reckoned wrong");
        Self {
            seq,
            kind,
            sse: Bytes::from(buf),
            data_at: (start, end),
            id_end,
        }
    }

    /// The event id, `<generation_id>.<seq>`.
    pub fn id(&self) -> &str {
        std::str::from_utf8(&self.sse[4..self.id_end]).unwrap_or_default()
    }

    /// The JSON payload.
    pub fn data(&self) -> Bytes {
        self.sse.slice(self.data_at.0..self.data_at.1)
    }
}

/// An event id as clients send it back in `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    pub generation_id: String,
    pub seq: u64,
}

impl EventId {
    pub fn parse(s: &str) -> Option<Self> {
        let (g, seq) = s.trim().rsplit_once('.')?;
        if g.is_empty() {
            return None;
        }
        Some(Self {
            generation_id: g.to_owned(),
            seq: seq.parse().ok()?,
        })
    }
}

struct Log {
    events: VecDeque<Event>,
    /// Sequence number of `events[0]`; grows as old events are evicted.
    first_seq: u64,
    next_seq: u64,
    finished_at: Option<Instant>,
}

/// The channel of one generation.
pub struct Channel {
    pub generation_id: String,
    pub session_id: String,
    /// Who may subscribe: the owner of the session.
    pub owner: String,
    /// Fed from elsewhere: a copy of a generation running on another instance (by the
    /// cluster bus), or a task followed through the store.
    pub remote: bool,
    /// First sequence number of the log: 0, or for a remote copy the oldest event the
    /// replay log still held when the copy was made.
    origin: u64,
    log: RwLock<Log>,
    capacity: usize,
    /// Latest published sequence; bumped on every publish and at the end.
    notify: watch::Sender<u64>,
    /// Live subscriber count, for admin output and tests.
    subscribers: AtomicU64,
    /// Tokens published so far, for admin output.
    tokens: AtomicU64,
    created: Instant,
}

impl Channel {
    pub fn is_finished(&self) -> bool {
        self.log.read().finished_at.is_some()
    }

    /// Number of events held for replay (bounded by the capacity).
    pub fn retained(&self) -> usize {
        self.log.read().events.len()
    }

    pub fn subscriber_count(&self) -> u64 {
        self.subscribers.load(Ordering::Relaxed)
    }

    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Appends an event and wakes every subscriber. Events after a final one are dropped,
    /// so a generation ends exactly once.
    pub fn publish(&self, kind: EventKind, data: &[u8]) -> Option<u64> {
        self.append(kind, data.len(), |buf| buf.extend_from_slice(data))
    }

    /// [`publish`](Self::publish) with the payload written in place by `write`, which
    /// puts exactly `data_len` bytes.
    fn append(
        &self,
        kind: EventKind,
        data_len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Option<u64> {
        let seq = {
            let mut log = self.log.write();
            if log.finished_at.is_some() {
                return None;
            }
            self.push(&mut log, kind, data_len, write)
        };
        self.notify.send_replace(seq);
        Some(seq)
    }

    /// Appends the next event to a log the caller holds locked (and not finished).
    fn push(
        &self,
        log: &mut Log,
        kind: EventKind,
        data_len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> u64 {
        let seq = log.next_seq;
        log.next_seq += 1;
        log.events.push_back(Event::encode_with(
            &self.generation_id,
            seq,
            kind,
            data_len,
            write,
        ));
        if log.events.len() > self.capacity {
            log.events.pop_front();
            log.first_seq += 1;
        }
        if kind.is_final() {
            log.finished_at = Some(Instant::now());
        }
        // Thinking is part of the reply the model produces, so it counts as tokens too.
        if matches!(kind, EventKind::Token | EventKind::Reasoning) {
            self.tokens.fetch_add(1, Ordering::Relaxed);
        }
        seq
    }

    /// The kind of the last event held, if any: how a finished generation ended.
    pub fn last_kind(&self) -> Option<EventKind> {
        self.log.read().events.back().map(|e| e.kind)
    }

    /// Sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.log.read().next_seq
    }

    /// Appends an event produced elsewhere with its own sequence number (a remote copy).
    /// Events already held are ignored, so redelivery is harmless; one past a gap is
    /// refused, and the caller fetches the missing ones first.
    /// The check and the append share one lock: the bus applies from concurrent tasks, and
    /// two of them must not both find `seq` missing and append it twice.
    pub fn apply(&self, seq: u64, kind: EventKind, data: &[u8]) -> Applied {
        {
            let mut log = self.log.write();
            if seq < log.next_seq || log.finished_at.is_some() {
                return Applied::Duplicate;
            }
            if seq > log.next_seq {
                return Applied::Gap {
                    expected: log.next_seq,
                };
            }
            self.push(&mut log, kind, data.len(), |buf| {
                buf.extend_from_slice(data)
            });
        }
        self.notify.send_replace(seq);
        Applied::Appended
    }

    /// Publishes a JSON-serialisable payload.
    /// Publishes a JSON-serialisable payload, serialised straight into the event's frame:
    /// once to learn its length, once in place (cheaper than a buffer per event).
    pub fn publish_json<T: Serialize>(&self, kind: EventKind, data: &T) -> Option<u64> {
        let mut len = Counter(0);
        if serde_json::to_writer(&mut len, data).is_err() {
            return self.publish(kind, b"{}");
        }
        self.append(kind, len.0, |buf| {
            let _ = serde_json::to_writer(buf, data);
        })
    }

    /// A cursor that will read every event after `after` (or from the start). `after` comes
    /// from the client: an id at or past the end (up to `u64::MAX`) replays nothing, and
    /// only events numbered above it are ever read.
    pub fn subscribe(self: &Arc<Self>, after: Option<u64>) -> Subscription {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        Subscription {
            channel: self.clone(),
            // Saturating: `u64::MAX + 1` wrapping to 0 would replay the whole generation.
            next: after.map_or(self.origin, |s| s.saturating_add(1)),
            rx: self.notify.subscribe(),
        }
    }
}

/// Counts what is written to it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What [`Channel::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Appended,
    Duplicate,
    Gap { expected: u64 },
}

/// Why a subscription stopped yielding events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The generation ended and every event was read.
    Finished,
    /// The subscriber fell further behind than the replay log reaches.
    Lagged,
}

pub struct Subscription {
    channel: Arc<Channel>,
    next: u64,
    rx: watch::Receiver<u64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.channel.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most events handed out per call, so one subscriber never holds the log lock long.
const BATCH: usize = 64;

impl Subscription {
    /// The events available now, without waiting; false when there were none.
    pub fn now_batch(&mut self, out: &mut Vec<Event>) -> bool {
        use futures::FutureExt;
        matches!(self.next_batch(out).now_or_never(), Some(Ok(())))
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// True when the generation has ended and this cursor has read all of it: a stream
    /// from here would carry nothing.
    pub fn is_exhausted(&self) -> bool {
        let log = self.channel.log.read();
        log.finished_at.is_some() && self.next >= log.next_seq
    }

    /// Waits for the next events and appends them to `out` (cleared first). Nothing is
    /// buffered per subscriber: the events stay in the channel's log until read.
    pub async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<(), End> {
        out.clear();
        loop {
            // Mark the current version seen *before* reading the log, so a publish that
            // lands after the read still wakes the wait below.
            self.rx.borrow_and_update();
            {
                let log = self.channel.log.read();
                if self.next < log.first_seq {
                    return Err(End::Lagged);
                }
                // A cursor far past the end (a client's id) is no index into the log.
                let start = usize::try_from(self.next - log.first_seq).unwrap_or(usize::MAX);
                if start < log.events.len() {
                    out.extend(log.events.range(start..).take(BATCH).cloned());
                    self.next += out.len() as u64;
                    return Ok(());
                }
                if log.finished_at.is_some() {
                    return Err(End::Finished);
                }
            }
            if self.rx.changed().await.is_err() {
                // The channel is gone; whatever was logged has been read.
                return Err(End::Finished);
            }
        }
    }
}

/// Anything that yields batches of hub events: one generation, or a session's feed.
pub trait EventFeed: Send {
    fn next_batch(
        &mut self,
        out: &mut Vec<Event>,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send;
}

impl EventFeed for Subscription {
    async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<(), End> {
        Subscription::next_batch(self, out).await
    }
}

/// Follows a session across its generations: the current one (from a resume point or its
/// start), then each new one from its first event. Never ends on its own.
pub struct SessionFeed {
    session: watch::Receiver<Option<Arc<Channel>>>,
    current: Option<Subscription>,
    /// The generation last followed, so a finished one is not replayed again.
    last_generation: Option<String>,
    /// Kept alive as long as the feed: the cluster bus's interest in this session.
    _hold: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl SessionFeed {
    /// `resume`: a channel of this session and the last sequence the client has (`None`:
    /// from the channel's start).
    pub fn new(hub: &Hub, session_id: &str, resume: Option<(Arc<Channel>, Option<u64>)>) -> Self {
        let mut session = hub.watch_session(session_id);
        let latest = session.borrow_and_update().clone();
        let (current, last_generation) = match resume {
            Some((ch, seq)) => (Some(ch.subscribe(seq)), Some(ch.generation_id.clone())),
            None => match latest {
                // A running generation is shown from its start, so a new tab shows all of it.
                Some(ch) if !ch.is_finished() => {
                    (Some(ch.subscribe(None)), Some(ch.generation_id.clone()))
                }
                Some(ch) => (None, Some(ch.generation_id.clone())),
                None => (None, None),
            },
        };
        Self {
            session,
            current,
            last_generation,
            _hold: None,
        }
    }

    /// Keeps `guard` alive until the feed is dropped.
    pub fn holding(mut self, guard: Box<dyn std::any::Any + Send + Sync>) -> Self {
        self._hold = Some(guard);
        self
    }
}

impl EventFeed for SessionFeed {
    async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<(), End> {
        loop {
            if let Some(sub) = &mut self.current {
                match sub.next_batch(out).await {
                    Ok(()) => return Ok(()),
                    Err(End::Lagged) => return Err(End::Lagged),
                    Err(End::Finished) => self.current = None,
                }
            }
            let latest = self.session.borrow_and_update().clone();
            if let Some(ch) = latest {
                if self.last_generation.as_deref() != Some(ch.generation_id.as_str()) {
                    self.last_generation = Some(ch.generation_id.clone());
                    self.current = Some(ch.subscribe(None));
                    continue;
                }
            }
            if self.session.changed().await.is_err() {
                return Err(End::Finished);
            }
        }
    }
}

/// Every live and recently finished generation of this instance.
pub struct Hub {
    channels: DashMap<String, Arc<Channel>>,
    /// The latest generation of each session, so a session subscriber can follow the
    /// next generation without polling.
    sessions: DashMap<String, watch::Sender<Option<Arc<Channel>>>>,
    capacity: usize,
    /// How long a finished generation stays available for resume.
    retention: Duration,
    /// Millis since `epoch` of the last sweep of expired channels.
    last_sweep: AtomicU64,
    epoch: Instant,
}

impl Hub {
    pub fn new(capacity: usize, retention: Duration) -> Self {
        Self {
            channels: DashMap::new(),
            sessions: DashMap::new(),
            capacity: capacity.max(16),
            retention,
            last_sweep: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Creates the channel of a new generation of `session_id`.
    pub fn create(&self, generation_id: &str, session_id: &str, owner: &str) -> Arc<Channel> {
        self.sweep();
        let channel = self.new_channel(generation_id, session_id, owner, false, 0);
        self.channels
            .insert(generation_id.to_owned(), channel.clone());
        self.sessions
            .entry(session_id.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .send_replace(Some(channel.clone()));
        channel
    }

    /// The local copy of a generation running on another instance, created on first use.
    /// Its log starts at `first_seq` (the oldest event the replay log still holds). It
    /// becomes the session's latest generation only if it is newer than the one known:
    /// generation ids sort by creation time.
    pub fn mirror(
        &self,
        generation_id: &str,
        session_id: &str,
        owner: &str,
        first_seq: u64,
    ) -> Arc<Channel> {
        self.sweep();
        let channel = match self.channels.entry(generation_id.to_owned()) {
            dashmap::mapref::entry::Entry::Occupied(e) => return e.get().clone(),
            dashmap::mapref::entry::Entry::Vacant(e) => e
                .insert(self.new_channel(generation_id, session_id, owner, true, first_seq))
                .clone(),
        };
        self.sessions
            .entry(session_id.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .send_if_modified(|latest| {
                if latest
                    .as_ref()
                    .is_some_and(|c| c.generation_id.as_str() >= generation_id)
                {
                    return false;
                }
                *latest = Some(channel.clone());
                true
            });
        channel
    }

    /// A channel nobody else can find: its feeder and its subscribers share it directly.
    pub fn detached(&self, id: &str, session_id: &str, owner: &str) -> Arc<Channel> {
        self.new_channel(id, session_id, owner, true, 0)
    }

    /// Forgets the unfinished remote copies of a session's generations: nothing feeds them
    /// once the instance stops following the session.
    pub fn drop_mirrors(&self, session_id: &str) {
        self.channels
            .retain(|_, c| !(c.remote && c.session_id == session_id && !c.is_finished()));
    }

    fn new_channel(
        &self,
        generation_id: &str,
        session_id: &str,
        owner: &str,
        remote: bool,
        first_seq: u64,
    ) -> Arc<Channel> {
        let (notify, _) = watch::channel(0);
        Arc::new(Channel {
            generation_id: generation_id.to_owned(),
            session_id: session_id.to_owned(),
            owner: owner.to_owned(),
            remote,
            origin: first_seq,
            log: RwLock::new(Log {
                events: VecDeque::with_capacity(64),
                first_seq,
                next_seq: first_seq,
                finished_at: None,
            }),
            capacity: self.capacity,
            notify,
            subscribers: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    pub fn get(&self, generation_id: &str) -> Option<Arc<Channel>> {
        self.channels.get(generation_id).map(|c| c.clone())
    }

    /// Follows the latest generation of a session.
    pub fn watch_session(&self, session_id: &str) -> watch::Receiver<Option<Arc<Channel>>> {
        self.sessions
            .entry(session_id.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Forgets a session's channels (the session was deleted).
    pub fn remove_session(&self, session_id: &str) {
        self.channels.retain(|_, c| c.session_id != session_id);
        if let Some((_, tx)) = self.sessions.remove(session_id) {
            tx.send_replace(None);
        }
    }

    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.channels.iter().map(|c| c.clone()).collect()
    }

    /// Drops channels whose generation ended longer than the retention ago. Runs at most
    /// once a second, from `create`, so no background task is needed.
    fn sweep(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let retention = self.retention;
        self.channels.retain(|_, c| {
            c.log
                .read()
                .finished_at
                .is_none_or(|t| t.elapsed() < retention)
        });
        let channels = &self.channels;
        self.sessions.retain(|_, tx| {
            tx.receiver_count() > 0
                || tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|c| channels.contains_key(&c.generation_id))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn subscribers_get_every_event_in_order_then_finish() {
        let hub = Hub::new(1000, Duration::from_secs(60));
        let ch = hub.create("g1", "s1", "u");
        let mut a = ch.subscribe(None);
        let producer = {
            let ch = ch.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    ch.publish_json(
                        EventKind::Token,
                        &serde_json::json!({"text": i.to_string()}),
                    );
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                ch.publish_json(EventKind::Done, &serde_json::json!({}));
            })
        };
        let mut seen = Vec::new();
        let mut batch = Vec::new();
        loop {
            match a.next_batch(&mut batch).await {
                Ok(()) => seen.extend(text_of(&batch)),
                Err(End::Finished) => break,
                Err(End::Lagged) => panic!("lagged"),
            }
        }
        producer.await.unwrap();
        assert_eq!(seen, (0..=500).collect::<Vec<_>>());
        // Published after the end: ignored.
        assert_eq!(ch.publish(EventKind::Token, b"{}"), None);
    }

    /// Frames built in place are the frames built from a serialised payload, and exactly
    /// as long as reckoned (the debug assertion in `encode_with`).
    #[test]
    fn json_payloads_are_framed_in_place_exactly() {
        #[derive(Serialize)]
        struct T<'a> {
            text: &'a str,
        }
        let hub = Hub::new(100_000, Duration::from_secs(60));
        let a = hub.create("0193-gen", "s1", "u");
        let b = hub.create("0193-gen", "s2", "u");
        let texts = ["", "plain", "quote \" and \\ and \n", "héllo 🦀", "\u{1}"];
        for i in 0..1_001 {
            let t = T {
                text: texts[i % texts.len()],
            };
            a.publish_json(EventKind::Token, &t);
            b.publish(EventKind::Token, &serde_json::to_vec(&t).unwrap());
        }
        let all = |ch: &Arc<Channel>| {
            let (mut s, mut batch, mut all) = (ch.subscribe(None), Vec::new(), Vec::new());
            while s.now_batch(&mut batch) {
                all.append(&mut batch);
            }
            all
        };
        let (ba, bb) = (all(&a), all(&b));
        assert_eq!((ba.len(), bb.len()), (1_001, 1_001));
        for (x, y) in ba.iter().zip(&bb) {
            assert_eq!(x.sse, y.sse);
            assert_eq!(x.data(), y.data());
            assert_eq!(x.id(), y.id());
        }
        assert_eq!(ba[1_000].id(), "0193-gen.1000");
    }

    #[tokio::test]
    async fn resume_reads_exactly_the_rest() {
        let hub = Hub::new(1000, Duration::from_secs(60));
        let ch = hub.create("g1", "s1", "u");
        for _ in 0..10 {
            ch.publish(EventKind::Token, b"{\"text\":\"x\"}");
        }
        ch.publish(EventKind::Done, b"{}");
        let mut s = ch.subscribe(Some(6));
        let mut batch = Vec::new();
        s.next_batch(&mut batch).await.unwrap();
        assert_eq!(text_of(&batch), vec![7, 8, 9, 10]);
        assert_eq!(s.next_batch(&mut batch).await, Err(End::Finished));
    }

    #[tokio::test]
    async fn a_subscriber_behind_the_log_is_told_it_lagged() {
        let hub = Hub::new(16, Duration::from_secs(60));
        let ch = hub.create("g1", "s1", "u");
        let mut s = ch.subscribe(None);
        for _ in 0..100 {
            ch.publish(EventKind::Token, b"{}");
        }
        assert_eq!(ch.retained(), 16, "memory stays bounded");
        let mut batch = Vec::new();
        assert_eq!(s.next_batch(&mut batch).await, Err(End::Lagged));
    }

    #[test]
    fn frames_and_ids() {
        let e = Event::encode("g7", 3, EventKind::Token, br#"{"text":"a\nb"}"#);
        assert_eq!(
            &e.sse[..],
            b"id: g7.3\nevent: token\ndata: {\"text\":\"a\\nb\"}\n\n"
        );
        assert_eq!(&e.data()[..], br#"{"text":"a\nb"}"#);
        assert_eq!(e.id(), "g7.3");
        assert_eq!(
            EventId::parse("g7.3"),
            Some(EventId {
                generation_id: "g7".into(),
                seq: 3
            })
        );
        assert_eq!(EventId::parse("nonsense"), None);
        assert_eq!(EventId::parse(".3"), None);
    }

    /// Remote copies and the replay log read kinds back by name: every kind must survive.
    #[test]
    fn every_kind_is_read_back_by_its_name() {
        use EventKind::*;
        for kind in [
            Start,
            Reasoning,
            Token,
            Usage,
            Done,
            Error,
            Interrupted,
            Queued,
            Running,
            Progress,
            Succeeded,
            Failed,
            Cancelled,
        ] {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        assert!(!Reasoning.is_final());
    }

    #[tokio::test]
    async fn a_remote_copy_counts_reasoning_as_tokens() {
        let hub = Hub::new(1000, Duration::from_secs(60));
        let ch = hub.mirror("g3", "s", "u", 0);
        assert_eq!(ch.apply(0, EventKind::Start, b"{}"), Applied::Appended);
        assert_eq!(
            ch.apply(1, EventKind::Reasoning, br#"{"text":"hm"}"#),
            Applied::Appended
        );
        assert_eq!(
            ch.apply(2, EventKind::Token, br#"{"text":"a"}"#),
            Applied::Appended
        );
        assert_eq!(ch.tokens(), 2);
        let mut batch = Vec::new();
        assert!(ch.subscribe(Some(0)).now_batch(&mut batch));
        assert_eq!(
            &batch[0].sse[..],
            b"id: g3.1\nevent: reasoning\ndata: {\"text\":\"hm\"}\n\n"
        );
    }

    /// The cluster bus applies one generation's events from several tasks at once: each
    /// sequence number must land once, under its own number, whoever applies it first.
    #[test]
    fn concurrent_applies_append_each_event_exactly_once() {
        const EVENTS: u64 = 20_000;
        const THREADS: usize = 4;
        let hub = Hub::new(100_000, Duration::from_secs(60));
        // A race shows only now and then: several rounds make the test fail reliably.
        for round in 0..10 {
            applies_race(
                &hub.mirror(&format!("g{round}"), "s", "u", 0),
                EVENTS,
                THREADS,
            );
        }
    }

    /// `threads` threads apply seqs `0..events` to `ch`, each all of them, in order.
    fn applies_race(ch: &Arc<Channel>, events: u64, threads: usize) {
        let start = std::sync::Barrier::new(threads);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    start.wait();
                    for seq in 0..events {
                        let data = format!("{{\"text\":\"{seq}\"}}");
                        // A gap means another thread has not applied `seq - 1` yet.
                        while let Applied::Gap { .. } =
                            ch.apply(seq, EventKind::Token, data.as_bytes())
                        {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
        });
        assert_eq!(ch.next_seq(), events);
        assert_eq!(ch.tokens(), events);
        let (mut sub, mut batch, mut seen) = (ch.subscribe(None), Vec::new(), 0);
        while sub.now_batch(&mut batch) {
            for e in &batch {
                assert_eq!(e.seq, seen);
                let data = format!("{{\"text\":\"{seen}\"}}");
                assert_eq!(
                    &e.data()[..],
                    data.as_bytes(),
                    "event {seen} holds another's payload"
                );
                seen += 1;
            }
        }
        assert_eq!(seen, events);
    }

    #[tokio::test]
    async fn session_watch_follows_new_generations() {
        let hub = Hub::new(100, Duration::from_secs(60));
        let mut rx = hub.watch_session("s1");
        assert!(rx.borrow_and_update().is_none());
        hub.create("g1", "s1", "u");
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().generation_id, "g1");
    }

    #[tokio::test]
    async fn a_remote_copy_takes_events_once_in_order_and_reports_gaps() {
        let hub = Hub::new(1000, Duration::from_secs(60));
        let ch = hub.mirror("g2", "s", "u", 5);
        assert!(ch.remote);
        assert_eq!(
            ch.apply(6, EventKind::Token, b"{}"),
            Applied::Gap { expected: 5 }
        );
        assert_eq!(ch.apply(5, EventKind::Start, b"{}"), Applied::Appended);
        assert_eq!(ch.apply(5, EventKind::Start, b"{}"), Applied::Duplicate);
        assert_eq!(
            ch.apply(6, EventKind::Token, b"{\"text\":\"a\"}"),
            Applied::Appended
        );
        assert_eq!(ch.apply(7, EventKind::Done, b"{}"), Applied::Appended);
        assert_eq!(ch.apply(8, EventKind::Token, b"{}"), Applied::Duplicate);
        // Same id encoding as the instance that produced them.
        let mut sub = ch.subscribe(None);
        let mut batch = Vec::new();
        assert!(sub.now_batch(&mut batch));
        let ids: Vec<&str> = batch.iter().map(|e| e.id()).collect();
        assert_eq!(ids, ["g2.5", "g2.6", "g2.7"]);
        // The same generation is one copy, however many times it is asked for.
        assert!(Arc::ptr_eq(&ch, &hub.mirror("g2", "s", "u", 0)));
    }

    #[tokio::test]
    async fn an_older_remote_generation_does_not_replace_the_sessions_latest() {
        let hub = Hub::new(1000, Duration::from_secs(60));
        let rx = hub.watch_session("s");
        hub.mirror("0002", "s", "u", 0);
        hub.mirror("0001", "s", "u", 0);
        assert_eq!(rx.borrow().as_ref().unwrap().generation_id, "0002");
        hub.drop_mirrors("s");
        assert!(hub.get("0001").is_none());
    }
}

#[cfg(test)]
mod props {
    use futures::FutureExt;
    use proptest::prelude::*;

    use super::*;

    /// What a subscriber at `after` reads now: the seqs, and how the reading stopped
    /// (`None`: still waiting on a running generation).
    fn read_now(sub: &mut Subscription) -> (Vec<u64>, Option<End>) {
        let (mut seqs, mut batch) = (Vec::new(), Vec::new());
        loop {
            match sub.next_batch(&mut batch).now_or_never() {
                Some(Ok(())) => seqs.extend(batch.iter().map(|e| e.seq)),
                Some(Err(end)) => return (seqs, Some(end)),
                None => return (seqs, None),
            }
        }
    }

    proptest! {
        /// Whatever id a client resumes from — inside the log, evicted, at its end, past it,
        /// up to `u64::MAX` — no event at or before it is read, the rest come in order with
        /// no gap, a cursor behind the log is told it lagged, and nothing panics.
        #[test]
        fn resume_never_replays_at_or_before_the_id(
            len in 0u64..200,
            capacity in 16usize..64,
            origin in prop_oneof![Just(0u64), 0u64..1_000, Just(u64::MAX - 300)],
            finished in any::<bool>(),
            pick in 0u8..4,
            offset in 0u64..210,
            below_max in 0u64..4,
            anything in any::<u64>(),
        ) {
            let hub = Hub::new(capacity, Duration::from_secs(60));
            let ch = hub.mirror("0193-g", "s", "u", origin);
            for i in 0..len {
                let kind = if finished && i + 1 == len { EventKind::Done } else { EventKind::Token };
                prop_assert_eq!(ch.apply(origin + i, kind, b"{}"), Applied::Appended);
            }
            let end = origin + len;
            let after = match pick {
                0 => origin.saturating_add(offset),
                1 => u64::MAX - below_max,
                2 => end.saturating_add(below_max),
                _ => anything,
            };
            // The id as a client sends it back.
            let id = EventId::parse(&format!("0193-g.{after}"));
            prop_assert_eq!(id.as_ref().map(|i| i.seq), Some(after));
            let mut sub = ch.subscribe(Some(after));
            let (seqs, stop) = read_now(&mut sub);
            prop_assert!(seqs.iter().all(|&s| s > after), "replayed at or before {}: {:?}", after, seqs);
            prop_assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "gap: {:?}", seqs);
            let first_held = end - (len.min(capacity.max(16) as u64));
            let next = after.saturating_add(1);
            if next < first_held {
                prop_assert_eq!(stop, Some(End::Lagged));
                prop_assert!(seqs.is_empty());
            } else {
                let expected: Vec<u64> = (next..end).collect();
                prop_assert_eq!(&seqs, &expected);
                let ended = finished && len > 0;
                prop_assert_eq!(stop, ended.then_some(End::Finished));
                prop_assert_eq!(sub.is_exhausted(), ended);
            }
        }

        /// Any text as `Last-Event-ID`: parsed or refused, never a panic; what parses names
        /// a generation and round-trips through the id a frame carries.
        #[test]
        fn any_last_event_id_parses_or_is_refused(s in ".{0,40}|[0-9a-f-]{1,12}\\.[0-9+-]{0,25}") {
            if let Some(id) = EventId::parse(&s) {
                prop_assert!(!id.generation_id.is_empty());
                let again = EventId::parse(&format!("{}.{}", id.generation_id, id.seq));
                prop_assert_eq!(again, Some(id));
            }
        }
    }
}
