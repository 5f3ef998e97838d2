//! PostgreSQL store: a bb8 pool of tokio-postgres connections.
//!
//! Everything about where the data lives comes from the URL, `options` included, so
//! `?options=-c%20search_path%3Dtenant` puts every table, and the migration history, in
//! that schema for both the pool and the migration connection.
//!
//! Nothing outlives one transaction on the server, so a pooler in transaction mode
//! (PgBouncer) may hand each statement to another server connection: statements are unnamed
//! and carry their parameter types (one round trip, nothing prepared to go missing), and
//! migrations run in one transaction under a transaction-level lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bb8::{ErrorSink, ManageConnection, PooledConnection, RunError};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type, WrongType};
use tokio_postgres::{Client, Config, NoTls, Row, SimpleQueryMessage};

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
use crate::config::{DbPooler, StoreConfig};
use crate::guard::breaker::{Breaker, BreakerSettings};

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

pub struct PgStore {
    pool: bb8::Pool<PgManager>,
    acquire_timeout: Duration,
    query_timeout: Duration,
    health: Arc<Health>,
    /// Why the pool last failed to connect: bb8 reports only "timed out" to the caller.
    last_connect_error: LastError,
    applied: Vec<String>,
}

/// Pool size and use, for metrics and readiness output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    pub max: u32,
    pub open: u32,
    pub idle: u32,
}

#[derive(Debug, Clone, Default)]
struct LastError(Arc<Mutex<Option<(Instant, String)>>>);

impl ErrorSink<StoreError> for LastError {
    fn sink(&self, e: StoreError) {
        tracing::warn!(error = %e, "postgres connection failed");
        *self.0.lock() = Some((Instant::now(), e.to_string()));
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<StoreError>> {
        Box::new(self.clone())
    }
}

/// A circuit breaker on the database: once it is found down (connects or statements
/// failing in a row), calls fail at once instead of each waiting the acquire timeout,
/// until a trial call after the open period finds it back.
struct Health {
    breaker: Breaker,
    /// Wakes the calls waiting for a connection when the circuit opens.
    opened: Notify,
}

impl Health {
    fn new(open_for: Duration) -> Self {
        Self {
            breaker: Breaker::new(BreakerSettings {
                failures_to_open: 2,
                open_for,
                successes_to_close: 1,
            }),
            opened: Notify::new(),
        }
    }

    fn failure(&self) {
        if self.breaker.failure() {
            tracing::warn!("postgres unreachable: failing fast until a trial finds it back");
            self.opened.notify_waiters();
        }
    }

    fn success(&self) {
        self.breaker.success();
    }

    /// Feeds the breaker with the outcome of one call to the database.
    fn observe<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Ok(_) => self.success(),
            Err(StoreError::Unavailable(_)) => self.failure(),
            // The database answered: it is up, whatever the statement's fault.
            Err(_) => self.success(),
        }
    }
}

/// One pooled connection. It is marked broken while a statement is in flight, so one that
/// timed out or whose caller gave up is dropped rather than handed out again: its answer
/// may never come, or come late to the next user.
pub struct PgConn {
    client: Client,
    broken: AtomicBool,
    driver: JoinHandle<()>,
}

impl Drop for PgConn {
    fn drop(&mut self) {
        // A healthy connection's driver ends by itself once the client is gone; a broken
        // one's may wait on a socket that never answers.
        if self.broken.load(Ordering::Relaxed) {
            self.driver.abort();
        }
    }
}

impl PgConn {
    /// Runs one exchange with the server within `limit`; the connection stays marked
    /// broken unless it completes.
    async fn guarded<T>(
        &self,
        limit: Duration,
        f: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        self.broken.store(true, Ordering::Relaxed);
        match tokio::time::timeout(limit, f).await {
            Ok(r) => {
                // An error answer leaves the connection usable; a closed one reports itself.
                self.broken.store(false, Ordering::Relaxed);
                Ok(r?)
            }
            Err(_) => Err(StoreError::Unavailable(
                format!("no answer from the database within {limit:?}").into(),
            )),
        }
    }
}

/// Makes connections for the pool. Each step has a deadline: a server that accepts TCP and
/// then says nothing must not hold a pool slot forever.
struct PgManager {
    config: Config,
    connect_timeout: Duration,
    check_timeout: Duration,
    health: Arc<Health>,
}

impl ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = StoreError;

    async fn connect(&self) -> Result<PgConn, StoreError> {
        let r = match tokio::time::timeout(self.connect_timeout, self.config.connect(NoTls)).await {
            Ok(Ok((client, connection))) => {
                let driver = tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                Ok(PgConn {
                    client,
                    broken: AtomicBool::new(false),
                    driver,
                })
            }
            Ok(Err(e)) => Err(StoreError::from(e)),
            Err(_) => Err(StoreError::Unavailable(
                format!("connecting took longer than {:?}", self.connect_timeout).into(),
            )),
        };
        match &r {
            Ok(_) => self.health.success(),
            Err(_) => self.health.failure(),
        }
        r
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), StoreError> {
        conn.guarded(self.check_timeout, conn.client.simple_query(""))
            .await
            .map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.broken.load(Ordering::Relaxed) || conn.client.is_closed()
    }
}

/// A connection checked out of the pool: every statement has the query timeout and feeds
/// the breaker.
struct Conn<'a> {
    inner: PooledConnection<'a, PgManager>,
    limit: Duration,
    health: &'a Health,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];
