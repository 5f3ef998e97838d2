//! Health reports. Liveness never touches a dependency, so a slow database cannot make an
//! orchestrator restart a healthy process; readiness says whether to send traffic here.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Lifecycle;
use crate::cluster::BusStatus;
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
    pub providers: Vec<Provider>,
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
        providers: providers
            .into_iter()
            .map(|(name, circuit)| Provider { name, circuit })
            .collect(),
    }
}
