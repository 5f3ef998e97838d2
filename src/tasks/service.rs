//! Tasks: creation, the worker pool, progress events, cancellation.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Delivery, QueueError, TaskQueue};
use crate::chat::agent::{DEFAULT_AGENT, build_request, render};
use crate::chat::service::{Caller, ChatError};
use crate::domain::{Message, Role};
use crate::hub::{Channel, EventId, EventKind, Hub, Subscription};
use crate::store::finals::FinalWrites;
use crate::store::{Agent, Store, StoreError, Task, TaskStatus, new_id, now_millis};
use crate::upstream::Upstreams;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<StoreError> for TaskError {
    fn from(e: StoreError) -> Self {
        Self::Chat(ChatError::Store(e))
    }
}

#[derive(Debug, Clone)]
pub struct TaskSettings {
    pub workers: usize,
    /// Instance name + worker number make each worker's consumer name in the queue.
    pub server_id: String,
    /// Other instances' workers take tasks from the same queue: a task's events are then
    /// read from the store unless it runs here.
    pub shared: bool,
    /// Where a result the store could not take is kept until it can (see `FinalWrites`).
    pub data_dir: std::path::PathBuf,
}

/// What `GET /api/tasks/{id}` shows.
#[derive(Debug, Serialize)]
pub struct TaskView {
    pub id: String,
    pub status: TaskStatus,
    pub agent: String,
    pub scene: Option<String>,
    /// 1-based place in the queue while queued.
    pub position: Option<u64>,
    pub progress: Progress,
    pub result: Option<String>,
    /// A reasoning model's thinking behind `result`; absent when there was none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Progress {
    pub tokens: i64,
}

pub struct TaskService {
    store: Arc<dyn Store>,
    upstreams: Arc<Upstreams>,
    hub: Arc<Hub>,
    queue: Arc<dyn TaskQueue>,
    settings: TaskSettings,
    /// Cancellation of the tasks running on this instance.
    running: Arc<DashMap<String, CancellationToken>>,
    /// The worker loops.
    workers: TaskTracker,
    /// Fired when draining starts: workers stop taking tasks.
    drain: CancellationToken,
    /// Fired when the drain window is over: running tasks are abandoned unacknowledged,
    /// so the queue delivers them again (to another instance, or after the restart).
    stop: CancellationToken,
    /// Final writes, kept and retried while the store is unreachable.
    finals: Arc<FinalWrites>,
}

/// Emit a progress event at most every this many tokens, so a fast stream does not flood
/// watchers with one event per token.
const PROGRESS_EVERY: i64 = 16;

/// How often a task running on another instance is looked up in the store.
const STORE_POLL: Duration = Duration::from_millis(250);

/// How long a worker waits on the queue before checking for shutdown again.
const POP_WAIT: Duration = Duration::from_secs(2);

impl TaskService {
    pub fn new(
        store: Arc<dyn Store>,
        upstreams: Arc<Upstreams>,
        hub: Arc<Hub>,
        queue: Arc<dyn TaskQueue>,
        settings: TaskSettings,
        drain: CancellationToken,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let finals = Arc::new(FinalWrites::new(store.clone(), &settings.data_dir));
        Arc::new(Self {
            finals,
            store,
            upstreams,
            hub,
            queue,
            settings,
            running: Arc::new(DashMap::new()),
            workers: TaskTracker::new(),
            drain,
            stop,
        })
    }

    pub fn workers(&self) -> &TaskTracker {
        &self.workers
    }

    pub fn queue(&self) -> &Arc<dyn TaskQueue> {
        &self.queue
    }

    /// Queues again what a previous run of an embedded instance left unfinished, then
    /// starts the workers.
    pub async fn start(self: &Arc<Self>, recover: bool) -> Result<(), TaskError> {
        if recover {
            let pending = self.store.list_unfinished_tasks().await?;
            if !pending.is_empty() {
                tracing::info!(tasks = pending.len(), "queueing tasks left by the last run");
            }
            for t in pending {
                self.channel(&t);
                self.queue.push(&t.id).await?;
            }
        }
        for n in 0..self.settings.workers {
            let this = self.clone();
            let consumer = format!("{}-{n}", self.settings.server_id);
            self.workers.spawn(async move { this.work(consumer).await });
        }
        Ok(())
    }

    fn channel(&self, t: &Task) -> Arc<Channel> {
        self.hub.get(&t.id).unwrap_or_else(|| {
            self.hub
                .create(&t.id, &format!("task:{}", t.id), &t.user_id)
        })
    }

