//! `/v1/responses` as a service: a response runs as a job of its own, so one path serves a
//! streamed, a whole and a background response. A foreground job hands its events to its
//! one reader through a bounded queue (a slow reader slows the upstream, as on
//! `/v1/chat/completions`); a background job publishes them to a hub channel exported to
//! the cluster, so its stream resumes after any event, on any instance, from the same
//! replay log as a session's generation. A stored response is kept in the store.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::completions::{CompletionError, Completions};
use super::service::{Caller, ChatError};
use crate::cluster::{Bus, Follow};
use crate::dialect::responses::{self, CreateResponse, ResponseBuilder, ResponseEvent};
use crate::domain::ChatRequest;
use crate::hub::{Channel, End, Event, EventKind, Hub, Subscription};
use crate::store::{Store, StoredResponse, now_millis};
use crate::upstream::{UpstreamError, Upstreams};

#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Completion(#[from] CompletionError),
    /// A request this response's state does not allow (cancelling a response that did not
    /// run in the background, streaming one again whose events are gone).
    #[error("{0}")]
    State(String),
}

impl From<UpstreamError> for ResponseError {
    fn from(e: UpstreamError) -> Self {
        Self::Completion(e.into())
    }
}

impl From<crate::store::StoreError> for ResponseError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Chat(e.into())
    }
}

pub struct ResponseParts {
    pub completions: Arc<Completions>,
    pub upstreams: Arc<Upstreams>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub bus: Arc<dyn Bus>,
    /// Where jobs run: the generations' tracker, which the drain waits for.
    pub tasks: TaskTracker,
    /// Ends running jobs when the drain window is over.
    pub stop: CancellationToken,
    /// This instance, recorded as the runner of its background responses.
    pub server_id: String,
}

/// Responses and their jobs.
pub struct Responses {
    p: ResponseParts,
    /// Jobs running on this instance, by response id, to cancel them.
    running: Arc<DashMap<String, CancellationToken>>,
}

/// What `POST /v1/responses` answers.
pub struct Created {
    pub answer: Answer,
    /// The response's own upstream call writes the request's log line when it ends (a
    /// foreground response that was no cache hit or shared flight).
    pub logs_at_end: bool,
}

pub enum Answer {
    /// `stream: true`: the response's events as they come.
    Events(ResponseFeed),
    /// The response object: whole, or as queued for a background response.
    Object(Value),
}

/// A response's events, with what must live as long as the reader.
pub struct ResponseFeed {
    id: String,
    events: Events,
    /// A streamed (not background) response is cancelled when its reader goes away.
    _cancel_on_drop: Option<DropGuard>,
    /// Keeps this instance following a response that runs on another one.
    _follow: Option<Follow>,
    /// Whether the response runs in the background: its readers may leave at any time.
    pub background: bool,
}

enum Events {
    /// A background response's channel, from a sequence number on.
    Hub(Subscription, Vec<Event>),
    /// A foreground response's one reader.
    Queue(mpsc::Receiver<ResponseEvent>),
}

/// One event of a feed: from the hub (stored by kind, the JSON as the client reads it), or
/// straight from the job.
pub enum FeedEvent {
    Hub(Event),
    Direct(ResponseEvent),
}

/// Most events a feed hands out at once.
const FEED_BATCH: usize = 64;

/// Events a foreground job may run ahead of its reader before it waits for it.
const QUEUE: usize = 64;

impl ResponseFeed {
    pub fn response_id(&self) -> &str {
        &self.id
    }

    /// Waits for the next events and puts them in `out` (cleared first).
    pub async fn next_batch(&mut self, out: &mut Vec<FeedEvent>) -> Result<(), End> {
        out.clear();
        match &mut self.events {
            Events::Hub(sub, batch) => {
                sub.next_batch(batch).await?;
                out.extend(batch.drain(..).map(FeedEvent::Hub));
            }
            Events::Queue(rx) => {
                let first = rx.recv().await.ok_or(End::Finished)?;
                out.push(FeedEvent::Direct(first));
                while out.len() < FEED_BATCH {
                    match rx.try_recv() {
                        Ok(ev) => out.push(FeedEvent::Direct(ev)),
                        Err(_) => break,
                    }
                }
            }
        }
        Ok(())
    }
}

/// How often a background job looks for a cancel asked on another instance (or its
/// response deleted there).
const CANCEL_POLL: Duration = Duration::from_secs(1);

/// How long a cancel waits for the job to write its last event before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

impl Responses {
    pub fn new(p: ResponseParts) -> Self {
        Self {
            p,
            running: Arc::new(DashMap::new()),
        }
    }

