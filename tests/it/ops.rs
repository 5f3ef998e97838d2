//! Operations: Prometheus metrics, the JSON summary, readiness, admin endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::db::Backend;
use common::proxy::Proxy;
use common::*;
use serde_json::{Value, json};
use sluice::config::{AuthMode, RedisConfig, Secret};
use sluice_mock::{MockConfig, full_reply};

/// Parses the exposition format strictly enough to reject anything malformed:
/// `name{label="v",…} value` lines, `# HELP`/`# TYPE` comments, blank lines.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment: {line}");
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
            let labels = &series[name_end + 1..series.len() - 1];
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name: {line}"
                );
                let _ = v;
            }
        }
        out.insert(series.to_owned(), value);
    }
    out
}

async fn scrape(url: &str) -> (String, HashMap<String, f64>) {
    let r = client().get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    let parsed = parse_prometheus(&text);
    (text, parsed)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn counters_move_by_exactly_what_happened() {
    crate::require!(Postgres, Redis);
    let (_mock, server) = mock_and_server().await;
    let (text, before) = scrape(&server.url).await;
    for name in [
        "sluice_tokens_streamed_total",
        "sluice_active_streams",
        "sluice_connections{transport=\"sse\"}",
        "sluice_connections{transport=\"ws\"}",
        "sluice_cache_requests_total{result=\"hit\"}",
        "sluice_rate_limited_total",
        "sluice_task_queue_depth",
        "sluice_bus_messages_total{direction=\"in\"}",
        "sluice_circuit_state{provider=\"mock\"}",
    ] {
        assert!(before.contains_key(name), "{name} missing from:\n{text}");
    }
    for n in [3usize, 5, 7] {
        let r =
            read_stream(post(&server.chat_url(), &body(true, json!({"tokens": n}))).await).await;
        assert!(r.done);
        assert_eq!(r.text, full_reply(n));
    }
    let (text, after) = scrape(&server.url).await;
    assert_eq!(
        value(&after, "sluice_tokens_streamed_total")
            - value(&before, "sluice_tokens_streamed_total"),
        15.0,
        "{text}"
    );
    let ok = "http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"}";
    assert_eq!(value(&after, ok) - value(&before, ok), 3.0, "{text}");
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("sluice_upstream_ttft_seconds_bucket{provider=\"mock\"")),
        "{text}"
    );
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("http_request_duration_seconds_bucket")),
        "{text}"
    );
    assert_eq!(value(&after, "sluice_active_streams"), 0.0);

    // An upstream failure shows up by provider and kind.
    let r = post(&server.chat_url(), &body(true, json!({"fault": "500"}))).await;
    assert_eq!(r.status(), 502);
    let (_, after_err) = scrape(&server.url).await;
    assert_eq!(
        value(
            &after_err,
            "sluice_upstream_errors_total{provider=\"mock\",kind=\"upstream_error\"}"
        ),
        3.0
    );
    for line in text.lines() {
        assert!(
            !line.contains("hello there"),
            "prompt text in a label: {line}"
        );
    }

    // The JSON summary agrees with the series.
    let s: Value = client()
        .get(format!("{}/api/metrics", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in [
        "total_requests",
        "concurrent_requests",
        "active_streams",
        "cache_hit_rate",
        "rate_limited_requests",
        "average_response_time_ms",
        "ttft_p95_ms",
        "tokens_streamed",
        "cache_size",
        "upstream_errors",
        "uptime_s",
        "server_id",
    ] {
        assert!(s.get(field).is_some(), "{field} missing: {s}");
    }
    assert_eq!(
        s["tokens_streamed"].as_f64().unwrap(),
        value(&after_err, "sluice_tokens_streamed_total")
    );
    assert_eq!(s["upstream_errors"]["mock"], 3);
    let http_total: f64 = after_err
        .iter()
        .filter(|(k, _)| k.starts_with("http_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    // The summary's own request is in flight while it is computed, so it is not counted yet.
    assert_eq!(
        s["total_requests"].as_f64().unwrap(),
        http_total + 1.0,
        "{s}"
    );
    assert!(s["ttft_p95_ms"].as_f64().unwrap() > 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn readiness_follows_postgres_and_redis() {
    crate::require!(Postgres, Redis);
    let db = common::db::fresh(Backend::Postgres).await;
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let redis = common::need::redis_addr();
    let mut pg_proxy = Proxy::start(pg).await;
    let mut redis_proxy = Proxy::start(redis).await;
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    let url = db
        .config
        .database_url
        .as_ref()
        .unwrap()
        .expose()
        .replace("127.0.0.1:5432", &pg_proxy.addr.to_string());
    cfg.store = db.config.clone();
    cfg.store.database_url = Some(Secret::new(url));
    cfg.store.acquire_timeout = Duration::from_millis(500);
    cfg.redis = Some(RedisConfig {
        url: Secret::new(format!("redis://{}", redis_proxy.addr)),
        prefix: format!("sluice-test-{}", uuid::Uuid::new_v4().simple()),
    });
    let server = TestServer::start(cfg).await;
    let ready = |url: String| async move {
        let r = client()
            .get(format!("{url}/health/ready"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let wait_for = |want: u16| {
        let url = server.url.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let (s, v) = ready(url.clone()).await;
                if s == want {
                    return v;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "readiness never became {want}: {v}"
                );
                tokio::task::yield_now().await;
            }
        }
    };
    let v = wait_for(200).await;
    assert_eq!(v["store"]["backend"], "postgres");
    assert_eq!(v["redis"]["ok"], true);
    assert!(v["store"]["latency_ms"].is_number());

    pg_proxy.stop();
    let v = wait_for(503).await;
    assert_eq!(v["store"]["ok"], false);
    // Liveness does not depend on the database.
    assert_eq!(
        client()
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    pg_proxy.resume().await;
    wait_for(200).await;

    redis_proxy.stop();
    let v = wait_for(503).await;
    assert_eq!(v["redis"]["ok"], false);
    assert_eq!(v["store"]["ok"], true);
    redis_proxy.resume().await;
    wait_for(200).await;
    server.shutdown().await;
}

#[tokio::test]
async fn admin_paths_need_an_admin_key_in_every_spelling() {
    let mock = mock(MockConfig {
        tokens: 30,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.chat.default_model = "mock-model".into();
    let server = TestServer::start(cfg).await;
    let admin = api_key(&server, "root", true).await;
    let user = api_key(&server, "alice", false).await;
    let paths = [
        "/api/admin/streams",
        "/api/admin/streams/",
        "//api/admin/streams",
        "/api//admin/streams",
        "/API/ADMIN/STREAMS",
        "/api/Admin/streams",
        "/api/%61dmin/streams",
        "/api/admin/usage",
        "/api/admin/drain",
        "/api/admin/cache/clear",
        "/api/admin",
        "/api/admin/nonexistent",
    ];
    let methods = [
        reqwest::Method::GET,
        reqwest::Method::HEAD,
        reqwest::Method::OPTIONS,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
    ];
    for path in paths {
        for m in &methods {
            let url = format!("{}{path}", server.url);
            let none = client()
                .request(m.clone(), &url)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(none, 401, "{m} {path} without a key");
            let as_user = client()
                .request(m.clone(), &url)
                .bearer_auth(&user)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(as_user, 403, "{m} {path} with a user key");
        }
    }

    // With the admin key: running streams, usage, drain.
    let s: Value = client()
        .post(format!("{}/api/sessions", server.url))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = s["id"].as_str().unwrap().to_owned();
    let live = client()
        .post(format!("{}/api/sessions/{sid}/messages", server.url))
        .bearer_auth(&user)
        .header("accept", "text/event-stream")
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    let mut bytes = live.bytes_stream();
    use futures::StreamExt;
    bytes.next().await.unwrap().unwrap();
    let streams: Value = get_json_as(&format!("{}/api/admin/streams", server.url), &admin).await;
    let row = &streams["data"][0];
    assert_eq!(row["session_id"], sid.as_str());
    assert_eq!(row["subscribers"], 1);
    assert!(row["age_s"].is_u64() && row["tokens"].is_u64() && row["instance"].is_string());
    while bytes.next().await.is_some() {}

    let usage: Value = get_json_as(&format!("{}/api/admin/usage", server.url), &admin).await;
    let rows = usage["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{usage}");
    assert_eq!(rows[0]["model"], "mock-model");
    assert_eq!(rows[0]["completion_tokens"], 30);
    assert_eq!(rows[0]["requests"], 1);

    let r = client()
        .post(format!("{}/api/admin/drain", server.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        client()
            .get(format!("{}/health/ready", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let r = client()
        .post(server.chat_url())
        .bearer_auth(&user)
        .json(&body(true, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    server.shutdown().await;
}

#[tokio::test]
async fn deterministic_replies_are_cached_until_cleared() {
    crate::require!(Redis);
    let prefix = format!("sluice-test-{}", uuid::Uuid::new_v4().simple());
    let redis_url = common::need::redis_url();
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Off;
    cfg.redis = Some(RedisConfig {
        url: Secret::new(redis_url.clone()),
        prefix: prefix.clone(),
    });
    let a = TestServer::start(cfg.clone()).await;
    let b = TestServer::start(cfg).await;
    let mut req = body(true, json!({"tokens": 6}));
    req["temperature"] = json!(0);

    let first = read_stream(post(&a.chat_url(), &req).await).await;
    assert_eq!(first.text, full_reply(6));
    assert_eq!(mock.stats().chat_requests, 1);
    // Same request again, streamed and not: from the cache, token by token.
    let again = read_stream(post(&a.chat_url(), &req).await).await;
    assert!(again.done);
    assert_eq!(again.text, first.text);
    assert!(
        again
            .chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"].is_string())
            .count()
            >= 6
    );
    let mut plain = req.clone();
    plain["stream"] = json!(false);
    let v: Value = client()
        .post(a.chat_url())
        .json(&plain)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], full_reply(6));
    // Another instance sharing Redis finds it too.
    let other = read_stream(post(&b.chat_url(), &req).await).await;
    assert_eq!(other.text, first.text);
    assert_eq!(
        mock.stats().chat_requests,
        1,
        "every repeat came from the cache"
    );
    // A non-deterministic request is never cached.
    let mut hot = req.clone();
    hot["temperature"] = json!(0.8);
    read_stream(post(&a.chat_url(), &hot).await).await;
    read_stream(post(&a.chat_url(), &hot).await).await;
    assert_eq!(mock.stats().chat_requests, 3);

    let (_, m) = scrape(&a.url).await;
    assert_eq!(
        value(&m, "sluice_cache_requests_total{result=\"hit\"}"),
        2.0
    );
    assert_eq!(
        value(&m, "sluice_cache_requests_total{result=\"miss\"}"),
        1.0
    );
    let s: Value = client()
        .get(format!("{}/api/metrics", a.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["cache_size"], 1);
    assert!((s["cache_hit_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);

    let r: Value = client()
        .post(format!("{}/api/admin/cache/clear", a.url))
        .json(&json!({"prefix": "mock-model:"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r["cleared"].as_u64().unwrap() >= 1, "{r}");
    // Cleared in L1 here and in Redis; `b` still holds its own L1 copy until its TTL.
    let after = read_stream(post(&a.chat_url(), &req).await).await;
    assert_eq!(after.text, first.text);
    assert_eq!(
        mock.stats().chat_requests,
        4,
        "after clearing, the upstream is asked again"
    );
    a.shutdown().await;
    b.shutdown().await;
}