type Typed<'p> = Vec<(&'p (dyn ToSql + Sync), Type)>;

/// What a parameter is sent as: the first of these its Rust type converts to. The server
/// casts where a column differs (an INT8 into an INTEGER column, TEXT into VARCHAR).
const PARAM_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::INT8,
    Type::INT4,
    Type::BOOL,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::BYTEA,
    Type::INT2,
    Type::TEXT_ARRAY,
];

/// Pairs each parameter with its type, so a statement goes out unnamed in one round trip
/// (Parse, Bind, Execute) instead of being prepared under a name first: a named statement
/// lives on one server connection, which a transaction pooler does not keep for us.
/// Every statement goes through here; a new one needs nothing more than `&[&a, &b]`.
fn typed<'p>(params: Params<'p>) -> Result<Typed<'p>, StoreError> {
    let mut buf = bytes::BytesMut::new();
    params
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            for ty in &PARAM_TYPES {
                buf.clear();
                match p.to_sql_checked(ty, &mut buf) {
                    Err(e) if e.is::<WrongType>() => continue,
                    // The value's own fault (too long, say) shows again when it is sent.
                    _ => return Ok((p, ty.clone())),
                }
            }
            Err(StoreError::Backend(
                format!("parameter ${} has a type the store does not send", i + 1).into(),
            ))
        })
        .collect()
}

impl Conn<'_> {
    async fn run<T>(
        &self,
        f: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let r = self.inner.guarded(self.limit, f).await;
        self.health.observe(&r);
        r
    }

    async fn execute(&self, q: &str, p: Params<'_>) -> Result<u64, StoreError> {
        let p = typed(p)?;
        self.run(self.inner.client.execute_typed(q, &p)).await
    }

    async fn query(&self, q: &str, p: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let p = typed(p)?;
        self.run(self.inner.client.query_typed(q, &p)).await
    }

    async fn query_opt(&self, q: &str, p: Params<'_>) -> Result<Option<Row>, StoreError> {
        let p = typed(p)?;
        self.run(self.inner.client.query_typed_opt(q, &p)).await
    }

    async fn query_one(&self, q: &str, p: Params<'_>) -> Result<Row, StoreError> {
        let p = typed(p)?;
        self.run(self.inner.client.query_typed_one(q, &p)).await
    }

    async fn simple_query(&self, q: &str) -> Result<Vec<SimpleQueryMessage>, StoreError> {
        self.run(self.inner.client.simple_query(q)).await
    }
}

impl PgStore {
    /// Applies pending migrations on a connection of its own, then builds the pool.
    /// Fails when the database cannot be reached, so a bad `DATABASE_URL` stops the start.
    pub async fn connect(url: &str, cfg: &StoreConfig) -> Result<Self, StoreError> {
        // The parse error never echoes the URL, which may hold a password.
        let mut pg: Config = url.parse().map_err(|e| {
            StoreError::Backend(format!("invalid DATABASE_URL: {e}").into()).with_source(e)
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(cfg.acquire_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("sluice");
        }
        // A dead peer or path (no RST ever comes) ends the socket instead of leaving it
        // open: unacknowledged data for the query timeout, or failed keepalive probes.
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(cfg.query_timeout);
        }
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives(true)
                .keepalives_idle(Duration::from_secs(30))
                .keepalives_interval(Duration::from_secs(5))
                .keepalives_retries(3);
        }
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(cfg.acquire_timeout);
        if cfg.pooler == DbPooler::Pgbouncer && pg.get_options().is_some() {
            // PgBouncer refuses the startup parameter, or drops it when told to ignore it,
            // and a dropped search_path would put the tables in another schema.
            return Err(StoreError::Backend(
                "DATABASE_URL has `options`, which PgBouncer does not pass on \
                 (SLUICE_DB_POOLER=pgbouncer): set them on the role instead, \
                 e.g. ALTER ROLE sluice SET search_path = ..."
                    .into(),
            ));
        }
        let applied = migrate(&pg).await?;
        if !applied.is_empty() {
            tracing::info!(migrations = ?applied, "postgres store migrated");
        }
        // The server stops a statement at the same limit the client waits for it (the
        // migrations above may take longer, on a connection of their own). Behind a pooler
        // that limit is the role's or database's statement_timeout.
        let options = pg.get_options().unwrap_or_default();
        if cfg.pooler == DbPooler::None && !options.contains("statement_timeout") {
            let ms = cfg.query_timeout.as_millis().max(1);
            pg.options(format!("{options} -c statement_timeout={ms}").trim_start());
        }
        let health = Arc::new(Health::new(cfg.breaker_open));
        let sink = LastError::default();
        let manager = PgManager {
            config: pg,
            connect_timeout,
            // A check is one round trip with nothing to do; it gets half the acquire
            // timeout, so a hung connection is found and dropped within one acquire.
            check_timeout: (cfg.acquire_timeout / 2).min(cfg.query_timeout),
            health: health.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(cfg.pool_size.max(1))
            .connection_timeout(cfg.acquire_timeout)
            .max_lifetime(Some(cfg.max_lifetime))
            .error_sink(Box::new(sink.clone()))
            .build(manager)
            .await?;
        Ok(Self {
            pool,
            acquire_timeout: cfg.acquire_timeout,
            query_timeout: cfg.query_timeout,
            health,
            last_connect_error: sink,
            applied,
        })
    }

    /// Migrations this `connect` applied (empty when the schema was already current).
    pub fn applied_migrations(&self) -> &[String] {
        &self.applied
    }

    pub fn pool_state(&self) -> PoolState {
        let s = self.pool.state();
        PoolState {
            max: self.pool.config().max_size,
            open: s.connections,
            idle: s.idle_connections,
        }
    }

    /// The breaker's state: `closed`, `half_open` or `open`.
    pub fn breaker_state(&self) -> &'static str {
        self.health.breaker.state()
    }

