//! `POST /v1/messages`, Anthropic Messages dialect (streaming only, scenarios excepted).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::knobs;
use super::scenario::Api;
use super::script::{self, Dialect};
use super::tokens::json_string;
use super::{Fault, Shared};

pub(crate) async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match shared.record_chat(&body) {
        Ok(req) => req,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
    };
    let plan = match knobs::plan(&shared, &headers, &req, Api::Anthropic) {
        Ok(plan) => plan,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
    };
    let stream = req.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream && plan.scenario.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the mock only streams /v1/messages replies (scenarios excepted); send \"stream\": true",
        );
    }
    match plan.fault {
        Some(Fault::RateLimit) => {
            let mut resp = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "mock rate limit",
            );
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                shared.config.retry_after_secs.into(),
            );
            return resp;
        }
        Some(Fault::ServerError) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "mock server error",
            );
        }
        _ => {}
    }
    if let Some(scenario) = plan.scenario {
        let fixture = scenario.fixture(&req);
        return super::play(&shared, &plan, fixture, stream, true).await;
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock");
    let dialect = Anthropic {
        id: format!("msg_mock_{}", shared.next_id()),
        model: json_string(model),
        input_tokens: prompt_words(&req),
    };
    super::sse_response(script::body(Arc::clone(&shared), plan, dialect))
}

/// Words of the system prompt plus every message, so the same conversation
/// counts the same as through the OpenAI endpoint (where the system prompt is
/// a message).
fn prompt_words(req: &Value) -> u64 {
    let system = req.get("system").map_or(0, super::content_words);
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content"))
                .map(super::content_words)
                .sum()
        });
    system + messages
}

struct Anthropic {
    id: String,
    /// Already a JSON string literal.
    model: String,
    input_tokens: u64,
}

fn event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

impl Dialect for Anthropic {
    fn prelude(&self) -> Vec<Bytes> {
        vec![
            event(
                "message_start",
                &format!(
                    "{{\"type\":\"message_start\",\"message\":{{\"id\":\"{}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{},\"output_tokens\":1}}}}}}",
                    self.id, self.model, self.input_tokens
                ),
            ),
            event(
                "content_block_start",
                "{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}",
            ),
            event("ping", "{\"type\":\"ping\"}"),
        ]
    }

    fn token_json(&self, text: &str) -> Bytes {
        const OPEN: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":";
        const CLOSE: &str = "}}\n\n";
        let mut s = String::with_capacity(OPEN.len() + text.len() + CLOSE.len());
        s.push_str(OPEN);
        s.push_str(text);
        s.push_str(CLOSE);
        Bytes::from(s)
    }

    fn epilogue(&self, sent: usize) -> Vec<Bytes> {
        vec![
            event(
                "content_block_stop",
                "{\"type\":\"content_block_stop\",\"index\":0}",
            ),
            event(
                "message_delta",
                &format!(
                    "{{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{sent}}}}}"
                ),
            ),
            event("message_stop", "{\"type\":\"message_stop\"}"),
        ]
    }

    fn malformed(&self) -> Bytes {
        Bytes::from_static(
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\n\n",
        )
    }

    fn error_event(&self) -> Bytes {
        Bytes::from_static(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"mock in-band error\"}}\n\n",
        )
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}
