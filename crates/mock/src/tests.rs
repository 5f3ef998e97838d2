// A failed unwrap is exactly how a test should report a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use super::*;

/// Upper bound for anything that should happen "now"; generous so a loaded CI
/// box does not flake, while a hang still fails the test.
const WAIT: Duration = Duration::from_secs(10);
/// How long silence must last to count as "no data": only used to prove an
/// absence, never to synchronise.
const SILENCE: Duration = Duration::from_millis(300);

/// reqwest here is built without a TLS provider of its own (sluice's choice); the tests
/// speak plain HTTP, but building a client still needs one installed.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A fixture's first chunk, as JSON.
fn first_chunk(fixture: &str) -> Value {
    let data = parse_sse(fixture).into_iter().next().unwrap().data;
    serde_json::from_str(&data).unwrap()
}

fn client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn mock() -> MockServer {
    spawn(MockConfig::default()).await.unwrap()
}

async fn chat(server: &MockServer, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", server.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn wait_stats(server: &MockServer, pred: impl FnMut(&MockStats) -> bool) -> MockStats {
    let mut rx = server.watch();
    let stats = tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .expect("timed out waiting for stats")
        .expect("stats sender dropped");
    stats.clone()
}

#[derive(Debug)]
struct Event {
    event: Option<String>,
    data: String,
}

fn parse_sse(text: &str) -> Vec<Event> {
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "body does not end on an event boundary: {text:?}"
    );
    text.split_terminator("\n\n")
        .map(|block| {
            let mut event = None;
            let mut data = None;
            for line in block.split('\n') {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "multi-line data in {block:?}");
                    data = Some(v.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            Event {
                event,
                data: data.expect("event without data"),
            }
        })
        .collect()
}

fn json_events(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect()
}

fn openai_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

