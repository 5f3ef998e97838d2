//! What a newcomer meets first: SDKs with a placeholder key on a local server, a real
//! provider's model by default (with `demo` still the demo), the model list and its entries,
//! and a model picked per message.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_mock::MockConfig;

/// Posts `content` (with `model`, if any) to a new session of the local user and reads the
/// reply's events to its end.
async fn session_reply(server: &TestServer, model: Option<&str>) -> (String, Value) {
    let s: Value = client()
        .post(format!("{}/api/sessions", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = s["id"].as_str().unwrap();
    let mut body = json!({"content": "hello there"});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let resp = client()
        .post(format!("{}/api/sessions/{id}/messages", server.url))
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    let mut text = String::new();
    while let Some(ev) = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("stalled")
    {
        let ev = ev.unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        match ev.event.as_str() {
            "token" => text.push_str(data["text"].as_str().unwrap_or_default()),
            "done" => break,
            "error" | "interrupted" => panic!("the reply failed: {data}"),
            _ => {}
        }
    }
    let messages: Value = client()
        .get(format!("{}/api/sessions/{id}/messages", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (text, messages["data"][1].clone())
}

#[tokio::test]
async fn sessions_use_the_providers_model_and_demo_stays_the_demo() {
    let mock = mock(MockConfig {
        tokens: 3,
        ..Default::default()
    })
    .await;
    let mut cfg = config_for(&mock);
    cfg.upstream.demo.first_token = std::time::Duration::ZERO;
    cfg.upstream.demo.between_tokens = std::time::Duration::ZERO;
    let server = TestServer::start(cfg).await;
    // No SLUICE_DEFAULT_MODEL and an OpenAI-compatible upstream without a list: the first
    // model the upstream lists itself.
    assert_eq!(server.state.upstreams.default_model(), "mock");
    let (text, reply) = session_reply(&server, None).await;
    assert_eq!(reply["model"], "mock");
    assert!(!text.contains("demo"), "{text}");
    let sent: Value = serde_json::from_slice(&mock.last_request_body().unwrap()).unwrap();
    assert_eq!(sent["model"], "mock");

    let before = mock.stats().chat_requests;
    let (text, reply) = session_reply(&server, Some("demo")).await;
    assert_eq!(reply["model"], "demo");
    assert!(text.contains("built-in demo"), "{text}");
    let r = read_stream(
        client()
            .post(server.chat_url())
            .json(&json!({"model": "demo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.text.contains("built-in demo"), "{}", r.text);
    assert_eq!(
        mock.stats().chat_requests,
        before,
        "demo never reaches the upstream"
    );
    server.shutdown().await;
}