    /// Starts the response `req` asks for.
    pub async fn create(
        &self,
        caller: &Caller,
        req: CreateResponse,
    ) -> Result<Created, ResponseError> {
        if req.background && !req.store {
            return Err(ChatError::Invalid(
                "background: a background response must be stored (store: true)".into(),
            )
            .into());
        }
        let history = match req.previous_response_id.as_deref() {
            Some(prev) => self.history(caller, prev).await?,
            None => Vec::new(),
        };
        let chat = responses::to_chat(&req, &history).map_err(ChatError::Invalid)?;
        let id = responses::new_id("resp");
        let created_at = crate::domain::chunk::unix_now();
        let builder = ResponseBuilder::new(responses::shell(&req, &id, created_at));
        let mut input_items = history;
        input_items.extend(req.input_items());
        let record = req.store.then(|| StoredResponse {
            id: id.clone(),
            user_id: caller.user_id.clone(),
            status: "queued".into(),
            body: String::new(),
            input_items: Value::Array(input_items).to_string(),
            server: None,
            cancel_at: None,
            created_at: now_millis(),
            updated_at: now_millis(),
        });
        let cancel = CancellationToken::new();
        let job = Job {
            id,
            caller: caller.clone(),
            builder,
            cancel,
            record,
            inserted: false,
            store: self.p.store.clone(),
            stop: self.p.stop.clone(),
            poll_cancel: req.background,
            running: self.running.clone(),
        };
        if req.background {
            self.background(job, chat, req.stream).await
        } else {
            self.foreground(job, chat, req.stream).await
        }
    }

