//! `POST /v1/chat/completions`, OpenAI Chat Completions dialect.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::knobs::{self, Plan};
use super::scenario::Api;
use super::script::{self, Dialect};
use super::tokens::{full_reply, json_string};
use super::{Fault, Shared};

pub(crate) async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match shared.record_chat(&body) {
        Ok(req) => req,
        Err(msg) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                &msg,
            );
        }
    };
    let plan = match knobs::plan(&shared, &headers, &req, Api::OpenAi) {
        Ok(plan) => plan,
        Err(msg) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_mock_knob",
                &msg,
            );
        }
    };
    match plan.fault {
        Some(Fault::RateLimit) => return rate_limited(shared.config.retry_after_secs),
        Some(Fault::ServerError) => return server_error(),
        _ => {}
    }
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if let Some(scenario) = plan.scenario {
        let fixture = scenario.fixture(&req);
        return super::play(&shared, &plan, fixture, stream, include_usage).await;
    }
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock");
    let id = format!("chatcmpl-mock-{}", shared.next_id());
    let prompt_tokens = prompt_words(&req);
    if stream {
        let dialect = OpenAi {
            head: format!(
                "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"choices\":[",
                super::unix_now(),
                json_string(model)
            ),
            prompt_tokens,
            include_usage,
        };
        super::sse_response(script::body(Arc::clone(&shared), plan, dialect))
    } else {
        non_stream(&shared, plan, &id, model, prompt_tokens).await
    }
}

async fn non_stream(
    shared: &Shared,
    plan: Plan,
    id: &str,
    model: &str,
    prompt_tokens: u64,
) -> Response {
    match plan.fault {
        None => {}
        Some(Fault::StallFirst | Fault::StallMid) => {
            shared.cancel.cancelled().await;
            return super::shutting_down_response();
        }
        Some(Fault::ResetMid) => {
            return (StatusCode::OK, script::reset_body()).into_response();
        }
        Some(f) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "server_error",
                &format!("mock fault {f} has no non-streaming form"),
            );
        }
    }
    // A non-streamed reply is ready when its last token would have been.
    if !super::generation_delay(shared, &plan).await {
        return super::shutting_down_response();
    }
    let completion_tokens = plan.tokens as u64;
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": super::unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": full_reply(plan.tokens)},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// Whitespace-separated words across all message contents, whether a
/// content is a string or an array of text parts.
fn prompt_words(req: &Value) -> u64 {
    req.get("messages")
        .and_then(Value::as_array)
        .map_or(0, |msgs| {
            msgs.iter()
                .filter_map(|m| m.get("content"))
                .map(super::content_words)
                .sum()
        })
}

struct OpenAi {
    /// Everything of a chunk up to the inside of `"choices":[`; identical for
    /// every chunk of one reply, so it is formatted once.
    head: String,
    prompt_tokens: u64,
    include_usage: bool,
}

impl OpenAi {
    fn chunk(&self, tail: &str) -> Bytes {
        let mut s = String::with_capacity(self.head.len() + tail.len());
        s.push_str(&self.head);
        s.push_str(tail);
        Bytes::from(s)
    }
}

impl Dialect for OpenAi {
    fn prelude(&self) -> Vec<Bytes> {
        vec![self.chunk(
            "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        )]
    }

    fn token_json(&self, text: &str) -> Bytes {
        const OPEN: &str = "{\"index\":0,\"delta\":{\"content\":";
        const CLOSE: &str = "},\"finish_reason\":null}]}\n\n";
        let mut s = String::with_capacity(self.head.len() + OPEN.len() + text.len() + CLOSE.len());
        s.push_str(&self.head);
        s.push_str(OPEN);
        s.push_str(text);
        s.push_str(CLOSE);
        Bytes::from(s)
    }

    fn epilogue(&self, sent: usize) -> Vec<Bytes> {
        let mut events =
            vec![self.chunk("{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n")];
        if self.include_usage {
            let completion = sent as u64;
            events.push(self.chunk(&format!(
                "],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
                self.prompt_tokens,
                self.prompt_tokens + completion
            )));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }

    fn malformed(&self) -> Bytes {
        Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\n\n")
    }

    fn error_event(&self) -> Bytes {
        Bytes::from_static(
            b"data: {\"error\":{\"message\":\"mock in-band error\",\"type\":\"server_error\",\"code\":\"mock_error\"}}\n\n",
        )
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": code}})),
    )
        .into_response()
}

fn rate_limited(retry_after_secs: u64) -> Response {
    let mut resp = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "rate_limited",
        "mock rate limit",
    );
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, retry_after_secs.into());
    resp
}

fn server_error() -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "server_error",
        "mock server error",
    )
}
