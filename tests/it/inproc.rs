//! The in-process tier: tests of one request and its whole answer, through the router with
//! no socket (`common::inproc`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};
use sluice::config::{AuthMode, ModelRoute};
use sluice_mock::{MockConfig, MockServer, full_reply};

use crate::common::db::{Backend, TestDb};
use crate::common::env::TestEnv;
use crate::common::inproc::{App, RequestBuilder, Response, api_key, mock_and_app};
use crate::common::{
    WAIT, base_config, body, config_for, fallback_config, mock, store_key_with_id,
};
use crate::openai_stream::fixed_status_upstream;

// From openai_stream.
#[tokio::test]
async fn malformed_requests_get_the_right_4xx() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.server.max_body_bytes = 4096;
    cfg.upstream.providers[0].models = vec!["mock-model".into()];
    let server = App::start(cfg).await;
    let url = server.chat_url();
    let c = server.client();

    let cases: Vec<(&str, RequestBuilder, u16, &str)> = vec![
        ("no content type", c.post(&url).body("{}"), 415, "unsupported_media_type"),
        ("text/plain", c.post(&url).header("content-type", "text/plain").body("{}"), 415, "unsupported_media_type"),
        ("broken JSON", c.post(&url).header("content-type", "application/json").body("{\"model\":"), 400, "invalid_json"),
        ("trailing garbage", c.post(&url).header("content-type", "application/json").body(r#"{"model":"m","messages":[]} x"#), 400, "invalid_json"),
        ("missing messages", c.post(&url).json(&json!({"model": "mock-model"})), 422, "invalid_request"),
        ("wrong role", c.post(&url).json(&json!({"model": "mock-model", "messages": [{"role": "robot", "content": "x"}]})), 422, "invalid_request"),
        ("wrong type", c.post(&url).json(&json!({"model": "mock-model", "messages": "hi"})), 422, "invalid_request"),
        ("empty messages", c.post(&url).json(&json!({"model": "mock-model", "messages": []})), 422, "invalid_request"),
        ("n of 0", c.post(&url).json(&json!({"model": "mock-model", "n": 0, "messages": [{"role": "user", "content": "x"}]})), 422, "invalid_request"),
        ("content of a number", c.post(&url).json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": 5}]})), 422, "invalid_request"),
        ("temperature", c.post(&url).json(&json!({"model": "mock-model", "temperature": 9, "messages": [{"role": "user", "content": "x"}]})), 422, "invalid_request"),
        ("too large", c.post(&url).json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "x".repeat(10_000)}]})), 413, "payload_too_large"),
        ("unknown model", c.post(&url).json(&json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})), 404, "model_not_found"),
        ("wrong method", c.get(&url), 405, "method_not_allowed"),
        ("unknown route", c.post(format!("{}/v1/nothing", server.url)).json(&json!({})), 404, "not_found"),
    ];
    for (name, req, status, code) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        let v: Value = resp
            .json()
            .await
            .unwrap_or_else(|_| panic!("{name}: JSON error body"));
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(v["error"]["type"].is_string(), "{name}");
    }
    let v: Value = c
        .post(&url)
        .json(&json!({"model": "mock-model", "messages": [{"role": "robot", "content": "x"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].role"),
        "{v}"
    );
    assert_eq!(
        mock.stats().chat_requests,
        0,
        "no bad request reached the upstream"
    );
    // Still healthy afterwards.
    let ok = c
        .post(&url)
        .json(&body(true, json!({"tokens": 2})))
        .send()
        .await
        .unwrap()
        .stream();
    assert!(ok.done);
    server.shutdown().await;
}

// From openai_stream.
#[tokio::test]
async fn models_and_health() {
    let (_mock, server) = mock_and_app().await;
    let v: Value = server
        .client()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "demo")
    );
    let h: Value = server
        .client()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    assert!(h["server_id"].is_string());
    assert!(h["version"].is_string());
    assert!(h["uptime_s"].is_u64());
    server.shutdown().await;
}