    async fn conn(&self) -> Result<Conn<'_>, StoreError> {
        if !self.health.breaker.allow() {
            return Err(StoreError::Unavailable(
                self.down_message(format!(
                    "database unreachable; next try in {}s",
                    self.health.breaker.retry_after()
                ))
                .into(),
            ));
        }
        // Registered before waiting, so an opening during the wait is not missed.
        let opened = self.health.opened.notified();
        let got = tokio::select! {
            got = self.pool.get() => got,
            _ = opened => {
                return Err(StoreError::Unavailable(
                    self.down_message("database unreachable".into()).into(),
                ));
            }
        };
        match got {
            Ok(inner) => Ok(Conn {
                inner,
                limit: self.query_timeout,
                health: &self.health,
            }),
            Err(RunError::User(e)) => {
                self.health
                    .observe::<()>(&Err(StoreError::Unavailable(String::new().into())));
                Err(e)
            }
            Err(RunError::TimedOut) => {
                self.health.failure();
                Err(StoreError::Unavailable(
                    self.down_message(format!(
                        "no database connection within {:?} ({} open, pool max {})",
                        self.acquire_timeout,
                        self.pool.state().connections,
                        self.pool.config().max_size
                    ))
                    .into(),
                ))
            }
        }
    }

    /// `msg`, with the last connect error when it is recent enough to explain it.
    fn down_message(&self, mut msg: String) -> String {
        if let Some((at, err)) = &*self.last_connect_error.0.lock()
            && at.elapsed() <= self.acquire_timeout * 2
        {
            msg.push_str(": ");
            msg.push_str(err);
        }
        msg
    }
}

/// Runs the embedded migrations, all in one transaction. Instances starting together would
/// race to apply the same migration, so the transaction first takes an advisory lock named
/// after the target schema (per schema, so isolated test schemas do not wait on each
/// other). Lock, history and changes share the transaction, the one thing a transaction
/// pooler keeps on one server connection; it all goes away if this process dies half-way.
async fn migrate(pg: &Config) -> Result<Vec<String>, StoreError> {
    let (mut client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres migration connection failed");
        }
    });
    let result = async {
        let tx = client.transaction().await?;
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(hashtext('sluice.migrate.' || coalesce(current_schema(), '')))",
        )
        .await?;
        let mut locked = Locked(tx);
        let report = embedded::migrations::runner()
            .run_async(&mut locked)
            .await
            .map_err(migration_error)?;
        locked.0.commit().await?;
        Ok(report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect())
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}

/// refinery's migrations inside a transaction that holds the migration lock: each step
/// runs in it instead of in a transaction of its own, and nothing is prepared.
struct Locked<'a>(tokio_postgres::Transaction<'a>);

/// A history row refinery did not write, or an error of the database.
#[derive(Debug, thiserror::Error)]
enum MigrateError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("unreadable migration history: {0}")]
    History(String),
}

impl refinery_core::traits::r#async::AsyncTransaction for Locked<'_> {
    type Error = MigrateError;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, MigrateError> {
        let mut n = 0;
        for q in queries {
            self.0.batch_execute(q).await?;
            n += 1;
        }
        Ok(n)
    }
}

impl refinery_core::traits::r#async::AsyncQuery<Vec<refinery::Migration>> for Locked<'_> {
    async fn query<'a>(
        &'a mut self,
        query: &'a str,
    ) -> Result<Vec<refinery::Migration>, MigrateError> {
        // The simple protocol: the history's text columns as text, nothing prepared.
        let mut applied = Vec::new();
        for m in self.0.simple_query(query).await? {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let field = |i: usize| {
                r.get(i)
                    .ok_or_else(|| MigrateError::History(format!("column {i} is null")))
            };
            let bad = |what: &str, v: &str| MigrateError::History(format!("{what} {v:?}"));
            let version = field(0)?;
            let applied_on = field(2)?;
            let checksum = field(3)?;
            applied.push(refinery::Migration::applied(
                version.parse().map_err(|_| bad("version", version))?,
                field(1)?.to_owned(),
                time::OffsetDateTime::parse(
                    applied_on,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|_| bad("applied_on", applied_on))?,
                checksum.parse().map_err(|_| bad("checksum", checksum))?,
            ));
        }
        Ok(applied)
    }
}

impl refinery::AsyncMigrate for Locked<'_> {}

/// refinery's own message for a database error is only "db error"; the cause says more,
/// and says whether the database or the migration is at fault.
fn migration_error(e: refinery::Error) -> StoreError {
    let step = brief(&e);
    let mut cause = None;
    let mut next = std::error::Error::source(&e);
    while let Some(s) = next {
        if let Some(pg) = s.downcast_ref::<tokio_postgres::Error>() {
            cause = Some(pg);
            break;
        }
        next = s.source();
    }
    let error = match cause.map(classify) {
        Some(StoreError::Unavailable(m)) => {
            StoreError::Unavailable(format!("migrating postgres: {m}").into())
        }
        Some(StoreError::Backend(m) | StoreError::Conflict(m) | StoreError::NotFound(m)) => {
            StoreError::Backend(format!("migrating postgres: {step}: {m}").into())
        }
        None => StoreError::Backend(format!("migrating postgres: {step}").into()),
    };
    error.with_source(e)
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(&e).with_source(e)
    }
}

