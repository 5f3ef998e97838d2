//! sluice-mock: a fake OpenAI/Anthropic-compatible LLM server.
//!
//! It exists so integration tests, benchmarks and offline UI work have an
//! upstream that is deterministic ([`token_text`]), fast enough never to be
//! the bottleneck (zero-delay mode pushes tokens as fast as the socket takes
//! them), able to misbehave on demand ([`Fault`]), and observable: every
//! request, connection and stream is counted in [`MockStats`], which tests
//! wait on through [`MockServer::watch`] instead of sleeping.
//!
//! Endpoints:
//! - `POST /v1/chat/completions` — OpenAI Chat Completions, streamed or not.
//! - `POST /v1/messages` — Anthropic Messages, streaming only (scenarios excepted).
//! - `GET /v1/models` — a single model, `mock`.
//! - `GET /_mock/stats` — [`MockStats`] as JSON.
//! - `GET /_mock/requests/last` — the last chat request's body, byte for byte as
//!   received (`application/json`); `404` before the first one and after a reset.
//! - `POST /_mock/reset` — zero the counters and the `fail_times` budgets.
//!
//! Every knob of [`MockConfig`] can be overridden per request by headers
//! (`x-mock-tokens`, `x-mock-first-token-ms`, `x-mock-token-ms`,
//! `x-mock-fault`, `x-mock-fail-times`, `x-mock-key`, `x-mock-scenario`) or,
//! winning over the headers, by a body field `"mock": {"tokens", "first_token_ms",
//! "token_ms", "fault", "fail_times", "key", "stamp", "scenario"}`. A fault of `"none"` (or
//! `null` in the body) switches a process-wide fault off. `stamp: true`
//! (header `x-mock-stamp: 1`) ends every token's text in
//! `@<request arrived>@<token sent>`, Unix nanoseconds, for latency
//! measurements that do not depend on the timer's millisecond ticks;
//! `--stamp` (`SLUICE_MOCK_STAMP`) does it for every request that does not
//! say `stamp: false`.
//!
//! `scenario` plays a recorded provider reply instead of the token text ([`Scenario`]):
//! `tool_call`, `parallel_tool_calls`, `reasoning`, `logprobs` and `n` on the OpenAI
//! endpoint, `tool_use` and `thinking` on the Anthropic one; a name the endpoint does not
//! play is a `400` (`invalid_mock_knob` on the OpenAI endpoint), and `"none"` / `null`
//! switches a process-wide `--scenario` (`SLUICE_MOCK_SCENARIO`) off. The process-wide one
//! applies to its own dialect's endpoint only. Recordings live in `tests/fixtures/` and are
//! sent event by event as recorded, ids, `created` and `model` included (the request's
//! `model` is not echoed), paced by `first_token_delay` and `token_delay` like tokens;
//! `tokens` and `stamp` do not apply. The one change: OpenAI's usage chunk is sent only
//! when the request asks `stream_options.include_usage: true`. In the tool scenarios a
//! conversation that ends in a tool result (OpenAI: a last message of role `tool`;
//! Anthropic: a `tool_result` block in the last user message) gets the scenario's final
//! text answer instead. Not streamed, the OpenAI endpoint answers the `chat.completion`
//! the chunks add up (merged as the OpenAI SDKs and sluice merge them), the Anthropic one the
//! Messages API `message`. The `429` and `500` faults apply to scenarios as to plain
//! replies; the stream-shape faults cannot be combined with one and get a `400`.

mod anthropic;
mod knobs;
mod listener;
mod openai;
mod scenario;
mod script;
mod tokens;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http::{StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use scenario::Scenario;
pub use tokens::{full_reply, token_text};

use knobs::Plan;
use listener::CountingListener;
use scenario::Fixture;

/// Chat bodies in load tests can carry long conversations; axum's 2 MiB
/// default would turn those into spurious 413s.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How long [`MockServer::shutdown`] waits for connections to wind down
/// before giving up on them, so a wedged client cannot hang a test.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Process-wide defaults; every field can be overridden per request.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Length of every reply, so tests know exactly what text to expect.
    pub tokens: usize,
    /// Delay before the first token, to simulate time-to-first-token.
    pub first_token_delay: Duration,
    /// Delay between tokens, to simulate generation speed.
    pub token_delay: Duration,
    /// Misbehaviour applied to chat requests, to exercise error paths.
    pub fault: Option<Fault>,
    /// `Retry-After` sent with 429s, to test that clients honour it.
    pub retry_after_secs: u64,
    /// Limits the fault to the first N chat requests per key, so a retrying
    /// client can be shown to recover; `None` faults every request.
    pub fail_times: Option<u32>,
    /// Stamps every streamed token with when it left (see the `stamp` knob) even when the
    /// request does not ask: requests that sluice builds itself, such as a chat
    /// session's, carry no knobs, and the fan-out benchmark times them this way.
    pub stamp: bool,
    /// A [`Scenario`] name played for every request that names none, for the same reason
    /// as `stamp`: a chat session's requests carry no knobs. It applies to the endpoint of
    /// its dialect only; the other one plays plain text.
    pub scenario: Option<String>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            tokens: 16,
            first_token_delay: Duration::ZERO,
            token_delay: Duration::ZERO,
            fault: None,
            retry_after_secs: 1,
            fail_times: None,
            stamp: false,
            scenario: None,
        }
    }
}