/// Reads a streamed body until the client-side stream ends or errors;
/// returns the text and whether it ended in an error.
async fn read_until_end(resp: reqwest::Response) -> (String, bool) {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut errored = false;
    while let Some(item) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        match item {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    (String::from_utf8(body).unwrap(), errored)
}

/// Reads until `n` token events have arrived (events are whole per frame,
/// but frames may coalesce, so count events rather than chunks).
async fn read_tokens(resp: &mut reqwest::Response, n: usize) -> String {
    let mut buf = String::new();
    loop {
        let count = buf
            .split_terminator("\n\n")
            .filter(|e| e.contains("\"delta\":{\"content\":") || e.contains("text_delta"))
            .count();
        if buf.ends_with("\n\n") && count >= n {
            return buf;
        }
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("body ended early");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[test]
fn token_text_is_deterministic_and_nasty() {
    assert_eq!(token_text(0), token_text(0));
    let reply = full_reply(64);
    assert_eq!(reply, (0..64).map(token_text).collect::<String>());
    for needle in ["héllo", "世界", "🦀", "naïve", "\"", "\n", "data: ", "\\"] {
        assert!(reply.contains(needle), "missing {needle:?}");
    }
    for i in 0..64 {
        let t = token_text(i);
        assert!(t.ends_with(' ') && !t.ends_with("  "), "{t:?}");
        assert_eq!(
            serde_json::from_str::<String>(tokens::token_json(i)).unwrap(),
            t
        );
    }
}

#[test]
fn fault_names_round_trip() {
    for f in [
        Fault::RateLimit,
        Fault::ServerError,
        Fault::StallFirst,
        Fault::StallMid,
        Fault::ResetMid,
        Fault::Malformed,
        Fault::ErrorChunk,
        Fault::Endless,
    ] {
        assert_eq!(f.as_str().parse::<Fault>(), Ok(f));
    }
    assert!("nope".parse::<Fault>().is_err());
}

#[test]
fn args_build_config() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockArgs,
    }
    let cli = Cli::try_parse_from([
        "x",
        "--tokens",
        "3",
        "--token-ms",
        "5",
        "--first-token-ms",
        "7",
        "--fault",
        "429",
        "--fail-times",
        "2",
        "--retry-after-secs",
        "9",
    ])
    .unwrap();
    assert_eq!(cli.mock.addr, "127.0.0.1:9090");
    let c = cli.mock.config().unwrap();
    assert_eq!(c.tokens, 3);
    assert_eq!(c.token_delay, Duration::from_millis(5));
    assert_eq!(c.first_token_delay, Duration::from_millis(7));
    assert_eq!(c.fault, Some(Fault::RateLimit));
    assert_eq!(c.fail_times, Some(2));
    assert_eq!(c.retry_after_secs, 9);

    let bad = Cli::try_parse_from(["x", "--fault", "bogus"]).unwrap();
    assert!(bad.mock.config().is_err());
    let none = Cli::try_parse_from(["x", "--fault", "none"]).unwrap();
    assert_eq!(none.mock.config().unwrap().fault, None);
}

#[tokio::test]
async fn stream_shape_and_done() {
    let server = mock().await;
    let resp = chat(
        &server,
        json!({"model": "gpt-x", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let (text, errored) = read_until_end(resp).await;
    assert!(!errored);
    let events = parse_sse(&text);
    assert_eq!(events.len(), 1 + 16 + 1 + 1);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks = json_events(&events);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-x");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c.get("usage").is_none());
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    for (i, c) in chunks[1..17].iter().enumerate() {
        assert_eq!(c["choices"][0]["delta"], json!({"content": token_text(i)}));
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(chunks[17]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[17]["choices"][0]["finish_reason"], "stop");
    assert_eq!(openai_text(&chunks), full_reply(16));
    let stats = wait_stats(&server, |s| s.completed_streams == 1).await;
    assert_eq!(stats.aborted_streams, 0);
    assert_eq!(stats.active_streams, 0);
}

#[tokio::test]
async fn include_usage_adds_usage_chunk() {
    let server = mock().await;
    let resp = chat(
        &server,
        json!({
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "be  brief\n"},
                {"role": "user", "content": [
                    {"type": "text", "text": "one two"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "three"},
                ]},
            ],
            "mock": {"tokens": 4},
        }),
    )
    .await;
    let (text, _) = read_until_end(resp).await;
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks = json_events(&events);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(openai_text(&chunks), full_reply(4));
}

#[tokio::test]
async fn non_stream_returns_full_reply() {
    let server = mock().await;
    let resp = chat(
        &server,
        json!({"messages": [{"role": "user", "content": "a b c"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "mock");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], full_reply(16));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19})
    );
    let stats = server.stats();
    assert_eq!(stats.chat_requests, 1);
    assert_eq!(stats.active_streams + stats.completed_streams, 0);
}

#[tokio::test]
async fn tokens_arrive_as_separate_frames_after_first_token_delay() {
    let server = mock().await;
    let started = Instant::now();
    let mut resp = chat(
        &server,
        json!({"stream": true, "mock": {"tokens": 3, "first_token_ms": 150, "token_ms": 40}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut chunks = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        chunks.push((started.elapsed(), String::from_utf8(c.to_vec()).unwrap()));
    }
    assert!(chunks[0].0 >= Duration::from_millis(150), "{chunks:?}");
    // Tokens are 40 ms apart, so unless frames were coalesced server-side
    // the client sees several reads.
    assert!(chunks.len() >= 3, "{chunks:?}");
    for (_, c) in &chunks {
        assert!(c.ends_with("\n\n"), "frame split mid-event: {c:?}");
    }
    let text: String = chunks.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(openai_text(&json_events(&parse_sse(&text))), full_reply(3));
    assert!(started.elapsed() >= Duration::from_millis(150 + 2 * 40));
}

#[tokio::test]
async fn fault_429_and_500() {
    let server = spawn(MockConfig {
        retry_after_secs: 7,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    for stream in [true, false] {
        let resp = chat(&server, json!({"stream": stream, "mock": {"fault": "429"}})).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "rate_limited");
        assert!(body["error"]["message"].is_string());

        let resp = chat(&server, json!({"stream": stream, "mock": {"fault": 500}})).await;
        assert_eq!(resp.status(), 500);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error");
    }
    assert_eq!(server.stats().chat_requests, 4);
}

#[tokio::test]
async fn fault_stall_first_then_client_cancel_is_counted() {
    let server = mock().await;
    let mut resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "stall_first"}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        tokio::time::timeout(SILENCE, resp.chunk()).await.is_err(),
        "stall_first sent data"
    );
    let stats = server.stats();
    assert_eq!(stats.active_streams, 1);
    assert_eq!(stats.open_connections, 1);
    drop(resp);
    let stats = wait_stats(&server, |s| {
        s.aborted_streams == 1 && s.open_connections == 0
    })
    .await;
    assert_eq!(stats.active_streams, 0);
    assert_eq!(stats.completed_streams, 0);
}

#[tokio::test]
async fn fault_stall_mid_sends_half_then_nothing() {
    let server = mock().await;
    let mut resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "stall_mid", "tokens": 10}}),
    )
    .await;
    let text = read_tokens(&mut resp, 5).await;
    assert_eq!(openai_text(&json_events(&parse_sse(&text))), full_reply(5));
    assert!(tokio::time::timeout(SILENCE, resp.chunk()).await.is_err());
    drop(resp);
    wait_stats(&server, |s| s.aborted_streams == 1 && s.active_streams == 0).await;
}

#[tokio::test]
async fn fault_reset_mid_is_an_incomplete_body() {
    let server = mock().await;
    let resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "reset_mid", "tokens": 8}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, errored) = read_until_end(resp).await;
    assert!(errored, "reset_mid ended cleanly: {text:?}");
    let chunks = json_events(&parse_sse(&text));
    assert_eq!(openai_text(&chunks), full_reply(4));
    assert!(!text.contains("[DONE]"));
    wait_stats(&server, |s| {
        s.completed_streams == 1 && s.open_connections == 0
    })
    .await;

    let err = chat_err(&server, json!({"mock": {"fault": "reset_mid"}})).await;
    assert!(err, "non-stream reset_mid produced a complete body");
}

