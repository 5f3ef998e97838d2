//! The WebSocket protocol: JSON text frames, many topics per connection.
//!
//! The connection loop is written against a generic `Sink`/`Stream` of messages, so it is
//! tested with channels as well as over real sockets. It is an adapter over the same hub
//! feeds as SSE: a topic's events are the SSE events, reframed as
//! `{"topic","id","event","data"}`.
//!
//! Backpressure: outgoing frames go through bounded queues drained by a writer task. A
//! topic's events are read from the hub's replay log only as fast as the client takes them,
//! so a backlog of any length costs no more than the queue. A client that stops reading
//! blocks the writer; the queue stays full; once it has taken no frame for `send_timeout`
//! the connection is closed with a reason. Nothing is buffered beyond the queues, and other
//! connections are not affected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::chat::service::{Caller, ChatError, ChatService};
pub use crate::config::WsSettings;
use crate::hub::{End, Event, EventFeed};
use crate::tasks::service::{TaskError, TaskService};

pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// Why an op was not admitted: the same code and message an HTTP request would get.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: String,
    pub message: String,
    /// The credentials are gone for good (a revoked key): the connection is closed with
    /// 1008 instead of answered with an error frame.
    pub fatal: bool,
}

/// The admission checks an HTTP request passes before it starts a generation (rate
/// limits, quotas), applied to each `chat` op of a connection.
#[async_trait::async_trait]
pub trait Admit: Send + Sync {
    /// Whether the connection's key is still valid; asked before each `chat` and
    /// `subscribe` op, so a key revoked after the upgrade stops at its next op.
    async fn authorize(&self) -> Result<(), Refusal>;
    async fn chat(&self) -> Result<(), Refusal>;
}

/// What the connection loop needs from the rest of the server.
pub struct WsContext {
    /// Checks each `chat` op; `None` admits all.
    pub admit: Option<Arc<dyn Admit>>,
    pub chat: Arc<ChatService>,
    pub tasks: Arc<TaskService>,
    pub caller: Caller,
    pub settings: WsSettings,
    /// Fired when the server shuts down: clients are closed with 1001 and told to
    /// reconnect (elsewhere, in a cluster) and resume.
    pub stop: CancellationToken,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum ClientOp {
    Chat {
        session_id: String,
        content: String,
        #[serde(default)]
        model: Option<String>,
    },
    Subscribe {
        topic: String,
        #[serde(default)]
        last_event_id: Option<String>,
    },
    Unsubscribe {
        topic: String,
    },
    Cancel {
        session_id: String,
    },
    Ping,
}

const OPS: [&str; 5] = ["chat", "subscribe", "unsubscribe", "cancel", "ping"];

fn error_frame(code: &str, message: &str, topic: Option<&str>) -> Message {
    let mut v = serde_json::json!({"op": "error", "code": code, "message": message});
    if let Some(t) = topic {
        v["topic"] = Value::String(t.to_owned());
    }
    Message::Text(v.to_string().into())
}

/// A client's text frame as an op, or the error frame that answers it. serde_json's
/// recursion limit refuses JSON nested deeper than 128 as `bad_request`, so no frame can
/// overflow the stack.
fn parse_op(text: &str) -> Result<ClientOp, Message> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| error_frame("bad_request", &format!("invalid JSON: {e}"), None))?;
    let Some(op) = value.get("op").and_then(Value::as_str) else {
        return Err(error_frame("bad_request", "missing \"op\"", None));
    };
    if !OPS.contains(&op) {
        return Err(error_frame(
            "unknown_op",
            &format!("unknown op '{op}'; expected one of {}", OPS.join(", ")),
            None,
        ));
    }
    serde_json::from_value(value).map_err(|e| error_frame("bad_request", &e.to_string(), None))
}

/// `{"topic","id","event","data"}` with the event's JSON payload spliced in unparsed.
fn event_frame(topic_json: &[u8], e: &Event) -> Message {
    let data = e.data();
    let mut buf = Vec::with_capacity(topic_json.len() + data.len() + 64);
    buf.extend_from_slice(b"{\"topic\":");
    buf.extend_from_slice(topic_json);
    buf.extend_from_slice(b",\"id\":\"");
    buf.extend_from_slice(e.id().as_bytes());
    buf.extend_from_slice(b"\",\"event\":\"");
    buf.extend_from_slice(e.kind.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"data\":");
    buf.extend_from_slice(&data);
    buf.push(b'}');
    text(Bytes::from(buf))
}

