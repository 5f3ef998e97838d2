//! Embedded SQLite store: one file, `<data_dir>/sluice.db`, in WAL mode.
//!
//! rusqlite is blocking, so every query runs on tokio's blocking pool, never on a worker.
//! WAL lets readers and one writer work at the same time, which shapes the connections:
//! one writer behind an async mutex (SQLite takes one writer at a time anyway, and queuing
//! in-process is cheaper than spinning on `SQLITE_BUSY`) and a few read-only connections
//! for the read paths. Waiting for either happens asynchronously and is bounded by
//! `acquire_timeout`, as with the PostgreSQL pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::codec::{
    BadValue, brief, check_final, json_list, parse_json_list, parse_role, role_str, search_terms,
};
use super::sql;
use super::{
    Agent, ApiKey, CatalogStore, KeyStore, KnowledgeDoc, KnowledgeHit, MessageStatus,
    MessageUpdate, Millis, ResponseStore, Scene, Session, SessionCursor, SessionStore, StoreError,
    StoreHealth, StoredMessage, StoredResponse, Task, TaskStatus, TaskStore, UsageRecord, UsageRow,
    UsageStore, User,
};
use crate::config::StoreConfig;

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

/// The file name inside `data_dir`.
pub const DB_FILE: &str = "sluice.db";
/// Taken by `open` while it migrates (see [`migration_lock`]).
pub const LOCK_FILE: &str = "sluice.db-migrate-lock";

/// Readers beyond this buy nothing for a chat server's read mix and cost file handles.
const MAX_READERS: u32 = 4;

pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<tokio::sync::Mutex<Connection>>,
    readers: Arc<Readers>,
    acquire_timeout: Duration,
    applied: Vec<String>,
}

