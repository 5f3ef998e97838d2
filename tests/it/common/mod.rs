//! Shared harness: the real server on 127.0.0.1:0 in front of the real mock upstream.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod db;
pub mod env;
pub mod inproc;
pub mod need;
pub mod pgbouncer;
pub mod proxy;
pub mod reasoning;
pub mod ws;

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;
use sluice::config::{Config, ProviderConfig, ProviderKind, Secret};
use sluice_mock::{MockConfig, MockServer, MockStats};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything a test waits on; generous because CI machines are shared.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub url: String,
    /// The server's state, for driving its lifecycle (drain) directly.
    pub state: sluice::state::AppState,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let state = sluice::state::AppState::new(config)
            .await
            .expect("valid config");
        Self::serve(state).await
    }

    /// Serves a state a test has put together itself.
    pub async fn serve(state: sluice::state::AppState) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let st = state.clone();
        let task = tokio::spawn(async move {
            sluice::server::serve(st, listener, async move { s.cancelled().await }).await
        });
        Self {
            url,
            state,
            stop,
            task,
        }
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }

    pub fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.url)
    }
}

/// Embedded defaults with a store of its own in a fresh temp dir.
pub fn base_config() -> Config {
    let mut c = Config::default();
    c.store.data_dir = tempfile::tempdir().unwrap().keep();
    // Tests make many requests from one client; the guard tests turn limits on themselves.
    c.guards.rate_chat_per_min = 0;
    c.guards.rate_api_per_min = 0;
    c.guards.rate_admin_per_min = 0;
    c.upstream.provider_concurrency = 1_000;
    c
}

/// A config whose only provider is the mock, with retries fast enough for tests.
pub fn config_for(mock: &MockServer) -> Config {
    let mut c = base_config();
    c.upstream.providers = vec![ProviderConfig::openai("mock", &mock.url(), None)];
    c.upstream.retry.base = Duration::from_millis(10);
    c.upstream.retry.max = Duration::from_millis(1500);
    c.upstream.timeouts.first_token = Duration::from_secs(5);
    c.upstream.timeouts.idle = Duration::from_secs(5);
    c
}

/// Embedded defaults with two providers, `first` and `second`, behind one model `name` whose
/// targets are `first<first_model>` then `second<second_model>` (a model suffix such as
/// `":big"`, or `""` for the provider's own).
pub fn fallback_config(
    name: &str,
    first: (&str, &MockServer, &str),
    second: (&str, &MockServer, &str),
) -> Config {
    let mut c = base_config();
    c.upstream.providers = vec![
        ProviderConfig::openai(first.0, &first.1.url(), None),
        ProviderConfig::openai(second.0, &second.1.url(), None),
    ];
    c.upstream.models = vec![sluice::config::ModelRoute {
        name: name.into(),
        targets: vec![
            format!("{}{}", first.0, first.2),
            format!("{}{}", second.0, second.2),
        ],
    }];
    c
}

pub async fn mock(config: MockConfig) -> MockServer {
    sluice_mock::spawn(config)
        .await
        .expect("mock upstream starts")
}

/// `config_for(mock)` with sluice's Anthropic provider instead, for `claude-*` models, in
/// front of the mock's Messages API endpoint.
pub fn claude_config(mock: &MockServer) -> Config {
    let mut cfg = config_for(mock);
    cfg.upstream.providers = vec![ProviderConfig {
        name: "claude".into(),
        kind: ProviderKind::Anthropic,
        base_url: Some(mock.url()),
        base_urls: vec![],
        api_key: Some(Secret::new("test-key")),
        api_key_env: None,
        models: vec!["claude-*".into()],
        http2: false,
    }];
    cfg
}

/// A sluice in front of a mock playing `scenario` on its Messages API endpoint, through
/// sluice's Anthropic provider ([`claude_config`]).
pub async fn claude_server(scenario: &str) -> (MockServer, TestServer) {
    let mock = mock(MockConfig {
        scenario: Some(scenario.into()),
        ..Default::default()
    })
    .await;
    let server = TestServer::start(claude_config(&mock)).await;
    (mock, server)
}

pub async fn mock_and_server() -> (MockServer, TestServer) {
    let m = mock(MockConfig::default()).await;
    let s = TestServer::start(config_for(&m)).await;
    (m, s)
}

