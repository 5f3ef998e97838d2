//! Health reports. Liveness never touches a dependency, so a slow database cannot make an
//! orchestrator restart a healthy process; readiness says whether to send traffic here.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Lifecycle;
use crate::cluster::BusStatus;
use crate::config::Config;
use crate::queue::TaskQueue;
use crate::store::Store;

#[derive(Debug, Serialize)]
pub struct Liveness {
    pub status: &'static str,
    pub server_id: String,
    pub version: &'static str,
    pub uptime_s: u64,
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub draining: bool,
    pub store: Dependency,
    /// Present in cluster mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<Dependency>,
    /// How generations are shared with other instances; `ok: false` while the Redis
    /// subscription is being re-established (local streams keep working meanwhile).
    pub bus: BusStatus,
    /// Where the shared state lives, so instances of one cluster can be compared.
    pub shared: Shared,
    pub providers: Vec<Provider>,
}

/// Where this instance keeps what it shares with its peers, without credentials:
/// instances of one cluster must show identical values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shared {
    /// `postgres HOST:PORT/DB[ search_path=S]` or `sqlite /abs/path/sluice.db`.
    pub store: String,
    /// `redis HOST:PORT/DB prefix P:` or `local`.
    pub bus: String,
}

impl Shared {
    pub fn of(config: &Config) -> Self {
        let store = match &config.store.database_url {
            Some(url) => describe_postgres(url.expose()),
            None => {
                let dir = std::path::absolute(&config.store.data_dir)
                    .unwrap_or_else(|_| config.store.data_dir.clone());
                format!(
                    "sqlite {}",
                    dir.join(crate::store::sqlite::DB_FILE).display()
                )
            }
        };
        let bus = match &config.redis {
            Some(r) => format!("{} prefix {}:", describe_redis(r.url.expose()), r.prefix),
            None => "local".into(),
        };
        Shared { store, bus }
    }
}

/// Hosts, ports, database and search_path; never the user or password.
fn describe_postgres(url: &str) -> String {
    let Ok(pg) = url.parse::<tokio_postgres::Config>() else {
        return "postgres (unparsable URL)".into();
    };
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            // One port applies to every host; otherwise one per host.
            let ports = pg.get_ports();
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let host = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("postgres");
    let mut out = format!("postgres {host}/{db}");
    if let Some(path) = pg.get_options().and_then(search_path) {
        out.push_str(" search_path=");
        out.push_str(&path);
    }
    out
}

/// The search_path of libpq `options` (`-c search_path=x` or `-csearch_path=x`).
fn search_path(options: &str) -> Option<String> {
    let at = options.find("search_path=")?;
    let rest = &options[at + "search_path=".len()..];
    Some(
        rest.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Host, port and database number of a `redis://` URL; never the user or password.
fn describe_redis(url: &str) -> String {
    let tls = url.starts_with("rediss://");
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.is_empty() {
        "127.0.0.1"
    } else {
        hostport
    };
    let has_port = match hostport.rsplit_once(':') {
        Some((h, _)) => !h.ends_with(':') && (!h.starts_with('[') || h.ends_with(']')),
        None => false,
    };
    let port = if has_port { "" } else { ":6379" };
    let db = path
        .split(['?', '#'])
        .next()
        .filter(|d| !d.is_empty())
        .unwrap_or("0");
    let scheme = if tls { "rediss" } else { "redis" };
    format!("{scheme} {hostport}{port}/{db}")
}

#[derive(Debug, Serialize)]
pub struct Provider {
    pub name: String,
    /// `closed` (healthy), `half_open` or `open`.
    pub circuit: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Dependency {
    pub backend: &'static str,
    pub ok: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn liveness(lifecycle: &Lifecycle, server_id: &str) -> Liveness {
    Liveness {
        status: if lifecycle.is_draining() {
            "draining"
        } else {
            "ok"
        },
        server_id: server_id.to_owned(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: lifecycle.uptime_secs(),
    }
}

/// A readiness probe must answer quickly even when a dependency hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn probe<F, E>(backend: &'static str, check: F) -> Dependency
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let error = match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 2 s".into()),
    };
    Dependency {
        backend,
        ok: error.is_none(),
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        error,
    }
}

pub async fn readiness(
    lifecycle: &Lifecycle,
    store: &dyn Store,
    queue: &dyn TaskQueue,
    bus: BusStatus,
    shared: Shared,
    providers: Vec<(String, &'static str)>,
) -> Readiness {
    let redis = async {
        if queue.backend() == "redis" {
            Some(probe("redis", async { queue.depth().await.map(|_| ()) }).await)
        } else {
            None
        }
    };
    let (store, redis) = tokio::join!(probe(store.backend(), store.ping()), redis);
    let draining = lifecycle.is_draining();
    Readiness {
        ready: !draining && store.ok && redis.as_ref().is_none_or(|r| r.ok) && bus.ok,
        draining,
        store,
        redis,
        bus,
        shared,
        providers: providers
            .into_iter()
            .map(|(name, circuit)| Provider { name, circuit })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_is_described_without_credentials() {
        assert_eq!(
            describe_postgres(
                "postgres://u:secret@db.example:6432/app?options=-c%20search_path%3Dtenant_1"
            ),
            "postgres db.example:6432/app search_path=tenant_1"
        );
        assert_eq!(
            describe_postgres("postgresql://postgres@127.0.0.1/sluice"),
            "postgres 127.0.0.1:5432/sluice"
        );
    }

    #[test]
    fn redis_is_described_without_credentials() {
        assert_eq!(
            describe_redis("redis://:pw@127.0.0.1:6380/2"),
            "redis 127.0.0.1:6380/2"
        );
        assert_eq!(
            describe_redis("redis://127.0.0.1"),
            "redis 127.0.0.1:6379/0"
        );
        assert_eq!(
            describe_redis("rediss://user:pw@[::1]/"),
            "rediss [::1]:6379/0"
        );
        assert_eq!(describe_redis("redis://[::1]:7000"), "redis [::1]:7000/0");
    }

    #[test]
    fn an_instance_without_shared_services_says_so() {
        let mut config = Config::default();
        config.store.data_dir = "/var/lib/sluice/8001/data".into();
        let s = Shared::of(&config);
        assert_eq!(s.store, "sqlite /var/lib/sluice/8001/data/sluice.db");
        assert_eq!(s.bus, "local");
        assert!(
            !serde_json::to_string(&s)
                .unwrap_or_default()
                .contains("secret")
        );
    }
}