/// Non-stream request whose body must fail to arrive completely.
async fn chat_err(server: &MockServer, body: Value) -> bool {
    match client()
        .post(format!("{}/chat/completions", server.url()))
        .json(&body)
        .send()
        .await
    {
        Err(_) => true,
        Ok(resp) => resp.bytes().await.is_err(),
    }
}

#[tokio::test]
async fn fault_malformed_truncates_json_then_ends() {
    let server = mock().await;
    let resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "malformed", "tokens": 6}}),
    )
    .await;
    let (text, errored) = read_until_end(resp).await;
    assert!(!errored);
    let events = parse_sse(&text);
    let last = events.last().unwrap();
    assert_eq!(last.data, "{\"choices\":[{\"delta\":{\"content\":");
    assert!(serde_json::from_str::<Value>(&last.data).is_err());
    assert_eq!(
        openai_text(&json_events(&events[..events.len() - 1])),
        full_reply(3)
    );
    assert!(!text.contains("[DONE]"));

    let resp = chat(&server, json!({"mock": {"fault": "malformed"}})).await;
    assert_eq!(resp.status(), 500);
}

#[tokio::test]
async fn fault_error_chunk_ends_without_done() {
    let server = mock().await;
    let resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "error_chunk", "tokens": 6}}),
    )
    .await;
    let (text, errored) = read_until_end(resp).await;
    assert!(!errored);
    let chunks = json_events(&parse_sse(&text));
    assert_eq!(
        chunks.last().unwrap(),
        &json!({"error": {"message": "mock in-band error", "type": "server_error", "code": "mock_error"}})
    );
    assert_eq!(openai_text(&chunks), full_reply(3));
    assert!(!text.contains("[DONE]"));
    wait_stats(&server, |s| s.completed_streams == 1).await;
}

#[tokio::test]
async fn fault_endless_keeps_counting_until_client_leaves() {
    let server = mock().await;
    let mut resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "endless", "tokens": 2}}),
    )
    .await;
    let started = Instant::now();
    let text = read_tokens(&mut resp, 40).await;
    // 1 ms minimum spacing between tokens.
    assert!(started.elapsed() >= Duration::from_millis(39));
    let got = openai_text(&json_events(&parse_sse(&text)));
    assert!(got.starts_with(&full_reply(40)), "{got:?}");
    drop(resp);
    wait_stats(&server, |s| s.aborted_streams == 1 && s.active_streams == 0).await;

    let resp = chat(&server, json!({"mock": {"fault": "endless"}})).await;
    assert_eq!(resp.status(), 500);
}

#[tokio::test]
async fn non_stream_stall_never_answers() {
    let server = mock().await;
    let req = client()
        .post(format!("{}/chat/completions", server.url()))
        .json(&json!({"mock": {"fault": "stall_mid"}}))
        .send();
    assert!(tokio::time::timeout(SILENCE, req).await.is_err());
    wait_stats(&server, |s| s.open_connections == 0).await;
}

