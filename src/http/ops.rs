//! Operations: metrics, and the admin endpoints.

use std::time::Instant;

use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::Principal;
use super::extract::OptionalJson;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::now_millis;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(prometheus))
        .route("/api/metrics", get(summary))
        .route("/api/admin/streams", get(streams))
        .route("/api/admin/drain", post(drain))
        .route("/api/admin/usage", get(usage))
        .route("/api/admin/cache/clear", post(cache_clear))
}

/// Counts and times every request by its route template.
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    st.metrics.request_started();
    let resp = next.run(req).await;
    st.metrics.request_finished(
        method.as_str(),
        &route,
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

/// Values read at scrape time rather than kept up to date.
async fn refresh_gauges(st: &AppState) {
    if let Ok(depth) = st.tasks.queue().depth().await {
        st.metrics
            .gauge("sluice_task_queue_depth", &[])
            .set(depth as f64);
    }
    if let Some(p) = st.store.pool_state() {
        st.metrics
            .gauge("sluice_db_pool_connections", &[("state", "active")])
            .set(p.open.saturating_sub(p.idle) as f64);
        st.metrics
            .gauge("sluice_db_pool_connections", &[("state", "idle")])
            .set(p.idle as f64);
        st.metrics
            .gauge("sluice_db_pool_connections", &[("state", "max")])
            .set(p.max as f64);
    }
    for (name, state) in st.upstreams.circuit_states() {
        let code = match state {
            "open" => 2.0,
            "half_open" => 1.0,
            _ => 0.0,
        };
        st.metrics
            .gauge("sluice_circuit_state", &[("provider", &name)])
            .set(code);
    }
}

async fn prometheus(State(st): State<AppState>) -> Response {
    refresh_gauges(&st).await;
    let mut resp = st.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn summary(State(st): State<AppState>, _who: Principal) -> Json<serde_json::Value> {
    let cache_size = match &st.cache {
        Some(c) => c.size().await,
        None => 0,
    };
    let s = st.metrics.summary(
        st.lifecycle.uptime_secs(),
        &st.config.server.server_id,
        cache_size,
    );
    Json(serde_json::to_value(s).unwrap_or_default())
}

async fn streams(State(st): State<AppState>) -> Json<serde_json::Value> {
    let mut data: Vec<_> = st
        .chat
        .hub()
        .channels()
        .into_iter()
        // Generations running here; copies of other instances' are listed there.
        .filter(|c| {
            !c.is_finished()
                && !c.remote
                && !c.session_id.starts_with("task:")
                && c.session_id != "flight"
        })
        .map(|c| {
            json!({
                "generation_id": c.generation_id,
                "session_id": c.session_id,
                "owner": c.owner,
                "instance": st.config.server.server_id,
                "age_s": c.age().as_secs(),
                "tokens": c.tokens(),
                "subscribers": c.subscriber_count(),
            })
        })
        .collect();
    // Through a load balancer any instance answers: the bus adds the others' generations.
    if let Some(cluster) = st.chat.bus().running().await {
        let now = crate::store::now_millis().max(0) as u64;
        for r in cluster {
            if data
                .iter()
                .any(|d| d["generation_id"] == r.generation_id.as_str())
            {
                continue;
            }
            data.push(json!({
                "generation_id": r.generation_id,
                "session_id": r.session_id,
                "owner": r.owner,
                "instance": r.instance,
                "age_s": r.started_at.map(|a| now.saturating_sub(a) / 1000),
            }));
        }
    }
    Json(json!({ "data": data }))
}

async fn drain(State(st): State<AppState>) -> Json<serde_json::Value> {
    st.lifecycle.start_drain();
    Json(json!({ "draining": true }))
}

#[derive(Deserialize)]
struct UsageQuery {
    /// Milliseconds since the epoch; default: the last 24 hours.
    #[serde(default)]
    from: Option<i64>,
    #[serde(default)]
    to: Option<i64>,
}

async fn usage(
    State(st): State<AppState>,
    Query(q): Query<UsageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let to = q.to.unwrap_or_else(now_millis);
    let from = q.from.unwrap_or(to - 24 * 3600 * 1000);
    if from > to {
        return Err(ApiError::Unprocessable("from: must not be after to".into()));
    }
    let rows = st
        .store
        .usage_summary(from, to)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(json!({ "from": from, "to": to, "data": rows })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CacheClear {
    #[serde(default)]
    prefix: Option<String>,
}

/// Clears cached replies whose key (`<model>:<hash>`) starts with `prefix`, or all.
async fn cache_clear(
    State(st): State<AppState>,
    OptionalJson(b): OptionalJson<CacheClear>,
) -> Json<serde_json::Value> {
    let b = b.unwrap_or_default();
    let cleared = match &st.cache {
        Some(c) => c.clear(b.prefix.as_deref()).await,
        None => 0,
    };
    Json(json!({ "cleared": cleared, "prefix": b.prefix }))
}
