//! Fresh, isolated stores for tests: SQLite in a temp dir, PostgreSQL in a schema of its own.
//!
//! PostgreSQL is shared by CI runs and developers, so every `TestDb` gets a new schema,
//! `sluice_t_<unix seconds>_<random>`, reached through the URL's `search_path` option. The
//! schema is dropped when the `TestDb` is; schemas of runs that died before that (killed,
//! aborted) are swept by the first `fresh` of a later run once they are an hour old.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice::config::{Secret, StoreConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Sqlite,
    Postgres,
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

    /// A client on this test's schema, for looking at tables directly.
    pub async fn pg_client(&self) -> tokio_postgres::Client {
        let url = self.database_url().expect("a PostgreSQL TestDb");
        connect(url).await
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
            }
        }
        Backend::Postgres => {
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
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else {
            return;
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
                    let _ = client
                        .batch_execute(&format!(
                            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                        ))
                        .await;
                    drop(client);
                    let _ = driver.await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Drops test schemas left behind by runs that died more than an hour ago.
async fn sweep_stale(client: &tokio_postgres::Client) {
    let Ok(rows) = client
        .query(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
            &[&SCHEMA_PREFIX],
        )
        .await
    else {
        return;
    };
    let cutoff = unix_secs().saturating_sub(STALE_AFTER.as_secs());
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        let well_formed = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if well_formed && created.is_some_and(|t| t < cutoff) {
            // Another run may be sweeping the same schema; either drop is fine.
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
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
/// `sqlite::name` and `postgres::name`, so a failure names its backend and runs in parallel.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::db::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::db::Backend::Postgres).await
                }
            )*
        }
    };
}
