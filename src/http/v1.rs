//! The OpenAI-compatible API: any OpenAI SDK pointed at `http://host/v1` is a client.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::auth::Principal;
use super::extract::RelayJson;
use crate::chat::completions::Completion;
use crate::error::ApiError;
use crate::state::AppState;
use crate::transport::openai::{self, CompletionRequest, ResponseMeta};
use crate::upstream::{ModelInfo, UpstreamError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        // A wildcard: upstream model ids may hold slashes (`meta-llama/Llama-3.1-8B`).
        .route("/v1/models/{*id}", get(model))
}

async fn chat_completions(
    State(st): State<AppState>,
    who: Principal,
    RelayJson(req): RelayJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    let (chat, opts) = req.into_domain().map_err(ApiError::Unprocessable)?;
    let Completion {
        relay,
        permit,
        model,
        own_call,
    } = st
        .completions
        .open(&who.user_id, who.key_id.as_deref(), chat)
        .await?;
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        model,
    };
    let mut response = if opts.stream {
        let events = openai::chunk_stream(
            relay,
            meta,
            opts.include_usage,
            st.config.server.ping_interval,
            st.lifecycle.stop_token(),
        );
        super::sse_holding(&st, events, permit)
    } else {
        let completion = relay.collect().await?;
        drop(permit);
        Json(openai::completion_json(&meta, completion)).into_response()
    };
    if own_call {
        response.extensions_mut().insert(super::LogsAtEnd);
    }
    Ok(response)
}

fn model_object(m: &ModelInfo) -> serde_json::Value {
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by})
}

async fn models(State(st): State<AppState>, _who: Principal) -> Json<serde_json::Value> {
    let data: Vec<_> = st
        .upstreams
        .models()
        .await
        .iter()
        .map(model_object)
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// One model of the list, as OpenAI's `models.retrieve` expects it.
async fn model(
    State(st): State<AppState>,
    _who: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.upstreams
        .models()
        .await
        .iter()
        .find(|m| m.id == id)
        .map(|m| Json(model_object(m)))
        .ok_or_else(|| UpstreamError::UnknownModel(id).into())
}