/// Idle read-only connections; a semaphore permit is a claim on one of them.
struct Readers {
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// A borrowed reader, given back when dropped (also when the query panics).
struct Lease {
    conn: Option<Connection>,
    readers: Arc<Readers>,
    // Released after the connection is back (fields drop after `Drop::drop`).
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.readers.idle.lock().push(conn);
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/sluice.db` and applies pending migrations.
    pub async fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let dir = cfg.data_dir.clone();
        let busy = cfg.acquire_timeout;
        let n_readers = cfg.pool_size.clamp(1, MAX_READERS);
        let (path, writer, readers, applied) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()).into())
                    .with_source(e)
            })?;
            let path = dir.join(DB_FILE);
            let lock = migration_lock(&dir, busy)?;
            let mut writer = open_conn(&path, busy, false)?;
            let report = embedded::migrations::runner()
                .run(&mut writer)
                .map_err(|e| {
                    StoreError::Backend(
                        format!("migrating {}: {}", path.display(), brief(&e)).into(),
                    )
                    .with_source(e)
                })?;
            let applied = report
                .applied_migrations()
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>();
            // Opened after migrating so the first reader already sees the WAL journal mode.
            let readers = (0..n_readers)
                .map(|_| open_conn(&path, busy, true))
                .collect::<Result<Vec<_>, _>>()?;
            drop(lock);
            Ok::<_, StoreError>((path, writer, readers, applied))
        })
        .await
        .map_err(join_error)??;
        if !applied.is_empty() {
            tracing::info!(path = %path.display(), migrations = ?applied, "sqlite store migrated");
        }
        Ok(Self {
            path,
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            readers: Arc::new(Readers {
                idle: Mutex::new(readers),
                permits: Arc::new(Semaphore::new(n_readers as usize)),
            }),
            acquire_timeout: cfg.acquire_timeout,
            applied,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Migrations this `open` applied (empty when the schema was already current).
    pub fn applied_migrations(&self) -> &[String] {
        &self.applied
    }

    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let mut conn = tokio::time::timeout(self.acquire_timeout, self.writer.clone().lock_owned())
            .await
            .map_err(|_| self.busy("the writer connection"))?;
        // The guard moves into the blocking task: if the caller is cancelled, the
        // statement still completes and only then frees the writer.
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(join_error)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = tokio::time::timeout(
            self.acquire_timeout,
            self.readers.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| self.busy("a reader connection"))?
        .map_err(|_| StoreError::Unavailable("sqlite store closed".into()))?;
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.idle.lock().pop();
            let lease = Lease {
                conn,
                readers: readers.clone(),
                _permit: permit,
            };
            match &lease.conn {
                Some(conn) => f(conn),
                // Unreachable while permits and connections are counted together.
                None => Err(StoreError::Backend("sqlite reader pool is empty".into())),
            }
        })
        .await
        .map_err(join_error)?
    }

    fn busy(&self, what: &str) -> StoreError {
        StoreError::Unavailable(
            format!(
                "no sqlite connection: waited {:?} for {what}",
                self.acquire_timeout
            )
            .into(),
        )
    }
}

/// Makes concurrent opens of one data directory, by several processes or several stores
/// of one process, take turns: two first starts would otherwise both find the journal mode
/// to switch and the migrations pending, and one would fail. refinery runs its own
/// transactions on the connection it migrates, so the lock lives in a file of its own: an
/// exclusive SQLite transaction there, which the OS releases even if this process dies.
fn migration_lock(dir: &Path, busy: Duration) -> Result<Connection, StoreError> {
    let path = dir.join(LOCK_FILE);
    let lock = Connection::open(&path).map_err(|e| {
        StoreError::Unavailable(format!("cannot open {}: {e}", path.display()).into())
            .with_source(e)
    })?;
    // A long migration elsewhere is worth waiting for; a request timeout is not the bound.
    lock.busy_timeout(busy.max(Duration::from_secs(60)))?;
    lock.execute_batch("BEGIN EXCLUSIVE")?;
    Ok(lock)
}

fn open_conn(path: &Path, busy: Duration, read_only: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| {
        StoreError::Unavailable(format!("cannot open {}: {e}", path.display()).into())
            .with_source(e)
    })?;
    // Another process (a second instance, `sluice keys`) may hold the write lock briefly.
    conn.busy_timeout(busy)?;
    // Every query is `prepare_cached`; room for all of them, with headroom for new ones.
    conn.set_prepared_statement_cache_capacity(64);
    if !read_only {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(
                format!(
                    "{} cannot use WAL (journal_mode is {mode}); is it on a network file system?",
                    path.display()
                )
                .into(),
            ));
        }
    }
    // Per connection, not per file: SQLite forgets both on every open.
    conn.pragma_update(None, "foreign_keys", true)?;
    // With WAL, NORMAL is durable against application crashes and only risks the last
    // transactions on power loss; FULL would fsync on every token-batch update.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    if read_only {
        conn.pragma_update(None, "query_only", true)?;
    }
    Ok(conn)
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Backend(format!("sqlite task failed: {e}").into()).with_source(e)
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        classify(&e).with_source(e)
    }
}

fn classify(e: &rusqlite::Error) -> StoreError {
    {
        use rusqlite::ErrorCode;
        use rusqlite::ffi;
        if let rusqlite::Error::SqliteFailure(f, _) = e {
            match f.code {
                ErrorCode::ConstraintViolation => match f.extended_code {
                    ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                        return StoreError::Conflict(e.to_string().into());
                    }
                    ffi::SQLITE_CONSTRAINT_FOREIGNKEY => {
                        return StoreError::NotFound(format!("referenced row: {e}").into());
                    }
                    _ => {}
                },
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure => {
                    return StoreError::Unavailable(e.to_string().into());
                }
                _ => {}
            }
        }
        StoreError::Backend(e.to_string().into())
    }
}

fn bad_value(idx: usize, column: &'static str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        idx,
        rusqlite::types::Type::Text,
        Box::new(BadValue {
            column,
            value: value.to_owned(),
        }),
    )
}

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
    })
}

fn key_row(r: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: r.get(0)?,
        user_id: r.get(1)?,
        name: r.get(2)?,
        prefix: r.get(3)?,
        is_admin: r.get(4)?,
        created_at: r.get(5)?,
        revoked_at: r.get(6)?,
    })
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        id: r.get(0)?,
        user_id: r.get(1)?,
        agent: r.get(2)?,
        title: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    let role: String = r.get(2)?;
    let status: String = r.get(4)?;
    Ok(StoredMessage {
        id: r.get(0)?,
        session_id: r.get(1)?,
        role: parse_role(&role).ok_or_else(|| bad_value(2, "messages.role", &role))?,
        content: r.get(3)?,
        reasoning: r.get(12)?,
        status: MessageStatus::parse(&status)
            .ok_or_else(|| bad_value(4, "messages.status", &status))?,
        generation_id: r.get(5)?,
        model: r.get(6)?,
        prompt_tokens: r.get(7)?,
        completion_tokens: r.get(8)?,
        error: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
    })
}

fn json_list_at(r: &Row<'_>, idx: usize, column: &'static str) -> rusqlite::Result<Vec<String>> {
    let text: String = r.get(idx)?;
    parse_json_list(column, &text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn agent_row(r: &Row<'_>) -> rusqlite::Result<Agent> {
    Ok(Agent {
        id: r.get(0)?,
        name: r.get(1)?,
        provider: r.get(2)?,
        model: r.get(3)?,
        system_prompt: r.get(4)?,
        temperature: r.get(5)?,
        max_tokens: r.get(6)?,
        fallback_models: json_list_at(r, 7, "agents.fallback_models")?,
        knowledge: r.get(8)?,
        is_active: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
    })
}

fn scene_row(r: &Row<'_>) -> rusqlite::Result<Scene> {
    Ok(Scene {
        id: r.get(0)?,
        name: r.get(1)?,
        agent: r.get(2)?,
        template: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

fn task_row(r: &Row<'_>) -> rusqlite::Result<Task> {
    let status: String = r.get(6)?;
    Ok(Task {
        id: r.get(0)?,
        user_id: r.get(1)?,
        key_id: r.get(2)?,
        agent: r.get(3)?,
        scene: r.get(4)?,
        input: r.get(5)?,
        status: TaskStatus::parse(&status).ok_or_else(|| bad_value(6, "tasks.status", &status))?,
        result: r.get(7)?,
        reasoning: r.get(13)?,
        error: r.get(8)?,
        progress_tokens: r.get(9)?,
        created_at: r.get(10)?,
        started_at: r.get(11)?,
        finished_at: r.get(12)?,
    })
}

fn hit_row(r: &Row<'_>) -> rusqlite::Result<KnowledgeHit> {
    Ok(KnowledgeHit {
        id: r.get(0)?,
        title: r.get(1)?,
        snippet: r.get(2)?,
        tags: json_list_at(r, 3, "knowledge_docs.tags")?,
        score: r.get(4)?,
    })
}

/// An FTS5 query matching any of the words: each one an FTS5 string (`"` doubled inside),
/// so nothing of the user's text is read as FTS5 syntax.
fn fts5_any(terms: &[String]) -> String {
    terms
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" OR ")
}

#[async_trait]
impl StoreHealth for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    /// One file, no pool to report.
    fn pool_state(&self) -> Option<super::PoolState> {
        None
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn ensure_user(&self, user: &User) -> Result<User, StoreError> {
        let new = user.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(sql::INSERT_USER.sqlite())?
                .execute(params![new.id, new.name, new.created_at])?;
            let user = tx
                .prepare_cached(sql::USER_BY_NAME.sqlite())?
                .query_row([&new.name], user_row)?;
            tx.commit()?;
            Ok(user)
        })
        .await
    }

    async fn create_api_key(&self, key: &ApiKey, key_hash: &[u8; 32]) -> Result<(), StoreError> {
        let key = key.clone();
        let hash = *key_hash;
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_API_KEY.sqlite())?
                .execute(params![
                    key.id,
                    key.user_id,
                    key.name,
                    &hash[..],
                    key.prefix,
                    key.is_admin,
                    key.created_at
                ])?;
            Ok(())
        })
        .await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(sql::LIST_API_KEYS.sqlite())?;
            let keys = stmt.query_map([], key_row)?.collect::<Result<_, _>>()?;
            Ok(keys)
        })
        .await
    }

    async fn revoke_api_key(&self, id_or_name: &str, now: Millis) -> Result<u64, StoreError> {
        let id_or_name = id_or_name.to_owned();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::REVOKE_API_KEY.sqlite())?
                .execute(params![id_or_name, now])?;
            Ok(n as u64)
        })
        .await
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        let hash = *key_hash;
        self.read(move |c| {
            let key = c
                .prepare_cached(sql::API_KEY_BY_HASH.sqlite())?
                .query_row([&hash[..]], key_row)
                .optional()?;
            Ok(key)
        })
        .await
    }

    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let key = c
                .prepare_cached(sql::API_KEY_BY_ID.sqlite())?
                .query_row([&id], key_row)
                .optional()?;
            Ok(key)
        })
        .await
    }
}