// From ui.
/// The files themselves, without a browser: strict headers, revalidation, JSON 404s, and
/// nothing loaded from elsewhere (the binary must work offline).
#[tokio::test]
async fn ui_files_are_served_embedded_with_strict_headers() {
    let server = App::start(base_config()).await;
    let get = |path: &str, etag: Option<&str>| {
        let mut r = server.client().get(format!("{}{path}", server.url));
        if let Some(e) = etag {
            r = r.header("if-none-match", e);
        }
        r.send()
    };
    let index = get("/", None).await.unwrap();
    assert_eq!(index.status(), 200);
    let h = index.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    let html = index.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/ui/js/app.js"></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "no inline script");
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert_eq!(get("/", Some(&etag)).await.unwrap().status(), 304);

    let js = get("/ui/js/chat.js", None).await.unwrap();
    assert_eq!(js.status(), 200);
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    for missing in ["/ui/nope.js", "/ui/README.md", "/ui/..%2fCargo.toml"] {
        let r = get(missing, None).await.unwrap();
        assert_eq!(r.status(), 404, "{missing}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{missing}");
    }

    // Nothing in static/ loads from another origin.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
    let mut files = vec![root.join("index.html"), root.join("app.css")];
    files.extend(
        std::fs::read_dir(root.join("js"))
            .unwrap()
            .flatten()
            .map(|e| e.path()),
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for external in [
            "src=\"http",
            "href=\"http",
            "url(http",
            "from 'http",
            "from \"http",
            "//cdn",
        ] {
            assert!(
                !text.contains(external),
                "{} loads {external}…",
                f.display()
            );
        }
    }
    server.shutdown().await;
}

// From access.
#[tokio::test]
async fn without_keys_only_loopback_and_allowed_host_names_are_served() {
    let mut cfg = base_config();
    cfg.server.allowed_hosts = vec!["sluice.lan".into()];
    let server = App::start(cfg).await;
    // In process there is no port; any will do, as a browser sends the one it used.
    let port = 8080;
    let me = format!("{}/api/me", server.url);
    for host in [
        "attacker.example".to_owned(),
        format!("attacker.example:{port}"),
        format!("127.0.0.1.attacker.example:{port}"),
        format!("localhost.attacker.example:{port}"),
    ] {
        let (status, body) = status_with_host(&server, &me, &host, None).await;
        assert_eq!(status, 403, "{host}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("SLUICE_ALLOWED_HOSTS"), "{message}");
    }
    let (status, _) = status_with_host(
        &server,
        &format!("{}/api/admin/cache/clear", server.url),
        "attacker.example",
        None,
    )
    .await;
    assert_eq!(status, 403);
    for host in [
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("app.localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.1.2.3:{port}"),
        format!("[::1]:{port}"),
        "[::1]".to_owned(),
        format!("sluice.lan:{port}"),
        "SLUICE.lan".to_owned(),
    ] {
        assert_eq!(
            status_with_host(&server, &me, &host, None).await.0,
            200,
            "{host}"
        );
    }
    server.shutdown().await;

    // Keys required: the key is what keeps other pages out, so any name is served.
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    let server = App::start(cfg).await;
    let key = api_key(&server, "alice", false).await;
    let me = format!("{}/api/me", server.url);
    assert_eq!(
        status_with_host(&server, &me, "attacker.example", Some(&key))
            .await
            .0,
        200
    );
    server.shutdown().await;
}

// From access.
async fn status_with_host(app: &App, url: &str, host: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = app.client().get(url).header("host", host);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

// From guards.
#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.server.cors_origins = vec!["https://chat.example.com/".into()];
    let server = App::start(cfg).await;
    let preflight = |origin: &str| {
        server
            .client()
            .request(Method::OPTIONS, server.chat_url())
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };

    let r = preflight("https://chat.example.com").await.unwrap();
    assert!(r.status().is_success());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://chat.example.com");
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["authorization", "content-type", "last-event-id"] {
        assert!(headers.contains(name), "{headers}");
    }
    assert!(h.get("access-control-allow-credentials").is_none());

    // The actual request carries the exposed headers.
    let r = server
        .client()
        .get(format!("{}/v1/models", server.url))
        .header("origin", "https://chat.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after") && exposed.contains("x-request-id"));

    let r = preflight("https://evil.example.net").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = server
        .client()
        .get(format!("{}/v1/models", server.url))
        .header("origin", "https://evil.example.net")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    server.shutdown().await;

    // No origins configured: no CORS headers at all.
    let server = App::start(config_for(&mock)).await;
    let r = server
        .client()
        .request(Method::OPTIONS, server.chat_url())
        .header("origin", "https://chat.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        !r.headers()
            .keys()
            .any(|k| k.as_str().starts_with("access-control-"))
    );
    server.shutdown().await;
}

