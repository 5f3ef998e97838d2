//! Metrics: Prometheus series through the `metrics` crate, and a JSON summary
//! for people and dashboards computed from the same increments.
//!
//! Each server owns its recorder instead of installing a global one, so several servers
//! in one process (the test suite) never mix their numbers. Labels carry route templates,
//! providers and error kinds only — never a key, a user or prompt text.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use parking_lot::Mutex;
use serde::Serialize;

static META: Metadata<'static> = Metadata::new("sluice", metrics::Level::INFO, None);

/// Latency buckets (seconds) for request durations and time to first token.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    tokens: Counter,
    active_streams: Gauge,
    rate_limited: Counter,
    body_timeouts: Counter,
    // The JSON summary's own tallies, moved together with the series above.
    total_requests: AtomicU64,
    in_flight: AtomicI64,
    latency_us: AtomicU64,
    tokens_total: AtomicU64,
    streams_now: AtomicI64,
    rate_limited_total: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    upstream_errors: DashMap<String, u64>,
    /// Time to first token in microseconds, for the summary's p95.
    /// `None` only if the histogram could not be built (its bounds are constants).
    ttft: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub total_requests: u64,
    pub concurrent_requests: i64,
    pub active_streams: i64,
    pub cache_hit_rate: f64,
    pub rate_limited_requests: u64,
    pub average_response_time_ms: f64,
    pub ttft_p95_ms: f64,
    pub tokens_streamed: u64,
    pub cache_size: u64,
    pub upstream_errors: std::collections::BTreeMap<String, u64>,
    pub uptime_s: u64,
    pub server_id: String,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let c = |name: &'static str| recorder.register_counter(&Key::from_name(name), &META);
        let tokens = c("sluice_tokens_streamed_total");
        let rate_limited = c("sluice_rate_limited_total");
        let body_timeouts = c("sluice_body_timeouts_total");
        let active_streams =
            recorder.register_gauge(&Key::from_name("sluice_active_streams"), &META);
        tokens.increment(0);
        rate_limited.increment(0);
        body_timeouts.increment(0);
        active_streams.increment(0.0);
        let m = Self {
            tokens,
            active_streams,
            rate_limited,
            body_timeouts,
            total_requests: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            latency_us: AtomicU64::new(0),
            tokens_total: AtomicU64::new(0),
            streams_now: AtomicI64::new(0),
            rate_limited_total: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            upstream_errors: DashMap::new(),
            ttft: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).ok()),
            recorder,
            handle,
        };
        // Series that exist before their first event, so dashboards and alerts see zeros.
        for result in ["hit", "miss"] {
            m.labelled_counter("sluice_cache_requests_total", &[("result", result)])
                .increment(0);
        }
        for direction in ["in", "out"] {
            m.labelled_counter("sluice_bus_messages_total", &[("direction", direction)])
                .increment(0);
        }
        for transport in ["sse", "ws"] {
            m.gauge("sluice_connections", &[("transport", transport)])
                .increment(0.0);
        }
        Arc::new(m)
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn labelled_counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &META)
    }

    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// One finished request; `route` is the matched route template, never the raw path.
    pub fn request_finished(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.total_requests.fetch_add(1, Ordering::Relaxed);
        self.latency_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let status = status.to_string();
        self.labelled_counter(
            "http_requests_total",
            &[("method", method), ("route", route), ("status", &status)],
        )
        .increment(1);
        self.histogram(
            "http_request_duration_seconds",
            &[("method", method), ("route", route)],
        )
        .record(elapsed.as_secs_f64());
    }

    /// One token relayed from an upstream (counted once, whatever the number of watchers).
    pub fn token(&self) {
        self.tokens.increment(1);
        self.tokens_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_ttft(&self, provider: &str, ttft: Duration) {
        self.histogram("sluice_upstream_ttft_seconds", &[("provider", provider)])
            .record(ttft.as_secs_f64());
        if let Some(h) = self.ttft.lock().as_mut() {
            h.saturating_record((ttft.as_micros() as u64).max(1));
        }
    }

    pub fn upstream_error(&self, provider: &str, kind: &str) {
        self.labelled_counter(
            "sluice_upstream_errors_total",
            &[("provider", provider), ("kind", kind)],
        )
        .increment(1);
        *self.upstream_errors.entry(provider.to_owned()).or_insert(0) += 1;
    }

    /// The counter of `provider`'s streams failed for a line or event over
    /// `SLUICE_UPSTREAM_MAX_EVENT_BYTES`; registered at zero, so the series exists from the start.
    pub fn upstream_oversized(&self, provider: &str) -> Counter {
        let c = self.labelled_counter(
            "sluice_upstream_oversized_events_total",
            &[("provider", provider)],
        );
        c.increment(0);
        c
    }

    pub fn rate_limited(&self) {
        self.rate_limited.increment(1);
        self.rate_limited_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A request answered 408: its body did not arrive within the body timeout.
    pub fn body_timeout(&self) {
        self.body_timeouts.increment(1);
    }

    pub fn cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.labelled_counter("sluice_cache_requests_total", &[("result", result)])
            .increment(1);
        if hit {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An upstream stream is open until the guard drops.
    pub fn upstream_stream(self: &Arc<Self>) -> StreamGuard {
        self.active_streams.increment(1.0);
        self.streams_now.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            metrics: self.clone(),
            connection: None,
        }
    }

    /// A client connection of `transport` (`sse`, `ws`) is open until the guard drops.
    pub fn connection(self: &Arc<Self>, transport: &'static str) -> StreamGuard {
        let g = self.gauge("sluice_connections", &[("transport", transport)]);
        g.increment(1.0);
        StreamGuard {
            metrics: self.clone(),
            connection: Some(g),
        }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn summary(&self, uptime_s: u64, server_id: &str, cache_size: u64) -> Summary {
        let total = self.total_requests.load(Ordering::Relaxed);
        let hits = self.cache_hits.load(Ordering::Relaxed);
        let lookups = hits + self.cache_misses.load(Ordering::Relaxed);
        let ttft = self.ttft.lock();
        Summary {
            total_requests: total,
            concurrent_requests: self.in_flight.load(Ordering::Relaxed).max(0),
            active_streams: self.streams_now.load(Ordering::Relaxed).max(0),
            cache_hit_rate: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
            rate_limited_requests: self.rate_limited_total.load(Ordering::Relaxed),
            average_response_time_ms: if total == 0 {
                0.0
            } else {
                self.latency_us.load(Ordering::Relaxed) as f64 / total as f64 / 1000.0
            },
            ttft_p95_ms: match ttft.as_ref() {
                Some(h) if !h.is_empty() => h.value_at_quantile(0.95) as f64 / 1000.0,
                _ => 0.0,
            },
            tokens_streamed: self.tokens_total.load(Ordering::Relaxed),
            cache_size,
            upstream_errors: self
                .upstream_errors
                .iter()
                .map(|e| (e.key().clone(), *e.value()))
                .collect(),
            uptime_s,
            server_id: server_id.to_owned(),
        }
    }
}

/// Decrements its gauge when the stream or connection ends, however it ends.
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    connection: Option<Gauge>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        match &self.connection {
            Some(g) => g.decrement(1.0),
            None => {
                self.metrics.active_streams.decrement(1.0);
                self.metrics.streams_now.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
