#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

//! Guards as a client sees them: rate limits per key and per IP, cluster-wide
//! quotas in Redis, input limits (body, content type, JSON, schema, request head, slow
//! heads) and CORS.

use crate::common;
use crate::common::need::redis_url;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use sluice::config::{AuthMode, Config, RedisConfig, Secret};
use sluice_mock::{MockConfig, MockServer, full_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Deletes every Redis key under a test's prefix when dropped.
struct RedisPrefix(String);

impl RedisPrefix {
    fn new() -> Self {
        Self(format!("sluice-guards-{}", uuid::Uuid::new_v4().simple()))
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) else {
            return;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.0))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// The current quota window (minute) by the Redis clock, which the quota script uses.
async fn redis_minute() -> u64 {
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    secs / 60
}

async fn new_key(state: &sluice::state::AppState, user: &str) -> (String, String) {
    store_key_with_id(state, user, false).await
}

fn keyed_config(mock: &MockServer) -> Config {
    let mut cfg = config_for(mock);
    cfg.chat.auth = AuthMode::Required;
    cfg
}

async fn chat(url: &str, key: Option<&str>, xff: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .post(format!("{url}/v1/chat/completions"))
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
async fn refusal(resp: reqwest::Response) -> (u16, Option<u64>, String) {
    let (status, headers) = (resp.status(), resp.headers().clone());
    refusal_of(status, &headers, &resp.bytes().await.unwrap())
}

#[tokio::test]
async fn two_instances_share_one_quota_in_redis() {
    crate::require!(Redis);
    let prefix = RedisPrefix::new();
    let mock = mock(MockConfig::default()).await;
    let mut cfg = keyed_config(&mock);
    cfg.redis = Some(RedisConfig {
        url: Secret::new(redis_url()),
        prefix: prefix.0.clone(),
    });
    cfg.guards.quota_rpm = 5;
    // One cluster: one store (as PostgreSQL would be), so a key has one id everywhere.
    let a = TestServer::start(cfg.clone()).await;
    let b = TestServer::start(cfg).await;
    // Windows are fixed minutes: a run that straddles two is repeated with a fresh key.
    let mut checked = false;
    for _ in 0..2 {
        let (key, _) = new_key(&a.state, "alice").await;
        let minute = redis_minute().await;
        let mut statuses = Vec::new();
        for server in [&a, &a, &a, &b, &b] {
            statuses.push(chat(&server.url, Some(&key), None).await.status().as_u16());
        }
        let sixth = refusal(chat(&b.url, Some(&key), None).await).await;
        let seventh = refusal(chat(&a.url, Some(&key), None).await).await;
        if redis_minute().await != minute {
            continue;
        }
        assert_eq!(statuses, [200; 5]);
        let (status, retry, code) = sixth;
        assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
        assert!(matches!(retry, Some(1..=60)), "Retry-After {retry:?}");
        assert_eq!(seventh.0, 429, "the other instance refuses too");
        checked = true;
        break;
    }
    assert!(checked, "two runs straddled a minute boundary");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_key_past_its_token_quota_is_refused_on_its_next_request() {
    crate::require!(Redis);
    let prefix = RedisPrefix::new();
    let mock = mock(MockConfig::default()).await;
    let mut cfg = keyed_config(&mock);
    cfg.redis = Some(RedisConfig {
        url: Secret::new(redis_url()),
        prefix: prefix.0.clone(),
    });
    cfg.guards.quota_tpm = 1_000;
    let server = TestServer::start(cfg).await;
    let quota = server
        .state
        .guards
        .quota
        .as_ref()
        .expect("quota configured");
    let (other, _) = new_key(&server.state, "bob").await;
    let mut checked = false;
    for _ in 0..2 {
        let (key, key_id) = new_key(&server.state, "alice").await;
        let minute = redis_minute().await;
        let first = chat(&server.url, Some(&key), None).await.status();
        quota.add_tokens(&key_id, 1_001).await;
        let next = refusal(chat(&server.url, Some(&key), None).await).await;
        if redis_minute().await != minute {
            continue;
        }
        assert_eq!(first, 200);
        let (status, retry, code) = next;
        assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
        assert!(retry.unwrap() >= 1);
        checked = true;
        break;
    }
    assert!(checked, "two runs straddled a minute boundary");
    assert_eq!(chat(&server.url, Some(&other), None).await.status(), 200);
    server.shutdown().await;
}

/// Writes `head` on a raw connection and reads until the server closes it.
async fn raw_exchange(url: &str, head: &[u8]) -> (String, Duration) {
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    s.write_all(head).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the server never closed the connection")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn input_limits_answer_with_their_status() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.server.max_body_bytes = 4_096;
    cfg.guards.max_header_bytes = 2_048;
    let server = TestServer::start(cfg).await;
    let url = server.chat_url();
    let c = client();
    let cases = [
        (
            "body too large",
            c.post(&url).json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "x".repeat(8_000)}]})),
            413,
        ),
        (
            "text/plain",
            c.post(&url).header("content-type", "text/plain").body("{}"),
            415,
        ),
        (
            "invalid JSON",
            c.post(&url)
                .header("content-type", "application/json")
                .body("{\"model\":"),
            400,
        ),
        (
            "schema",
            c.post(&url).json(&json!({"model": "mock-model", "messages": "hi"})),
            422,
        ),
        (
            "header over the limit",
            c.post(&url)
                .header("x-padding", "p".repeat(4_000))
                .json(&body(false, json!({}))),
            431,
        ),
    ];
    for (what, req, status) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
    }
    // A head past hyper's own buffer is refused before any routing.
    let head = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(64 * 1024)
    );
    let (resp, _) = raw_exchange(&server.url, head.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "got {resp:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn slow_request_heads_are_cut_off_and_the_server_stays_healthy() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.guards.header_timeout = Duration::from_millis(300);
    let server = TestServer::start(cfg).await;

    // Half a request head, then nothing.
    let (resp, took) = raw_exchange(
        &server.url,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty",
    )
    .await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    assert!(took < WAIT);
    assert!(!resp.contains("200 OK"), "got {resp:?}");
    // Nothing at all (before HTTP/1 and HTTP/2 can be told apart).
    let (_, took) = raw_exchange(&server.url, b"").await;
    assert!(took >= Duration::from_millis(250) && took < WAIT);
    // A slice of the HTTP/2 preface.
    let (_, took) = raw_exchange(&server.url, b"PRI * HTT").await;
    assert!(took >= Duration::from_millis(250) && took < WAIT);

    let r = client()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = read_stream(post(&server.chat_url(), &body(true, json!({"tokens": 5}))).await).await;
    assert!(out.done);
    assert_eq!(out.text, full_reply(5));
    server.shutdown().await;
}

