//! A short reasoning model for the session, WebSocket, cluster and UI tests: three pieces of
//! thinking, then three of answer. The mock's `reasoning` scenario plays a whole recorded
//! stream of about a hundred events, too long for tests that pace every piece to watch it
//! arrive.

use std::convert::Infallible;
use std::time::Duration;

use serde_json::{Value, json};

/// The thinking, in the pieces it streams in (`delta.reasoning_content`).
pub const THINKING: [&str; 3] = ["Let me think", " about it", " carefully."];
/// The answer that follows (`delta.content`).
pub const ANSWER: [&str; 3] = ["The answer", " is", " 42."];
/// `completion_tokens_details.reasoning_tokens` of its usage report.
pub const REASONING_TOKENS: u64 = 3;

/// Base URL (`…/v1`) of an upstream that answers every chat completion with [`THINKING`],
/// then [`ANSWER`], a finish, a usage chunk and `[DONE]`, waiting `pace` before each piece
/// of text (as the mock's `token_delay`).
pub async fn reasoning_upstream(pace: Duration) -> String {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({
            "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "r1",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        format!("data: {c}\n\n")
    };
    let mut pieces = Vec::new();
    for t in THINKING {
        let delta = json!({"role": "assistant", "content": null, "reasoning_content": t});
        pieces.push((pace, chunk(delta, Value::Null)));
    }
    for t in ANSWER {
        pieces.push((pace, chunk(json!({"content": t}), Value::Null)));
    }
    let done = [
        chunk(json!({}), json!("stop")),
        format!(
            "data: {}\n\n",
            json!({
                "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "r1",
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
                          "completion_tokens_details": {"reasoning_tokens": REASONING_TOKENS}},
            })
        ),
        "data: [DONE]\n\n".to_owned(),
    ];
    pieces.extend(done.map(|c| (Duration::ZERO, c)));
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let pieces = pieces.clone();
            async move {
                let body = async_stream::stream! {
                    for (wait, piece) in pieces {
                        tokio::time::sleep(wait).await;
                        yield Ok::<_, Infallible>(piece);
                    }
                };
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::from_stream(body),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

/// The events of one reply of this model on a session's stream, in order.
pub const EVENTS: [&str; 9] = [
    "start",
    "reasoning",
    "reasoning",
    "reasoning",
    "token",
    "token",
    "token",
    "usage",
    "done",
];

/// The whole thinking.
pub fn thinking() -> String {
    THINKING.concat()
}

/// The whole answer.
pub fn answer() -> String {
    ANSWER.concat()
}