/// Command-line / environment configuration of the `sluice-mock` binary.
#[derive(clap::Args, Debug, Clone)]
pub struct MockArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "SLUICE_MOCK_ADDR", default_value = "127.0.0.1:9090")]
    pub addr: String,
    /// Tokens per reply.
    #[arg(long, env = "SLUICE_MOCK_TOKENS", default_value_t = 16)]
    pub tokens: usize,
    /// Milliseconds before the first token.
    #[arg(long, env = "SLUICE_MOCK_FIRST_TOKEN_MS", default_value_t = 0)]
    pub first_token_ms: u64,
    /// Milliseconds between tokens.
    #[arg(long, env = "SLUICE_MOCK_TOKEN_MS", default_value_t = 0)]
    pub token_ms: u64,
    /// Fault for every chat request: 429, 500, stall_first, stall_mid,
    /// reset_mid, malformed, error_chunk, endless (or none).
    #[arg(long, env = "SLUICE_MOCK_FAULT")]
    pub fault: Option<String>,
    /// Retry-After seconds sent with 429 responses.
    #[arg(long, env = "SLUICE_MOCK_RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Apply the fault only to the first N requests per x-mock-key.
    #[arg(long, env = "SLUICE_MOCK_FAIL_TIMES")]
    pub fail_times: Option<u32>,
    /// Stamp every streamed token with its request's arrival and its own departure time
    /// (`@<ns>@<ns>` at the end of its text), as the per-request `stamp` knob does.
    #[arg(long, env = "SLUICE_MOCK_STAMP")]
    pub stamp: bool,
    /// Recorded reply for every request that names no scenario: tool_call,
    /// parallel_tool_calls, reasoning, logprobs, n (OpenAI), tool_use, thinking
    /// (Anthropic) or none.
    #[arg(long, env = "SLUICE_MOCK_SCENARIO")]
    pub scenario: Option<String>,
}

impl MockArgs {
    /// The [`MockConfig`] these arguments describe; fails on an unknown
    /// fault or scenario name.
    pub fn config(&self) -> Result<MockConfig, String> {
        let fault = match &self.fault {
            Some(name) => knobs::parse_fault(name)?,
            None => None,
        };
        let scenario = match &self.scenario {
            Some(name) => scenario::parse(name)?,
            None => None,
        };
        Ok(MockConfig {
            tokens: self.tokens,
            first_token_delay: Duration::from_millis(self.first_token_ms),
            token_delay: Duration::from_millis(self.token_ms),
            fault,
            retry_after_secs: self.retry_after_secs,
            fail_times: self.fail_times,
            stamp: self.stamp,
            scenario: scenario.map(|s| s.as_str().to_owned()),
        })
    }
}

/// A way for the mock to misbehave. Status faults apply to streamed and
/// non-streamed requests alike; the others describe the streamed body (see
/// each variant for what a non-streaming request gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `429` with `Retry-After: <retry_after_secs>` and an error JSON
    /// (OpenAI: `{"error":{"type":"rate_limit_error","code":"rate_limited"}}`,
    /// Anthropic: `{"type":"error","error":{"type":"rate_limit_error"}}`).
    RateLimit,
    /// `500` with an error JSON (OpenAI type `server_error`, Anthropic type
    /// `api_error`).
    ServerError,
    /// `200` and headers at once, then no body bytes ever, until the client
    /// disconnects or the server shuts down. Non-streaming: no response.
    StallFirst,
    /// `tokens/2` tokens (after the normal prelude), then silence forever.
    /// Non-streaming: no response.
    StallMid,
    /// `tokens/2` tokens, then the response is aborted without a clean end
    /// (HTTP/1: connection closed mid chunked body; HTTP/2: RST_STREAM), so
    /// the client sees an incomplete-body error. Non-streaming: the
    /// connection is closed before any response bytes.
    ResetMid,
    /// `tokens/2` tokens, then one event whose JSON is cut off mid-object,
    /// then a clean end of body (no `[DONE]` / `message_stop`).
    /// Non-streaming: `500`.
    Malformed,
    /// `tokens/2` tokens, then an in-band error event, then a clean end
    /// (OpenAI: `data: {"error":{..,"code":"mock_error"}}`, Anthropic:
    /// `event: error`). Non-streaming: `500`.
    ErrorChunk,
    /// Tokens forever (indices keep counting), at least 1 ms apart whatever
    /// `token_delay` says. Non-streaming: `500`.
    Endless,
}