// From first_hour_auth.
fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

async fn status_with_key(app: &App, url: &str, key: &str) -> u16 {
    app.client()
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
        let server = App::start(cfg).await;
        let url = server.chat_url();
        for placeholder in ["unused", "sk-placeholder", "ollama"] {
            assert_eq!(
                status_with_key(&server, &url, placeholder).await,
                200,
                "{auth:?}"
            );
        }
        let me: Value = server
            .client()
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
        assert_eq!(status_with_key(&server, &url, &typo).await, 401, "{auth:?}");
        let real = api_key(&server, "alice", false).await;
        assert_eq!(status_with_key(&server, &url, &real).await, 200);
        server.shutdown().await;
    }
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    let server = App::start(cfg).await;
    assert_eq!(
        status_with_key(&server, &server.chat_url(), "unused").await,
        401
    );
    server.shutdown().await;
}

// From first_hour_auth.
#[tokio::test]
async fn models_are_listed_and_each_can_be_retrieved() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.upstream.models = vec![ModelRoute {
        name: "house".into(),
        targets: vec!["mock:mock".into()],
    }];
    cfg.chat.default_model = "mock-model".into();
    let server = App::start(cfg).await;
    let list = server.get_json(&format!("{}/v1/models", server.url)).await;
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
        let m = server
            .get_json(&format!("{}/v1/models/{id}", server.url))
            .await;
        assert_eq!(m["id"], id);
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_u64() && m["owned_by"].is_string(), "{m}");
    }
    let mock_entry = server
        .get_json(&format!("{}/v1/models/mock", server.url))
        .await;
    assert_eq!(mock_entry["owned_by"], "mock");
    let missing = server
        .client()
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

// From openai_stream.
#[tokio::test]
async fn stream_and_non_stream_replies_match() {
    let (mock, server) = mock_and_app().await;
    let streamed = server
        .post_stream(&server.chat_url(), &body(true, json!({"tokens": 20})))
        .await;
    assert!(streamed.done);
    assert!(streamed.error.is_none());
    assert_eq!(streamed.finish_reason.as_deref(), Some("stop"));

    let resp = server
        .post(&server.chat_url(), &body(false, json!({"tokens": 20})))
        .await;
    assert_eq!(resp.status(), 200);
    let whole: Value = resp.json().await.unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(
        whole["choices"][0]["message"]["content"],
        streamed.text.as_str()
    );
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert_eq!(streamed.text, full_reply(20));
    let usage = streamed
        .usage
        .expect("usage chunk when include_usage is set");
    assert_eq!(whole["usage"], usage);
    assert_eq!(usage["completion_tokens"], 20);
    // sluice always asks the upstream for usage, whatever the client asked.
    let upstream_saw = mock.stats().last_request.unwrap();
    assert_eq!(upstream_saw["stream_options"]["include_usage"], true);
    assert_eq!(upstream_saw["stream"], true);
    assert_eq!(upstream_saw["model"], "mock-model");
    server.shutdown().await;
}