    /// A task from a scene: its template filled with `variables` becomes the user message.
    pub async fn create_from_scene(
        &self,
        caller: &Caller,
        scene: &str,
        variables: &Map<String, Value>,
    ) -> Result<Task, TaskError> {
        let scene = self
            .store
            .get_scene(scene)
            .await?
            .ok_or(ChatError::NotFound("scene"))?;
        let prompt = render(&scene.template, variables).map_err(ChatError::Invalid)?;
        self.create(
            caller,
            Some(&scene.agent),
            Some(&scene.name),
            vec![Message::new(Role::User, prompt)],
        )
        .await
    }

    pub async fn create(
        &self,
        caller: &Caller,
        agent: Option<&str>,
        scene: Option<&str>,
        messages: Vec<Message>,
    ) -> Result<Task, TaskError> {
        if messages.is_empty() {
            return Err(
                ChatError::Invalid("messages: must contain at least one message".into()).into(),
            );
        }
        let agent = self.agent(agent).await?;
        let now = now_millis();
        let task = Task {
            id: new_id(),
            user_id: caller.user_id.clone(),
            key_id: caller.key_id.clone(),
            agent: agent.name.clone(),
            scene: scene.map(str::to_owned),
            input: json!({ "messages": messages }).to_string(),
            status: TaskStatus::Queued,
            result: None,
            reasoning: None,
            error: None,
            progress_tokens: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        };
        self.store.create_task(&task).await?;
        let channel = self.channel(&task);
        // `queued` goes out before the push: a worker may pick the task up at once, and its
        // `running` must never come before `queued` in the task's event log.
        let position = self.store.task_position(&task.id).await?.unwrap_or(1);
        channel.publish_json(EventKind::Queued, &json!({ "position": position }));
        if let Err(e) = self.queue.push(&task.id).await {
            let msg = e.to_string();
            // `finish_task` only moves running tasks: claim first, so the task is recorded
            // as failed rather than left queued for a restart to run.
            if let Ok(Some(_)) = self.store.claim_task(&task.id, now_millis()).await {
                self.store
                    .finish_task(
                        &task.id,
                        TaskStatus::Failed,
                        None,
                        None,
                        Some(&msg),
                        now_millis(),
                    )
                    .await
                    .ok();
            }
            channel.publish_json(EventKind::Failed, &json!({"error": msg}));
            return Err(e.into());
        }
        Ok(task)
    }