fn text(b: Bytes) -> Message {
    // Everything framed here is built from JSON, which is UTF-8.
    Message::Text(Utf8Bytes::try_from(b).unwrap_or_else(|_| Utf8Bytes::from_static("{}")))
}

fn close_msg(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// How the read loop ended, which decides the closing handshake.
enum Ending {
    /// The client sent a Close: the WebSocket layer has queued the echo of its code
    /// (RFC 6455 §5.5.1), which only has to be flushed.
    Answer,
    /// Ours to send, with its code and reason; the client then answers it.
    Close(Message),
    /// Ours to send to a peer that has gone silent: no answer is waited for.
    Abandon(Message),
    /// The server shuts down: the events already relayed go out first, then this Close.
    Shutdown(Message),
    /// Nothing can be sent: the client went away, or the writer already failed.
    Gone,
}

/// How long a client gets to answer the server's Close before the socket is dropped.
/// Dropping it before the answer arrives makes the kernel reset the connection, which
/// clients may report as an abnormal close.
const CLOSE_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// The same at shutdown, where the process waits for it: shorter, since a client that
/// has read the Close loses nothing when the socket then closes.
const SHUTDOWN_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Serves one connection until either side ends it.
pub async fn serve<W, R, E>(write: W, mut read: R, ctx: WsContext)
where
    W: Sink<Message> + Unpin + Send + 'static,
    W::Error: Send,
    R: Stream<Item = Result<Message, E>> + Unpin + Send,
{
    // Replies to the client's ops and pings have their own small queue, ahead of the
    // events: a feed keeps the event queue full while a backlog is read.
    let (out, out_rx) = mpsc::channel::<Message>(CONTROL_QUEUE);
    let (events, events_rx) = mpsc::channel::<Message>(ctx.settings.queue.max(8));
    // `Some(frame)`: send our close; `None`: flush the echo of the client's.
    let (close_tx, close_rx) = oneshot::channel::<Option<Message>>();
    // A close frame may wait behind frames a paused client has not read yet; it gets as
    // long as an idle peer would, so a client that resumes reading learns why it was cut.
    let grace = ctx.settings.idle_timeout;
    let mut writer = tokio::spawn(write_loop(
        write,
        out_rx,
        events_rx,
        close_rx,
        grace,
        ctx.stop.clone(),
    ));
    // Tripped by anyone who finds the queue full.
    let overflow = CancellationToken::new();
    // Tripped when the connection's key turns out to be revoked.
    let revoked = CancellationToken::new();
    let mut conn = Conn {
        ctx: &ctx,
        out: out.clone(),
        events,
        overflow: overflow.clone(),
        revoked: revoked.clone(),
        topics: HashMap::new(),
        forwarders: JoinSet::new(),
    };
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + ctx.settings.ping_every,
        ctx.settings.ping_every,
    );
    let mut last_seen = Instant::now();
    let mut writer_done = false;
    let ending = loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break Ending::Shutdown(close_msg(close::GOING_AWAY, "server shutting down; reconnect and resume")),
            _ = overflow.cancelled() => break Ending::Close(close_msg(close::POLICY, "send queue full: the client is not reading")),
            _ = revoked.cancelled() => break Ending::Close(close_msg(close::POLICY, "API key revoked: reconnect with a valid key")),
            // Awaited here once; a JoinHandle polled again after that panics.
            _ = &mut writer => {
                writer_done = true;
                break Ending::Gone;
            }
            msg = read.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    last_seen = Instant::now();
                    if t.len() > ctx.settings.max_message {
                        break Ending::Close(close_msg(close::TOO_BIG, "message larger than 64 KiB"));
                    }
                    conn.handle(t.as_str()).await;
                }
                Some(Ok(Message::Binary(_))) => {
                    break Ending::Close(close_msg(close::UNSUPPORTED, "binary frames are not supported; send JSON text"));
                }
                // Pings are answered by the WebSocket layer; any frame proves the peer alive.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_seen = Instant::now(),
                Some(Ok(Message::Close(_))) => break Ending::Answer,
                None => break Ending::Gone,
                Some(Err(_)) => break Ending::Close(close_msg(close::TOO_BIG, "invalid or oversized frame")),
            },
            _ = ping.tick() => {
                if last_seen.elapsed() >= ctx.settings.idle_timeout {
                    break Ending::Abandon(close_msg(close::GOING_AWAY, "no traffic from the client; closing"));
                }
                conn.send(Message::Ping(Bytes::new()));
            }
        }
    };
    // The close request goes first: the writer prefers it to anything still queued, and
    // must not mistake the queue closing below for the end of the connection.
    let ours = matches!(ending, Ending::Close(_) | Ending::Shutdown(_));
    let answer_wait = if matches!(ending, Ending::Shutdown(_)) {
        SHUTDOWN_ANSWER_WAIT
    } else {
        CLOSE_ANSWER_WAIT
    };
    let mut close_tx = Some(close_tx);
    let mut request_close = |frame: Option<Message>| {
        if let Some(tx) = close_tx.take() {
            let _ = tx.send(frame);
        }
    };
    // A shutdown's Close waits behind the queued events, so a reading client gets the
    // end of its reply (`done`, `interrupted`) before it.
    let mut queued_close = false;
    match ending {
        Ending::Close(frame) | Ending::Abandon(frame) => request_close(Some(frame)),
        Ending::Answer => request_close(None),
        Ending::Shutdown(frame) => {
            // Forwarders end at `stop` once they have relayed what the hub holds.
            let relayed = async { while conn.forwarders.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(CLOSE_ANSWER_WAIT, relayed).await;
            // Behind the events still queued, not in the control queue that overtakes them.
            match conn.events.try_send(frame) {
                Ok(()) => queued_close = true,
                // A client that is not reading gets it ahead of the queue, as any close.
                Err(e) => request_close(Some(e.into_inner())),
            }
        }
        Ending::Gone => {}
    }
    conn.forwarders.abort_all();
    drop(conn);
    drop(out);
    // Bounded: the writer ends within `grace` of the close, or at stop.
    if !writer_done {
        // Polled to completion at most once: a JoinHandle polled again after that panics.
        let finished = queued_close && tokio::time::timeout(grace, &mut writer).await.is_ok();
        if !finished {
            if queued_close {
                // Stuck behind a client that stopped reading: the Close goes ahead after all.
                request_close(Some(close_msg(
                    close::GOING_AWAY,
                    "server shutting down; reconnect and resume",
                )));
            }
            let _ = writer.await;
        }
    }
    if ours {
        // The handshake completes when the client answers; only then is the socket dropped.
        let answered = async {
            while let Some(Ok(m)) = read.next().await {
                if matches!(m, Message::Close(_)) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(answer_wait, answered).await;
    }
}

/// Drains the queue into the socket; on a close request, sends it (even when a send is
/// stuck on a client that does not read) and ends.
async fn write_loop<W>(
    mut write: W,
    mut rx: mpsc::Receiver<Message>,
    mut events: mpsc::Receiver<Message>,
    mut close: oneshot::Receiver<Option<Message>>,
    grace: Duration,
    stop: CancellationToken,
) where
    W: Sink<Message> + Unpin,
{
    let request = loop {
        tokio::select! {
            biased;
            request = &mut close => break request.ok(),
            msg = next_frame(&mut rx, &mut events) => {
                let Some(msg) = msg else { break None };
                tokio::select! {
                    biased;
                    // A send stuck on a full socket is abandoned; the frame is already in
                    // the WebSocket layer's buffer, so framing stays intact.
                    request = &mut close => break request.ok(),
                    r = write.send(msg) => if r.is_err() { return },
                }
            }
        }
    };
    let Some(frame) = request else { return };
    let finish = async {
        match frame {
            Some(frame) => write.send(frame).await,
            // Sending a Close of our own is refused once the client's arrived; closing the
            // sink flushes the echo the WebSocket layer queued instead.
            None => write.close().await,
        }
    };
    // `stop` may be what asked for this close (a restart): a close that can go out at
    // once still does; only one stuck on a client that does not read is given up.
    tokio::select! {
        biased;
        _ = tokio::time::timeout(grace, finish) => {}
        _ = stop.cancelled() => {}
    }
}

/// The next frame to write: the connection's own first, then the topics' events; `None`
/// only once both queues are closed and empty, so neither loses what it still holds.
async fn next_frame(
    control: &mut mpsc::Receiver<Message>,
    events: &mut mpsc::Receiver<Message>,
) -> Option<Message> {
    tokio::select! {
        biased;
        Some(m) = control.recv() => Some(m),
        Some(m) = events.recv() => Some(m),
        else => None,
    }
}

/// Frames of the connection's own (pongs, pings, errors) queued before it counts as not
/// reading.
const CONTROL_QUEUE: usize = 64;

struct Conn<'a> {
    ctx: &'a WsContext,
    out: mpsc::Sender<Message>,
    /// The topics' events.
    events: mpsc::Sender<Message>,
    overflow: CancellationToken,
    revoked: CancellationToken,
    topics: HashMap<String, AbortHandle>,
    forwarders: JoinSet<()>,
}

impl Conn<'_> {
    fn send(&self, m: Message) {
        if self.out.try_send(m).is_err() {
            self.overflow.cancel();
        }
    }

    async fn handle(&mut self, text: &str) {
        let op = match parse_op(text) {
            Ok(op) => op,
            Err(frame) => return self.send(frame),
        };
        if matches!(op, ClientOp::Chat { .. } | ClientOp::Subscribe { .. })
            && !self.authorized().await
        {
            return;
        }
        match op {
            ClientOp::Ping => self.send(Message::Text(Utf8Bytes::from_static("{\"op\":\"pong\"}"))),
            ClientOp::Subscribe {
                topic,
                last_event_id,
            } => self.subscribe(topic, last_event_id).await,
            ClientOp::Unsubscribe { topic } => match self.topics.remove(&topic) {
                Some(h) => h.abort(),
                None => self.send(error_frame(
                    "not_subscribed",
                    "not subscribed to this topic",
                    Some(&topic),
                )),
            },
            ClientOp::Chat {
                session_id,
                content,
                model,
            } => self.chat(session_id, content, model).await,
            ClientOp::Cancel { session_id } => {
                let topic = format!("session:{session_id}");
                if let Err(e) = self.ctx.chat.cancel(&self.ctx.caller, &session_id).await {
                    self.chat_error(e, &topic);
                }
            }
        }
    }

    /// The connection's key checked again: a refusal is an error frame, a revoked key
    /// ends the connection.
    async fn authorized(&self) -> bool {
        let Some(admit) = &self.ctx.admit else {
            return true;
        };
        match admit.authorize().await {
            Ok(()) => true,
            Err(r) if r.fatal => {
                self.revoked.cancel();
                false
            }
            Err(r) => {
                self.send(error_frame(&r.code, &r.message, None));
                false
            }
        }
    }

    fn chat_error(&self, e: ChatError, topic: &str) {
        let (code, msg) = match &e {
            ChatError::NotFound(_) => ("not_found", e.to_string()),
            ChatError::Busy { .. } => ("generation_running", e.to_string()),
            ChatError::Invalid(m) => ("invalid_request", m.clone()),
            ChatError::TooManyStreams(_) => ("too_many_streams", e.to_string()),
            ChatError::Store(_) => ("unavailable", "the store is unavailable; retry".to_owned()),
        };
        self.send(error_frame(code, &msg, Some(topic)));
    }

    async fn subscribe(&mut self, topic: String, last_event_id: Option<String>) {
        if self.topics.get(&topic).is_some_and(|h| !h.is_finished()) {
            return self.send(error_frame(
                "already_subscribed",
                "already subscribed to this topic",
                Some(&topic),
            ));
        }
        if let Some(task_id) = topic.strip_prefix("task:") {
            return match self
                .ctx
                .tasks
                .events(&self.ctx.caller, task_id, last_event_id.as_deref())
                .await
            {
                Ok(sub) => self.forward(topic, sub),
                Err(TaskError::Chat(e)) => self.chat_error(e, &topic),
                Err(TaskError::Queue(e)) => {
                    self.send(error_frame("unavailable", &e.to_string(), Some(&topic)))
                }
            };
        }
        let Some(session_id) = topic.strip_prefix("session:") else {
            return self.send(error_frame("not_found", "unknown topic", Some(&topic)));
        };
        match self
            .ctx
            .chat
            .feed(&self.ctx.caller, session_id, last_event_id.as_deref())
            .await
        {
            Ok(feed) => self.forward(topic, feed),
            Err(e) => self.chat_error(e, &topic),
        }
    }

    async fn chat(&mut self, session_id: String, content: String, model: Option<String>) {
        let topic = format!("session:{session_id}");
        if let Some(admit) = &self.ctx.admit {
            if let Err(r) = admit.chat().await {
                return self.send(error_frame(&r.code, &r.message, Some(&topic)));
            }
        }
        match self
            .ctx
            .chat
            .post_message(&self.ctx.caller, &session_id, &content, model.as_deref())
            .await
        {
            // A subscribed session's feed picks the new generation up by itself.
            Ok(started) => {
                if self.topics.get(&topic).is_none_or(|h| h.is_finished()) {
                    let feed = self.ctx.chat.feed_from(started.channel);
                    self.forward(topic, feed);
                }
            }
            Err(e) => self.chat_error(e, &topic),
        }
    }

    /// Relays a feed's events to the queue until the feed ends, the server shuts down or
    /// the client stops reading. The feed is read only as the queue makes room, so a long
    /// backlog streams from the replay log at the client's pace.
    fn forward<F: EventFeed + 'static>(&mut self, topic: String, feed: F) {
        let mut feed = UntilShutdown {
            feed,
            shutdown: self.ctx.stop.clone(),
        };
        let out = self.events.clone();
        let overflow = self.overflow.clone();
        let send_timeout = self.ctx.settings.send_timeout;
        let topic_json = serde_json::to_vec(&topic).unwrap_or_default();
        let t = topic.clone();
        let handle = self.forwarders.spawn(async move {
            let mut batch = Vec::with_capacity(64);
            loop {
                match feed.next_batch(&mut batch).await {
                    Ok(()) => {
                        for e in batch.drain(..) {
                            let room = match out.try_reserve() {
                                Ok(room) => room,
                                Err(mpsc::error::TrySendError::Full(())) => {
                                    match tokio::time::timeout(send_timeout, out.reserve()).await {
                                        Ok(Ok(room)) => room,
                                        // The connection is ending.
                                        Ok(Err(_)) => return,
                                        Err(_) => {
                                            overflow.cancel();
                                            return;
                                        }
                                    }
                                }
                                Err(mpsc::error::TrySendError::Closed(())) => return,
                            };
                            room.send(event_frame(&topic_json, &e));
                        }
                    }
                    Err(End::Finished) => return,
                    Err(End::Lagged) => {
                        let _ = out.try_send(error_frame(
                            "lagged",
                            "this client fell behind the stream; subscribe again with last_event_id",
                            Some(&t),
                        ));
                        return;
                    }
                }
            }
        });
        self.topics.insert(topic, handle);
    }
}

