//! Chat sessions: history, one generation at a time per session, and the generation task
//! that relays an upstream reply into the hub while persisting it.
//!
//! A generation belongs to the session, not to the request that started it: it keeps
//! running when its clients disconnect (a reload resumes it) until it is done, cancelled,
//! or out of time, and its final state is always written to the store.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::agent::{DEFAULT_AGENT, build_request};
use crate::cluster::Bus;
use crate::domain::{ChatRequest, FinishReason, Message, Role, Usage};
use crate::guard::streams::{Limit, StreamLimits, StreamPermit};
use crate::hub::{Channel, EventId, EventKind, Hub, SessionFeed};
use crate::store::finals::FinalWrites;
use crate::store::{
    MessageStatus, MessageUpdate, Session, SessionCursor, Store, StoreError, StoredMessage,
    UsageRecord, new_id, now_millis,
};
use crate::upstream::{Target, UpstreamError, Upstreams};

/// Who is asking: every session operation is scoped to this user.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub key_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Missing, or owned by someone else: the two are indistinguishable to the caller.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("a generation is already running in this session")]
    Busy { generation_id: String },
    #[error("{0}")]
    Invalid(String),
    #[error("too many streams {}; retry shortly", match .0 { Limit::Instance => "on this instance", Limit::Key => "for this key" })]
    TooManyStreams(Limit),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// Budget of conversation text sent upstream; the oldest messages are left out first.
    pub history_max_chars: usize,
    /// Longest accepted user message.
    pub max_message_chars: usize,
    /// This instance, named in the store's hold on a session it runs a generation of.
    pub server_id: String,
    /// How long a session's hold in the store lasts when nobody releases it (its instance
    /// died). Longer than any generation can run, so it never lapses under a live one;
    /// see [`claim_lifetime`].
    pub claim_for: std::time::Duration,
}

/// The store's hold on a session outlives the longest generation: the total generation
/// time limit, the drain window an instance may keep running it after, and a margin for
/// the start and the final write. A hold is thus never renewed (no write per stream while
/// it runs); a lost instance's hold is freed sooner when its reply is stored as ended.
pub fn claim_lifetime(
    total: std::time::Duration,
    drain: std::time::Duration,
) -> std::time::Duration {
    total + drain + std::time::Duration::from_secs(60)
}

struct Running {
    generation_id: String,
    cancel: CancellationToken,
}

pub struct ChatService {
    store: Arc<dyn Store>,
    upstreams: Arc<Upstreams>,
    hub: Arc<Hub>,
    settings: ChatSettings,
    /// The running generation of each session: the one-at-a-time rule and cancellation.
    running: Arc<DashMap<String, Running>>,
    /// Every generation task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Fired when the drain window is over: generations still running end as interrupted.
    stop: CancellationToken,
    /// A generation holds a stream place of its caller until it ends.
    streams: Arc<StreamLimits>,
    /// Tokens-per-minute quotas, when configured.
    meter: Option<Arc<dyn crate::domain::TokenMeter>>,
    /// Carries generations to and from other instances.
    bus: Arc<dyn Bus>,
    /// Final writes of replies, kept and retried while the store is unreachable.
    finals: Arc<FinalWrites>,
}

/// What the user sent, and the model they picked for it, if any.
struct Turn<'a> {
    content: &'a str,
    model: Option<&'a str>,
}

/// A generation that has been accepted and is running.
pub struct Started {
    pub generation_id: String,
    pub message_id: String,
    pub user_message_id: String,
    pub channel: Arc<Channel>,
}

