//! Fresh, isolated stores for tests: SQLite in a temp dir, PostgreSQL in a schema of its own,
//! PostgreSQL through PgBouncer in a database of its own.
//!
//! PostgreSQL is shared by CI runs and developers, so every `TestDb` gets a new schema,
//! `sluice_t_<unix seconds>_<random>`, reached through the URL's `search_path` option. The
//! schema is dropped when the `TestDb` is; schemas of runs that died before that (killed,
//! aborted) are swept by the first `fresh` of a later run once they are an hour old.
//!
//! PgBouncer passes no `options` on, so there each `TestDb` gets a database of that name
//! instead (its tables in `public`), reached through one PgBouncer in transaction mode per
//! test process; stale databases are swept as stale schemas are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice::config::{DbPooler, Secret, StoreConfig};

use super::pgbouncer::PgBouncer;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// PostgreSQL through PgBouncer in transaction mode.
    PgBouncer,
}

impl Backend {
    pub fn is_postgres(self) -> bool {
        self != Backend::Sqlite
    }
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

const SCHEMA_PREFIX: &str = "sluice_t_";
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// The server the PostgreSQL tests use; override with `SLUICE_TEST_DATABASE_URL`.
pub fn server_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub struct TestDb {
    pub backend: Backend,
    /// What `sluice::store::open` takes; `database_url` is set for PostgreSQL only.
    pub config: StoreConfig,
    /// SQLite: the data directory, removed on drop.
    dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the schema, dropped on drop.
    schema: Option<String>,
    /// PgBouncer: the database, dropped on drop, and its URL on the server itself.
    database: Option<(String, String)>,
}

impl TestDb {
    /// The URL with `search_path` set to this test's schema (PostgreSQL only).
    pub fn database_url(&self) -> Option<&str> {
        self.config.database_url.as_ref().map(Secret::expose)
    }

    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// SQLite only: the data directory.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// A client on this test's schema or database, for looking at tables directly: on the
    /// server itself, as its statements are prepared ones.
    pub async fn pg_client(&self) -> tokio_postgres::Client {
        match &self.database {
            Some((_, direct)) => connect(direct).await,
            None => connect(self.database_url().expect("a PostgreSQL TestDb")).await,
        }
    }
}

pub async fn fresh(backend: Backend) -> TestDb {
    let mut config = StoreConfig {
        // Small and quick to fail, so a broken database fails a test instead of hanging it.
        pool_size: 4,
        acquire_timeout: Duration::from_secs(10),
        ..StoreConfig::default()
    };
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            config.data_dir = dir.path().join("data");
            TestDb {
                backend,
                config,
                dir: Some(dir),
                schema: None,
                database: None,
            }
        }
        Backend::Postgres | Backend::PgBouncer => {
            let server = server_url();
            let client = connect(&server).await;
            static SWEPT: AtomicBool = AtomicBool::new(false);
            if !SWEPT.swap(true, Ordering::SeqCst) {
                sweep_stale(&client).await;
            }
            let schema = format!(
                "{SCHEMA_PREFIX}{}_{:016x}",
                unix_secs(),
                rand::random::<u64>()
            );
            if backend == Backend::PgBouncer {
                let bouncer = pgbouncer();
                // template0: nobody is ever connected to it, which CREATE DATABASE requires.
                client
                    .batch_execute(&format!("CREATE DATABASE \"{schema}\" TEMPLATE template0"))
                    .await
                    .expect("create test database");
                config.database_url = Some(Secret::new(bouncer.url(&schema)));
                config.pooler = DbPooler::Pgbouncer;
                let direct = with_database(&server, &schema);
                return TestDb {
                    backend,
                    config,
                    dir: None,
                    schema: None,
                    database: Some((schema, direct)),
                };
            }
            // DDL takes no parameters; the name is ours and only [a-z0-9_].
            client
                .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
                .await
                .expect("create test schema");
            config.database_url = Some(Secret::new(with_search_path(&server, &schema)));
            TestDb {
                backend,
                config,
                dir: None,
                schema: Some(schema),
                database: None,
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // FORCE: PgBouncer still holds server connections to the database.
        let drop_sql = match (self.schema.take(), self.database.take()) {
            (Some(schema), _) => {
                format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")
            }
            (None, Some((db, _))) => format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
            (None, None) => return,
        };
        // Drop runs inside the test's runtime, which must not be re-entered or blocked on
        // its own I/O; a thread with a runtime of its own does the work. Joining it keeps
        // the test process from exiting before the schema is gone.
        let server = server_url();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&server, tokio_postgres::NoTls).await
                {
                    let driver = tokio::spawn(conn);
                    // A connection of the test still inside a transaction would make this
                    // wait; give up instead, and leave the schema to the sweep.
                    let _ = client.batch_execute(&drop_sql).await;
                    drop(client);
                    let _ = driver.await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Drops test schemas and databases left behind by runs that died more than an hour ago.
async fn sweep_stale(client: &tokio_postgres::Client) {
    let Ok(rows) = client
        .query(
            "SELECT nspname, 'SCHEMA' FROM pg_namespace WHERE starts_with(nspname, $1)
             UNION ALL
             SELECT datname, 'DATABASE' FROM pg_database WHERE starts_with(datname, $1)",
            &[&SCHEMA_PREFIX],
        )
        .await
    else {
        return;
    };
    let cutoff = unix_secs().saturating_sub(STALE_AFTER.as_secs());
    for row in rows {
        let name: String = row.get(0);
        let kind: &str = row.get(1);
        let created = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        let well_formed = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if well_formed && created.is_some_and(|t| t < cutoff) {
            // Another run may be sweeping the same one; either drop is fine.
            let tail = if kind == "SCHEMA" {
                "CASCADE"
            } else {
                "WITH (FORCE)"
            };
            let _ = client
                .batch_execute(&format!("DROP {kind} IF EXISTS \"{name}\" {tail}"))
                .await;
        }
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL tests need a server at SLUICE_TEST_DATABASE_URL ({}): {e}",
                server_url()
            )
        });
    tokio::spawn(conn);
    client
}

/// The PgBouncer of this test process, started by the first test that needs it.
pub fn pgbouncer() -> &'static PgBouncer {
    static BOUNCER: std::sync::OnceLock<PgBouncer> = std::sync::OnceLock::new();
    BOUNCER.get_or_init(|| PgBouncer::start(&server_url()))
}