#[async_trait]
impl SessionStore for SqliteStore {
    async fn create_session(&self, s: &Session) -> Result<(), StoreError> {
        let session = s.clone();
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_SESSION.sqlite())?
                .execute(params![
                    session.id,
                    session.user_id,
                    session.agent,
                    session.title,
                    session.created_at,
                    session.updated_at
                ])?;
            Ok(())
        })
        .await
    }

    async fn list_sessions(
        &self,
        user_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<Session>, StoreError> {
        let user_id = user_id.to_owned();
        let after = after.cloned();
        self.read(move |c| {
            let sessions = match after {
                None => c
                    .prepare_cached(sql::LIST_SESSIONS.sqlite())?
                    .query_map(params![user_id, limit], session_row)?
                    .collect::<Result<_, _>>()?,
                Some(cur) => c
                    .prepare_cached(sql::LIST_SESSIONS_AFTER.sqlite())?
                    .query_map(params![user_id, cur.updated_at, cur.id, limit], session_row)?
                    .collect::<Result<_, _>>()?,
            };
            Ok(sessions)
        })
        .await
    }

    async fn get_session(&self, user_id: &str, id: &str) -> Result<Option<Session>, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        self.read(move |c| {
            let s = c
                .prepare_cached(sql::GET_SESSION.sqlite())?
                .query_row(params![id, user_id], session_row)
                .optional()?;
            Ok(s)
        })
        .await
    }

    async fn delete_session(&self, user_id: &str, id: &str) -> Result<bool, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        // Messages go with it through `ON DELETE CASCADE` (foreign_keys is on).
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::DELETE_SESSION.sqlite())?
                .execute(params![id, user_id])?;
            Ok(n > 0)
        })
        .await
    }

    async fn update_session_title(
        &self,
        user_id: &str,
        id: &str,
        title: Option<&str>,
    ) -> Result<Option<Session>, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        let title = title.map(str::to_owned);
        self.write(move |c| {
            let s = c
                .prepare_cached(sql::UPDATE_SESSION_TITLE.sqlite())?
                .query_row(params![id, user_id, title], session_row)
                .optional()?;
            Ok(s)
        })
        .await
    }

    async fn list_messages(&self, session_id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        let session_id = session_id.to_owned();
        self.read(move |c| {
            let msgs = c
                .prepare_cached(sql::LIST_MESSAGES.sqlite())?
                .query_map([&session_id], message_row)?
                .collect::<Result<_, _>>()?;
            Ok(msgs)
        })
        .await
    }

    async fn insert_message(&self, m: &StoredMessage) -> Result<(), StoreError> {
        let m = m.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(sql::INSERT_MESSAGE.sqlite())?
                .execute(params![
                    m.id,
                    m.session_id,
                    role_str(m.role),
                    m.content,
                    m.status.as_str(),
                    m.generation_id,
                    m.model,
                    m.prompt_tokens,
                    m.completion_tokens,
                    m.error,
                    m.created_at,
                    m.updated_at,
                    m.reasoning
                ])?;
            tx.prepare_cached(sql::TOUCH_SESSION.sqlite())?
                .execute(params![m.session_id, m.updated_at])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn update_message(
        &self,
        id: &str,
        u: &MessageUpdate,
        now: Millis,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        let u = u.clone();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::UPDATE_MESSAGE.sqlite())?
                .execute(params![
                    id,
                    u.content,
                    u.status.as_str(),
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.error,
                    now,
                    u.reasoning
                ])?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("message {id}").into()));
            }
            Ok(())
        })
        .await
    }

    async fn interrupt_streaming(&self, now: Millis) -> Result<u64, StoreError> {
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::INTERRUPT_STREAMING.sqlite())?
                .execute([now])?;
            Ok(n as u64)
        })
        .await
    }

    async fn claim_generation(
        &self,
        session_id: &str,
        generation_id: &str,
        server_id: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Option<String>, StoreError> {
        let (session_id, generation_id, server_id) = (
            session_id.to_owned(),
            generation_id.to_owned(),
            server_id.to_owned(),
        );
        // The one writer connection serialises claims; the statement alone decides.
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::CLAIM_GENERATION.sqlite())?
                .execute(params![
                    session_id,
                    generation_id,
                    server_id,
                    now,
                    expires_at
                ])?;
            if n == 1 {
                return Ok(None);
            }
            let running: Option<Option<String>> = c
                .prepare_cached(sql::RUNNING_GENERATION.sqlite())?
                .query_row([&session_id], |r| r.get(0))
                .optional()?;
            match running {
                Some(g) => Ok(Some(g.unwrap_or_default())),
                None => Err(StoreError::NotFound(format!("session {session_id}").into())),
            }
        })
        .await
    }

    async fn release_generation(
        &self,
        session_id: &str,
        generation_id: &str,
    ) -> Result<bool, StoreError> {
        let (session_id, generation_id) = (session_id.to_owned(), generation_id.to_owned());
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::RELEASE_GENERATION.sqlite())?
                .execute([&session_id, &generation_id])?;
            Ok(n == 1)
        })
        .await
    }

    async fn interrupt_streaming_of(
        &self,
        server_id: &str,
        now: Millis,
    ) -> Result<u64, StoreError> {
        let server_id = server_id.to_owned();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::INTERRUPT_STREAMING_OF.sqlite())?
                .execute(params![server_id, now])?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl CatalogStore for SqliteStore {
    async fn create_agent(&self, a: &Agent) -> Result<(), StoreError> {
        let a = a.clone();
        let fallback = json_list(&a.fallback_models)?;
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_AGENT.sqlite())?
                .execute(params![
                    a.id,
                    a.name,
                    a.provider,
                    a.model,
                    a.system_prompt,
                    a.temperature,
                    a.max_tokens,
                    fallback,
                    a.knowledge,
                    a.is_active,
                    a.created_at,
                    a.updated_at
                ])?;
            Ok(())
        })
        .await
    }

    async fn update_agent(&self, a: &Agent) -> Result<bool, StoreError> {
        let a = a.clone();
        let fallback = json_list(&a.fallback_models)?;
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::UPDATE_AGENT.sqlite())?
                .execute(params![
                    a.name,
                    a.provider,
                    a.model,
                    a.system_prompt,
                    a.temperature,
                    a.max_tokens,
                    fallback,
                    a.knowledge,
                    a.is_active,
                    a.updated_at
                ])?;
            Ok(n > 0)
        })
        .await
    }

    async fn get_agent(&self, name: &str) -> Result<Option<Agent>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            let a = c
                .prepare_cached(sql::GET_AGENT.sqlite())?
                .query_row([&name], agent_row)
                .optional()?;
            Ok(a)
        })
        .await
    }

    async fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.read(|c| {
            let agents = c
                .prepare_cached(sql::LIST_AGENTS.sqlite())?
                .query_map([], agent_row)?
                .collect::<Result<_, _>>()?;
            Ok(agents)
        })
        .await
    }

    async fn delete_agent(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::DELETE_AGENT.sqlite())?
                .execute([&name])?;
            Ok(n > 0)
        })
        .await
    }

    async fn create_scene(&self, s: &Scene) -> Result<(), StoreError> {
        let s = s.clone();
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_SCENE.sqlite())?
                .execute(params![
                    s.id,
                    s.name,
                    s.agent,
                    s.template,
                    s.created_at,
                    s.updated_at
                ])?;
            Ok(())
        })
        .await
    }

    async fn update_scene(&self, s: &Scene) -> Result<bool, StoreError> {
        let s = s.clone();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::UPDATE_SCENE.sqlite())?
                .execute(params![s.name, s.agent, s.template, s.updated_at])?;
            Ok(n > 0)
        })
        .await
    }

    async fn get_scene(&self, name: &str) -> Result<Option<Scene>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            let s = c
                .prepare_cached(sql::GET_SCENE.sqlite())?
                .query_row([&name], scene_row)
                .optional()?;
            Ok(s)
        })
        .await
    }

    async fn list_scenes(&self) -> Result<Vec<Scene>, StoreError> {
        self.read(|c| {
            let scenes = c
                .prepare_cached(sql::LIST_SCENES.sqlite())?
                .query_map([], scene_row)?
                .collect::<Result<_, _>>()?;
            Ok(scenes)
        })
        .await
    }

    async fn delete_scene(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::DELETE_SCENE.sqlite())?
                .execute([&name])?;
            Ok(n > 0)
        })
        .await
    }

    async fn add_knowledge(&self, d: &KnowledgeDoc) -> Result<(), StoreError> {
        let d = d.clone();
        let tags = json_list(&d.tags)?;
        // One statement, so the FTS trigger's insert commits with the row or not at all.
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_KNOWLEDGE.sqlite())?
                .execute(params![d.id, d.title, d.content, tags, d.created_at])?;
            Ok(())
        })
        .await
    }

    async fn search_knowledge(
        &self,
        query: &str,
        limit: u32,
    ) -> Result<Vec<KnowledgeHit>, StoreError> {
        let terms = search_terms(query);
        if terms.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let fts = fts5_any(&terms);
        // bm25 is lower-is-better; the weights (title, tags, content) put a title match
        // far above body text. The snippet is taken from the content, since the title is
        // returned anyway; a document without content falls back to its title.
        self.read(move |c| {
            let hits = c
                .prepare_cached(
                    "SELECT d.id, d.title,
                            coalesce(nullif(snippet(knowledge_fts, 2, '', '', '…', 24), ''), d.title),
                            d.tags, -bm25(knowledge_fts, 10.0, 5.0, 1.0)
                     FROM knowledge_fts JOIN knowledge_docs d ON d.doc_no = knowledge_fts.rowid
                     WHERE knowledge_fts MATCH ?1
                     ORDER BY bm25(knowledge_fts, 10.0, 5.0, 1.0), d.doc_no
                     LIMIT ?2",
                )?
                .query_map(params![fts, limit], hit_row)?
                .collect::<Result<_, _>>()?;
            Ok(hits)
        })
        .await
    }
}