/// Tokens counted against `key_id`'s quota in every window (a test may straddle a minute).
async fn tokens_counted(prefix: &str, key_id: &str) -> u64 {
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:quota:{{{key_id}}}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut total = 0;
    for k in keys {
        let t: Option<u64> = redis::cmd("HGET")
            .arg(&k)
            .arg("t")
            .query_async(&mut conn)
            .await
            .unwrap();
        total += t.unwrap_or(0);
    }
    total
}

/// Waits until the quota holds `want` tokens of `key_id`; fails with what it holds.
async fn assert_counted(prefix: &str, key_id: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = tokens_counted(prefix, key_id).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the quota counted {got} tokens, {want} were streamed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A keyed server with a token quota in Redis under its own prefix. Idle SSE streams are
/// pinged often, so a client that went away is noticed quickly.
async fn metered_server(mock: &MockServer) -> (TestServer, RedisPrefix, String, String) {
    let prefix = RedisPrefix::new();
    let mut cfg = keyed_config(mock);
    cfg.redis = Some(RedisConfig {
        url: Secret::new(redis_url()),
        prefix: prefix.0.clone(),
    });
    cfg.guards.quota_tpm = 1_000_000;
    cfg.server.ping_interval = Duration::from_millis(50);
    let server = TestServer::start(cfg).await;
    let (key, key_id) = new_key(&server.state, "alice").await;
    (server, prefix, key, key_id)
}

/// 20 tokens (more than one metering batch, not a multiple of it), then a stall.
const STREAMED: u64 = 20;

#[tokio::test]
async fn a_v1_stream_left_by_its_client_is_charged_every_token_it_streamed() {
    crate::require!(Redis);
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let mock = mock(MockConfig::default()).await;
    let (server, prefix, key, key_id) = metered_server(&mock).await;
    let resp = client()
        .post(server.chat_url())
        .bearer_auth(&key)
        .json(&body(
            true,
            json!({"tokens": STREAMED * 2, "fault": "stall_mid"}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    let mut tokens = 0;
    while tokens < STREAMED {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        if v["choices"][0]["delta"]["content"].is_string() {
            tokens += 1;
        }
    }
    drop(events);
    assert_counted(&prefix.0, &key_id, STREAMED).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_v1_stream_cut_by_an_upstream_error_is_charged_every_token_it_streamed() {
    crate::require!(Redis);
    let mock = mock(MockConfig::default()).await;
    let (server, prefix, key, key_id) = metered_server(&mock).await;
    let resp = client()
        .post(server.chat_url())
        .bearer_auth(&key)
        .json(&body(
            true,
            json!({"tokens": STREAMED * 2, "fault": "error_chunk"}),
        ))
        .send()
        .await
        .unwrap();
    let out = read_stream(resp).await;
    assert!(out.error.is_some(), "{out:?}");
    assert_eq!(out.text, full_reply(STREAMED as usize));
    assert_counted(&prefix.0, &key_id, STREAMED).await;
    server.shutdown().await;
}

/// `/v1/responses` rides the same relay: its tokens are metered against the key's quota.
#[tokio::test]
async fn a_responses_stream_is_charged_every_token_it_streamed() {
    crate::require!(Redis);
    let mock = mock(MockConfig::default()).await;
    let (server, prefix, key, key_id) = metered_server(&mock).await;
    let resp = client()
        .post(format!("{}/v1/responses", server.url))
        .bearer_auth(&key)
        .json(
            &json!({"model": "mock-model", "stream": true, "input": "hi",
            "mock": {"tokens": STREAMED}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.contains("event: response.completed\n"), "{body}");
    assert_counted(&prefix.0, &key_id, STREAMED).await;
    server.shutdown().await;
}

/// A session's reply, read over SSE until `STREAMED` tokens have come.
async fn session_after_tokens(
    server: &TestServer,
    key: &str,
) -> (String, impl futures::Stream<Item = Value> + Unpin + use<>) {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let s: Value = client()
        .post(format!("{}/api/sessions", server.url))
        .bearer_auth(key)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = s["id"].as_str().unwrap().to_owned();
    let resp = client()
        .post(format!("{}/api/sessions/{sid}/messages", server.url))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut events = Box::pin(resp.bytes_stream().eventsource().map(|ev| {
        let ev = ev.unwrap();
        json!({"event": ev.event, "data": serde_json::from_str::<Value>(&ev.data).unwrap()})
    }));
    let mut tokens = 0;
    while tokens < STREAMED {
        let v = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(v["event"], "error", "{v}");
        if v["event"] == "token" {
            tokens += 1;
        }
    }
    (sid, events)
}

#[tokio::test]
async fn a_cancelled_session_generation_is_charged_every_token_it_streamed() {
    crate::require!(Redis);
    use futures::StreamExt;
    let mock = mock(MockConfig {
        tokens: STREAMED as usize * 2,
        fault: Some(sluice_mock::Fault::StallMid),
        ..Default::default()
    })
    .await;
    let (server, prefix, key, key_id) = metered_server(&mock).await;
    let (sid, mut events) = session_after_tokens(&server, &key).await;
    let r = client()
        .post(format!("{}/api/sessions/{sid}/cancel", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let done = tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done["data"]["finish_reason"], "cancelled", "{done}");
    assert_counted(&prefix.0, &key_id, STREAMED).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_session_generation_cut_by_an_upstream_error_is_charged_every_token_it_streamed() {
    crate::require!(Redis);
    use futures::StreamExt;
    let mock = mock(MockConfig {
        tokens: STREAMED as usize * 2,
        fault: Some(sluice_mock::Fault::ErrorChunk),
        ..Default::default()
    })
    .await;
    let (server, prefix, key, key_id) = metered_server(&mock).await;
    let (_, mut events) = session_after_tokens(&server, &key).await;
    let end = tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end["event"], "error", "{end}");
    assert_counted(&prefix.0, &key_id, STREAMED).await;
    server.shutdown().await;
}