/// The server URL naming `database` instead of its own.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    let mut out = format!("{}/{database}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The server URL with `options=-c search_path=<schema>` added (percent-encoded).
pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Runs each listed `async fn name(backend: Backend)` once per backend, as separate tests
/// `sqlite::name`, `postgres::name` and `pgbouncer::name`, so a failure names its backend
/// and runs in parallel. `backend_tests!(sqlite, postgres; a, b)` names the backends to use.
/// A backend whose server is missing skips its tests (see `need`).
#[macro_export]
macro_rules! backend_tests {
    (@list []; $($name:ident),*) => {};
    (@list [$m:ident $(, $rest:ident)*]; $($name:ident),*) => {
        $crate::backend_tests!(@mod $m; $($name),*);
        $crate::backend_tests!(@list [$($rest),*]; $($name),*);
    };
    ($($m:ident),+ ; $($name:ident),* $(,)?) => {
        $crate::backend_tests!(@list [$($m),+]; $($name),*);
    };
    ($($name:ident),* $(,)?) => {
        $crate::backend_tests!(sqlite, postgres, pgbouncer; $($name),*);
    };
    (@mod sqlite; $($name:ident),*) => {
        $crate::backend_tests!(@tests sqlite, Sqlite, []; $($name),*);
    };
    (@mod postgres; $($name:ident),*) => {
        $crate::backend_tests!(@tests postgres, Postgres, [Postgres]; $($name),*);
    };
    (@mod pgbouncer; $($name:ident),*) => {
        $crate::backend_tests!(@tests pgbouncer, PgBouncer, [Postgres, PgBouncer]; $($name),*);
    };
    (@needs [$($need:ident),*]) => {
        [$($crate::common::need::Need::$need),*]
    };
    (@tests $m:ident, $backend:ident, $needs:tt; $($name:ident),*) => {
        mod $m {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !$crate::common::need::have(&$crate::backend_tests!(@needs $needs)) {
                        return;
                    }
                    super::$name($crate::common::db::Backend::$backend).await
                }
            )*
        }
    };
}