/// A feed that ends at shutdown once nothing more is ready: what the hub already holds is
/// still relayed before the connection's Close.
struct UntilShutdown<F> {
    feed: F,
    shutdown: CancellationToken,
}

impl<F: EventFeed> EventFeed for UntilShutdown<F> {
    async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<(), End> {
        tokio::select! {
            biased;
            r = self.feed.next_batch(out) => r,
            _ = self.shutdown.cancelled() => Err(End::Finished),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc as fmpsc;

    /// The loop over plain channels: no socket, no server.
    async fn harness() -> (
        fmpsc::UnboundedSender<Result<Message, std::convert::Infallible>>,
        fmpsc::UnboundedReceiver<Message>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut cfg = crate::config::Config::default();
        cfg.store.data_dir = tempfile::tempdir().unwrap().keep();
        let st = crate::state::AppState::new(cfg).await.unwrap();
        let (to_server, from_client) = fmpsc::unbounded();
        let (to_client, from_server) = fmpsc::unbounded::<Message>();
        let ctx = WsContext {
            chat: st.chat.clone(),
            tasks: st.tasks.clone(),
            caller: Caller {
                user_id: st.local_user.as_deref().unwrap().to_owned(),
                key_id: None,
            },
            settings: WsSettings::default(),
            stop: CancellationToken::new(),
            admit: None,
        };
        let task = tokio::spawn(serve(to_client, from_client, ctx));
        (to_server, from_server, task)
    }

    fn json_of(m: Message) -> Value {
        match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("not text: {other:?}"),
        }
    }

    #[tokio::test]
    async fn ping_errors_and_close_over_channels() {
        let (tx, mut rx, task) = harness().await;
        tx.unbounded_send(Ok(Message::Text("{\"op\":\"ping\"}".into())))
            .unwrap();
        assert_eq!(
            json_of(rx.next().await.unwrap()),
            serde_json::json!({"op": "pong"})
        );
        tx.unbounded_send(Ok(Message::Text("nope".into()))).unwrap();
        assert_eq!(json_of(rx.next().await.unwrap())["code"], "bad_request");
        tx.unbounded_send(Ok(Message::Text(
            "{\"op\":\"subscribe\",\"topic\":\"session:missing\"}".into(),
        )))
        .unwrap();
        let v = json_of(rx.next().await.unwrap());
        assert_eq!(v["code"], "not_found");
        assert_eq!(v["topic"], "session:missing");
        tx.unbounded_send(Ok(Message::Binary(Bytes::from_static(b"x"))))
            .unwrap();
        match rx.next().await.unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, close::UNSUPPORTED),
            other => panic!("expected close, got {other:?}"),
        }
        // The client's answer completes the handshake, and the connection ends.
        tx.unbounded_send(Ok(Message::Close(None))).unwrap();
        task.await.unwrap();
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    const VALID: [&str; 6] = [
        r#"{"op":"chat","session_id":"s1","content":"hi","model":"m"}"#,
        r#"{"op":"subscribe","topic":"session:s1","last_event_id":"0193-g.18446744073709551615"}"#,
        r#"{"op":"subscribe","topic":"task:t1"}"#,
        r#"{"op":"unsubscribe","topic":"session:s1"}"#,
        r#"{"op":"cancel","session_id":"s1"}"#,
        r#"{"op":"ping"}"#,
    ];

