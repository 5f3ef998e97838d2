//! `POST /v1/messages`: Anthropic's Messages API, for Claude Code and the Anthropic SDKs,
//! served by any upstream through the same relay as `/v1/chat/completions`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value};

use super::auth::Principal;
use super::extract::RelayJson;
use crate::chat::completions::Completion;
use crate::dialect::messages::{self, error_body, error_type};
use crate::error::ApiError;
use crate::state::AppState;
use crate::transport::messages as wire;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/messages", post(create))
}

async fn create(
    State(st): State<AppState>,
    who: Principal,
    RelayJson(body): RelayJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    // Anthropic answers a body it cannot take with 400 invalid_request_error.
    let req = messages::to_chat(body).map_err(ApiError::BadRequest)?;
    let Completion {
        relay,
        permit,
        model,
        own_call,
    } = st
        .completions
        .open(&who.user_id, who.key_id.as_deref(), req.chat)
        .await?;
    let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
    let mut response = if req.stream {
        let events = wire::event_stream(
            relay,
            id,
            model,
            st.config.server.ping_interval,
            st.lifecycle.stop_token(),
        );
        super::sse_holding(&st, events, permit)
    } else {
        let message = wire::collect(relay, id, model).await?;
        drop(permit);
        Json(message).into_response()
    };
    if own_call {
        response.extensions_mut().insert(super::LogsAtEnd);
    }
    Ok(response)
}

/// The most of an error body read to reshape it; sluice's own are a few hundred bytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Whether a path is the Messages API's, however it is spelled.
fn is_messages_path(path: &str) -> bool {
    let norm = super::path::normalize(path);
    norm == "/v1/messages" || norm.starts_with("/v1/messages/")
}

/// Every error under `/v1/messages` in Anthropic's shape,
/// `{"type":"error","error":{"type","message"}}`, its status and headers kept: the
/// Anthropic SDKs read only that shape. Mounted outside every other layer, so errors of
/// the caller middleware (401, 429), the limits (413, 431) and draining (503) are
/// reshaped as well as the handler's.
pub async fn anthropic_errors(req: Request, next: Next) -> Response {
    if !is_messages_path(req.uri().path()) {
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| reason(status));
    let body = error_body(error_type(status.as_u16()), &message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(
        parts,
        Body::from(serde_json::to_vec(&body).unwrap_or_default()),
    )
}

fn reason(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
}