impl Fault {
    /// The name accepted by [`FromStr`] and the `x-mock-fault` knob.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::RateLimit => "429",
            Fault::ServerError => "500",
            Fault::StallFirst => "stall_first",
            Fault::StallMid => "stall_mid",
            Fault::ResetMid => "reset_mid",
            Fault::Malformed => "malformed",
            Fault::ErrorChunk => "error_chunk",
            Fault::Endless => "endless",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "429" => Fault::RateLimit,
            "500" => Fault::ServerError,
            "stall_first" => Fault::StallFirst,
            "stall_mid" => Fault::StallMid,
            "reset_mid" => Fault::ResetMid,
            "malformed" => Fault::Malformed,
            "error_chunk" => Fault::ErrorChunk,
            "endless" => Fault::Endless,
            other => {
                return Err(format!(
                    "unknown mock fault {other:?}; expected 429, 500, stall_first, \
                     stall_mid, reset_mid, malformed, error_chunk, endless or none"
                ));
            }
        })
    }
}

/// Counters tests use to prove retries, reuse and cancellation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MockStats {
    /// Every HTTP request, including stats/reset calls and 404s.
    pub requests: u64,
    /// Chat requests (`/v1/chat/completions` and `/v1/messages`), to count
    /// upstream attempts such as retries.
    pub chat_requests: u64,
    /// TCP connections currently open, to prove a client hung up.
    pub open_connections: u64,
    /// TCP connections ever accepted, to prove connection reuse.
    pub total_connections: u64,
    /// Response bodies currently being streamed.
    pub active_streams: u64,
    /// High-water mark of `active_streams`, to check concurrency limits.
    pub max_active_streams: u64,
    /// Bodies that reached their scripted end (including scripted faults
    /// such as `reset_mid` or `malformed`).
    pub completed_streams: u64,
    /// Bodies dropped before their end: the client went away or the server
    /// shut down. This is how tests prove cancellation reached upstream.
    pub aborted_streams: u64,
    /// The last chat request body as received, to check what a relay
    /// forwarded (its exact bytes: `GET /_mock/requests/last`).
    pub last_request: Option<Value>,
}

/// State shared by the listener, handlers and body streams of one server.
pub(crate) struct Shared {
    config: MockConfig,
    stats: watch::Sender<MockStats>,
    /// Requests seen so far per `fail_times` key.
    fault_counts: Mutex<HashMap<String, u32>>,
    /// Cancelled at shutdown so stalled and endless bodies end and graceful
    /// shutdown can complete.
    cancel: CancellationToken,
    next_id: AtomicU64,
    /// The bytes behind `MockStats::last_request`, since a parsed copy loses key order,
    /// duplicate keys and number spelling.
    last_body: Mutex<Option<Bytes>>,
}

