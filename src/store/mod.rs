//! Persistence: one contract in roles ([`KeyStore`], [`SessionStore`], [`CatalogStore`],
//! [`TaskStore`], [`UsageStore`], [`StoreHealth`]; [`Store`] is all of them), two backends —
//! embedded SQLite (the default) and PostgreSQL (when `DATABASE_URL` is set) — sharing the
//! statements in `sql`. Domain code sees only the traits.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::StoreConfig;
use crate::domain::Role;

pub mod cli;
mod codec;
pub mod finals;
pub mod postgres;
mod sql;
pub mod sqlite;
pub mod text;

/// Milliseconds since the Unix epoch; the one time representation of both backends.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A new sortable id (UUID v7, simple form): ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// What a backend error is kept as: any error of the drivers or the OS.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub enum StoreError {
    /// The database cannot be reached or the pool has no connection to give in time.
    Unavailable(Detail),
    /// A uniqueness rule was violated.
    Conflict(Detail),
    NotFound(Detail),
    Backend(Detail),
}

/// A store error's message, and the driver or OS error behind it when there is one, so
/// logs and callers walking `source()` see the cause, not only its text.
#[derive(Debug)]
pub struct Detail {
    message: String,
    source: Option<BoxError>,
}

impl Detail {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for Detail {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for Detail {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl StoreError {
    pub fn detail(&self) -> &Detail {
        match self {
            Self::Unavailable(d) | Self::Conflict(d) | Self::NotFound(d) | Self::Backend(d) => d,
        }
    }
}

impl StoreError {
    /// The same error, with the driver or OS error that caused it kept as its source.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        let (Self::Unavailable(d) | Self::Conflict(d) | Self::NotFound(d) | Self::Backend(d)) =
            &mut self;
        d.source = Some(source.into());
        self
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(d) => write!(f, "store unavailable: {d}"),
            Self::Conflict(d) => write!(f, "conflict: {d}"),
            Self::NotFound(d) => write!(f, "not found: {d}"),
            Self::Backend(d) => write!(f, "store error: {d}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.detail()
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub id: String,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// The first characters of the key, so a user can tell keys apart; never the key.
    pub prefix: String,
    pub is_admin: bool,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub agent: Option<String>,
    pub title: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl User {
    /// A new user as a service creates it: a fresh id, created `now`.
    pub fn new(name: &str, now: Millis) -> Self {
        Self {
            id: new_id(),
            name: name.to_owned(),
            created_at: now,
        }
    }
}

impl ApiKey {
    /// A new active key as a service creates it: a fresh id, created `now`.
    pub fn new(user_id: &str, name: &str, prefix: &str, is_admin: bool, now: Millis) -> Self {
        Self {
            id: new_id(),
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            is_admin,
            created_at: now,
            revoked_at: None,
        }
    }
}

impl Session {
    /// A new session as the service creates it: a fresh id, created and updated `now`.
    pub fn new(user_id: &str, agent: Option<&str>, title: Option<&str>, now: Millis) -> Self {
        Self {
            id: new_id(),
            user_id: user_id.to_owned(),
            agent: agent.map(str::to_owned),
            title: title.map(str::to_owned),
            created_at: now,
            updated_at: now,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Complete,
    Streaming,
    Cancelled,
    Failed,
    Interrupted,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Streaming => "streaming",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "complete" => Self::Complete,
            "streaming" => Self::Streaming,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            "interrupted" => Self::Interrupted,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredMessage {
    pub id: String,
    pub session_id: String,
    pub role: Role,
    pub content: String,
    /// A reasoning model's thinking before its reply; absent from the JSON when there was
    /// none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    pub status: MessageStatus,
    /// The generation that produced an assistant message.
    pub generation_id: Option<String>,
    pub model: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// The final (or periodic) state of an assistant message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MessageUpdate {
    pub content: String,
    /// `None` stores no reasoning (NULL), not "leave it as it was".
    pub reasoning: Option<String>,
    pub status: MessageStatus,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub id: String,
    pub user_id: String,
    pub key_id: Option<String>,
    pub session_id: Option<String>,
    pub provider: String,
    pub model: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of the completion tokens, those the model spent reasoning.
    pub reasoning_tokens: i64,
    pub created_at: Millis,
}

/// Position in the newest-first session list: sessions strictly after it are returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor {
    pub updated_at: Millis,
    pub id: String,
}

/// A named model configuration used by sessions and tasks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// Provider to prefer; `None` routes by model name.
    pub provider: Option<String>,
    pub model: String,
    pub system_prompt: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<i64>,
    /// Models tried in order when `model` fails before its first token.
    pub fallback_models: Vec<String>,
    /// Whether the top knowledge-base hits for the user's message join the system prompt.
    pub knowledge: bool,
    pub is_active: bool,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A named prompt template with `{{variable}}` placeholders, bound to an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scene {
    pub id: String,
    pub name: String,
    pub agent: String,
    pub template: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KnowledgeDoc {
    pub id: String,
    pub title: String,
    pub content: String,
    pub tags: Vec<String>,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KnowledgeHit {
    pub id: String,
    pub title: String,
    /// A short excerpt around the matched terms.
    pub snippet: String,
    pub tags: Vec<String>,
    /// Higher is better; comparable within one search only.
    pub score: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// An asynchronous prompt job.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Task {
    pub id: String,
    pub user_id: String,
    pub key_id: Option<String>,
    pub agent: String,
    pub scene: Option<String>,
    /// The request as JSON text (`{"messages":[…]}`), kept so a restart can run it.
    pub input: String,
    pub status: TaskStatus,
    pub result: Option<String>,
    /// The thinking of a reasoning model that led to `result`.
    pub reasoning: Option<String>,
    pub error: Option<String>,
    pub progress_tokens: i64,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

/// A response of the Responses API as stored: its object and input items as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub id: String,
    pub user_id: String,
    /// `queued`, `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`; it
    /// overrides the object's own `status`, which a restart cannot rewrite.
    pub status: String,
    /// The response object (JSON).
    pub body: String,
    /// Every input item the model was given, earlier responses' included (a JSON array).
    pub input_items: String,
    /// The instance running it while unfinished.
    pub server: Option<String>,
    /// When a cancel was asked, while unfinished.
    pub cancel_at: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// What readiness and metrics ask of the database.
#[async_trait]
pub trait StoreHealth: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`, for health output.
    fn backend(&self) -> &'static str;

    /// A round trip to the database, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Connection pool occupancy, for backends that pool connections.
    fn pool_state(&self) -> Option<PoolState>;
}

/// Users and their API keys.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The user with this name, created if missing.
    /// The user named `user.name`: the stored one, or `user` stored when there is none.
    async fn ensure_user(&self, user: &User) -> Result<User, StoreError>;

    /// Stores `key`, found later by `key_hash` (the SHA-256 of the secret, never kept).
    async fn create_api_key(&self, key: &ApiKey, key_hash: &[u8; 32]) -> Result<(), StoreError>;

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes the active keys whose id or name is `id_or_name`; returns how many.
    async fn revoke_api_key(&self, id_or_name: &str, now: Millis) -> Result<u64, StoreError>;

    /// The active (not revoked) key with this SHA-256.
    async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError>;

    /// The active (not revoked) key with this id.
    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError>;
}

/// Sessions, their messages, and the one running generation a session may have.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn create_session(&self, s: &Session) -> Result<(), StoreError>;

    /// Newest first by `(updated_at, id)` descending.
    async fn list_sessions(
        &self,
        user_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<Session>, StoreError>;

    /// `None` when it does not exist or belongs to another user.
    async fn get_session(&self, user_id: &str, id: &str) -> Result<Option<Session>, StoreError>;

    /// Deletes the session and its messages; `false` when not found for this user.
    async fn delete_session(&self, user_id: &str, id: &str) -> Result<bool, StoreError>;

    async fn update_session_title(
        &self,
        user_id: &str,
        id: &str,
        title: Option<&str>,
    ) -> Result<Option<Session>, StoreError>;

    /// Oldest first.
    async fn list_messages(&self, session_id: &str) -> Result<Vec<StoredMessage>, StoreError>;

    /// Also moves the session's `updated_at` to the message's.
    async fn insert_message(&self, m: &StoredMessage) -> Result<(), StoreError>;

    /// `now` becomes the message's `updated_at`.
    async fn update_message(
        &self,
        id: &str,
        u: &MessageUpdate,
        now: Millis,
    ) -> Result<(), StoreError>;

    /// Marks every message still `streaming` as `interrupted`: after a restart of an embedded
    /// instance, nothing can still be producing them.
    async fn interrupt_streaming(&self, now: Millis) -> Result<u64, StoreError>;

    /// Takes the session's one running-generation slot for `generation_id`, run by
    /// `server_id`, until `expires_at`, in one conditional write. The slot is free when
    /// empty, past its expiry, or when its generation's reply is stored as no longer
    /// streaming. `Ok(None)`: taken. `Ok(Some(g))`: generation `g` holds it.
    async fn claim_generation(
        &self,
        session_id: &str,
        generation_id: &str,
        server_id: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Option<String>, StoreError>;

    /// Frees the session's slot if `generation_id` still holds it (compare and clear);
    /// `false` when another generation, or none, holds it.
    async fn release_generation(
        &self,
        session_id: &str,
        generation_id: &str,
    ) -> Result<bool, StoreError>;

    /// At the start of an instance sharing the store: marks `interrupted` the `streaming`
    /// replies no other instance can still be producing — every one except those whose
    /// session slot is held, unexpired, for that reply's generation by another server.
    async fn interrupt_streaming_of(&self, server_id: &str, now: Millis)
    -> Result<u64, StoreError>;
}

/// Agents, scenes and the knowledge base: names are unique; `create` of a taken name
/// is a Conflict.
#[async_trait]
pub trait CatalogStore: Send + Sync + 'static {
    // Agents.
    async fn create_agent(&self, a: &Agent) -> Result<(), StoreError>;

    /// Replaces the agent with `a.name`; `false` when there is none.
    async fn update_agent(&self, a: &Agent) -> Result<bool, StoreError>;

    async fn get_agent(&self, name: &str) -> Result<Option<Agent>, StoreError>;

    /// By name.
    async fn list_agents(&self) -> Result<Vec<Agent>, StoreError>;

    async fn delete_agent(&self, name: &str) -> Result<bool, StoreError>;

    // Scenes: as agents.
    async fn create_scene(&self, s: &Scene) -> Result<(), StoreError>;

    async fn update_scene(&self, s: &Scene) -> Result<bool, StoreError>;

    async fn get_scene(&self, name: &str) -> Result<Option<Scene>, StoreError>;

    async fn list_scenes(&self) -> Result<Vec<Scene>, StoreError>;

    async fn delete_scene(&self, name: &str) -> Result<bool, StoreError>;

    // Knowledge base with full-text search.
    async fn add_knowledge(&self, d: &KnowledgeDoc) -> Result<(), StoreError>;

    /// Best first. A document whose title matches the query ranks above one that only
    /// mentions it. Any user text is a valid query (it is never parsed as search syntax).
    async fn search_knowledge(
        &self,
        query: &str,
        limit: u32,
    ) -> Result<Vec<KnowledgeHit>, StoreError>;
}

/// Asynchronous prompt jobs.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    // Tasks.
    async fn create_task(&self, t: &Task) -> Result<(), StoreError>;

    /// `user_id: None` reads any user's task (workers); `Some` only that user's.
    async fn get_task(&self, user_id: Option<&str>, id: &str) -> Result<Option<Task>, StoreError>;

    /// Atomically moves a `queued` or `running` task to `running` (a reclaimed task was
    /// left `running` by a worker that died) and sets `started_at`; `None` when the task
    /// is missing or already final, so it must not run.
    async fn claim_task(&self, id: &str, now: Millis) -> Result<Option<Task>, StoreError>;

    async fn set_task_progress(&self, id: &str, tokens: i64) -> Result<(), StoreError>;

    /// Moves a `running` task to a final status; `false` when it was not running (already
    /// finished or cancelled), so a task completes exactly once.
    async fn finish_task(
        &self,
        id: &str,
        status: TaskStatus,
        result: Option<&str>,
        reasoning: Option<&str>,
        error: Option<&str>,
        now: Millis,
    ) -> Result<bool, StoreError>;

    /// Cancels a `queued` or `running` task of this user; returns its status before, or
    /// `None` when not found for this user. A final task is left as it is.
    async fn cancel_task(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<Option<TaskStatus>, StoreError>;

    /// `queued` and `running` tasks, oldest first (an embedded restart runs them again).
    async fn list_unfinished_tasks(&self) -> Result<Vec<Task>, StoreError>;

    /// 1-based place among queued tasks by creation time; `None` unless queued.
    async fn task_position(&self, id: &str) -> Result<Option<u64>, StoreError>;

    async fn count_queued_tasks(&self) -> Result<u64, StoreError>;
}

/// Token usage, per request and summed.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    async fn record_usage(&self, r: &UsageRecord) -> Result<(), StoreError>;

    /// Token usage per key and model recorded in `[from, to)`.
    async fn usage_summary(&self, from: Millis, to: Millis) -> Result<Vec<UsageRow>, StoreError>;
}

/// Stored responses of the Responses API.
#[async_trait]
pub trait ResponseStore: Send + Sync + 'static {
    async fn insert_response(&self, r: &StoredResponse) -> Result<(), StoreError>;

    /// Settles an unfinished response with its final `status` and object; `false` when it
    /// was already settled (or is gone).
    async fn finish_response(
        &self,
        id: &str,
        status: &str,
        body: &str,
        now: Millis,
    ) -> Result<bool, StoreError>;

    /// `None` when it does not exist or belongs to another user.
    async fn get_response(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<StoredResponse>, StoreError>;

    async fn delete_response(&self, user_id: &str, id: &str) -> Result<bool, StoreError>;

    /// Marks an unfinished response of this user as asked to stop, for the instance
    /// running it to read; `false` when none is unfinished.
    async fn request_response_cancel(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<bool, StoreError>;

    /// Marks `failed` the unfinished responses of `server_id` (`None`: of every instance),
    /// which nothing can still be running after a restart.
    async fn fail_unfinished_responses(
        &self,
        server_id: Option<&str>,
        now: Millis,
    ) -> Result<u64, StoreError>;
}

/// The whole contract: every role. Callers hold `Arc<dyn Store>`; a part of the code that
/// needs one role can take that role alone.
pub trait Store:
    StoreHealth + KeyStore + SessionStore + CatalogStore + TaskStore + UsageStore + ResponseStore
{
}

impl<
    T: StoreHealth
        + KeyStore
        + SessionStore
        + CatalogStore
        + TaskStore
        + UsageStore
        + ResponseStore
        + ?Sized,
> Store for T
{
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageRow {
    pub key_id: Option<String>,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
}

pub use postgres::PoolState;

/// Opens the configured backend and applies its migrations. Text reaching either backend
/// has NUL replaced (see [`text`]), so the two store the same.
pub async fn open(cfg: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match &cfg.database_url {
        Some(url) => Arc::new(text::NulSafe(
            postgres::PgStore::connect(url.expose(), cfg).await?,
        )),
        None => Arc::new(text::NulSafe(sqlite::SqliteStore::open(cfg).await?)),
    })
}