fn classify(e: &tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::UNIQUE_VIOLATION {
            return StoreError::Conflict(
                match db.constraint() {
                    Some(c) => format!("{} ({c})", db.message()),
                    None => db.message().to_owned(),
                }
                .into(),
            );
        }
        if *code == SqlState::FOREIGN_KEY_VIOLATION {
            return StoreError::NotFound(format!("referenced row: {}", db.message()).into());
        }
        // Connection exceptions, insufficient resources, operator intervention
        // (shutdown, recovery): the database, not the query, is the problem.
        return match &code.code()[..2] {
            "08" | "53" | "57" => {
                StoreError::Unavailable(format!("{}: {}", code.code(), db.message()).into())
            }
            _ => StoreError::Backend(format!("{}: {}", code.code(), db.message()).into()),
        };
    }
    // Not from the server: the socket failed, closed or timed out, or a value did not
    // convert. Only the last is this query's fault.
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io || e.to_string().contains("timeout") {
        return StoreError::Unavailable(e.to_string().into());
    }
    StoreError::Backend(e.to_string().into())
}

fn user_row(r: &Row) -> Result<User, StoreError> {
    Ok(User {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        created_at: r.try_get(2)?,
    })
}

fn key_row(r: &Row) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        name: r.try_get(2)?,
        prefix: r.try_get(3)?,
        is_admin: r.try_get(4)?,
        created_at: r.try_get(5)?,
        revoked_at: r.try_get(6)?,
    })
}

fn session_row(r: &Row) -> Result<Session, StoreError> {
    Ok(Session {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        agent: r.try_get(2)?,
        title: r.try_get(3)?,
        created_at: r.try_get(4)?,
        updated_at: r.try_get(5)?,
    })
}

fn message_row(r: &Row) -> Result<StoredMessage, StoreError> {
    let bad = |column, value: &str| {
        StoreError::Backend(
            BadValue {
                column,
                value: value.to_owned(),
            }
            .to_string()
            .into(),
        )
    };
    let role: &str = r.try_get(2)?;
    let status: &str = r.try_get(4)?;
    Ok(StoredMessage {
        id: r.try_get(0)?,
        session_id: r.try_get(1)?,
        role: parse_role(role).ok_or_else(|| bad("messages.role", role))?,
        content: r.try_get(3)?,
        reasoning: r.try_get(12)?,
        status: MessageStatus::parse(status).ok_or_else(|| bad("messages.status", status))?,
        generation_id: r.try_get(5)?,
        model: r.try_get(6)?,
        prompt_tokens: r.try_get(7)?,
        completion_tokens: r.try_get(8)?,
        error: r.try_get(9)?,
        created_at: r.try_get(10)?,
        updated_at: r.try_get(11)?,
    })
}

fn bad(e: BadValue) -> StoreError {
    StoreError::Backend(e.to_string().into()).with_source(e)
}

fn agent_row(r: &Row) -> Result<Agent, StoreError> {
    Ok(Agent {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        provider: r.try_get(2)?,
        model: r.try_get(3)?,
        system_prompt: r.try_get(4)?,
        temperature: r.try_get(5)?,
        max_tokens: r.try_get(6)?,
        fallback_models: parse_json_list("agents.fallback_models", r.try_get(7)?).map_err(bad)?,
        knowledge: r.try_get(8)?,
        is_active: r.try_get(9)?,
        created_at: r.try_get(10)?,
        updated_at: r.try_get(11)?,
    })
}

fn scene_row(r: &Row) -> Result<Scene, StoreError> {
    Ok(Scene {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        agent: r.try_get(2)?,
        template: r.try_get(3)?,
        created_at: r.try_get(4)?,
        updated_at: r.try_get(5)?,
    })
}

fn task_status(s: &str) -> Result<TaskStatus, StoreError> {
    TaskStatus::parse(s).ok_or_else(|| {
        bad(BadValue {
            column: "tasks.status",
            value: s.to_owned(),
        })
    })
}

fn task_row(r: &Row) -> Result<Task, StoreError> {
    Ok(Task {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        key_id: r.try_get(2)?,
        agent: r.try_get(3)?,
        scene: r.try_get(4)?,
        input: r.try_get(5)?,
        status: task_status(r.try_get(6)?)?,
        result: r.try_get(7)?,
        reasoning: r.try_get(13)?,
        error: r.try_get(8)?,
        progress_tokens: r.try_get(9)?,
        created_at: r.try_get(10)?,
        started_at: r.try_get(11)?,
        finished_at: r.try_get(12)?,
    })
}

fn hit_row(r: &Row) -> Result<KnowledgeHit, StoreError> {
    Ok(KnowledgeHit {
        id: r.try_get(0)?,
        title: r.try_get(1)?,
        snippet: r.try_get(2)?,
        tags: parse_json_list("knowledge_docs.tags", r.try_get(3)?).map_err(bad)?,
        score: r.try_get(4)?,
    })
}

#[async_trait]
impl StoreHealth for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.conn().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    fn pool_state(&self) -> Option<super::PoolState> {
        Some(PgStore::pool_state(self))
    }
}