impl Shared {
    fn new(config: MockConfig) -> Self {
        Self {
            config,
            stats: watch::Sender::new(MockStats::default()),
            fault_counts: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            next_id: AtomicU64::new(1),
            last_body: Mutex::new(None),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a chat request and parses its body; an unparsable body still
    /// counts, since the client did make the attempt.
    fn record_chat(&self, body: &Bytes) -> Result<Value, String> {
        let parsed = serde_json::from_slice::<Value>(body)
            .map_err(|e| format!("request body is not JSON: {e}"))
            .and_then(|v| {
                if v.is_object() {
                    Ok(v)
                } else {
                    Err("request body must be a JSON object".to_owned())
                }
            });
        if parsed.is_ok() {
            *lock(&self.last_body) = Some(body.clone());
        }
        self.stats.send_modify(|s| {
            s.chat_requests += 1;
            if let Ok(v) = &parsed {
                s.last_request = Some(v.clone());
            }
        });
        parsed
    }

    fn last_body(&self) -> Option<Bytes> {
        lock(&self.last_body).clone()
    }

    fn reset(&self) {
        self.stats.send_modify(|s| {
            *s = MockStats {
                open_connections: s.open_connections,
                active_streams: s.active_streams,
                max_active_streams: s.active_streams,
                ..MockStats::default()
            };
        });
        lock(&self.fault_counts).clear();
        *lock(&self.last_body) = None;
    }
}

/// A panic elsewhere must not take the mock's bookkeeping down with it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A mock server running in a background task; dropping it shuts it down.
pub struct MockServer {
    /// Where the server listens, for clients that need more than [`url`].
    ///
    /// [`url`]: MockServer::url
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl MockServer {
    /// OpenAI-style base URL, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        self.shared.stats.borrow().clone()
    }

    /// The last chat request body exactly as received (see `GET /_mock/requests/last`).
    pub fn last_request_body(&self) -> Option<Bytes> {
        self.shared.last_body()
    }

    /// A receiver that wakes on every counter change; wait on it with
    /// `wait_for` under a timeout instead of sleeping.
    pub fn watch(&self) -> watch::Receiver<MockStats> {
        self.shared.stats.subscribe()
    }

    /// Stops accepting, ends every open body (clients see an aborted
    /// response) and waits for connections to close.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("mock: connections still open after shutdown grace; abandoning");
                task.abort();
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// Starts a mock on `127.0.0.1:0` in a background task.
pub async fn spawn(config: MockConfig) -> io::Result<MockServer> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(config));
    let stop = shared.cancel.clone().cancelled_owned();
    let task = tokio::spawn(serve_shared(listener, Arc::clone(&shared), stop));
    Ok(MockServer {
        addr,
        shared,
        task: Some(task),
    })
}

/// Serves the mock on `listener` (HTTP/1.1 and h2c) until `shutdown`
/// completes and open connections have wound down.
pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_shared(listener, Arc::new(Shared::new(config)), shutdown).await
}

async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let cancel = shared.cancel.clone();
    let signal = async move {
        shutdown.await;
        cancel.cancel();
    };
    let app = router(Arc::clone(&shared));
    listener::serve(CountingListener::new(listener, shared), app, signal).await
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(models))
        .route("/_mock/stats", get(stats))
        .route("/_mock/reset", post(reset))
        .route("/_mock/requests/last", get(last_request))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            count_request,
        ))
        .with_state(shared)
}

async fn count_request(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    shared.stats.send_modify(|s| s.requests += 1);
    next.run(req).await
}

async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": "mock", "object": "model", "owned_by": "mock"}],
    }))
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<MockStats> {
    Json(shared.stats.borrow().clone())
}

async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.reset();
    StatusCode::NO_CONTENT
}

async fn last_request(State(shared): State<Arc<Shared>>) -> Response {
    match shared.last_body() {
        Some(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {
                "message": "no chat request recorded since the mock started or was reset",
                "type": "not_found_error",
                "code": "no_request",
            }})),
        )
            .into_response(),
    }
}

fn sse_response(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn shutting_down_response() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "mock server shutting down").into_response()
}

/// A scenario's recording: streamed as recorded (OpenAI's usage chunk only with
/// `include_usage`, as OpenAI does), or as the whole reply its events add up to, ready when
/// its last token would have been.
async fn play(
    shared: &Arc<Shared>,
    plan: &Plan,
    fixture: &'static Fixture,
    stream: bool,
    include_usage: bool,
) -> Response {
    if stream {
        let events = fixture.stream(include_usage);
        return sse_response(script::replay(Arc::clone(shared), plan, events));
    }
    let timing = Plan {
        tokens: fixture.tokens(),
        ..plan.clone()
    };
    if !generation_delay(shared, &timing).await {
        return shutting_down_response();
    }
    Json(fixture.whole()).into_response()
}

/// Waits as long as streaming `plan` would have taken; `false` if the server
/// shut down meanwhile.
async fn generation_delay(shared: &Shared, plan: &Plan) -> bool {
    let gaps = u32::try_from(plan.tokens.saturating_sub(1)).unwrap_or(u32::MAX);
    let total = plan
        .first_token_delay
        .saturating_add(plan.token_delay.saturating_mul(gaps));
    if total.is_zero() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(total) => true,
        () = shared.cancel.cancelled() => false,
    }
}

/// Whitespace-separated words of a message content: a string or an array of
/// `{"type":"text","text":..}` parts (other parts count nothing).
fn content_words(content: &Value) -> u64 {
    let words = |s: &str| s.split_whitespace().count() as u64;
    match content {
        Value::String(s) => words(s),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(words)
            .sum(),
        _ => 0,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
