//! What a newcomer meets first: SDKs with a placeholder key on a local server, a real
//! provider's model by default (with `demo` still the demo), the model list and its entries,
//! and a model picked per message.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::config::{AuthMode, ModelRoute};
use sluice::mock::MockConfig;

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

async fn status_with_key(url: &str, key: &str) -> u16 {
    client()
        .post(url)
        .bearer_auth(key)
        .json(&chat_body("mock-model"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn placeholder_keys_stand_for_the_local_user_unless_keys_are_required() {
    let mock = mock(MockConfig::default()).await;
    for auth in [AuthMode::Auto, AuthMode::Off] {
        let mut cfg = config_for(&mock);
        cfg.chat.auth = auth;
        let server = TestServer::start(cfg).await;
        let url = server.chat_url();
        for placeholder in ["unused", "sk-placeholder", "ollama"] {
            assert_eq!(status_with_key(&url, placeholder).await, 200, "{auth:?}");
        }
        let me: Value = client()
            .get(format!("{}/api/me", server.url))
            .bearer_auth("unused")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(me["key_id"], Value::Null, "the local user, with no key");
        assert_eq!(me["auth_required"], false);
        // Shaped like a sluice key, so it is checked: a typo in a real key is noticed.
        let typo = format!("{}typo", sluice::store::cli::KEY_PREFIX);
        assert_eq!(status_with_key(&url, &typo).await, 401, "{auth:?}");
        let real = api_key(&server, "alice", false).await;
        assert_eq!(status_with_key(&url, &real).await, 200);
        server.shutdown().await;
    }
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    let server = TestServer::start(cfg).await;
    assert_eq!(status_with_key(&server.chat_url(), "unused").await, 401);
    server.shutdown().await;
}

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

#[tokio::test]
async fn models_are_listed_and_each_can_be_retrieved() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.upstream.models = vec![ModelRoute {
        name: "house".into(),
        targets: vec!["mock:mock".into()],
    }];
    cfg.chat.default_model = "mock-model".into();
    let server = TestServer::start(cfg).await;
    let list = get_json(&format!("{}/v1/models", server.url)).await;
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in ["mock-model", "mock", "demo", "house"] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    for id in ids {
        let m = get_json(&format!("{}/v1/models/{id}", server.url)).await;
        assert_eq!(m["id"], id);
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_u64() && m["owned_by"].is_string(), "{m}");
    }
    let mock_entry = get_json(&format!("{}/v1/models/mock", server.url)).await;
    assert_eq!(mock_entry["owned_by"], "mock");
    let missing = client()
        .get(format!("{}/v1/models/no-such-model", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let e: Value = missing.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model")
    );
    server.shutdown().await;
}