#[async_trait]
impl KeyStore for PgStore {
    async fn ensure_user(&self, user: &User) -> Result<User, StoreError> {
        let c = self.conn().await?;
        // Two statements, not one CTE: a CTE's SELECT cannot see a row that a concurrent
        // transaction committed while its INSERT waited on the conflict.
        c.execute(
            sql::INSERT_USER.pg(),
            &[&user.id, &user.name, &user.created_at],
        )
        .await?;
        let row = c.query_one(sql::USER_BY_NAME.pg(), &[&user.name]).await?;
        user_row(&row)
    }

    async fn create_api_key(&self, key: &ApiKey, key_hash: &[u8; 32]) -> Result<(), StoreError> {
        self.conn()
            .await?
            .execute(
                sql::INSERT_API_KEY.pg(),
                &[
                    &key.id,
                    &key.user_id,
                    &key.name,
                    &key_hash.as_slice(),
                    &key.prefix,
                    &key.is_admin,
                    &key.created_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = self
            .conn()
            .await?
            .query(sql::LIST_API_KEYS.pg(), &[])
            .await?;
        rows.iter().map(key_row).collect()
    }

    async fn revoke_api_key(&self, id_or_name: &str, now: Millis) -> Result<u64, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::REVOKE_API_KEY.pg(), &[&id_or_name, &now])
            .await?;
        Ok(n)
    }

    async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::API_KEY_BY_HASH.pg(), &[&key_hash.as_slice()])
            .await?;
        row.as_ref().map(key_row).transpose()
    }

    async fn find_api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::API_KEY_BY_ID.pg(), &[&id])
            .await?;
        row.as_ref().map(key_row).transpose()
    }
}

#[async_trait]
impl SessionStore for PgStore {
    async fn create_session(&self, session: &Session) -> Result<(), StoreError> {
        self.conn()
            .await?
            .execute(
                sql::INSERT_SESSION.pg(),
                &[
                    &session.id,
                    &session.user_id,
                    &session.agent,
                    &session.title,
                    &session.created_at,
                    &session.updated_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn list_sessions(
        &self,
        user_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<Session>, StoreError> {
        let c = self.conn().await?;
        let limit = i64::from(limit);
        let rows = match after {
            None => {
                c.query(sql::LIST_SESSIONS.pg(), &[&user_id, &limit])
                    .await?
            }
            Some(cur) => {
                c.query(
                    sql::LIST_SESSIONS_AFTER.pg(),
                    &[&user_id, &cur.updated_at, &cur.id, &limit],
                )
                .await?
            }
        };
        rows.iter().map(session_row).collect()
    }

    async fn get_session(&self, user_id: &str, id: &str) -> Result<Option<Session>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::GET_SESSION.pg(), &[&id, &user_id])
            .await?;
        row.as_ref().map(session_row).transpose()
    }

    async fn delete_session(&self, user_id: &str, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::DELETE_SESSION.pg(), &[&id, &user_id])
            .await?;
        Ok(n > 0)
    }

    async fn update_session_title(
        &self,
        user_id: &str,
        id: &str,
        title: Option<&str>,
    ) -> Result<Option<Session>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::UPDATE_SESSION_TITLE.pg(), &[&id, &user_id, &title])
            .await?;
        row.as_ref().map(session_row).transpose()
    }

    async fn list_messages(&self, session_id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = self
            .conn()
            .await?
            .query(sql::LIST_MESSAGES.pg(), &[&session_id])
            .await?;
        rows.iter().map(message_row).collect()
    }

    async fn insert_message(&self, m: &StoredMessage) -> Result<(), StoreError> {
        // One statement is one transaction, and one round trip instead of four.
        self.conn()
            .await?
            .execute(
                "WITH m AS (
                     INSERT INTO messages (id, session_id, role, content, status, generation_id,
                         model, prompt_tokens, completion_tokens, error, created_at, updated_at,
                         reasoning)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     RETURNING session_id, updated_at
                 )
                 UPDATE sessions SET updated_at = m.updated_at FROM m WHERE sessions.id = m.session_id",
                &[
                    &m.id,
                    &m.session_id,
                    &role_str(m.role),
                    &m.content,
                    &m.status.as_str(),
                    &m.generation_id,
                    &m.model,
                    &m.prompt_tokens,
                    &m.completion_tokens,
                    &m.error,
                    &m.created_at,
                    &m.updated_at,
                    &m.reasoning,
                ],
            )
            .await?;
        Ok(())
    }

    async fn update_message(
        &self,
        id: &str,
        u: &MessageUpdate,
        now: Millis,
    ) -> Result<(), StoreError> {
        let n = self
            .conn()
            .await?
            .execute(
                sql::UPDATE_MESSAGE.pg(),
                &[
                    &id,
                    &u.content,
                    &u.status.as_str(),
                    &u.prompt_tokens,
                    &u.completion_tokens,
                    &u.error,
                    &now,
                    &u.reasoning,
                ],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("message {id}").into()));
        }
        Ok(())
    }

    async fn interrupt_streaming(&self, now: Millis) -> Result<u64, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::INTERRUPT_STREAMING.pg(), &[&now])
            .await?;
        Ok(n)
    }

    async fn claim_generation(
        &self,
        session_id: &str,
        generation_id: &str,
        server_id: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<Option<String>, StoreError> {
        let conn = self.conn().await?;
        // One statement decides: concurrent claims of a session queue on its row lock and
        // the later ones re-check the condition against the winner's values.
        let n = conn
            .execute(
                sql::CLAIM_GENERATION.pg(),
                &[&session_id, &generation_id, &server_id, &now, &expires_at],
            )
            .await?;
        if n == 1 {
            return Ok(None);
        }
        let row = conn
            .query_opt(sql::RUNNING_GENERATION.pg(), &[&session_id])
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("session {session_id}").into()))?;
        Ok(Some(row.get::<_, Option<String>>(0).unwrap_or_default()))
    }

    async fn release_generation(
        &self,
        session_id: &str,
        generation_id: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::RELEASE_GENERATION.pg(), &[&session_id, &generation_id])
            .await?;
        Ok(n == 1)
    }

    async fn interrupt_streaming_of(
        &self,
        server_id: &str,
        now: Millis,
    ) -> Result<u64, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::INTERRUPT_STREAMING_OF.pg(), &[&server_id, &now])
            .await?;
        Ok(n)
    }
}