    /// The error frame's code, or `None` for a valid op.
    fn answer(text: &str) -> Result<(), String> {
        match parse_op(text) {
            Ok(_) => Ok(()),
            Err(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                assert_eq!(v["op"], "error", "{v}");
                Err(v["code"].as_str().unwrap_or("").to_owned())
            }
            Err(other) => panic!("not an error frame: {other:?}"),
        }
    }

    /// A valid op with bytes replaced, inserted or cut, kept as text (frames are UTF-8).
    fn mutated() -> impl Strategy<Value = String> {
        (
            0..VALID.len(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<char>(), 0u8..3), 1..8),
        )
            .prop_map(|(which, edits)| {
                let mut s: Vec<char> = VALID[which].chars().collect();
                for (at, c, how) in edits {
                    let i = at.index(s.len() + 1);
                    match how {
                        0 if i < s.len() => s[i] = c,
                        1 => s.insert(i, c),
                        _ => s.truncate(i),
                    }
                }
                s.into_iter().collect()
            })
    }

    proptest! {
        /// Any text frame is a valid op or an error frame with a code, never a panic.
        #[test]
        fn any_frame_is_an_op_or_an_error_frame(
            text in prop_oneof![mutated(), ".{0,80}", "\\{\"op\":\"[a-z_]{0,12}\"(,\"[a-z_]{1,12}\":(\"[^\"]{0,8}\"|[0-9]{1,3}|null|\\[\\]|\\{\\}))*\\}"],
        ) {
            if let Err(code) = answer(&text) {
                prop_assert!(["bad_request", "unknown_op"].contains(&code.as_str()), "{} for {:?}", code, text);
            }
        }

        /// Nesting past serde_json's limit, anywhere in a frame, is a `bad_request`.
        #[test]
        fn deep_nesting_is_refused(
            depth in prop_oneof![128usize..300, Just(10_000usize), Just(30_000usize)],
            shape in 0u8..2,
            at in 0u8..3,
        ) {
            let (open, close) = if shape == 0 { ("[", "]") } else { ("{\"a\":", "}") };
            let deep = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let text = match at {
                0 => deep,
                1 => format!(r#"{{"op":"ping","x":{deep}}}"#),
                _ => format!(r#"{{"op":"subscribe","topic":"session:s","last_event_id":{deep}}}"#),
            };
            prop_assert_eq!(answer(&text), Err("bad_request".to_owned()));
        }
    }

    #[test]
    fn every_valid_op_parses() {
        for v in VALID {
            assert_eq!(answer(v), Ok(()), "{v}");
        }
    }
}