/// One page of sessions, newest first.
#[derive(Debug, Serialize)]
pub struct SessionPage {
    pub data: Vec<Session>,
    /// Pass back as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// What a [`ChatService`] is built from.
pub struct ChatParts {
    pub store: Arc<dyn Store>,
    pub upstreams: Arc<Upstreams>,
    pub hub: Arc<Hub>,
    pub settings: ChatSettings,
    /// Fired when the drain window is over.
    pub stop: CancellationToken,
    pub streams: Arc<StreamLimits>,
    pub meter: Option<Arc<dyn crate::domain::TokenMeter>>,
    pub bus: Arc<dyn Bus>,
    pub finals: Arc<FinalWrites>,
}

impl ChatService {
    pub fn new(p: ChatParts) -> Self {
        Self {
            store: p.store,
            upstreams: p.upstreams,
            hub: p.hub,
            settings: p.settings,
            running: Arc::new(DashMap::new()),
            tasks: TaskTracker::new(),
            stop: p.stop,
            streams: p.streams,
            meter: p.meter,
            bus: p.bus,
            finals: p.finals,
        }
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    pub async fn create_session(
        &self,
        caller: &Caller,
        agent: Option<&str>,
        title: Option<&str>,
    ) -> Result<Session, ChatError> {
        if let Some(name) = agent {
            self.agent(Some(name)).await.map_err(|_| {
                ChatError::Invalid(format!("agent: no active agent named '{name}'"))
            })?;
        }
        let session = Session::new(&caller.user_id, agent, title, now_millis());
        self.store.create_session(&session).await?;
        Ok(session)
    }

    pub async fn list_sessions(
        &self,
        caller: &Caller,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<SessionPage, ChatError> {
        let after = cursor.map(parse_cursor).transpose()?;
        let limit = limit.clamp(1, 100);
        let data = self
            .store
            .list_sessions(&caller.user_id, after.as_ref(), limit)
            .await?;
        let next_cursor = (data.len() == limit as usize)
            .then(|| data.last().map(|s| format!("{}_{}", s.updated_at, s.id)))
            .flatten();
        Ok(SessionPage { data, next_cursor })
    }

    /// An active agent by name, or the default agent.
    pub async fn agent(&self, name: Option<&str>) -> Result<crate::store::Agent, ChatError> {
        let name = name.unwrap_or(DEFAULT_AGENT);
        self.store
            .get_agent(name)
            .await?
            .filter(|a| a.is_active)
            .ok_or(ChatError::NotFound("agent"))
    }

    pub async fn get_session(&self, caller: &Caller, id: &str) -> Result<Session, ChatError> {
        self.store
            .get_session(&caller.user_id, id)
            .await?
            .ok_or(ChatError::NotFound("session"))
    }

    pub async fn rename_session(
        &self,
        caller: &Caller,
        id: &str,
        title: Option<&str>,
    ) -> Result<Session, ChatError> {
        self.store
            .update_session_title(&caller.user_id, id, title)
            .await?
            .ok_or(ChatError::NotFound("session"))
    }

    pub async fn delete_session(&self, caller: &Caller, id: &str) -> Result<(), ChatError> {
        if !self.store.delete_session(&caller.user_id, id).await? {
            return Err(ChatError::NotFound("session"));
        }
        if let Some((_, r)) = self.running.remove(id) {
            r.cancel.cancel();
        }
        self.hub.remove_session(id);
        Ok(())
    }

    pub async fn messages(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<Vec<StoredMessage>, ChatError> {
        self.get_session(caller, session_id).await?;
        Ok(self.store.list_messages(session_id).await?)
    }

    /// Stores the user message, then starts the generation in the background. `model`, when
    /// given, answers this message instead of the session agent's model. The reply's
    /// message exists (status `streaming`) before the first token is requested.
    pub async fn post_message(
        &self,
        caller: &Caller,
        session_id: &str,
        content: &str,
        model: Option<&str>,
    ) -> Result<Started, ChatError> {
        if content.trim().is_empty() {
            return Err(ChatError::Invalid("content: must not be empty".into()));
        }
        // The HTTP body parser refuses NUL already; the WebSocket `chat` op arrives here.
        if content.contains('\0') {
            return Err(ChatError::Invalid(
                "content: must not contain NUL (\\u0000)".into(),
            ));
        }
        if content.chars().count() > self.settings.max_message_chars {
            return Err(ChatError::Invalid(format!(
                "content: longer than {} characters",
                self.settings.max_message_chars
            )));
        }
        let session = self.get_session(caller, session_id).await?;
        let permit = self
            .streams
            .try_acquire(Some(caller.key_id.as_deref().unwrap_or(&caller.user_id)))
            .map_err(ChatError::TooManyStreams)?;
        let generation_id = new_id();
        let cancel = CancellationToken::new();
        match self.running.entry(session.id.clone()) {
            Entry::Occupied(e) => {
                return Err(ChatError::Busy {
                    generation_id: e.get().generation_id.clone(),
                });
            }
            Entry::Vacant(e) => {
                e.insert(Running {
                    generation_id: generation_id.clone(),
                    cancel: cancel.clone(),
                });
            }
        }
        // The store decides across instances, whatever else is reachable: the in-memory
        // entry above only spares it the posts that collide on this instance.
        let now = now_millis();
        let claimed = self
            .store
            .claim_generation(
                &session.id,
                &generation_id,
                &self.settings.server_id,
                now,
                now.saturating_add(self.settings.claim_for.as_millis() as i64),
            )
            .await;
        let held = match claimed {
            Ok(None) => None,
            Ok(Some(running)) => Some(Err(ChatError::Busy {
                generation_id: running,
            })),
            Err(e) => Some(Err(ChatError::Store(e))),
        };
        if let Some(refused) = held {
            self.running
                .remove_if(&session.id, |_, r| r.generation_id == generation_id);
            return refused;
        }
        match self
            .begin(
                caller,
                &session,
                Turn { content, model },
                &generation_id,
                cancel,
                permit,
            )
            .await
        {
            Ok(started) => Ok(started),
            Err(e) => {
                self.running
                    .remove_if(&session.id, |_, r| r.generation_id == generation_id);
                release(self.store.as_ref(), &session.id, &generation_id).await;
                Err(e)
            }
        }
    }

    async fn begin(
        &self,
        caller: &Caller,
        session: &Session,
        Turn { content, model }: Turn<'_>,
        generation_id: &str,
        cancel: CancellationToken,
        permit: StreamPermit,
    ) -> Result<Started, ChatError> {
        let mut agent = self.agent(session.agent.as_deref()).await?;
        let chain = match model.map(str::trim) {
            // A model picked for this reply is that model alone: falling back to another
            // would answer as a model the user did not pick.
            Some(m) if !m.is_empty() && m != agent.model => {
                let chain = self
                    .upstreams
                    .chain_for(m, None, &[])
                    .map_err(|e| ChatError::Invalid(format!("model: {e}")))?;
                agent.model = m.to_owned();
                agent.provider = None;
                chain
            }
            _ => self
                .upstreams
                .chain_for(
                    &agent.model,
                    agent.provider.as_deref(),
                    &agent.fallback_models,
                )
                .map_err(|e| ChatError::Invalid(format!("agent '{}': {e}", agent.name)))?,
        };
        let model = agent.model.clone();
        let now = now_millis();
        let user_msg = StoredMessage {
            id: new_id(),
            session_id: session.id.clone(),
            role: Role::User,
            content: content.to_owned(),
            reasoning: None,
            status: MessageStatus::Complete,
            generation_id: None,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            error: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_message(&user_msg).await?;
        let history = self.store.list_messages(&session.id).await?;
        let assistant = StoredMessage {
            id: new_id(),
            session_id: session.id.clone(),
            role: Role::Assistant,
            content: String::new(),
            reasoning: None,
            status: MessageStatus::Streaming,
            generation_id: Some(generation_id.to_owned()),
            model: Some(model.clone()),
            prompt_tokens: None,
            completion_tokens: None,
            error: None,
            // After the user message, even within the same millisecond.
            created_at: now + 1,
            updated_at: now + 1,
        };
        self.store.insert_message(&assistant).await?;

        let request = build_request(
            self.store.as_ref(),
            &agent,
            trim_history(&history, self.settings.history_max_chars),
        )
        .await?;
        let channel = self.hub.create(generation_id, &session.id, &caller.user_id);
        channel.publish_json(
            EventKind::Start,
            &serde_json::json!({
                "session_id": session.id,
                "generation_id": generation_id,
                "message_id": assistant.id,
                "model": model,
            }),
        );
        let job = Generation {
            session_id: session.id.clone(),
            generation_id: generation_id.to_owned(),
            message_id: assistant.id.clone(),
            caller: caller.clone(),
            request,
            chain,
            channel: channel.clone(),
            cancel,
            _permit: permit,
        };
        let deps = GenerationDeps {
            store: self.store.clone(),
            upstreams: self.upstreams.clone(),
            running: self.running.clone(),
            stop: self.stop.clone(),
            meter: self.meter.clone(),
            finals: self.finals.clone(),
            tasks: self.tasks.clone(),
        };
        // Lines the generation writes (its upstream call's among them) name it and its
        // session, as a request's name the request.
        let span = tracing::info_span!(
            "generation",
            session_id = %session.id,
            generation_id = %generation_id
        );
        self.tasks
            .spawn(tracing::Instrument::instrument(deps.run(job), span));
        // Tracked with the generation, so shutdown waits until its last event left too.
        self.tasks.spawn(self.bus.export(channel.clone()));
        Ok(Started {
            generation_id: generation_id.to_owned(),
            message_id: assistant.id,
            user_message_id: user_msg.id,
            channel,
        })
    }

    /// Stops the running generation of a session; its partial reply is kept.
    pub async fn cancel(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<Option<String>, ChatError> {
        self.get_session(caller, session_id).await?;
        Ok(self.running.get(session_id).map(|r| {
            r.cancel.cancel();
            r.generation_id.clone()
        }))
    }

    /// The feed of a session's generations, resuming after `last_event_id` when it names a
    /// generation of this session that is still retained.
    pub async fn feed(
        &self,
        caller: &Caller,
        session_id: &str,
        last_event_id: Option<&str>,
    ) -> Result<SessionFeed, ChatError> {
        let session = self.get_session(caller, session_id).await?;
        // Following first: a generation running on another instance is then in the hub,
        // and nothing published while the resume point is looked up is missed.
        let follow = self.bus.follow(&session.id).await;
        let resume = match last_event_id.and_then(EventId::parse) {
            Some(id) => {
                let channel = match self.hub.get(&id.generation_id) {
                    Some(ch) => Some(ch),
                    None => self.bus.fetch(&id.generation_id).await,
                };
                channel
                    .filter(|ch| ch.session_id == session.id && ch.owner == caller.user_id)
                    .map(|ch| (ch, Some(id.seq)))
            }
            None => None,
        };
        Ok(SessionFeed::new(&self.hub, &session.id, resume).holding(follow))
    }

    /// The feed of a session from the start of one of its generations (the WebSocket
    /// `chat` op follows the reply it started).
    pub fn feed_from(&self, channel: Arc<Channel>) -> SessionFeed {
        let session_id = channel.session_id.clone();
        SessionFeed::new(&self.hub, &session_id, Some((channel, None)))
    }
}

/// Frees the session's hold in the store. Should the store be away, the hold frees itself
/// once the reply's final state is stored (kept and retried), or at its expiry.
async fn release(store: &dyn Store, session_id: &str, generation_id: &str) {
    if let Err(e) = store.release_generation(session_id, generation_id).await {
        tracing::warn!(session_id = %session_id, generation_id = %generation_id, error = %e, "cannot release the session's running generation; it frees itself once the reply is stored");
    }
}

/// Keeps the newest messages that fit the budget, oldest first; the newest one always.
/// Messages with no text (a failed reply, the placeholder being generated) are left out.
fn trim_history(messages: &[StoredMessage], max_chars: usize) -> Vec<Message> {
    let mut kept = Vec::new();
    let mut used = 0usize;
    for m in messages.iter().rev() {
        if m.content.is_empty() || m.status == MessageStatus::Streaming {
            continue;
        }
        let len = m.content.chars().count();
        if !kept.is_empty() && used + len > max_chars {
            break;
        }
        used += len;
        kept.push(Message::new(m.role, m.content.clone()));
    }
    kept.reverse();
    kept
}

fn parse_cursor(s: &str) -> Result<SessionCursor, ChatError> {
    let bad = || ChatError::Invalid("cursor: not a cursor returned by this API".into());
    let (t, id) = s.split_once('_').ok_or_else(bad)?;
    Ok(SessionCursor {
        updated_at: t.parse().map_err(|_| bad())?,
        id: id.to_owned(),
    })
}

struct Generation {
    session_id: String,
    generation_id: String,
    message_id: String,
    caller: Caller,
    request: ChatRequest,
    chain: Vec<Target>,
    channel: Arc<Channel>,
    cancel: CancellationToken,
    /// Released when the generation ends.
    _permit: StreamPermit,
}

/// How often the reply of a running generation is saved.
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A running reply as far as it got: its text and the thinking before it.
#[derive(Default, Clone)]
struct Draft {
    text: String,
    reasoning: String,
}

impl Draft {
    fn reasoning(&self) -> Option<String> {
        (!self.reasoning.is_empty()).then(|| self.reasoning.clone())
    }
}

/// Writes each saved version of a running reply, still `streaming`, until the generation
/// drops its sender.
async fn save_progress(
    store: Arc<dyn Store>,
    message_id: String,
    mut saved: tokio::sync::watch::Receiver<Draft>,
) {
    while saved.changed().await.is_ok() {
        let draft = saved.borrow_and_update().clone();
        let update = MessageUpdate {
            reasoning: draft.reasoning(),
            content: draft.text,
            status: MessageStatus::Streaming,
            prompt_tokens: None,
            completion_tokens: None,
            error: None,
        };
        if let Err(e) = store
            .update_message(&message_id, &update, now_millis())
            .await
        {
            tracing::warn!(message_id = %message_id, error = %e, "cannot save the reply so far");
        }
    }
}

struct GenerationDeps {
    store: Arc<dyn Store>,
    upstreams: Arc<Upstreams>,
    running: Arc<DashMap<String, Running>>,
    stop: CancellationToken,
    meter: Option<Arc<dyn crate::domain::TokenMeter>>,
    finals: Arc<FinalWrites>,
    /// Where a retried final write runs, so shutdown waits for it too.
    tasks: TaskTracker,
}

/// How a generation ended.
enum Ending {
    Complete(FinishReason),
    Cancelled,
    Failed(UpstreamError),
    Interrupted,
}

struct Outcome {
    reply: Draft,
    usage: Option<Usage>,
    provider: String,
    ending: Ending,
}

/// The data of `token` and `reasoning` events.
#[derive(Serialize)]
struct TextData<'a> {
    text: &'a str,
}

impl GenerationDeps {
    async fn run(self, g: Generation) {
        // The reply so far is saved every few seconds by a writer of its own, so a crash
        // loses at most that much and a slow store never holds up a token.
        let (save, saved) = tokio::sync::watch::channel(Draft::default());
        let writer = tokio::spawn(save_progress(
            self.store.clone(),
            g.message_id.clone(),
            saved,
        ));
        let outcome = self.relay(&g, &save).await;
        drop(save);
        // Finished before the final write, which must be the last.
        let _ = writer.await;
        let (status, error) = match &outcome.ending {
            Ending::Complete(_) => (MessageStatus::Complete, None),
            Ending::Cancelled => (MessageStatus::Cancelled, None),
            Ending::Failed(e) => (MessageStatus::Failed, Some(e.to_string())),
            Ending::Interrupted => (MessageStatus::Interrupted, None),
        };
        let update = MessageUpdate {
            content: outcome.reply.text.clone(),
            reasoning: outcome.reply.reasoning(),
            status,
            prompt_tokens: outcome.usage.map(|u| u.prompt_tokens as i64),
            completion_tokens: outcome.usage.map(|u| u.completion_tokens as i64),
            error,
        };
        // Stored before the final event goes out, so a client that reads history on `done`
        // sees the final state. With the store away, the write is kept and retried instead
        // of holding up `done`.
        self.finals
            .save_message(&g.message_id, update, &self.tasks, &self.stop)
            .await;
        if let Some(u) = outcome.usage {
            let record = UsageRecord {
                id: new_id(),
                user_id: g.caller.user_id.clone(),
                key_id: g.caller.key_id.clone(),
                session_id: Some(g.session_id.clone()),
                provider: outcome.provider.clone(),
                model: g.request.model.clone(),
                prompt_tokens: u.prompt_tokens as i64,
                completion_tokens: u.completion_tokens as i64,
                reasoning_tokens: u.reasoning_tokens as i64,
                created_at: now_millis(),
            };
            if let Err(e) = self.store.record_usage(&record).await {
                tracing::warn!(error = %e, "cannot record usage");
            }
        }
        // Free the session before the final event, so a client may post its next message
        // as soon as it sees `done`.
        self.running
            .remove_if(&g.session_id, |_, r| r.generation_id == g.generation_id);
        release(self.store.as_ref(), &g.session_id, &g.generation_id).await;
        let ch = &g.channel;
        if let Some(u) = outcome.usage {
            ch.publish_json(EventKind::Usage, &u);
        }
        match outcome.ending {
            Ending::Complete(reason) => {
                ch.publish_json(
                    EventKind::Done,
                    &serde_json::json!({"finish_reason": reason.as_str(), "message_id": g.message_id}),
                );
            }
            Ending::Cancelled => {
                ch.publish_json(
                    EventKind::Done,
                    &serde_json::json!({"finish_reason": "cancelled", "message_id": g.message_id}),
                );
            }
            Ending::Failed(e) => {
                let retryable = e.is_retryable() || matches!(e, UpstreamError::Timeout { .. });
                ch.publish_json(
                    EventKind::Error,
                    &serde_json::json!({"code": e.code(), "message": e.to_string(), "retryable": retryable}),
                );
            }
            Ending::Interrupted => {
                ch.publish_json(
                    EventKind::Interrupted,
                    &serde_json::json!({"reason": "shutdown"}),
                );
            }
        }
    }

    async fn relay(&self, g: &Generation, save: &tokio::sync::watch::Sender<Draft>) -> Outcome {
        let mut out = Outcome {
            reply: Draft::default(),
            usage: None,
            provider: String::new(),
            ending: Ending::Interrupted,
        };
        let relay = tokio::select! {
            biased;
            _ = g.cancel.cancelled() => {
                out.ending = Ending::Cancelled;
                return out;
            }
            _ = self.stop.cancelled() => return out,
            r = self.upstreams.open_chain(&g.request, &g.chain) => r,
        };
        let relay = match relay {
            Ok(r) => r,
            Err(e) => {
                out.ending = Ending::Failed(e);
                return out;
            }
        };
        out.provider = relay.provider.clone();
        let mut events = relay.events;
        let mut finish = FinishReason::Stop;
        // Charged as the reply streams; what is left is charged however the reply ends.
        let mut tally = match (&self.meter, &g.caller.key_id) {
            (Some(m), Some(k)) => Some(crate::guard::quota::Tally::new(m.clone(), k.clone())),
            _ => None,
        };
        let mut checkpoint =
            tokio::time::interval_at(tokio::time::Instant::now() + SAVE_EVERY, SAVE_EVERY);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = g.cancel.cancelled() => {
                    out.ending = Ending::Cancelled;
                    return out;
                }
                _ = self.stop.cancelled() => return out,
                _ = checkpoint.tick() => {
                    let changed = {
                        let saved = save.borrow();
                        saved.text.len() != out.reply.text.len()
                            || saved.reasoning.len() != out.reply.reasoning.len()
                    };
                    if changed {
                        save.send_replace(out.reply.clone());
                    }
                }
                ev = events.next() => match ev {
                    Some(Ok(chunk)) => {
                        if let Some(r) = chunk.reasoning() {
                            g.channel.publish_json(EventKind::Reasoning, &TextData { text: r });
                            out.reply.reasoning.push_str(r);
                        }
                        if let Some(t) = chunk.content() {
                            g.channel.publish_json(EventKind::Token, &TextData { text: t });
                            out.reply.text.push_str(t);
                        }
                        if let Some(t) = tally.as_mut().filter(|_| chunk.is_token()) {
                            t.token().await;
                        }
                        if let Some(u) = chunk.usage() {
                            out.usage = Some(u);
                        }
                        if let Some(r) = chunk.finish() {
                            finish = r.clone();
                        }
                    }
                    Some(Err(e)) => {
                        out.ending = Ending::Failed(e);
                        return out;
                    }
                    None => {
                        if let Some(t) = &mut tally {
                            t.flush().await;
                        }
                        out.ending = Ending::Complete(finish);
                        return out;
                    }
                },
            }
        }
    }
}