#[async_trait]
impl CatalogStore for PgStore {
    async fn create_agent(&self, a: &Agent) -> Result<(), StoreError> {
        let fallback = json_list(&a.fallback_models)?;
        self.conn()
            .await?
            .execute(
                sql::INSERT_AGENT.pg(),
                &[
                    &a.id,
                    &a.name,
                    &a.provider,
                    &a.model,
                    &a.system_prompt,
                    &a.temperature,
                    &a.max_tokens,
                    &fallback,
                    &a.knowledge,
                    &a.is_active,
                    &a.created_at,
                    &a.updated_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn update_agent(&self, a: &Agent) -> Result<bool, StoreError> {
        let fallback = json_list(&a.fallback_models)?;
        let n = self
            .conn()
            .await?
            .execute(
                sql::UPDATE_AGENT.pg(),
                &[
                    &a.name,
                    &a.provider,
                    &a.model,
                    &a.system_prompt,
                    &a.temperature,
                    &a.max_tokens,
                    &fallback,
                    &a.knowledge,
                    &a.is_active,
                    &a.updated_at,
                ],
            )
            .await?;
        Ok(n > 0)
    }

    async fn get_agent(&self, name: &str) -> Result<Option<Agent>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::GET_AGENT.pg(), &[&name])
            .await?;
        row.as_ref().map(agent_row).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        let rows = self.conn().await?.query(sql::LIST_AGENTS.pg(), &[]).await?;
        rows.iter().map(agent_row).collect()
    }

    async fn delete_agent(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::DELETE_AGENT.pg(), &[&name])
            .await?;
        Ok(n > 0)
    }

    async fn create_scene(&self, s: &Scene) -> Result<(), StoreError> {
        self.conn()
            .await?
            .execute(
                sql::INSERT_SCENE.pg(),
                &[
                    &s.id,
                    &s.name,
                    &s.agent,
                    &s.template,
                    &s.created_at,
                    &s.updated_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn update_scene(&self, s: &Scene) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(
                sql::UPDATE_SCENE.pg(),
                &[&s.name, &s.agent, &s.template, &s.updated_at],
            )
            .await?;
        Ok(n > 0)
    }

    async fn get_scene(&self, name: &str) -> Result<Option<Scene>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::GET_SCENE.pg(), &[&name])
            .await?;
        row.as_ref().map(scene_row).transpose()
    }

    async fn list_scenes(&self) -> Result<Vec<Scene>, StoreError> {
        let rows = self.conn().await?.query(sql::LIST_SCENES.pg(), &[]).await?;
        rows.iter().map(scene_row).collect()
    }

    async fn delete_scene(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::DELETE_SCENE.pg(), &[&name])
            .await?;
        Ok(n > 0)
    }

    async fn add_knowledge(&self, d: &KnowledgeDoc) -> Result<(), StoreError> {
        let tags = json_list(&d.tags)?;
        // `search` is a generated column: PostgreSQL indexes the row itself.
        self.conn()
            .await?
            .execute(
                sql::INSERT_KNOWLEDGE.pg(),
                &[&d.id, &d.title, &d.content, &tags, &d.created_at],
            )
            .await?;
        Ok(())
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
        // plainto_tsquery reads the words as plain text (stemmed, stop words dropped) and
        // joins them with AND; its output, in the server's own quoting, has ' & ' only as
        // that operator (lexemes hold no spaces), so swapping it for ' | ' matches any
        // word. ts_rank weighs the title (A) above tags (B) above body text (C). The
        // headline, the costly part, is computed for the returned rows only; a document
        // without content falls back to its title.
        let rows = self
            .conn()
            .await?
            .query(
                "WITH q AS (
                     SELECT replace(plainto_tsquery('english', $1)::TEXT, ' & ', ' | ')::TSQUERY AS q
                 ), hits AS (
                     SELECT d.id, d.title, d.content, d.tags, d.created_at,
                            ts_rank(d.search, q.q)::FLOAT8 AS score, q.q
                     FROM knowledge_docs d, q
                     WHERE d.search @@ q.q
                     ORDER BY score DESC, d.created_at, d.id
                     LIMIT $2
                 )
                 SELECT id, title,
                        coalesce(nullif(ts_headline('english', content, q,
                            'MaxFragments=1, MaxWords=24, MinWords=12, StartSel=\"\", StopSel=\"\"'),
                            ''), title),
                        tags, score
                 FROM hits ORDER BY score DESC, created_at, id",
                &[&terms.join(" "), &i64::from(limit)],
            )
            .await?;
        rows.iter().map(hit_row).collect()
    }
}

