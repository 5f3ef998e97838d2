//! Guards: rate limits, cluster-wide quotas, concurrency limits, circuit breakers, CORS, the
//! `Host` check.
//! Plain limiters and decisions; `http::guards` turns them into middleware and responses.

pub mod breaker;
pub mod cors;
pub mod host;
pub mod quota;
pub mod rate;
pub mod streams;

use crate::config::GuardConfig;

/// Every guard of one server.
pub struct Guards {
    pub config: GuardConfig,
    /// Per-key (else per-IP) request rates, per route class.
    pub rate: rate::RateLimits,
    /// Cluster-wide per-key quotas in Redis; `None` without Redis or without quotas.
    pub quota: Option<std::sync::Arc<quota::Quota>>,
    /// Concurrent client streams per instance and per key.
    pub streams: std::sync::Arc<streams::StreamLimits>,
}