#[tokio::test]
async fn usage_chunk_only_when_asked() {
    let (_mock, server) = mock_and_app().await;
    let mut b = body(true, json!({"tokens": 3}));
    b.as_object_mut().unwrap().remove("stream_options");
    let r = server.post_stream(&server.chat_url(), &b).await;
    assert!(r.done);
    assert!(r.usage.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn rate_limit_before_first_token_is_retried_then_succeeds() {
    let (mock, server) = mock_and_app().await;
    let r = server
        .post_stream(
            &server.chat_url(),
            &body(
                true,
                json!({"tokens": 4, "fault": "429", "fail_times": 2, "key": "a"}),
            ),
        )
        .await;
    assert!(r.done, "{r:?}");
    assert_eq!(r.text, full_reply(4));
    assert_eq!(mock.stats().chat_requests, 3, "two 429s, then the success");
    server.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let (mock, server) = mock_and_app().await;
    let resp = server
        .post(
            &server.chat_url(),
            &body(
                false,
                json!({"tokens": 4, "fault": "500", "fail_times": 1, "key": "b"}),
            ),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], full_reply(4));
    assert_eq!(mock.stats().chat_requests, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_is_retried_then_502() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = base_config();
    cfg.upstream.providers = vec![sluice::config::ProviderConfig::openai(
        "down",
        &format!("http://127.0.0.1:{port}/v1"),
        None,
    )];
    cfg.upstream.retry.base = Duration::from_millis(10);
    let server = App::start(cfg).await;
    let resp = server
        .post(&server.chat_url(), &body(true, json!({})))
        .await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    server.shutdown().await;
}

#[tokio::test]
async fn fallback_to_the_next_provider_of_a_model() {
    let broken = mock(MockConfig {
        fault: Some(sluice_mock::Fault::ServerError),
        ..Default::default()
    })
    .await;
    let good = mock(MockConfig::default()).await;
    let mut cfg = fallback_config(
        "smart",
        ("broken", &broken, ":big"),
        ("good", &good, ":small"),
    );
    cfg.upstream.retry.base = Duration::from_millis(5);
    let server = App::start(cfg).await;
    let mut b = body(true, json!({"tokens": 3}));
    b["model"] = json!("smart");
    let r = server.post_stream(&server.chat_url(), &b).await;
    assert!(r.done);
    assert_eq!(r.text, full_reply(3));
    assert_eq!(broken.stats().chat_requests, 3);
    assert_eq!(good.stats().chat_requests, 1);
    assert_eq!(good.stats().last_request.unwrap()["model"], "small");
    assert_eq!(
        r.chunks[0]["model"], "small",
        "chunks arrive as the upstream sent them: the model that answered"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn anthropic_stream_is_translated() {
    // Anthropic takes no unknown body fields, so the knobs are the mock's process defaults.
    let mock = mock(MockConfig {
        tokens: 6,
        ..Default::default()
    })
    .await;
    let mut cfg = base_config();
    cfg.upstream.providers = vec![sluice::config::ProviderConfig {
        name: "claude".into(),
        kind: sluice::config::ProviderKind::Anthropic,
        base_url: Some(mock.url()),
        base_urls: vec![],
        api_key: Some(sluice::config::Secret::new("test-key")),
        api_key_env: None,
        models: vec!["claude-*".into()],
        http2: false,
    }];
    let server = App::start(cfg).await;
    let mut b = body(true, json!({"tokens": 6}));
    b["model"] = json!("claude-test");
    b["messages"] = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two three"}
    ]);
    let r = server.post_stream(&server.chat_url(), &b).await;
    assert!(r.done, "{r:?}");
    assert_eq!(r.text, full_reply(6));
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.usage.unwrap()["completion_tokens"], 6);
    let saw = mock.stats().last_request.unwrap();
    assert_eq!(saw["system"], "be brief");
    assert_eq!(saw["messages"][0]["role"], "user");
    assert_eq!(saw["stream"], true);
    server.shutdown().await;
}

#[tokio::test]
async fn recorded_anthropic_fixture_relays_through_the_api() {
    // A minimal upstream replaying a recorded Messages API stream in small pieces.
    let fixture = include_str!("../fixtures/anthropic_stream.txt");
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(move || async move {
            let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = fixture
                .as_bytes()
                .chunks(7)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(futures::stream::iter(pieces)))
                .unwrap()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut cfg = base_config();
    cfg.upstream.providers = vec![sluice::config::ProviderConfig {
        name: "claude".into(),
        kind: sluice::config::ProviderKind::Anthropic,
        base_url: Some(format!("http://{addr}/v1")),
        base_urls: vec![],
        api_key: None,
        api_key_env: None,
        models: vec![],
        http2: false,
    }];
    let server = App::start(cfg).await;
    let mut b = body(true, json!(null));
    b["model"] = json!("claude-sonnet-4-5");
    let r = server.post_stream(&server.chat_url(), &b).await;
    assert!(r.done);
    assert_eq!(r.text, "Hello! How can I help you today? Ça va — 世界 🦀");
    assert_eq!(
        r.usage.unwrap(),
        json!({"prompt_tokens": 12, "completion_tokens": 15, "total_tokens": 27})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn demo_provider_answers_with_zero_configuration() {
    let mut cfg = base_config();
    cfg.upstream.demo.first_token = Duration::from_millis(1);
    cfg.upstream.demo.between_tokens = Duration::from_millis(1);
    let server = App::start(cfg).await;
    let mut b = body(true, json!(null));
    b["model"] = json!("gpt-4o-mini");
    let r = server.post_stream(&server.chat_url(), &b).await;
    assert!(r.done);
    assert!(r.text.contains("demo"));
    assert!(r.chunks.len() > 10, "streamed in many chunks");
    server.shutdown().await;
}

#[tokio::test]
async fn other_4xx_are_never_retried() {
    for (upstream, client_sees) in [(400, 400), (401, 502), (403, 502), (404, 404), (422, 422)] {
        let (url, hits) = fixed_status_upstream(upstream).await;
        let mut cfg = base_config();
        cfg.upstream.retry.base = Duration::from_millis(5);
        cfg.upstream.providers = vec![sluice::config::ProviderConfig::openai("u", &url, None)];
        let server = App::start(cfg).await;
        let resp = server
            .post(&server.chat_url(), &body(true, json!({})))
            .await;
        assert_eq!(resp.status().as_u16(), client_sees, "upstream {upstream}");
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("upstream says {upstream}")),
            "{v}"
        );
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "upstream {upstream} retried"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn persistent_rate_limit_fails_with_429_and_retry_after() {
    let (mock, server) = mock_and_app().await;
    let resp = server
        .post(&server.chat_url(), &body(true, json!({"fault": "429"})))
        .await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"].is_string());
    assert_eq!(mock.stats().chat_requests, 3, "default of 3 tries");
    server.shutdown().await;
}

#[tokio::test]
async fn persistent_server_error_fails_with_502() {
    let (mock, server) = mock_and_app().await;
    let resp = server
        .post(&server.chat_url(), &body(true, json!({"fault": "500"})))
        .await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_error");
    assert_eq!(mock.stats().chat_requests, 3);
    server.shutdown().await;
}

// From guards.
/// A small chat request, with a key and an `X-Forwarded-For` if given.
async fn chat(app: &App, key: Option<&str>, xff: Option<&str>) -> Response {
    let mut req = app
        .client()
        .post(app.chat_url())
        .json(&body(false, json!({"tokens": 2})));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    req.send().await.unwrap()
}

/// Status, `Retry-After` and the error code of a refused request.
async fn refusal(resp: Response) -> (u16, Option<u64>, String) {
    let (status, headers) = (resp.status(), resp.headers().clone());
    crate::common::refusal_of(status, &headers, &resp.bytes().await.unwrap())
}

/// One unlabelled series of the app's `/metrics`.
async fn metric(app: &App, name: &str) -> f64 {
    let text = app
        .client()
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_and_other_keys_do_not() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.guards.rate_chat_per_min = 6;
    cfg.guards.rate_burst = 3;
    let server = App::start(cfg).await;
    let (alice, _) = store_key_with_id(&server.state, "alice", false).await;
    let (bob, _) = store_key_with_id(&server.state, "bob", false).await;
    let before = metric(&server, "sluice_rate_limited_total").await;

    for i in 0..3 {
        let r = chat(&server, Some(&alice), None).await;
        assert_eq!(r.status(), 200, "request {i} is within the burst");
    }
    let (status, retry, code) = refusal(chat(&server, Some(&alice), None).await).await;
    assert_eq!(status, 429);
    // 6/min: one request every 10 s.
    assert!(matches!(retry, Some(1..=10)), "Retry-After {retry:?}");
    assert_eq!(code, "rate_limited");

    let r = chat(&server, Some(&bob), None).await;
    assert_eq!(r.status(), 200, "another key has its own budget");
    // Other classes keep their own budgets (and health is never limited).
    let r = server
        .client()
        .get(format!("{}/v1/models", server.url))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for _ in 0..10 {
        let r = server
            .client()
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        metric(&server, "sluice_rate_limited_total").await,
        before + 1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.guards.rate_chat_per_min = 6;
    cfg.guards.rate_burst = 3;

    // The test client is not a trusted proxy: its X-Forwarded-For is its own invention.
    let direct = App::start(cfg.clone()).await;
    for i in 0..3 {
        let xff = format!("198.51.100.{i}");
        let r = chat(&direct, None, Some(&xff)).await;
        assert_eq!(r.status(), 200);
    }
    let (status, retry, code) = refusal(chat(&direct, None, Some("198.51.100.99")).await).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert!(retry.unwrap() >= 1);
    direct.shutdown().await;

    // Behind a trusted proxy (127.0.0.1 here), each forwarded address is its own client.
    cfg.guards.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let proxied = App::start(cfg).await;
    for i in 0..6 {
        let xff = format!("6.6.6.6, 198.51.100.{i}");
        let r = chat(&proxied, None, Some(&xff)).await;
        assert_eq!(r.status(), 200, "client {i}");
    }
    // …and one of them still has its limit, whatever it writes on the left.
    for i in 0..2 {
        let xff = format!("7.7.7.{i}, 198.51.100.0");
        assert_eq!(chat(&proxied, None, Some(&xff)).await.status(), 200);
    }
    let (status, _, _) = refusal(chat(&proxied, None, Some("198.51.100.0")).await).await;
    assert_eq!(status, 429);
    proxied.shutdown().await;
}

/// A server whose quota Redis cannot be reached. `AppState::new` would refuse the URL
/// for the task queue, so the quota is put in after it.
async fn unreachable_quota_server(mock: &MockServer, fail_open: bool) -> (App, String) {
    let mut cfg = config_for(mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.guards.quota_rpm = 100;
    cfg.guards.quota_fail_open = fail_open;
    let mut state = sluice::state::AppState::new(cfg.clone()).await.unwrap();
    let quota =
        sluice::guard::quota::Quota::connect("redis://127.0.0.1:1", "unused", &cfg.guards).await;
    assert!(
        quota.is_some(),
        "a quota is configured even while Redis is down"
    );
    state.guards = Arc::new(sluice::guard::Guards {
        config: cfg.guards.clone(),
        rate: sluice::guard::rate::RateLimits::new(&cfg.guards),
        quota: quota.map(Arc::new),
        streams: state.guards.streams.clone(),
    });
    let (key, _) = store_key_with_id(&state, "alice", false).await;
    (App::from_state(state), key)
}

#[tokio::test]
async fn unreachable_quota_redis_fails_open_or_closed_as_configured() {
    let mock = mock(MockConfig::default()).await;

    let (open, key) = unreachable_quota_server(&mock, true).await;
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(chat(&open, Some(&key), None).await.status(), 200);
    }
    assert!(
        started.elapsed() < WAIT,
        "an unreachable Redis costs bounded time"
    );
    open.shutdown().await;

    let (closed, key) = unreachable_quota_server(&mock, false).await;
    let (status, retry, code) = refusal(chat(&closed, Some(&key), None).await).await;
    assert_eq!((status, code.as_str()), (503, "quota_unavailable"));
    assert_eq!(retry, Some(1));
    // Routes without a quota are unaffected.
    let r = closed
        .client()
        .get(format!("{}/v1/models", closed.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    closed.shutdown().await;
}

// From sessions.
/// An app with keys required and the mock's model the default, on a fresh store of
/// `backend`, with a user's and an admin's key.
struct Keyed {
    app: App,
    mock: MockServer,
    user: String,
    admin: String,
    db: Option<TestDb>,
}

async fn keyed_app(backend: Backend, mock_cfg: MockConfig) -> Keyed {
    let p = TestEnv::builder()
        .mock(mock_cfg)
        .backend(backend)
        .keys_required()
        .prepare()
        .await;
    let app = App::start(p.config).await;
    let user = api_key(&app, "alice", false).await;
    let admin = api_key(&app, "root", true).await;
    Keyed {
        app,
        mock: p.mock,
        user,
        admin,
        db: p.db,
    }
}

impl Keyed {
    fn req(&self, key: &str, m: Method, path: &str) -> RequestBuilder {
        self.app
            .client()
            .request(m, format!("{}{path}", self.app.url))
            .bearer_auth(key)
    }

    async fn call(&self, key: &str, m: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.req(key, m, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    /// The user's task with one message, run to its end before the answer.
    async fn sync_task(&self, content: &str) -> (u16, Value) {
        let body = json!({"messages": [{"role": "user", "content": content}]});
        self.call(&self.user, Method::POST, "/api/tasks?sync=true", Some(body))
            .await
    }

    async fn new_session(&self) -> String {
        let r = self
            .req(&self.user, Method::POST, "/api/sessions")
            .json(&json!({"title": "t"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn scene(&self, name: &str, template: &str) {
        let (s, v) = self
            .call(
                &self.admin,
                Method::POST,
                "/api/scenes",
                Some(json!({"name": name, "agent": "default", "template": template})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
}

/// JSON nested 10,000 deep is refused with a 4xx — a 400 where it is read as free-form JSON
/// (fields relayed to the provider, message content) — and the server keeps serving.
#[tokio::test]
async fn deeply_nested_json_is_refused_with_a_4xx() {
    let e = keyed_app(Backend::Sqlite, MockConfig::default()).await;
    let req = |m: Method, path: &str| e.req(&e.user, m, path);
    let s = e.new_session().await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let relayed = [
        format!(
            r#"{{"model":"mock-model","messages":[{{"role":"user","content":"hi"}}],"x":{deep}}}"#
        ),
        format!(r#"{{"model":"mock-model","messages":[{{"role":"user","content":{deep}}}]}}"#),
    ];
    for body in relayed {
        let r = req(Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("recursion limit"), "{msg}");
    }
    // A schema that wants something else there refuses it first (422).
    let typed = [
        ("/v1/chat/completions".to_owned(), deep.clone()),
        (format!("/api/sessions/{s}/messages"), deep.clone()),
        (
            format!("/api/sessions/{s}/messages"),
            format!(r#"{{"content":"hi","model":{deep}}}"#),
        ),
    ];
    for (path, body) in typed {
        let r = req(Method::POST, &path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
    }
    let r = req(Method::GET, "/api/sessions").send().await.unwrap();
    assert_eq!(r.status(), 200);
    e.app.shutdown().await;
}

// From tasks.
crate::backend_tests!(
    sqlite, postgres;
    crud_and_pagination,
    revoked_key_is_refused,
    sync_returns_the_result,
    tasks_are_private,
    template_errors_are_422,
);

async fn template_errors_are_422(b: Backend) {
    let e = keyed_app(b, MockConfig::default()).await;
    e.scene("pair", "{{a}} and {{b}}").await;
    for (vars, field) in [
        (json!({"a": 1}), "variables.b"),
        (json!({"a": 1, "b": 2, "c": 3}), "variables.c"),
    ] {
        let (s, v) = e
            .call(
                &e.user,
                Method::POST,
                "/api/scenes/pair/run",
                Some(json!({"variables": vars})),
            )
            .await;
        assert_eq!(s, 422, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(field),
            "{v}"
        );
    }
    let (s, _) = e
        .call(
            &e.user,
            Method::POST,
            "/api/scenes/missing/run",
            Some(json!({"variables": {}})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = e
        .call(
            &e.admin,
            Method::POST,
            "/api/scenes",
            Some(json!({"name": "bad", "agent": "ghost", "template": "x"})),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(e.mock.stats().chat_requests, 0);
    e.app.shutdown().await;
}

async fn crud_and_pagination(b: Backend) {
    let e = keyed_app(b, MockConfig::default()).await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(e.new_session().await);
    }
    let got: Value = e
        .req(&e.user, Method::GET, &format!("/api/sessions/{}", ids[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], ids[0].as_str());
    assert_eq!(got["title"], "t");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/api/sessions?limit=3".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: Value = e
            .req(&e.user, Method::GET, &path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for s in page["data"].as_array().unwrap() {
            seen.push(s["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "every session once, newest first");

    let r = e
        .req(&e.user, Method::PATCH, &format!("/api/sessions/{}", ids[1]))
        .json(&json!({"title": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["title"], "renamed");
    let r = e
        .req(
            &e.user,
            Method::DELETE,
            &format!("/api/sessions/{}", ids[1]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = e
        .req(&e.user, Method::GET, &format!("/api/sessions/{}", ids[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = e
        .req(&e.user, Method::GET, "/api/sessions?cursor=garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    e.app.shutdown().await;
    drop(e.db);
}

async fn revoked_key_is_refused(b: Backend) {
    let e = keyed_app(b, MockConfig::default()).await;
    let s = e.new_session().await;
    let ok = e
        .req(&e.user, Method::GET, &format!("/api/sessions/{s}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let n = e
        .app
        .state
        .store
        .revoke_api_key("alice", sluice::store::now_millis())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let r = e
        .req(&e.user, Method::GET, &format!("/api/sessions/{s}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    e.app.shutdown().await;
}

async fn sync_returns_the_result(b: Backend) {
    let e = keyed_app(
        b,
        MockConfig {
            tokens: 5,
            ..Default::default()
        },
    )
    .await;
    let (s, v) = e.sync_task("hi").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["result"], full_reply(5));
    e.app.shutdown().await;
}

async fn tasks_are_private(b: Backend) {
    let e = keyed_app(
        b,
        MockConfig {
            tokens: 2,
            ..Default::default()
        },
    )
    .await;
    let (_, v) = e.sync_task("x").await;
    let id = v["id"].as_str().unwrap().to_owned();
    let other = api_key(&e.app, "mallory", false).await;
    for (m, path) in [
        (Method::GET, format!("/api/tasks/{id}")),
        (Method::GET, format!("/api/tasks/{id}/events")),
        (Method::DELETE, format!("/api/tasks/{id}")),
    ] {
        let (s, v) = e.call(&other, m, &path, None).await;
        assert_eq!(s, 404, "{path}: {v}");
    }
    e.app.shutdown().await;
}