#[async_trait]
impl TaskStore for PgStore {
    async fn create_task(&self, t: &Task) -> Result<(), StoreError> {
        self.conn()
            .await?
            .execute(
                sql::INSERT_TASK.pg(),
                &[
                    &t.id,
                    &t.user_id,
                    &t.key_id,
                    &t.agent,
                    &t.scene,
                    &t.input,
                    &t.status.as_str(),
                    &t.result,
                    &t.error,
                    &t.progress_tokens,
                    &t.created_at,
                    &t.started_at,
                    &t.finished_at,
                    &t.reasoning,
                ],
            )
            .await?;
        Ok(())
    }

    async fn get_task(&self, user_id: Option<&str>, id: &str) -> Result<Option<Task>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::GET_TASK.pg(), &[&id, &user_id])
            .await?;
        row.as_ref().map(task_row).transpose()
    }

    async fn claim_task(&self, id: &str, now: Millis) -> Result<Option<Task>, StoreError> {
        // One statement: a concurrent finish or cancel either commits first (and the
        // re-checked status no longer matches) or waits for this one.
        let row = self
            .conn()
            .await?
            .query_opt(sql::CLAIM_TASK.pg(), &[&id, &now])
            .await?;
        row.as_ref().map(task_row).transpose()
    }

    async fn set_task_progress(&self, id: &str, tokens: i64) -> Result<(), StoreError> {
        // Only while running: a late write of a worker that lost the task (cancelled,
        // finished elsewhere) must not change a settled record.
        self.conn()
            .await?
            .execute(sql::SET_TASK_PROGRESS.pg(), &[&id, &tokens])
            .await?;
        Ok(())
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
        let n = self
            .conn()
            .await?
            .execute(
                sql::FINISH_TASK.pg(),
                &[&id, &status.as_str(), &result, &error, &now, &reasoning],
            )
            .await?;
        Ok(n > 0)
    }

    async fn cancel_task(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<Option<TaskStatus>, StoreError> {
        // The status before is the answer, and UPDATE … RETURNING gives the one after: the
        // row is locked as it is read, so no finish can slip in between. Dropping the
        // transaction on an early return (or a cancelled caller) rolls it back.
        let mut c = self.conn().await?;
        let limit = c.limit;
        // Broken until the transaction is over: an abandoned one must not be reused.
        c.inner.broken.store(true, Ordering::Relaxed);
        let r = tokio::time::timeout(limit, async {
            let tx = c.inner.client.transaction().await?;
            let Some(row) = tx
                .query_typed_opt(
                    "SELECT status FROM tasks WHERE id = $1 AND user_id = $2 FOR UPDATE",
                    &typed(&[&id, &user_id])?,
                )
                .await?
            else {
                tx.rollback().await?;
                return Ok(None);
            };
            let before = task_status(row.try_get(0)?)?;
            if !before.is_final() {
                tx.execute_typed(sql::CANCEL_TASK.pg(), &typed(&[&id, &now])?)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, StoreError>(Some(before))
        })
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                format!("no answer from the database within {limit:?}").into(),
            ))
        });
        if r.is_ok() {
            c.inner.broken.store(false, Ordering::Relaxed);
        }
        c.health.observe(&r);
        r
    }

    async fn list_unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        let rows = self
            .conn()
            .await?
            .query(sql::LIST_UNFINISHED_TASKS.pg(), &[])
            .await?;
        rows.iter().map(task_row).collect()
    }

    async fn task_position(&self, id: &str) -> Result<Option<u64>, StoreError> {
        // `id` breaks ties between tasks created in the same millisecond, so positions
        // are distinct; the count is a range scan of tasks_status_created.
        let row = self
            .conn()
            .await?
            .query_opt(sql::TASK_POSITION.pg(), &[&id])
            .await?;
        let n: Option<i64> = row.map(|r| r.try_get(0)).transpose()?;
        Ok(n.map(|n| n.max(0) as u64))
    }

    async fn count_queued_tasks(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .await?
            .query_one(sql::COUNT_QUEUED_TASKS.pg(), &[])
            .await?
            .try_get(0)?;
        Ok(n.max(0) as u64)
    }
}

#[async_trait]
impl UsageStore for PgStore {
    async fn record_usage(&self, r: &UsageRecord) -> Result<(), StoreError> {
        self.conn()
            .await?
            .execute(
                sql::INSERT_USAGE.pg(),
                &[
                    &r.id,
                    &r.user_id,
                    &r.key_id,
                    &r.session_id,
                    &r.provider,
                    &r.model,
                    &r.prompt_tokens,
                    &r.completion_tokens,
                    &r.created_at,
                    &r.reasoning_tokens,
                ],
            )
            .await?;
        Ok(())
    }