#[async_trait]
impl TaskStore for SqliteStore {
    async fn create_task(&self, t: &Task) -> Result<(), StoreError> {
        let t = t.clone();
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_TASK.sqlite())?
                .execute(params![
                    t.id,
                    t.user_id,
                    t.key_id,
                    t.agent,
                    t.scene,
                    t.input,
                    t.status.as_str(),
                    t.result,
                    t.error,
                    t.progress_tokens,
                    t.created_at,
                    t.started_at,
                    t.finished_at,
                    t.reasoning
                ])?;
            Ok(())
        })
        .await
    }

    async fn get_task(&self, user_id: Option<&str>, id: &str) -> Result<Option<Task>, StoreError> {
        let (user_id, id) = (user_id.map(str::to_owned), id.to_owned());
        self.read(move |c| {
            let t = c
                .prepare_cached(sql::GET_TASK.sqlite())?
                .query_row(params![id, user_id], task_row)
                .optional()?;
            Ok(t)
        })
        .await
    }

    async fn claim_task(&self, id: &str, now: Millis) -> Result<Option<Task>, StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            let t = c
                .prepare_cached(sql::CLAIM_TASK.sqlite())?
                .query_row(params![id, now], task_row)
                .optional()?;
            Ok(t)
        })
        .await
    }

    async fn set_task_progress(&self, id: &str, tokens: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        // Only while running: a late write of a worker that lost the task (cancelled,
        // finished elsewhere) must not change a settled record.
        self.write(move |c| {
            c.prepare_cached(sql::SET_TASK_PROGRESS.sqlite())?
                .execute(params![id, tokens])?;
            Ok(())
        })
        .await
    }

    async fn finish_task(
        &self,
        id: &str,
        status: TaskStatus,
        result: Option<&str>,
        reasoning: Option<&str>,
        error: Option<&str>,
        now: Millis,
    ) -> Result<bool, StoreError> {
        check_final(status)?;
        let id = id.to_owned();
        let [result, reasoning, error] = [result, reasoning, error].map(|t| t.map(str::to_owned));
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::FINISH_TASK.sqlite())?
                .execute(params![id, status.as_str(), result, error, now, reasoning])?;
            Ok(n > 0)
        })
        .await
    }

    async fn cancel_task(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<Option<TaskStatus>, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        self.write(move |c| {
            // The status before is the answer, and UPDATE … RETURNING gives the one after:
            // read and write in one immediate transaction, so no writer (another process
            // included) can finish the task in between.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let before: Option<String> = tx
                .prepare_cached("SELECT status FROM tasks WHERE id = ?1 AND user_id = ?2")?
                .query_row(params![id, user_id], |r| r.get(0))
                .optional()?;
            let Some(before) = before else {
                return Ok(None);
            };
            let before =
                TaskStatus::parse(&before).ok_or_else(|| bad_value(0, "tasks.status", &before))?;
            if !before.is_final() {
                tx.prepare_cached(sql::CANCEL_TASK.sqlite())?
                    .execute(params![id, now])?;
            }
            tx.commit()?;
            Ok(Some(before))
        })
        .await
    }

    async fn list_unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.read(|c| {
            let tasks = c
                .prepare_cached(sql::LIST_UNFINISHED_TASKS.sqlite())?
                .query_map([], task_row)?
                .collect::<Result<_, _>>()?;
            Ok(tasks)
        })
        .await
    }

    async fn task_position(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let id = id.to_owned();
        // `id` breaks ties between tasks created in the same millisecond, so positions
        // are distinct; the count is a range scan of tasks_status_created.
        self.read(move |c| {
            let n: Option<i64> = c
                .prepare_cached(sql::TASK_POSITION.sqlite())?
                .query_row([&id], |r| r.get(0))
                .optional()?;
            Ok(n.map(|n| n.max(0) as u64))
        })
        .await
    }

    async fn count_queued_tasks(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c
                .prepare_cached(sql::COUNT_QUEUED_TASKS.sqlite())?
                .query_row([], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        })
        .await
    }
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn record_usage(&self, r: &UsageRecord) -> Result<(), StoreError> {
        let r = r.clone();
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_USAGE.sqlite())?
                .execute(params![
                    r.id,
                    r.user_id,
                    r.key_id,
                    r.session_id,
                    r.provider,
                    r.model,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.created_at,
                    r.reasoning_tokens
                ])?;
            Ok(())
        })
        .await
    }

    async fn usage_summary(&self, from: Millis, to: Millis) -> Result<Vec<UsageRow>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(sql::USAGE_SUMMARY.sqlite())?;
            let rows = stmt
                .query_map(rusqlite::params![from, to], |r| {
                    Ok(UsageRow {
                        key_id: r.get(0)?,
                        model: r.get(1)?,
                        requests: r.get(2)?,
                        prompt_tokens: r.get(3)?,
                        completion_tokens: r.get(4)?,
                        reasoning_tokens: r.get(5)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }
}

#[async_trait]
impl ResponseStore for SqliteStore {
    async fn insert_response(&self, r: &StoredResponse) -> Result<(), StoreError> {
        let r = r.clone();
        self.write(move |c| {
            c.prepare_cached(sql::INSERT_RESPONSE.sqlite())?
                .execute(params![
                    r.id,
                    r.user_id,
                    r.status,
                    r.body,
                    r.input_items,
                    r.server,
                    r.created_at,
                    r.updated_at
                ])?;
            Ok(())
        })
        .await
    }

    async fn finish_response(
        &self,
        id: &str,
        status: &str,
        body: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let (id, status, body) = (id.to_owned(), status.to_owned(), body.to_owned());
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::FINISH_RESPONSE.sqlite())?
                .execute(params![id, status, body, now])?;
            Ok(n > 0)
        })
        .await
    }

    async fn get_response(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        self.read(move |c| {
            let r = c
                .prepare_cached(sql::GET_RESPONSE.sqlite())?
                .query_row(params![id, user_id], |r| {
                    Ok(StoredResponse {
                        id: r.get(0)?,
                        user_id: r.get(1)?,
                        status: r.get(2)?,
                        body: r.get(3)?,
                        input_items: r.get(4)?,
                        server: r.get(5)?,
                        cancel_at: r.get(6)?,
                        created_at: r.get(7)?,
                        updated_at: r.get(8)?,
                    })
                })
                .optional()?;
            Ok(r)
        })
        .await
    }

    async fn delete_response(&self, user_id: &str, id: &str) -> Result<bool, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::DELETE_RESPONSE.sqlite())?
                .execute(params![id, user_id])?;
            Ok(n > 0)
        })
        .await
    }

    async fn request_response_cancel(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let (user_id, id) = (user_id.to_owned(), id.to_owned());
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::REQUEST_RESPONSE_CANCEL.sqlite())?
                .execute(params![id, user_id, now])?;
            Ok(n > 0)
        })
        .await
    }

    async fn fail_unfinished_responses(
        &self,
        server_id: Option<&str>,
        now: Millis,
    ) -> Result<u64, StoreError> {
        let server_id = server_id.map(str::to_owned);
        self.write(move |c| {
            let n = c
                .prepare_cached(sql::FAIL_UNFINISHED_RESPONSES.sqlite())?
                .execute(params![server_id, now])?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> StoreConfig {
        StoreConfig {
            data_dir: dir.join("nested/data"),
            ..StoreConfig::default()
        }
    }

    #[tokio::test]
    async fn creates_the_directory_and_uses_wal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&cfg(dir.path())).await.unwrap();
        assert!(store.path().exists());
        assert_eq!(store.applied_migrations().len(), 4);
        let mode: String = store
            .read(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: bool = store
            .write(|c| Ok(c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert!(fk);
    }

    #[tokio::test]
    async fn every_shared_statement_prepares() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&cfg(dir.path())).await.unwrap();
        store
            .read(|c| {
                for (name, s) in sql::ALL {
                    c.prepare(s.sqlite())
                        .map_err(|e| StoreError::Backend(format!("{name}: {e}").into()))?;
                }
                Ok(())
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn readers_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&cfg(dir.path())).await.unwrap();
        let err = store
            .read(|c| Ok(c.execute("DELETE FROM users", [])?))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_held_writer_times_out_as_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.acquire_timeout = Duration::from_millis(20);
        let store = SqliteStore::open(&c).await.unwrap();
        let _held = store.writer.clone().lock_owned().await;
        let err = store
            .ensure_user(&User::new("x", crate::store::now_millis()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        // Reads do not queue behind the writer.
        store.ping().await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_query_gives_its_reader_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.pool_size = 1;
        let store = SqliteStore::open(&c).await.unwrap();
        let r = store.read::<(), _>(|_| panic!("boom")).await.unwrap_err();
        assert!(matches!(r, StoreError::Backend(_)));
        store.ping().await.unwrap();
    }
}