/// A new key of `user` (created if need be), straight in the store.
pub async fn api_key(server: &TestServer, user: &str, admin: bool) -> String {
    store_key(&server.state, user, admin).await
}

/// A new key of `user` (created if need be) in the store of `state`.
pub async fn store_key(state: &sluice::state::AppState, user: &str, admin: bool) -> String {
    store_key_with_id(state, user, admin).await.0
}

/// A new key of `user` (created if need be) in the store of `state`, and the key's id.
pub async fn store_key_with_id(
    state: &sluice::state::AppState,
    user: &str,
    admin: bool,
) -> (String, String) {
    let key = format!(
        "{}test{}",
        sluice::store::cli::KEY_PREFIX,
        uuid::Uuid::new_v4().simple()
    );
    let store = &state.store;
    let now = sluice::store::now_millis();
    let u = store
        .ensure_user(&sluice::store::User::new(user, now))
        .await
        .unwrap();
    let record = sluice::store::ApiKey::new(&u.id, user, &key[..12], admin, now);
    store
        .create_api_key(&record, &sluice::store::cli::hash_key(&key))
        .await
        .unwrap();
    (key, record.id)
}

pub fn client() -> reqwest::Client {
    sluice::upstream::sse::install_crypto_provider();
    reqwest::Client::builder().build().unwrap()
}

/// A chat request body; `knobs` go to the mock upstream through sluice's pass-through.
pub fn body(stream: bool, knobs: Value) -> Value {
    serde_json::json!({
        "model": "mock-model",
        "stream": stream,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello there"}],
        "mock": knobs,
    })
}

/// Status, `Retry-After` and the error code of a refused request's answer.
pub fn refusal_of(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    body: &[u8],
) -> (u16, Option<u64>, String) {
    let retry = headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let v: Value = serde_json::from_slice(body).unwrap();
    let code = v["error"]["code"].as_str().unwrap_or("").to_owned();
    (status.as_u16(), retry, code)
}

/// What the server at `base` shows on `/metrics`.
pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The JSON body of a GET.
pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET url` with an API key, its JSON body.
pub async fn get_json_as(url: &str, key: &str) -> Value {
    client()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A new chat session at `base`, with `key` as its bearer if given; its id.
pub async fn create_session(base: &str, key: Option<&str>) -> String {
    let mut req = client()
        .post(format!("{base}/api/sessions"))
        .json(&serde_json::json!({}));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub async fn post(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.unwrap()
}

/// What an OpenAI SDK would make of a chat.completion.chunk stream.
#[derive(Debug, Default)]
pub struct StreamResult {
    pub chunks: Vec<Value>,
    pub text: String,
    pub done: bool,
    pub error: Option<Value>,
    pub usage: Option<Value>,
    pub finish_reason: Option<String>,
}

pub async fn read_stream(resp: reqwest::Response) -> StreamResult {
    let mut out = StreamResult::default();
    let mut events = resp.bytes_stream().eventsource();
    while let Some(ev) = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("stream stalled")
    {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => panic!("client-side stream error: {e}"),
        };
        if ev.data == "[DONE]" {
            assert!(!out.done, "[DONE] twice");
            out.done = true;
            continue;
        }
        assert!(!out.done, "data after [DONE]");
        let v: Value = serde_json::from_str(&ev.data).expect("every event is JSON");
        absorb(&mut out, v);
    }
    out
}

pub fn absorb(out: &mut StreamResult, v: Value) {
    if let Some(err) = v.get("error") {
        assert!(out.error.is_none(), "two error events");
        out.error = Some(err.clone());
    }
    if let Some(choice) = v["choices"].get(0) {
        if let Some(t) = choice["delta"]["content"].as_str() {
            out.text.push_str(t);
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            out.finish_reason = Some(r.to_owned());
        }
    }
    if v.get("usage").is_some_and(|u| !u.is_null()) {
        out.usage = Some(v["usage"].clone());
    }
    out.chunks.push(v);
}

/// Waits until the mock's stats satisfy `pred`, failing after `within`.
pub async fn wait_stats(
    mock: &MockServer,
    within: Duration,
    pred: impl Fn(&MockStats) -> bool,
) -> MockStats {
    let mut rx = mock.watch();
    match tokio::time::timeout(within, rx.wait_for(|s| pred(s))).await {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("mock stats never matched; last: {:?}", mock.stats()),
    }
}
