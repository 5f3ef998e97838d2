//! `POST /v1/messages`, Anthropic's Messages API, over raw HTTP: the event stream event by
//! event (order and shapes) from an OpenAI-compatible upstream and from sluice's Anthropic
//! provider, the non-streamed message, `x-api-key`, errors in Anthropic's shape, and a
//! client leaving mid-stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::config::AuthMode;
use sluice_mock::{MockConfig, full_reply};

fn url(server: &TestServer) -> String {
    format!("{}/v1/messages", server.url)
}

/// A Messages API body for `model`; `extra` fields are added (`mock` knobs, `stream`…).
fn request(model: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

async fn send(server: &TestServer, body: &Value) -> reqwest::Response {
    client()
        .post(url(server))
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Every event of a stream as (name, data), pings left out, checking on the way that each
/// event's name is its data's `type`.
async fn events(resp: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream().eventsource();
    while let Some(ev) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("stream stalled")
    {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).expect("every event is JSON");
        assert_eq!(data["type"], ev.event.as_str(), "event name is its type");
        if ev.event != "ping" {
            out.push((ev.event, data));
        }
    }
    out
}

fn names(evs: &[(String, Value)]) -> Vec<&str> {
    evs.iter().map(|(n, _)| n.as_str()).collect()
}

/// The events with consecutive deltas of one block collapsed into one `…delta` name, so a
/// stream's shape reads as its blocks.
fn shape(evs: &[(String, Value)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, data) in evs {
        let label = match name.as_str() {
            "content_block_start" => {
                format!("start {} {}", data["index"], data["content_block"]["type"])
            }
            "content_block_delta" => format!("{} {}", data["index"], data["delta"]["type"]),
            "content_block_stop" => format!("stop {}", data["index"]),
            other => other.to_owned(),
        };
        if out.last() != Some(&label) {
            out.push(label);
        }
    }
    out
}

/// The concatenated `field` of every delta of type `kind`.
fn joined(evs: &[(String, Value)], kind: &str, field: &str) -> String {
    evs.iter()
        .filter(|(_, d)| d["delta"]["type"] == kind)
        .map(|(_, d)| d["delta"][field].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts an Anthropic-shaped error with `status` and `kind`, returning its message.
async fn anthropic_error(resp: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(resp.status(), status);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert_eq!(
        v["error"].as_object().unwrap().len(),
        2,
        "type and message: {v}"
    );
    v["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn text_streams_as_one_text_block_with_x_api_key() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    let server = TestServer::start(cfg).await;
    let key = api_key(&server, "claude-code", false).await;
    let resp = client()
        .post(url(&server))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&request(
            "mock-model",
            json!({"stream": true, "mock": {"tokens": 5}}),
        ))
        .send()
        .await
        .unwrap();
    let evs = events(resp).await;
    assert_eq!(
        shape(&evs),
        [
            "message_start",
            "start 0 \"text\"",
            "0 \"text_delta\"",
            "stop 0",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(
        names(&evs)
            .iter()
            .filter(|n| **n == "content_block_delta")
            .count(),
        5
    );
    assert_eq!(joined(&evs, "text_delta", "text"), full_reply(5));
    let start = &evs[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["model"], "mock-model");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(
        evs[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["delta"]["stop_sequence"], Value::Null);
    assert_eq!(delta["usage"]["output_tokens"], 5);
    assert!(delta["usage"]["input_tokens"].as_u64().unwrap() > 0);

    // The same key as a bearer token works; a wrong one is refused in Anthropic's shape.
    let resp = client()
        .post(url(&server))
        .bearer_auth(&key)
        .json(&request("mock-model", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(url(&server))
        .header("x-api-key", "sk-sluice-wrong")
        .json(&request("mock-model", json!({})))
        .send()
        .await
        .unwrap();
    anthropic_error(resp, 401, "authentication_error").await;
    let resp = send(&server, &request("mock-model", json!({}))).await;
    let message = anthropic_error(resp, 401, "authentication_error").await;
    assert!(message.contains("missing API key"), "{message}");
    server.shutdown().await;
}

#[tokio::test]
async fn tool_calls_of_an_openai_upstream_stream_as_tool_use_blocks() {
    let (_mock, server) = mock_and_server().await;
    let body = request(
        "mock-model",
        json!({
            "stream": true,
            "mock": {"scenario": "tool_call"},
            "tools": [{"name": "get_weather", "input_schema": {"type": "object",
                "properties": {"location": {"type": "string"}}}}],
        }),
    );
    let evs = events(send(&server, &body).await).await;
    assert_eq!(
        shape(&evs),
        [
            "message_start",
            "start 0 \"tool_use\"",
            "0 \"input_json_delta\"",
            "stop 0",
            "message_delta",
            "message_stop"
        ]
    );
    let block = &evs[1].1["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["id"], "call_x1d8HgXhv0kiiDnLof8DdlKZ");
    assert_eq!(block["name"], "get_weather");
    assert_eq!(block["input"], json!({}));
    let input: Value =
        serde_json::from_str(&joined(&evs, "input_json_delta", "partial_json")).unwrap();
    assert!(input["location"].is_string(), "{input}");
    assert_eq!(evs[evs.len() - 2].1["delta"]["stop_reason"], "tool_use");

    // Not streamed: the same reply as one message, the input parsed.
    let mut body = body;
    body["stream"] = json!(false);
    let resp = send(&server, &body).await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "mock-model");
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["stop_sequence"], Value::Null);
    assert_eq!(
        m["content"],
        json!([{"type": "tool_use", "id": "call_x1d8HgXhv0kiiDnLof8DdlKZ",
                "name": "get_weather", "input": input}])
    );
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0);
    server.shutdown().await;
}

#[tokio::test]
async fn reasoning_of_an_openai_upstream_streams_as_a_thinking_block() {
    let (_mock, server) = mock_and_server().await;
    let body = request(
        "mock-model",
        json!({"stream": true, "mock": {"scenario": "reasoning"},
               "thinking": {"type": "enabled", "budget_tokens": 2048}}),
    );
    let evs = events(send(&server, &body).await).await;
    assert_eq!(
        shape(&evs),
        [
            "message_start",
            "start 0 \"thinking\"",
            "0 \"thinking_delta\"",
            "stop 0",
            "start 1 \"text\"",
            "1 \"text_delta\"",
            "stop 1",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(
        evs[1].1["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    assert!(
        joined(&evs, "thinking_delta", "thinking").starts_with("Okay, the user wants 17 × 23.")
    );
    assert_eq!(joined(&evs, "text_delta", "text"), "17 × 23 = **391**");
    // The upstream was asked for reasoning the way OpenAI-compatible ones take it.
    let last = get_json(&format!("http://{}/_mock/requests/last", _mock.addr)).await;
    assert_eq!(last["reasoning_effort"], "low");
    assert!(last.get("thinking").is_none(), "{last}");
    assert_eq!(last["max_tokens"], 256);
    server.shutdown().await;
}

#[tokio::test]
async fn anthropic_thinking_streams_with_its_signature_and_goes_back_signed() {
    let (mock, server) = claude_server("thinking").await;
    let body = request(
        "claude-test",
        json!({"stream": true, "thinking": {"type": "enabled", "budget_tokens": 5000}}),
    );
    let evs = events(send(&server, &body).await).await;
    assert_eq!(
        shape(&evs),
        [
            "message_start",
            "start 0 \"thinking\"",
            "0 \"thinking_delta\"",
            "0 \"signature_delta\"",
            "stop 0",
            "start 1 \"text\"",
            "1 \"text_delta\"",
            "stop 1",
            "message_delta",
            "message_stop"
        ]
    );
    let thinking = joined(&evs, "thinking_delta", "thinking");
    assert!(
        thinking.starts_with("The user wants 17 × 23."),
        "{thinking}"
    );
    let signature = joined(&evs, "signature_delta", "signature");
    assert!(
        signature.starts_with("Eq1pCAkYkQGMT1YTLUe2IVt2"),
        "{signature}"
    );
    let usage = &evs[evs.len() - 2].1["usage"];
    assert_eq!(usage["input_tokens"], 46);
    // The provider was asked for Anthropic's own thinking, budget as the client set it.
    let last = get_json(&format!("http://{}/_mock/requests/last", mock.addr)).await;
    assert_eq!(
        last["thinking"],
        json!({"type": "enabled", "budget_tokens": 5000})
    );

    // The signed block sent back in the next turn reaches Anthropic as it came.
    let text = joined(&evs, "text_delta", "text");
    let next = json!({
        "model": "claude-test", "max_tokens": 256,
        "thinking": {"type": "enabled", "budget_tokens": 5000},
        "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": thinking, "signature": signature},
                {"type": "text", "text": text},
            ]},
            {"role": "user", "content": "and 17 × 24?"},
        ],
    });
    let resp = send(&server, &next).await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["content"][0]["type"], "thinking");
    assert_eq!(m["content"][0]["signature"], signature.as_str());
    assert_eq!(m["content"][1]["type"], "text");
    let last = get_json(&format!("http://{}/_mock/requests/last", mock.addr)).await;
    assert_eq!(
        last["messages"][1]["content"][0],
        json!({"type": "thinking", "thinking": thinking, "signature": signature})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn anthropic_tool_use_streams_its_blocks_and_takes_tool_results() {
    let (mock, server) = claude_server("tool_use").await;
    let tools = json!([{"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let body = request("claude-test", json!({"stream": true, "tools": tools}));
    let evs = events(send(&server, &body).await).await;
    assert_eq!(
        shape(&evs),
        [
            "message_start",
            "start 0 \"text\"",
            "0 \"text_delta\"",
            "stop 0",
            "start 1 \"tool_use\"",
            "1 \"input_json_delta\"",
            "stop 1",
            "start 2 \"tool_use\"",
            "2 \"input_json_delta\"",
            "stop 2",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(evs[evs.len() - 2].1["delta"]["stop_reason"], "tool_use");
    let ids: Vec<String> = evs
        .iter()
        .filter(|(_, d)| d["content_block"]["type"] == "tool_use")
        .map(|(_, d)| d["content_block"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            "toolu_01JyDD9mNGIUcILO6jEap0Qd",
            "toolu_01QdFbr0DBGP6MHJF7rERBsu"
        ]
    );
    let results: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "tool_result", "tool_use_id": id, "content": "18°C"}))
        .collect();
    let next = json!({
        "model": "claude-test", "max_tokens": 256, "tools": tools,
        "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": ids[0], "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": ids[1], "name": "get_weather", "input": {"city": "Tokyo"}},
            ]},
            {"role": "user", "content": results},
        ],
    });
    let resp = send(&server, &next).await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["stop_reason"], "end_turn", "{m}");
    assert_eq!(m["content"][0]["type"], "text");
    let last = get_json(&format!("http://{}/_mock/requests/last", mock.addr)).await;
    let turn = &last["messages"][2];
    assert_eq!(turn["role"], "user");
    assert_eq!(
        turn["content"],
        json!([
            {"type": "tool_result", "tool_use_id": ids[0], "content": "18°C"},
            {"type": "tool_result", "tool_use_id": ids[1], "content": "18°C"},
        ])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn errors_take_anthropics_shape_and_name_the_field() {
    let mock = mock(MockConfig::default()).await;
    let server = TestServer::start(claude_config(&mock)).await;
    let no_max = json!({"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]});
    let m = anthropic_error(send(&server, &no_max).await, 400, "invalid_request_error").await;
    assert!(m.starts_with("max_tokens"), "{m}");
    let bad_block = request(
        "claude-test",
        json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]}),
    );
    let m = anthropic_error(
        send(&server, &bad_block).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(m.starts_with("messages[0].content[0].source.type"), "{m}");
    // Not an object at all: the body extractor's 422, reshaped.
    let m = anthropic_error(
        send(&server, &json!([1])).await,
        422,
        "invalid_request_error",
    )
    .await;
    assert!(!m.is_empty());
    let resp = client()
        .post(url(&server))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    anthropic_error(resp, 400, "invalid_request_error").await;
    let m = anthropic_error(
        send(&server, &request("gpt-nope", json!({}))).await,
        404,
        "not_found_error",
    )
    .await;
    assert!(m.contains("gpt-nope"), "{m}");
    let resp = client()
        .post(format!("{}/v1/messages/count_tokens", server.url))
        .json(&request("claude-test", json!({})))
        .send()
        .await
        .unwrap();
    anthropic_error(resp, 404, "not_found_error").await;
    // Other routes keep OpenAI's shape.
    let resp = post(&format!("{}/v1/nope", server.url), &json!({})).await;
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["code"].is_string(), "{v}");
    server.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_are_anthropic_errors_before_and_during_the_stream() {
    let (_mock, server) = mock_and_server().await;
    let body = request(
        "mock-model",
        json!({"stream": true, "mock": {"fault": "error_chunk", "tokens": 4}}),
    );
    let evs = events(send(&server, &body).await).await;
    let (last, data) = evs.last().unwrap();
    assert_eq!(last, "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(data["error"]["message"].is_string());
    assert!(!names(&evs).contains(&"message_stop"));

    let body = request("mock-model", json!({"mock": {"fault": "500"}}));
    anthropic_error(send(&server, &body).await, 502, "api_error").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_aborts_the_upstream_call() {
    let (mock, server) = mock_and_server().await;
    let body = request(
        "mock-model",
        json!({"stream": true, "mock": {"fault": "endless", "token_ms": 5}}),
    );
    let resp = send(&server, &body).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream().eventsource();
    for _ in 0..4 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(mock.stats().active_streams, 1);
    drop(stream);
    let s = wait_stats(&mock, Duration::from_secs(1), |s| s.active_streams == 0).await;
    assert_eq!(s.aborted_streams, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_spent_rate_limit_is_an_anthropic_rate_limit_error() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.guards.rate_chat_per_min = 1;
    cfg.guards.rate_burst = 1;
    let server = TestServer::start(cfg).await;
    let body = request("mock-model", json!({}));
    assert_eq!(send(&server, &body).await.status(), 200);
    let resp = send(&server, &body).await;
    assert_eq!(resp.status(), 429);
    assert!(
        resp.headers().get("retry-after").is_some(),
        "headers are kept"
    );
    anthropic_error(resp, 429, "rate_limit_error").await;
    server.shutdown().await;
}

#[tokio::test]
async fn pings_while_waiting_and_a_clean_end_at_shutdown() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.server.ping_interval = Duration::from_millis(50);
    let server = TestServer::start(cfg).await;
    let body = request(
        "mock-model",
        json!({"stream": true, "mock": {"tokens": 2, "first_token_ms": 400}}),
    );
    let resp = send(&server, &body).await;
    let mut raw = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(WAIT, bytes.next()).await.unwrap() {
        raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let ping = raw
        .find("event: ping\ndata: {\"type\":\"ping\"}\n\n")
        .expect("a ping event");
    let first_block = raw.find("event: content_block_start").expect("a block");
    assert!(
        ping < first_block,
        "ping came after the first token:\n{raw}"
    );
    assert!(raw.starts_with("event: message_start\n"), "{raw}");
    assert!(raw.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

    // A stream still running when the server stops ends with an error event of its own.
    let body = request(
        "mock-model",
        json!({"stream": true, "mock": {"fault": "endless", "token_ms": 5}}),
    );
    let resp = send(&server, &body).await;
    let mut stream = resp.bytes_stream().eventsource();
    stream.next().await.unwrap().unwrap();
    server.state.lifecycle.stop();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        last = Some(ev.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.event, "error");
    let v: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    server.shutdown().await;
}

#[tokio::test]
async fn a_draining_instance_refuses_in_anthropics_shape_and_placeholders_pass() {
    let (_mock, server) = mock_and_server().await;
    // A keyless local server: a placeholder in x-api-key is the local user, as in
    // Authorization, and a mistyped sluice key is still refused.
    let with_key = |key: &'static str| {
        client()
            .post(url(&server))
            .header("x-api-key", key)
            .json(&request("mock-model", json!({})))
            .send()
    };
    assert_eq!(with_key("unused").await.unwrap().status(), 200);
    anthropic_error(
        with_key("sk-sluice-typo").await.unwrap(),
        401,
        "authentication_error",
    )
    .await;
    server.state.lifecycle.start_drain();
    let resp = send(&server, &request("mock-model", json!({}))).await;
    assert!(resp.headers().get("retry-after").is_some());
    anthropic_error(resp, 503, "overloaded_error").await;
    server.shutdown().await;
}