    async fn usage_summary(&self, from: Millis, to: Millis) -> Result<Vec<UsageRow>, StoreError> {
        let rows = self
            .conn()
            .await?
            .query(sql::USAGE_SUMMARY.pg(), &[&from, &to])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    key_id: r.try_get(0)?,
                    model: r.try_get(1)?,
                    requests: r.try_get(2)?,
                    prompt_tokens: r.try_get(3)?,
                    completion_tokens: r.try_get(4)?,
                    reasoning_tokens: r.try_get(5)?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl ResponseStore for PgStore {
    async fn insert_response(&self, r: &StoredResponse) -> Result<(), StoreError> {
        self.conn()
            .await?
            .execute(
                sql::INSERT_RESPONSE.pg(),
                &[
                    &r.id,
                    &r.user_id,
                    &r.status,
                    &r.body,
                    &r.input_items,
                    &r.server,
                    &r.created_at,
                    &r.updated_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn finish_response(
        &self,
        id: &str,
        status: &str,
        body: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::FINISH_RESPONSE.pg(), &[&id, &status, &body, &now])
            .await?;
        Ok(n > 0)
    }

    async fn get_response(
        &self,
        user_id: &str,
        id: &str,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let row = self
            .conn()
            .await?
            .query_opt(sql::GET_RESPONSE.pg(), &[&id, &user_id])
            .await?;
        row.map(|r| {
            Ok(StoredResponse {
                id: r.try_get(0)?,
                user_id: r.try_get(1)?,
                status: r.try_get(2)?,
                body: r.try_get(3)?,
                input_items: r.try_get(4)?,
                server: r.try_get(5)?,
                cancel_at: r.try_get(6)?,
                created_at: r.try_get(7)?,
                updated_at: r.try_get(8)?,
            })
        })
        .transpose()
    }

    async fn delete_response(&self, user_id: &str, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::DELETE_RESPONSE.pg(), &[&id, &user_id])
            .await?;
        Ok(n > 0)
    }

    async fn request_response_cancel(
        &self,
        user_id: &str,
        id: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .await?
            .execute(sql::REQUEST_RESPONSE_CANCEL.pg(), &[&id, &user_id, &now])
            .await?;
        Ok(n > 0)
    }

    async fn fail_unfinished_responses(
        &self,
        server_id: Option<&str>,
        now: Millis,
    ) -> Result<u64, StoreError> {
        self.conn()
            .await?
            .execute(sql::FAIL_UNFINISHED_RESPONSES.pg(), &[&server_id, &now])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now_millis;

    /// A store in a schema of its own on the test server (see tests/it/common/db.rs), dropped
    /// at the end by the caller.
    async fn scratch(
        pool_size: u32,
        acquire_timeout: Duration,
    ) -> (PgStore, tokio_postgres::Client, String) {
        let server = std::env::var("SLUICE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let (admin, conn) = tokio_postgres::connect(&server, NoTls).await.unwrap();
        tokio::spawn(conn);
        let schema = format!(
            "sluice_t_{}_{:016x}",
            now_millis() / 1000,
            rand::random::<u64>()
        );
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let url = format!("{server}?options=-c%20search_path%3D{schema}");
        let cfg = StoreConfig {
            pool_size,
            acquire_timeout,
            ..StoreConfig::default()
        };
        (PgStore::connect(&url, &cfg).await.unwrap(), admin, schema)
    }

    #[tokio::test]
    async fn an_exhausted_pool_is_unavailable_not_stuck() {
        let (store, admin, schema) = scratch(1, Duration::from_millis(200)).await;
        let held = store.pool.get().await.unwrap();
        let err = store.ping().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert_eq!(store.pool_state().max, 1);
        drop(held);
        store.ping().await.unwrap();
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn every_shared_statement_prepares() {
        let (store, admin, schema) = scratch(1, Duration::from_secs(5)).await;
        let c = store.conn().await.unwrap();
        for (name, s) in sql::ALL {
            if let Err(e) = c.inner.client.prepare(s.pg()).await {
                panic!("{name}: {e}");
            }
        }
        drop(c);
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        let cfg = StoreConfig {
            acquire_timeout: Duration::from_secs(2),
            ..StoreConfig::default()
        };
        let err = PgStore::connect("postgres://postgres@127.0.0.1:1/test", &cfg)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_failed_migration_says_why() {
        let server = std::env::var("SLUICE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let url = format!("{server}?options=-c%20search_path%3Dsluice_no_such_schema");
        let err = PgStore::connect(&url, &StoreConfig::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
        assert!(
            err.to_string().contains("no schema has been selected"),
            "{err}"
        );
    }

    #[test]
    fn parameters_go_out_with_the_type_of_their_rust_value() {
        let none: Option<i64> = None;
        let bytes: &[u8] = b"k";
        let p: Params<'_> = &[&"s", &1i64, &2i32, &true, &0.5f64, &bytes, &none];
        let types: Vec<Type> = typed(p).unwrap().into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            types,
            [
                Type::TEXT,
                Type::INT8,
                Type::INT4,
                Type::BOOL,
                Type::FLOAT8,
                Type::BYTEA,
                Type::INT8
            ]
        );
        let err = typed(&[&"s", &std::time::SystemTime::now()]).unwrap_err();
        assert!(err.to_string().contains("parameter $2"), "{err}");
    }

    #[tokio::test]
    async fn url_options_are_refused_behind_pgbouncer() {
        // PgBouncer would refuse them, or drop them and with them the schema.
        let cfg = StoreConfig {
            pooler: DbPooler::Pgbouncer,
            ..StoreConfig::default()
        };
        let url = "postgres://postgres@127.0.0.1:1/test?options=-c%20search_path%3Dtenant";
        let err = PgStore::connect(url, &cfg).await.err().unwrap();
        assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
        assert!(err.to_string().contains("ALTER ROLE"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_url_does_not_echo_the_password() {
        let err = PgStore::connect(
            "postgres://u:hunter2@h/db?sslmode=bogus",
            &StoreConfig::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