    /// Stores the response as queued and runs it where no client waits for it; answers the
    /// queued object, or (`stream`) its events from the start.
    async fn background(
        &self,
        mut job: Job,
        chat: ChatRequest,
        stream: bool,
    ) -> Result<Created, ResponseError> {
        // Refused now rather than as a failed response: the model must exist.
        self.p.upstreams.resolve(&chat.model)?;
        let id = job.id.clone();
        let queued = job.queued();
        if let Some(record) = &job.record {
            let record = StoredResponse {
                body: queued.to_string(),
                server: Some(self.p.server_id.clone()),
                ..record.clone()
            };
            self.p.store.insert_response(&record).await?;
            job.inserted = true;
        }
        let channel = self.p.hub.create(&id, &id, &job.caller.user_id);
        self.running.insert(id.clone(), job.cancel.clone());
        let completions = self.p.completions.clone();
        let sink = Sink::Hub(channel.clone());
        self.p.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let relay = completions
                    .open(&job.caller.user_id, job.caller.key_id.as_deref(), chat)
                    .await;
                job.run(relay, sink).await
            },
            tracing::info_span!("response", response_id = %id),
        ));
        // Tracked with the job, so shutdown waits until its last event left too.
        self.p.tasks.spawn(self.p.bus.export(channel.clone()));
        let answer = if stream {
            Answer::Events(ResponseFeed {
                id,
                events: Events::Hub(channel.subscribe(None), Vec::new()),
                _cancel_on_drop: None,
                _follow: None,
                background: true,
            })
        } else {
            Answer::Object(queued)
        };
        Ok(Created {
            answer,
            logs_at_end: false,
        })
    }

    /// Runs the response for the client that asked, which gets its events as they come
    /// (`stream`) or the whole object; a client that leaves cancels it.
    async fn foreground(
        &self,
        job: Job,
        chat: ChatRequest,
        stream: bool,
    ) -> Result<Created, ResponseError> {
        // The upstream call opens before the answer, so a refusal (unknown model, every
        // provider down) is the request's own HTTP error.
        let relay = self
            .p
            .completions
            .open(&job.caller.user_id, job.caller.key_id.as_deref(), chat)
            .await?;
        let logs_at_end = relay.own_call;
        let (id, cancel) = (job.id.clone(), job.cancel.clone());
        let (tx, rx) = mpsc::channel(QUEUE);
        self.running.insert(id.clone(), cancel.clone());
        self.p.tasks.spawn(tracing::Instrument::instrument(
            job.run(Ok(relay), Sink::Queue(tx)),
            tracing::info_span!("response", response_id = %id),
        ));
        let feed = ResponseFeed {
            id,
            events: Events::Queue(rx),
            _cancel_on_drop: Some(cancel.drop_guard()),
            _follow: None,
            background: false,
        };
        let answer = if stream {
            Answer::Events(feed)
        } else {
            Answer::Object(last_response(feed).await?)
        };
        Ok(Created {
            answer,
            logs_at_end,
        })
    }

    /// The conversation up to and including `prev`: its input items, then its output.
    async fn history(&self, caller: &Caller, prev: &str) -> Result<Vec<Value>, ResponseError> {
        let stored = self
            .p
            .store
            .get_response(&caller.user_id, prev)
            .await?
            .ok_or(ChatError::NotFound("previous_response_id: the response"))?;
        if matches!(stored.status.as_str(), "queued" | "in_progress") {
            return Err(ChatError::Invalid(format!(
                "previous_response_id: response '{prev}' is still {}",
                stored.status
            ))
            .into());
        }
        let mut items = parse_items(&stored.input_items);
        let body: Value = serde_json::from_str(&stored.body).unwrap_or(Value::Null);
        if let Some(output) = body.get("output").and_then(Value::as_array) {
            items.extend(output.iter().cloned());
        }
        Ok(items)
    }

    /// The stored response, its status as the store has it. An unfinished one whose
    /// instance was lost (its replay log ends `interrupted`) is settled as failed here.
    pub async fn get(&self, caller: &Caller, id: &str) -> Result<Value, ResponseError> {
        let stored = self.stored(caller, id).await?;
        let mut body: Value = serde_json::from_str(&stored.body).unwrap_or_else(|_| json!({}));
        let mut status = stored.status.clone();
        if matches!(status.as_str(), "queued" | "in_progress") {
            // The store is written when a response starts and ends; how far it got is the
            // channel's to say (or, for one running elsewhere, the shared replay log's).
            let last = match self.p.hub.get(id) {
                Some(ch) => ch.last_kind(),
                None => self.p.bus.last_kind(id).await,
            };
            match last {
                Some(EventKind::Interrupted) => {
                    status = "failed".into();
                    body["error"] = lost_error();
                    self.p
                        .store
                        .finish_response(id, &status, &with_status(&body, &status), now_millis())
                        .await?;
                }
                Some(EventKind::Response) => status = "in_progress".into(),
                _ => {}
            }
        }
        if status == "failed" && body.get("error").is_none_or(Value::is_null) {
            body["error"] = lost_error();
        }
        body["status"] = Value::String(status);
        Ok(body)
    }

    /// Deletes a stored response (stopping it if it runs here).
    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<Value, ResponseError> {
        let _ = self.stored(caller, id).await?;
        if let Some(r) = self.running.get(id) {
            r.cancel();
        }
        self.p.store.delete_response(&caller.user_id, id).await?;
        Ok(json!({"id": id, "object": "response", "deleted": true}))
    }

    /// The input items a stored response was given, earlier responses' included, as
    /// OpenAI's list page: `order` `asc` or `desc` (the default), `after` an item id.
    pub async fn input_items(
        &self,
        caller: &Caller,
        id: &str,
        page: ItemPage,
    ) -> Result<Value, ResponseError> {
        let stored = self.stored(caller, id).await?;
        let mut items = parse_items(&stored.input_items);
        if !page.ascending {
            items.reverse();
        }
        let start = match page.after.as_deref() {
            Some(after) => items
                .iter()
                .position(|i| i.get("id").and_then(Value::as_str) == Some(after))
                .map(|i| i + 1)
                .ok_or_else(|| ChatError::Invalid(format!("after: no item '{after}'")))?,
            None => 0,
        };
        let rest = &items[start..];
        let data: Vec<Value> = rest.iter().take(page.limit).cloned().collect();
        let id_of = |v: Option<&Value>| v.and_then(|i| i.get("id")).cloned();
        Ok(json!({
            "object": "list",
            "first_id": id_of(data.first()),
            "last_id": id_of(data.last()),
            "has_more": rest.len() > data.len(),
            "data": data,
        }))
    }

    /// Stops a background response and answers it as it ended.
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<Value, ResponseError> {
        let stored = self.stored(caller, id).await?;
        // Only a background response is stored before it ends.
        if !matches!(stored.status.as_str(), "queued" | "in_progress") {
            let body: Value = serde_json::from_str(&stored.body).unwrap_or(Value::Null);
            if body.get("background").and_then(Value::as_bool) != Some(true) {
                return Err(ResponseError::State(
                    "only a background response can be cancelled".into(),
                ));
            }
            return self.get(caller, id).await;
        }
        let _follow = self.p.bus.follow(id).await;
        let channel = self.channel(id).await;
        match self.running.get(id) {
            Some(r) => r.cancel(),
            None => {
                self.p
                    .store
                    .request_response_cancel(&caller.user_id, id, now_millis())
                    .await?;
            }
        }
        if let Some(ch) = channel {
            let mut sub = ch.subscribe(Some(ch.next_seq().saturating_sub(1)));
            let mut batch = Vec::new();
            let _ = tokio::time::timeout(CANCEL_WAIT, async {
                while sub.next_batch(&mut batch).await.is_ok() {}
            })
            .await;
        }
        self.get(caller, id).await
    }

    /// A background response's events after `starting_after` (from its start without),
    /// while it runs or for the replay window after it ended, on any instance.
    pub async fn events(
        &self,
        caller: &Caller,
        id: &str,
        starting_after: Option<u64>,
    ) -> Result<ResponseFeed, ResponseError> {
        let stored = self.stored(caller, id).await?;
        // Following first: nothing published while the channel is looked up is missed.
        let follow = self.p.bus.follow(id).await;
        let channel = self
            .channel(id)
            .await
            .filter(|ch| ch.owner == caller.user_id)
            .ok_or_else(|| {
                let background = serde_json::from_str::<Value>(&stored.body)
                    .ok()
                    .and_then(|b| b.get("background").and_then(Value::as_bool))
                    == Some(true);
                ResponseError::State(if background {
                    "this response's events are no longer kept (SLUICE_REPLAY_TTL after it ends)"
                        .into()
                } else {
                    "only a background response can be streamed again".into()
                })
            })?;
        Ok(ResponseFeed {
            id: id.to_owned(),
            events: Events::Hub(channel.subscribe(starting_after), Vec::new()),
            _cancel_on_drop: None,
            _follow: Some(follow),
            background: true,
        })
    }

    async fn stored(&self, caller: &Caller, id: &str) -> Result<StoredResponse, ResponseError> {
        Ok(self
            .p
            .store
            .get_response(&caller.user_id, id)
            .await?
            .ok_or(ChatError::NotFound("response"))?)
    }

    async fn channel(&self, id: &str) -> Option<Arc<Channel>> {
        match self.p.hub.get(id) {
            Some(ch) => Some(ch),
            None => self.p.bus.fetch(id).await,
        }
    }
}