#[tokio::test]
async fn fail_times_per_key_then_success() {
    let server = mock().await;
    let body =
        |key: &str| json!({"stream": true, "mock": {"fault": "429", "fail_times": 2, "key": key}});
    assert_eq!(chat(&server, body("a")).await.status(), 429);
    assert_eq!(chat(&server, body("a")).await.status(), 429);
    let (text, _) = read_until_end(chat(&server, body("a")).await).await;
    assert_eq!(openai_text(&json_events(&parse_sse(&text))), full_reply(16));
    // Another key has its own budget.
    assert_eq!(chat(&server, body("b")).await.status(), 429);
    assert_eq!(chat(&server, body("a")).await.status(), 200);
    // Reset restores the budget.
    client()
        .post(format!("http://{}/_mock/reset", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(chat(&server, body("a")).await.status(), 429);
}

#[tokio::test]
async fn process_config_fault_with_headers_and_default_key() {
    let server = spawn(MockConfig {
        fault: Some(Fault::ServerError),
        fail_times: Some(1),
        tokens: 3,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(chat(&server, json!({})).await.status(), 500);
    let body: Value = chat(&server, json!({})).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], full_reply(3));
    // A request can re-enable failure for its own key via headers...
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .header("x-mock-key", "h")
        .header("x-mock-fail-times", "1")
        .header("x-mock-fault", "429")
        .header("x-mock-tokens", "2")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    // ...and the body wins over headers.
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .header("x-mock-fault", "429")
        .header("x-mock-tokens", "2")
        .json(&json!({"mock": {"fault": null, "tokens": 5}}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], full_reply(5));
}

#[tokio::test]
async fn invalid_knobs_are_400() {
    let server = mock().await;
    for body in [
        json!({"mock": {"tokens": -1}}),
        json!({"mock": {"fault": "nope"}}),
        json!({"mock": {"token": 3}}),
        json!({"mock": "fast"}),
    ] {
        let resp = chat(&server, body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .header("x-mock-token-ms", "soon")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(server.stats().chat_requests, 6);
}

#[tokio::test]
async fn stats_count_and_watch_wakes() {
    let server = mock().await;
    let mut rx = server.watch();
    assert_eq!(*rx.borrow_and_update(), MockStats::default());

    let http = client();
    let body = json!({"stream": true, "messages": [{"role": "user", "content": "x"}], "extra": 1});
    for _ in 0..3 {
        let resp = http
            .post(format!("{}/chat/completions", server.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        read_until_end(resp).await;
    }
    tokio::time::timeout(WAIT, rx.changed())
        .await
        .unwrap()
        .unwrap();
    let stats = wait_stats(&server, |s| s.completed_streams == 3).await;
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.chat_requests, 3);
    assert_eq!(stats.last_request, Some(body));
    // One pooled client, sequential requests: a single reused connection.
    assert_eq!(stats.total_connections, 1);
    assert_eq!(stats.open_connections, 1);
    assert_eq!(stats.max_active_streams, 1);

    let models: Value = http
        .get(format!("{}/models", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models,
        json!({"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "mock"}]})
    );
    let over_http: MockStats = http
        .get(format!("http://{}/_mock/stats", server.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http.requests, 5);
    assert_eq!(over_http.completed_streams, 3);

    let resp = http
        .post(format!("http://{}/_mock/reset", server.addr))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let stats = server.stats();
    assert_eq!(
        stats,
        MockStats {
            open_connections: 1,
            ..MockStats::default()
        }
    );

    drop(http);
    wait_stats(&server, |s| s.open_connections == 0).await;
}

#[tokio::test]
async fn concurrent_streams_are_all_counted() {
    const N: usize = 200;
    let server = mock().await;
    let http = client();
    let url = format!("{}/chat/completions", server.url());
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let resp = http
                    .post(url)
                    .json(&json!({"stream": true, "mock": {"tokens": 64, "first_token_ms": 50}}))
                    .send()
                    .await
                    .unwrap();
                let (text, errored) = read_until_end(resp).await;
                assert!(!errored);
                openai_text(&json_events(&parse_sse(&text)))
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), full_reply(64));
    }
    let stats = wait_stats(&server, |s| s.completed_streams == N as u64).await;
    assert_eq!(stats.aborted_streams, 0);
    assert!(stats.max_active_streams > 1, "{stats:?}");
    assert!(stats.max_active_streams <= N as u64);
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let server = mock().await;
    install_crypto_provider();
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = http
        .post(format!("{}/chat/completions", server.url()))
        .json(&json!({"stream": true, "mock": {"tokens": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let (text, errored) = read_until_end(resp).await;
    assert!(!errored);
    assert_eq!(openai_text(&json_events(&parse_sse(&text))), full_reply(5));

    // Over HTTP/2 a reset is a stream error, still visible as such.
    let resp = http
        .post(format!("{}/chat/completions", server.url()))
        .json(&json!({"stream": true, "mock": {"tokens": 6, "fault": "reset_mid"}}))
        .send()
        .await
        .unwrap();
    let (_, errored) = read_until_end(resp).await;
    assert!(errored);
    let stats = server.stats();
    assert_eq!(stats.total_connections, 1);
}

#[tokio::test]
async fn shutdown_ends_stalled_streams() {
    let server = mock().await;
    let mut resp = chat(
        &server,
        json!({"stream": true, "mock": {"fault": "stall_first"}}),
    )
    .await;
    let mut rx = server.watch();
    tokio::time::timeout(WAIT, server.shutdown()).await.unwrap();
    let end = tokio::time::timeout(WAIT, resp.chunk()).await.unwrap();
    assert!(end.is_err(), "stalled stream ended cleanly: {end:?}");
    let stats = rx.borrow_and_update().clone();
    assert_eq!(stats.aborted_streams, 1);
    assert_eq!(stats.open_connections, 0);
}

#[tokio::test]
async fn serve_stops_on_its_shutdown_future() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, MockConfig::default(), async {
        let _ = rx.await;
    }));
    let resp = client()
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tx.send(()).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

async fn messages(server: &MockServer, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/messages", server.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn anthropic_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(v["delta"]["type"], "text_delta");
            v["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn anthropic_stream_shape() {
    let server = mock().await;
    let resp = messages(
        &server,
        json!({
            "model": "claude-x",
            "stream": true,
            "system": "be nice",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
            "mock": {"tokens": 4},
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, errored) = read_until_end(resp).await;
    assert!(!errored);
    let events = parse_sse(&text);
    let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    for (e, d) in events.iter().zip(&data) {
        assert_eq!(Some(d["type"].as_str().unwrap()), e.event.as_deref());
    }
    let msg = &data[0]["message"];
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["model"], "claude-x");
    assert_eq!(msg["content"], json!([]));
    assert_eq!(msg["stop_reason"], Value::Null);
    assert_eq!(msg["usage"], json!({"input_tokens": 4, "output_tokens": 1}));
    assert_eq!(
        data[1],
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    assert_eq!(anthropic_text(&events), full_reply(4));
    assert_eq!(
        data[8],
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 4}})
    );
    wait_stats(&server, |s| s.completed_streams == 1).await;
}

#[tokio::test]
async fn anthropic_faults_and_non_stream() {
    let server = mock().await;
    let resp = messages(&server, json!({"stream": true, "mock": {"fault": "429"}})).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let resp = messages(&server, json!({"stream": true, "mock": {"fault": "500"}})).await;
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "api_error");

    let resp = messages(
        &server,
        json!({"stream": true, "mock": {"fault": "error_chunk", "tokens": 4}}),
    )
    .await;
    let (text, _) = read_until_end(resp).await;
    let events = parse_sse(&text);
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(
        serde_json::from_str::<Value>(&last.data).unwrap(),
        json!({"type": "error", "error": {"type": "api_error", "message": "mock in-band error"}})
    );
    assert_eq!(anthropic_text(&events), full_reply(2));

    let resp = messages(
        &server,
        json!({"stream": true, "mock": {"fault": "reset_mid", "tokens": 4}}),
    )
    .await;
    let (_, errored) = read_until_end(resp).await;
    assert!(errored);

    let resp = messages(&server, json!({"messages": []})).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(server.stats().chat_requests, 5);
}

#[tokio::test]
async fn process_wide_stamp_marks_every_token_unless_a_request_opts_out() {
    let server = spawn(MockConfig {
        tokens: 3,
        stamp: true,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let before = super::knobs::unix_ns();
    let text = chat(&server, json!({"stream": true}))
        .await
        .text()
        .await
        .unwrap();
    let after = super::knobs::unix_ns();
    let tokens: Vec<String> = json_events(&parse_sse(&text))
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(tokens.len(), 3, "{text}");
    for (i, t) in tokens.iter().enumerate() {
        let (word, stamps) = t.trim_end().split_once('@').expect("stamped");
        assert_eq!(word, token_text(i).trim_end());
        let (arrived, sent) = stamps.split_once('@').expect("two stamps");
        let (arrived, sent): (u128, u128) = (arrived.parse().unwrap(), sent.parse().unwrap());
        assert!(before <= arrived && arrived <= sent && sent <= after, "{t}");
    }
    // A request's own knob wins over the process-wide setting.
    let text = chat(&server, json!({"stream": true, "mock": {"stamp": false}}))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(openai_text(&json_events(&parse_sse(&text))), full_reply(3));
}

const OPENAI_FIXTURES: [(&str, &str); 5] = [
    (
        "tool_call",
        include_str!("../../../tests/fixtures/openai_tool_call.sse"),
    ),
    (
        "parallel_tool_calls",
        include_str!("../../../tests/fixtures/openai_parallel_tool_calls.sse"),
    ),
    (
        "reasoning",
        include_str!("../../../tests/fixtures/openai_reasoning.sse"),
    ),
    (
        "logprobs",
        include_str!("../../../tests/fixtures/openai_logprobs.sse"),
    ),
    ("n", include_str!("../../../tests/fixtures/openai_n.sse")),
];

const ANTHROPIC_FIXTURES: [(&str, &str); 2] = [
    (
        "tool_use",
        include_str!("../../../tests/fixtures/anthropic_tool_use.sse"),
    ),
    (
        "thinking",
        include_str!("../../../tests/fixtures/anthropic_thinking.sse"),
    ),
];

/// The fixture as a client that did not ask for usage gets it: OpenAI's usage chunk, the
/// one with no choices, left out.
fn without_usage_chunk(fixture: &str) -> String {
    let kept: String = fixture
        .split_inclusive("\n\n")
        .filter(|e| !e.contains(",\"choices\":[],"))
        .collect();
    assert_eq!(
        fixture.len() - kept.len(),
        fixture
            .split_inclusive("\n\n")
            .find(|e| e.contains(",\"choices\":[],"))
            .unwrap()
            .len(),
        "exactly one usage chunk"
    );
    kept
}

async fn last_request_over_http(server: &MockServer) -> reqwest::Response {
    client()
        .get(format!("http://{}/_mock/requests/last", server.addr))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn openai_scenarios_stream_their_fixture_byte_for_byte() {
    let server = mock().await;
    for (name, fixture) in OPENAI_FIXTURES {
        let resp = chat(
            &server,
            json!({
                "model": "gpt-x",
                "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "hi"}],
                "mock": {"scenario": name},
            }),
        )
        .await;
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let (text, errored) = read_until_end(resp).await;
        assert!(!errored, "{name}");
        assert_eq!(text, fixture, "{name}");

        // Without include_usage the usage chunk is left out, as OpenAI does; the header
        // selects the scenario as well as the body does.
        let resp = client()
            .post(format!("{}/chat/completions", server.url()))
            .header("x-mock-scenario", name)
            .json(&json!({"stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let (text, _) = read_until_end(resp).await;
        assert_eq!(text, without_usage_chunk(fixture), "{name}");
    }
    let stats = wait_stats(&server, |s| s.completed_streams == 10).await;
    assert_eq!(stats.aborted_streams, 0);
}

#[tokio::test]
async fn scenario_chunks_carry_what_they_promise() {
    let server = mock().await;
    let play = |name: &'static str| {
        let server = &server;
        async move {
            let (text, _) = read_until_end(
                chat(
                    server,
                    json!({"stream": true, "stream_options": {"include_usage": true}, "mock": {"scenario": name}}),
                )
                .await,
            )
            .await;
            json_events(&parse_sse(&text))
        }
    };
    let chunks = play("tool_call").await;
    let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["function"]["arguments"], "");
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    let args: String = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
        .map(|a| a.as_str().unwrap())
        .collect();
    let args: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(args["location"], "Paris, France");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "tool_calls"
    );

    let chunks = play("parallel_tool_calls").await;
    let ids: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/id"))
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);

    let chunks = play("reasoning").await;
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/reasoning_content"))
        .filter_map(Value::as_str)
        .collect();
    assert!(reasoning.contains("391"), "{reasoning}");
    assert_eq!(openai_text(&chunks), "17 × 23 = **391**");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens_details"]["reasoning_tokens"].as_u64() > Some(0));

    let chunks = play("logprobs").await;
    let entry = &chunks[1]["choices"][0]["logprobs"]["content"][0];
    assert_eq!(entry["token"], chunks[1]["choices"][0]["delta"]["content"]);
    assert!(entry["top_logprobs"].as_array().unwrap().len() >= 2);

    let chunks = play("n").await;
    let mut finished = Vec::new();
    for c in &chunks {
        for choice in c["choices"].as_array().unwrap() {
            if choice["finish_reason"].is_string() {
                finished.push(choice["index"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(finished, [0, 1]);
}

#[tokio::test]
async fn anthropic_scenarios_stream_their_fixture_byte_for_byte() {
    let server = mock().await;
    for (name, fixture) in ANTHROPIC_FIXTURES {
        let resp = messages(
            &server,
            json!({
                "model": "claude-x",
                "stream": true,
                "messages": [{"role": "user", "content": "hi"}],
                "mock": {"scenario": name},
            }),
        )
        .await;
        assert_eq!(resp.status(), 200, "{name}");
        let (text, errored) = read_until_end(resp).await;
        assert!(!errored, "{name}");
        assert_eq!(text, fixture, "{name}");
    }
    let events = parse_sse(ANTHROPIC_FIXTURES[0].1);
    let starts: Vec<Value> = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_start"))
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["content_block"].clone())
        .collect();
    assert_eq!(starts[0]["type"], "text");
    for tool in &starts[1..] {
        assert_eq!(tool["type"], "tool_use");
        assert!(tool["id"].as_str().unwrap().starts_with("toolu_"));
        assert_eq!(tool["input"], json!({}));
    }
    assert_eq!(starts.len(), 3);
    wait_stats(&server, |s| s.completed_streams == 2).await;
}

#[tokio::test]
async fn scenario_events_are_paced_like_tokens() {
    let server = mock().await;
    let started = Instant::now();
    let mut resp = chat(
        &server,
        json!({"stream": true, "mock": {"scenario": "tool_call", "first_token_ms": 100, "token_ms": 10}}),
    )
    .await;
    let mut reads = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        reads.push((started.elapsed(), String::from_utf8(c.to_vec()).unwrap()));
    }
    assert!(reads[0].0 >= Duration::from_millis(100), "{reads:?}");
    assert!(reads.len() >= 3, "{reads:?}");
    for (_, r) in &reads {
        assert!(r.ends_with("\n\n"), "frame split mid-event: {r:?}");
    }
    // 13 token chunks (the call's start and 12 argument fragments): 12 gaps.
    assert!(started.elapsed() >= Duration::from_millis(100 + 12 * 10));
    let text: String = reads.into_iter().map(|(_, r)| r).collect();
    assert_eq!(text, without_usage_chunk(OPENAI_FIXTURES[0].1));
}

#[tokio::test]
async fn tool_results_get_the_final_answer() {
    let server = mock().await;
    let turn_two = json!({
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris, France\"}"},
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\":18}"},
        ],
    });
    for (name, fixture) in [
        (
            "tool_call",
            include_str!("../../../tests/fixtures/openai_tool_call_final.sse"),
        ),
        (
            "parallel_tool_calls",
            include_str!("../../../tests/fixtures/openai_parallel_tool_calls_final.sse"),
        ),
    ] {
        let mut body = turn_two.clone();
        body["mock"] = json!({"scenario": name});
        let (text, _) = read_until_end(chat(&server, body).await).await;
        assert_eq!(text, fixture, "{name}");
        let chunks = json_events(&parse_sse(&text));
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "stop"
        );
        assert!(openai_text(&chunks).contains("18°C"));
    }
    // A tool message earlier in the conversation is not the end of a loop.
    let mut body = turn_two.clone();
    body["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "user", "content": "And Tokyo?"}));
    body["mock"] = json!({"scenario": "tool_call"});
    let (text, _) = read_until_end(chat(&server, body).await).await;
    assert_eq!(text, OPENAI_FIXTURES[0].1);

    let resp = messages(
        &server,
        json!({
            "stream": true,
            "messages": [
                {"role": "user", "content": "Weather in Paris and Tokyo?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "I'll check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris, France"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"location": "Tokyo, Japan"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, partly cloudy"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "24C, sunny"},
                ]},
            ],
            "mock": {"scenario": "tool_use"},
        }),
    )
    .await;
    let (text, _) = read_until_end(resp).await;
    assert_eq!(
        text,
        include_str!("../../../tests/fixtures/anthropic_tool_use_final.sse")
    );
    let delta = parse_sse(&text)
        .into_iter()
        .find(|e| e.event.as_deref() == Some("message_delta"))
        .unwrap();
    let delta: Value = serde_json::from_str(&delta.data).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
}

#[tokio::test]
async fn non_streamed_scenarios_answer_the_whole_reply() {
    let server = mock().await;
    for (name, fixture) in OPENAI_FIXTURES {
        let resp = chat(&server, json!({"mock": {"scenario": name}})).await;
        assert_eq!(resp.status(), 200, "{name}");
        let body: Value = resp.json().await.unwrap();
        // sluice's own merge of the same chunks is compared with this reply in sluice's tests.
        assert_eq!(body["id"], first_chunk(fixture)["id"], "{name}");
        assert_eq!(body["object"], "chat.completion");
        assert!(body["usage"]["total_tokens"].as_u64() > Some(0), "{name}");
    }
    let body: Value = chat(&server, json!({"mock": {"scenario": "tool_call"}}))
        .await
        .json()
        .await
        .unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        call["function"]["arguments"],
        "{\"location\":\"Paris, France\",\"unit\":\"celsius\"}"
    );
    assert!(call.get("index").is_none());
    let body: Value = chat(&server, json!({"mock": {"scenario": "n"}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hi there! 👋");
    assert_eq!(
        body["choices"][1]["message"]["content"],
        "Hello! How are you doing today?"
    );
    let body: Value = chat(&server, json!({"mock": {"scenario": "reasoning"}}))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        body["choices"][0]["message"]["reasoning_content"]
            .as_str()
            .unwrap()
            .starts_with("Okay")
    );

    let resp = messages(&server, json!({"mock": {"scenario": "tool_use"}})).await;
    assert_eq!(resp.status(), 200);
    let msg: Value = resp.json().await.unwrap();
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["stop_reason"], "tool_use");
    assert_eq!(msg["model"], "claude-sonnet-4-5-20250929");
    let content = msg["content"].as_array().unwrap();
    assert_eq!(
        content[0],
        json!({"type": "text", "text": "I'll check the current weather in both cities for you."})
    );
    assert_eq!(content[1]["type"], "tool_use");
    assert_eq!(content[1]["name"], "get_weather");
    assert_eq!(content[1]["input"], json!({"location": "Paris, France"}));
    assert_eq!(content[2]["input"], json!({"location": "Tokyo, Japan"}));
    assert_eq!(msg["usage"]["output_tokens"], 118);

    let msg: Value = messages(&server, json!({"mock": {"scenario": "thinking"}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(msg["stop_reason"], "end_turn");
    assert_eq!(msg["content"][0]["type"], "thinking");
    assert!(
        msg["content"][0]["thinking"]
            .as_str()
            .unwrap()
            .contains("= 391")
    );
    assert!(msg["content"][0]["signature"].as_str().unwrap().len() > 100);
    assert_eq!(
        msg["content"][1],
        json!({"type": "text", "text": "17 × 23 = **391**"})
    );
    let stats = server.stats();
    assert_eq!(stats.active_streams + stats.completed_streams, 0);
}

#[tokio::test]
async fn process_wide_scenario_plays_for_requests_without_knobs() {
    let server = spawn(MockConfig {
        scenario: Some("tool_call".into()),
        tokens: 3,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let (text, _) = read_until_end(chat(&server, json!({"stream": true})).await).await;
    assert_eq!(text, without_usage_chunk(OPENAI_FIXTURES[0].1));
    // A request can pick another scenario or none.
    let (text, _) = read_until_end(
        chat(
            &server,
            json!({"stream": true, "stream_options": {"include_usage": true}, "mock": {"scenario": "n"}}),
        )
        .await,
    )
    .await;
    assert_eq!(text, OPENAI_FIXTURES[4].1);
    let (text, _) =
        read_until_end(chat(&server, json!({"stream": true, "mock": {"scenario": null}})).await)
            .await;
    assert_eq!(openai_text(&json_events(&parse_sse(&text))), full_reply(3));
    // The Anthropic endpoint is not the scenario's and plays plain text.
    let (text, _) = read_until_end(messages(&server, json!({"stream": true})).await).await;
    assert_eq!(anthropic_text(&parse_sse(&text)), full_reply(3));

    let server = spawn(MockConfig {
        scenario: Some("thinking".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let (text, _) = read_until_end(messages(&server, json!({"stream": true})).await).await;
    assert_eq!(text, ANTHROPIC_FIXTURES[1].1);

    let server = spawn(MockConfig {
        scenario: Some("bogus".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let resp = chat(&server, json!({"stream": true})).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_mock_knob");
}

#[test]
fn scenario_flag_builds_config() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        mock: MockArgs,
    }
    let cli = Cli::try_parse_from(["x", "--scenario", "tool_use"]).unwrap();
    assert_eq!(
        cli.mock.config().unwrap().scenario.as_deref(),
        Some("tool_use")
    );
    let none = Cli::try_parse_from(["x", "--scenario", "none"]).unwrap();
    assert_eq!(none.mock.config().unwrap().scenario, None);
    let bad = Cli::try_parse_from(["x", "--scenario", "tools"]).unwrap();
    let err = bad.mock.config().unwrap_err();
    assert!(err.contains("\"tools\""), "{err}");
    let unset = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(unset.mock.config().unwrap().scenario, None);
}

#[tokio::test]
async fn bad_scenario_knobs_are_400() {
    let server = mock().await;
    for (body, needle) in [
        (
            json!({"mock": {"scenario": "tool_calls"}}),
            "\"tool_calls\"",
        ),
        (
            json!({"stream": true, "mock": {"scenario": "tool_use"}}),
            "\"tool_use\"",
        ),
        (json!({"mock": {"scenario": 3}}), "mock.scenario"),
        (
            json!({"stream": true, "mock": {"scenario": "n", "fault": "stall_mid"}}),
            "stall_mid",
        ),
    ] {
        let resp = chat(&server, body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_mock_knob", "{body}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .header("x-mock-scenario", "thinking")
        .json(&json!({"stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"thinking\"")
    );
    for scenario in ["reasoning", "nope"] {
        let resp = messages(
            &server,
            json!({"stream": true, "mock": {"scenario": scenario}}),
        )
        .await;
        assert_eq!(resp.status(), 400, "{scenario}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "error");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("{scenario:?}"))
        );
    }
    assert_eq!(server.stats().completed_streams, 0);
}

#[tokio::test]
async fn status_faults_still_apply_to_scenarios() {
    let server = mock().await;
    let body = json!({
        "stream": true,
        "mock": {"scenario": "tool_call", "fault": 429, "fail_times": 1, "key": "s"},
    });
    let resp = chat(&server, body.clone()).await;
    assert_eq!(resp.status(), 429);
    let (text, _) = read_until_end(chat(&server, body).await).await;
    assert_eq!(text, without_usage_chunk(OPENAI_FIXTURES[0].1));
    let resp = messages(
        &server,
        json!({"stream": true, "mock": {"scenario": "tool_use", "fault": "500"}}),
    )
    .await;
    assert_eq!(resp.status(), 500);
}

#[tokio::test]
async fn last_request_is_the_body_as_received() {
    let server = mock().await;
    let resp = last_request_over_http(&server).await;
    assert_eq!(resp.status(), 404);

    // Key order, spacing and number spelling a parsed copy would lose.
    let raw = r#"{"stream":false, "model":"m","messages":[{"role":"user","content":"hé \u00e9"}],"temperature":1.0,"mock":{"tokens":2},"a":1e2}"#;
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = last_request_over_http(&server).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), raw);
    assert_eq!(server.last_request_body().unwrap(), raw.as_bytes());
    let parsed: Value = serde_json::from_str(raw).unwrap();
    assert_eq!(server.stats().last_request, Some(parsed));

    // The Anthropic endpoint records too; an unparsable body does not replace the last one.
    let sent = json!({"stream": true, "messages": [{"role": "user", "content": "x"}], "mock": {"tokens": 1}});
    read_until_end(messages(&server, sent.clone()).await).await;
    let got: Value = last_request_over_http(&server).await.json().await.unwrap();
    assert_eq!(got, sent);
    let resp = client()
        .post(format!("{}/chat/completions", server.url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let got: Value = last_request_over_http(&server).await.json().await.unwrap();
    assert_eq!(got, sent);

    client()
        .post(format!("http://{}/_mock/reset", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(last_request_over_http(&server).await.status(), 404);
    assert_eq!(server.last_request_body(), None);
}