    async fn agent(&self, name: Option<&str>) -> Result<Agent, TaskError> {
        let name = name.unwrap_or(DEFAULT_AGENT);
        self.store
            .get_agent(name)
            .await?
            .filter(|a| a.is_active)
            .ok_or_else(|| {
                ChatError::Invalid(format!("agent: no active agent named '{name}'")).into()
            })
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<TaskView, TaskError> {
        let t = self
            .store
            .get_task(Some(&caller.user_id), id)
            .await?
            .ok_or(ChatError::NotFound("task"))?;
        let position = if t.status == TaskStatus::Queued {
            self.store.task_position(&t.id).await?
        } else {
            None
        };
        Ok(TaskView {
            id: t.id,
            status: t.status,
            agent: t.agent,
            scene: t.scene,
            position,
            progress: Progress {
                tokens: t.progress_tokens,
            },
            result: t.result,
            reasoning: t.reasoning,
            error: t.error,
            created_at: t.created_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
        })
    }

    /// Cancels a queued or running task; a running one stops its upstream request.
    pub async fn cancel(&self, caller: &Caller, id: &str) -> Result<TaskStatus, TaskError> {
        let before = self
            .store
            .cancel_task(&caller.user_id, id, now_millis())
            .await?
            .ok_or(ChatError::NotFound("task"))?;
        if !before.is_final() {
            if let Some(token) = self.running.get(id) {
                token.cancel();
            }
            if let Some(ch) = self.hub.get(id) {
                ch.publish_json(EventKind::Cancelled, &json!({}));
            }
        }
        Ok(before)
    }

    /// The task's events from after `last_event_id` (or its start). A task this instance
    /// has no log for (finished before a restart) yields its final state.
    pub async fn events(
        &self,
        caller: &Caller,
        id: &str,
        last_event_id: Option<&str>,
    ) -> Result<Subscription, TaskError> {
        let t = self
            .store
            .get_task(Some(&caller.user_id), id)
            .await?
            .ok_or(ChatError::NotFound("task"))?;
        let after = last_event_id
            .and_then(EventId::parse)
            .filter(|e| e.generation_id == t.id)
            .map(|e| e.seq);
        let unfinished = matches!(t.status, TaskStatus::Queued | TaskStatus::Running);
        let here = self.running.contains_key(&t.id);
        let channel = match self.hub.get(&t.id) {
            Some(ch) if ch.is_finished() || here || !self.settings.shared => ch,
            _ if self.settings.shared && unfinished => self.follow_store(t).await,
            Some(ch) => ch,
            None => {
                let ch = self.channel(&t);
                publish_final(&ch, &t);
                ch
            }
        };
        Ok(channel.subscribe(after))
    }

    /// The events of a task that may run on another instance, read from the store: its
    /// state now, then each change, until it ends, nobody watches, or this instance drains.
    async fn follow_store(&self, t: Task) -> Arc<Channel> {
        let ch = self
            .hub
            .detached(&t.id, &format!("task:{}", t.id), &t.user_id);
        if t.status == TaskStatus::Queued {
            let position = self.store.task_position(&t.id).await.ok().flatten();
            ch.publish_json(EventKind::Queued, &json!({ "position": position }));
        } else {
            ch.publish_json(EventKind::Running, &json!({}));
            if t.progress_tokens > 0 {
                ch.publish_json(EventKind::Progress, &json!({ "tokens": t.progress_tokens }));
            }
        }
        let (store, drain, channel) = (self.store.clone(), self.drain.clone(), ch.clone());
        self.workers.spawn(async move {
            let (mut status, mut tokens) = (t.status, t.progress_tokens);
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + STORE_POLL, STORE_POLL);
            loop {
                tokio::select! {
                    _ = drain.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if channel.subscriber_count() == 0 {
                    return;
                }
                let Ok(Some(now)) = store.get_task(None, &t.id).await else {
                    continue;
                };
                if now.status == TaskStatus::Running && status == TaskStatus::Queued {
                    channel.publish_json(EventKind::Running, &json!({}));
                }
                if now.progress_tokens > tokens {
                    tokens = now.progress_tokens;
                    channel.publish_json(EventKind::Progress, &json!({ "tokens": tokens }));
                }
                status = now.status;
                if !matches!(status, TaskStatus::Queued | TaskStatus::Running) {
                    publish_final(&channel, &now);
                    return;
                }
            }
        });
        ch
    }

    /// Waits for the task to end (for `?sync=true`).
    pub async fn wait(&self, caller: &Caller, id: &str) -> Result<TaskView, TaskError> {
        let mut sub = self.events(caller, id, None).await?;
        let mut batch = Vec::new();
        while sub.next_batch(&mut batch).await.is_ok() {}
        self.get(caller, id).await
    }

    async fn work(self: Arc<Self>, consumer: String) {
        loop {
            let delivery = tokio::select! {
                _ = self.drain.cancelled() => return,
                d = self.queue.pop(&consumer, POP_WAIT) => d,
            };
            match delivery {
                Ok(Some(d)) => self.run(&d, &consumer).await,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "task queue unavailable; retrying");
                    tokio::select! {
                        _ = self.drain.cancelled() => return,
                        _ = tokio::time::sleep(POP_WAIT) => {}
                    }
                }
            }
        }
    }

    async fn run(&self, d: &Delivery, consumer: &str) {
        let task = match self.store.claim_task(&d.task_id, now_millis()).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                // Finished or cancelled meanwhile: nothing to run.
                self.queue.ack(d).await.ok();
                return;
            }
            Err(e) => {
                // Left unacknowledged: the queue delivers it again.
                tracing::warn!(task_id = %d.task_id, error = %e, "cannot claim task");
                return;
            }
        };
        let cancel = CancellationToken::new();
        self.running.insert(task.id.clone(), cancel.clone());
        let channel = self.channel(&task);
        channel.publish_json(EventKind::Running, &json!({}));
        // Keeps the delivery ours while the task runs longer than the reclaim time.
        let heartbeat = async {
            let Some(every) = self.queue.reclaim_after().map(|r| r / 3) else {
                return std::future::pending().await;
            };
            // Also how soon a cancel sent to another instance takes effect.
            let every = every.clamp(Duration::from_millis(10), Duration::from_secs(1));
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = self.queue.keep_alive(d, consumer).await {
                    tracing::warn!(task_id = %d.task_id, error = %e, "cannot extend the task's delivery");
                }
                // A cancel sent to another instance only reaches the store.
                if let Ok(Some(t)) = self.store.get_task(None, &task.id).await {
                    if t.status == TaskStatus::Cancelled {
                        cancel.cancel();
                    }
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(None),
            never = heartbeat => never,
            _ = self.stop.cancelled() => {
                // Not finished: left running and unacknowledged, so it runs again.
                self.running.remove(&task.id);
                return;
            }
            // Its lines (the upstream call's among them) name the task.
            r = tracing::Instrument::instrument(
                self.generate(&task, &channel),
                tracing::info_span!("task", task_id = %task.id),
            ) => r.map_err(Some),
        };
        self.running.remove(&task.id);
        let now = now_millis();
        // With the store away, the result is kept and its write retried (see
        // `FinalWrites`); the outcome is told and the delivery settled all the same.
        let finished = match &outcome {
            Ok(reply) => {
                self.finals
                    .finish_task(
                        &task.id,
                        TaskStatus::Succeeded,
                        Some(&reply.text),
                        reply.reasoning(),
                        None,
                        now,
                        &self.workers,
                        &self.stop,
                    )
                    .await
            }
            Err(Some(e)) => {
                self.finals
                    .finish_task(
                        &task.id,
                        TaskStatus::Failed,
                        None,
                        None,
                        Some(e),
                        now,
                        &self.workers,
                        &self.stop,
                    )
                    .await
            }
            // Cancelled: the store was updated by `cancel`.
            Err(None) => Ok(Some(false)),
        };
        match finished {
            Ok(Some(true) | None) => match outcome {
                Ok(reply) => {
                    channel.publish_json(
                        EventKind::Succeeded,
                        &succeeded(Some(&reply.text), reply.reasoning()),
                    );
                }
                Err(Some(e)) => {
                    channel.publish_json(EventKind::Failed, &json!({ "error": e }));
                }
                Err(None) => {}
            },
            Ok(Some(false)) => {}
            Err(e) => {
                tracing::error!(task_id = %task.id, error = %e, "cannot store the task result");
                return;
            }
        }
        self.queue.ack(d).await.ok();
    }

    /// Runs the task's request upstream; the reply, or why it failed.
    async fn generate(&self, task: &Task, channel: &Channel) -> Result<Reply, String> {
        #[derive(serde::Deserialize)]
        struct Input {
            messages: Vec<Message>,
        }
        let input: Input =
            serde_json::from_str(&task.input).map_err(|e| format!("unreadable task input: {e}"))?;
        let agent = self
            .store
            .get_agent(&task.agent)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("agent '{}' no longer exists", task.agent))?;
        let req = build_request(self.store.as_ref(), &agent, input.messages)
            .await
            .map_err(|e| e.to_string())?;
        let chain = self
            .upstreams
            .chain_for(
                &agent.model,
                agent.provider.as_deref(),
                &agent.fallback_models,
            )
            .map_err(|e| e.to_string())?;
        let relay = self
            .upstreams
            .open_chain(&req, &chain)
            .await
            .map_err(|e| e.to_string())?;
        let mut events = relay.events;
        let mut reply = Reply::default();
        let mut tokens = 0i64;
        while let Some(ev) = events.next().await {
            let chunk = ev.map_err(|e| e.to_string())?;
            // The thinking streams live, as in a session; the answer comes whole at the end.
            if let Some(r) = chunk.reasoning() {
                channel.publish_json(EventKind::Reasoning, &TextData { text: r });
                reply.reasoning.push_str(r);
            }
            if let Some(t) = chunk.content() {
                reply.text.push_str(t);
            }
            if chunk.is_token() {
                tokens += 1;
                if tokens % PROGRESS_EVERY == 0 {
                    channel.publish_json(EventKind::Progress, &json!({ "tokens": tokens }));
                    self.store.set_task_progress(&task.id, tokens).await.ok();
                }
            }
        }
        channel.publish_json(EventKind::Progress, &json!({ "tokens": tokens }));
        self.store.set_task_progress(&task.id, tokens).await.ok();
        Ok(reply)
    }
}