/// A page of input items.
#[derive(Debug, Clone)]
pub struct ItemPage {
    pub limit: usize,
    pub ascending: bool,
    pub after: Option<String>,
}

fn parse_items(text: &str) -> Vec<Value> {
    match serde_json::from_str(text) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

fn lost_error() -> Value {
    json!({
        "code": "server_error",
        "message": "the instance running this response stopped before it ended",
    })
}

fn with_status(body: &Value, status: &str) -> String {
    let mut body = body.clone();
    body["status"] = Value::String(status.into());
    body.to_string()
}

/// The response object of the last event of a response's feed.
async fn last_response(mut feed: ResponseFeed) -> Result<Value, ResponseError> {
    let mut batch = Vec::new();
    let mut last = None;
    loop {
        match feed.next_batch(&mut batch).await {
            Ok(()) => last = batch.pop().or(last),
            Err(End::Finished) => break,
            Err(End::Lagged) => {
                return Err(ResponseError::State(
                    "the response outran its event log".into(),
                ));
            }
        }
    }
    let data = match last {
        Some(FeedEvent::Direct(ev)) => ev.data.into_bytes(),
        Some(FeedEvent::Hub(ev)) => ev.data().to_vec(),
        None => Vec::new(),
    };
    let event: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
    Ok(event.get("response").cloned().unwrap_or(event))
}

/// Where a job's events go.
enum Sink {
    /// A background response's channel, numbered by the hub as the builder numbered them.
    Hub(Arc<Channel>),
    /// A foreground response's reader; a full queue makes the job wait for it.
    Queue(mpsc::Sender<ResponseEvent>),
}

/// One response being produced: the relay's chunks through the builder, each event into
/// the channel, the final object into the store.
struct Job {
    id: String,
    caller: Caller,
    builder: ResponseBuilder,
    cancel: CancellationToken,
    /// `Some` when the response is stored.
    record: Option<StoredResponse>,
    /// The record is in the store already (a background response, stored as queued).
    inserted: bool,
    store: Arc<dyn Store>,
    stop: CancellationToken,
    /// A background response in a cluster: a cancel may be asked on another instance.
    poll_cancel: bool,
    running: Arc<DashMap<String, CancellationToken>>,
}

impl Job {
    /// The object of a background response as it is queued.
    fn queued(&self) -> Value {
        let mut r = self.builder.response();
        r["status"] = Value::String("queued".into());
        r
    }

    async fn run(
        mut self,
        relay: Result<super::completions::Completion, CompletionError>,
        sink: Sink,
    ) {
        let mut out = Vec::new();
        self.builder.begin(&mut out);
        self.publish(&sink, &mut out).await;
        match relay {
            Ok(completion) => self.relay(completion, &sink, &mut out).await,
            Err(e) => {
                let (code, message) = failure(&e);
                self.builder.fail(code, &message, &mut out);
            }
        }
        self.running.remove(&self.id);
        // Stored before the last event is published: whoever sees the response end (a
        // cancel waiting for it, a client that retrieves it) finds it settled.
        self.save().await;
        self.publish(&sink, &mut out).await;
    }

    async fn save(&mut self) {
        let Some(record) = self.record.take() else {
            return;
        };
        let body = self.builder.response();
        let status = body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("completed")
            .to_owned();
        let now = now_millis();
        let saved = if self.inserted {
            self.store
                .finish_response(&self.id, &status, &body.to_string(), now)
                .await
                .map(|_| ())
        } else {
            self.store
                .insert_response(&StoredResponse {
                    status,
                    body: body.to_string(),
                    updated_at: now,
                    ..record
                })
                .await
        };
        if let Err(e) = saved {
            tracing::error!(response_id = %self.id, error = %e, "cannot store the response");
        }
    }

    async fn relay(
        &mut self,
        completion: super::completions::Completion,
        sink: &Sink,
        out: &mut Vec<ResponseEvent>,
    ) {
        let super::completions::Completion {
            relay,
            permit: _permit,
            ..
        } = completion;
        let mut events = relay.events;
        let mut poll = tokio::time::interval(CANCEL_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (cancel, stop) = (self.cancel.clone(), self.stop.clone());
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.builder.cancel(out);
                    break;
                }
                _ = stop.cancelled() => {
                    self.builder.fail(
                        "server_error",
                        "the server is shutting down; retry the request",
                        out,
                    );
                    break;
                }
                _ = poll.tick(), if self.poll_cancel => {
                    // Asked on another instance, or deleted: either way it stops here.
                    match self.store.get_response(&self.caller.user_id, &self.id).await {
                        Ok(Some(r)) if r.cancel_at.is_none() => {}
                        Ok(_) => self.cancel.cancel(),
                        Err(e) => tracing::warn!(response_id = %self.id, error = %e, "cannot look for a cancel"),
                    }
                    continue;
                }
                ev = events.next() => match ev {
                    Some(Ok(chunk)) => self.builder.push(&chunk, out),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "response failed after it started");
                        self.builder.fail(failure_code(&e), &e.to_string(), out);
                        break;
                    }
                    None => {
                        self.builder.complete(out);
                        break;
                    }
                },
            }
            self.publish(sink, out).await;
        }
    }

    /// Hands the events on; the relay's last events are left in `out` for
    /// [`run`](Self::run) to hand on once the response is stored. A reader that left, or
    /// one still not reading at shutdown, gets nothing more.
    async fn publish(&self, sink: &Sink, out: &mut Vec<ResponseEvent>) {
        let last = out.len().saturating_sub(1);
        for (i, ev) in out.drain(..).enumerate() {
            match sink {
                Sink::Hub(channel) => {
                    let kind = if i == last && self.builder.is_final() {
                        EventKind::ResponseEnd
                    } else {
                        EventKind::Response
                    };
                    if channel.publish(kind, ev.data.as_bytes()) != Some(ev.seq) {
                        tracing::error!(response_id = %self.id, seq = ev.seq, "response event out of sequence");
                    }
                }
                Sink::Queue(tx) => {
                    // At shutdown only a reader that has stopped reading is given up on.
                    let sent = tokio::select! {
                        biased;
                        sent = tx.send(ev) => sent.is_ok(),
                        _ = self.stop.cancelled() => false,
                    };
                    if !sent {
                        // Dropping the drain drops the events left.
                        return;
                    }
                }
            }
        }
    }
}

/// A response that could not start, as its `error`.
fn failure(e: &CompletionError) -> (&'static str, String) {
    match e {
        CompletionError::Chat(c) => ("rate_limit_exceeded", c.to_string()),
        CompletionError::Upstream(u) => (failure_code(u), u.to_string()),
    }
}

/// The `response.error.code` of an upstream failure, in the API's vocabulary; the
/// message says what happened.
fn failure_code(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Status { status: 429, .. } => "rate_limit_exceeded",
        _ => "server_error",
    }
}
