use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::ops::health;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(live))
        .route("/health/ready", get(ready))
}

async fn live(State(st): State<AppState>) -> impl IntoResponse {
    Json(health::liveness(&st.lifecycle, &st.config.server.server_id))
}

async fn ready(State(st): State<AppState>) -> impl IntoResponse {
    let r = health::readiness(
        &st.lifecycle,
        st.store.as_ref(),
        st.tasks.queue().as_ref(),
        st.bus.status(),
        health::Shared::of(&st.config),
        st.upstreams.circuit_states(),
    )
    .await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r))
}
