//! The in-process tier: tests of one request and its whole answer, through the router with
//! no socket (`common::inproc`).

use std::path::Path;

use http::Method;
use serde_json::{Value, json};
use sluice::config::{AuthMode, ModelRoute};
use sluice::mock::MockConfig;

use crate::common::inproc::{App, RequestBuilder, api_key, mock_and_app};
use crate::common::{base_config, body, config_for, mock};

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