/// The data of `reasoning` events, as in a session.
#[derive(Serialize)]
struct TextData<'a> {
    text: &'a str,
}

/// What a task's model answered, and the thinking before it.
#[derive(Default)]
struct Reply {
    text: String,
    reasoning: String,
}

impl Reply {
    fn reasoning(&self) -> Option<&str> {
        Some(self.reasoning.as_str()).filter(|r| !r.is_empty())
    }
}

/// The data of `succeeded`: `{result}`, with `reasoning` when the model reasoned.
fn succeeded(result: Option<&str>, reasoning: Option<&str>) -> Value {
    let mut data = json!({ "result": result });
    if let Some(r) = reasoning {
        data["reasoning"] = json!(r);
    }
    data
}

/// The final event of a task known only from the store.
fn publish_final(ch: &Channel, t: &Task) {
    match t.status {
        TaskStatus::Succeeded => {
            ch.publish_json(
                EventKind::Succeeded,
                &succeeded(t.result.as_deref(), t.reasoning.as_deref()),
            );
        }
        TaskStatus::Failed => {
            ch.publish_json(EventKind::Failed, &json!({ "error": t.error }));
        }
        TaskStatus::Cancelled => {
            ch.publish_json(EventKind::Cancelled, &json!({}));
        }
        TaskStatus::Queued | TaskStatus::Running => {
            ch.publish_json(EventKind::Queued, &json!({ "position": Value::Null }));
        }
    }
}
