//! Concurrency limits, per-provider limits, circuit breakers and single-flight.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_mock::{MockConfig, full_reply};

#[tokio::test]
async fn the_stream_past_the_limit_gets_503() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.guards.max_streams_per_key = 2;
    cfg.guards.max_streams = 3;
    let server = TestServer::start(cfg).await;
    let endless = body(true, json!({"fault": "endless", "token_ms": 20}));
    let mut open = Vec::new();
    for _ in 0..2 {
        let r = post(&server.chat_url(), &endless).await;
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream().eventsource();
        s.next().await.unwrap().unwrap();
        open.push(s);
    }
    // The local user is one key: its third stream is refused, at once, with a reason.
    let r = post(&server.chat_url(), &endless).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_streams");
    // A session generation counts too.
    let s: Value = client()
        .post(format!("{}/api/sessions", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = client()
        .post(format!(
            "{}/api/sessions/{}/messages",
            server.url,
            s["id"].as_str().unwrap()
        ))
        .json(&json!({"content": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // Ending one stream frees its place.
    drop(open.pop());
    wait_stats(&mock, WAIT, |s| s.active_streams == 1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = post(&server.chat_url(), &body(true, json!({"tokens": 2}))).await;
        if r.status() == 200 {
            assert!(read_stream(r).await.done);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "place never freed");
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn provider_concurrency_never_exceeds_its_limit() {
    let mock = mock(MockConfig {
        tokens: 5,
        token_delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let mut cfg = config_for(&mock);
    cfg.upstream.provider_concurrency = 3;
    let server = TestServer::start(cfg).await;
    let runs = (0..12).map(|_| {
        let url = server.chat_url();
        async move {
            read_stream(post(&url, &body(true, json!({"tokens": 5, "token_ms": 20}))).await).await
        }
    });
    for r in futures::future::join_all(runs).await {
        assert!(r.done);
        assert_eq!(r.text, full_reply(5));
    }
    let s = mock.stats();
    assert_eq!(s.completed_streams, 12);
    assert!(
        s.max_active_streams <= 3,
        "{} at once",
        s.max_active_streams
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_default_provider_limit_lets_a_thousand_streams_through_at_once() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    // The shipped default, not the wide limit the other tests start from.
    cfg.upstream.provider_concurrency =
        sluice::config::UpstreamConfig::default().provider_concurrency;
    // A stream that had to queue for a slot would give up at once and get 503.
    cfg.upstream.provider_queue = Duration::from_millis(1);
    // Slow first tokens on a loaded machine are not what this test is about: only a 503
    // from a full limit is.
    cfg.upstream.timeouts.first_token = Duration::from_secs(60);
    // Nor a gap between tokens while a loaded machine stalls this process: an idle
    // timeout would end streams already open before the count below.
    cfg.upstream.timeouts.idle = Duration::from_secs(60);
    // Nor is the circuit: a few connects to the mock that a loaded machine drops must not
    // turn the rest away as `circuit_open`.
    cfg.upstream.breaker_failures = u32::MAX;
    let server = TestServer::start(cfg).await;
    let slow_endless = body(true, json!({"fault": "endless", "token_ms": 1000}));
    let opens = (0..1_000).map(|_| async {
        let r = post(&server.chat_url(), &slow_endless).await;
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream().eventsource();
        let first = s.next().await.unwrap().unwrap();
        // A chunk of the mock's reply, not an error event standing in for one.
        assert!(
            first.data.contains("chat.completion.chunk"),
            "{}",
            first.data
        );
        s
    });
    // At most 200 connects in flight: the point is a thousand open streams, not a thousand
    // simultaneous handshakes, which overflow a busy machine's SYN queue.
    let open: Vec<_> = futures::stream::iter(opens)
        .buffer_unordered(200)
        .collect()
        .await;
    assert_eq!(mock.stats().active_streams, 1_000);
    drop(open);
    server.shutdown().await;
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_closes_after_recovery() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.upstream.retry.max_attempts = 1;
    cfg.upstream.breaker_failures = 5;
    cfg.upstream.breaker_open = Duration::from_millis(400);
    cfg.upstream.breaker_successes = 3;
    let server = TestServer::start(cfg).await;
    for _ in 0..5 {
        let r = post(&server.chat_url(), &body(false, json!({"fault": "500"}))).await;
        assert_eq!(r.status(), 502);
    }
    assert_eq!(mock.stats().chat_requests, 5);
    let ready: Value = client()
        .get(format!("{}/health/ready", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["providers"][0]["circuit"], "open", "{ready}");
    // Open: fails fast without asking the upstream.
    let r = post(&server.chat_url(), &body(false, json!({"tokens": 2}))).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "circuit_open"
    );
    assert_eq!(mock.stats().chat_requests, 5);
    // After the open period, trial requests go through and close it again.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut ok = 0;
    while ok < 3 {
        let r = post(&server.chat_url(), &body(false, json!({"tokens": 2}))).await;
        if r.status() == 200 {
            ok += 1;
        } else {
            assert_eq!(r.status(), 503);
            assert!(tokio::time::Instant::now() < deadline, "never half-opened");
            tokio::task::yield_now().await;
        }
    }
    let ready: Value = client()
        .get(format!("{}/health/ready", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["providers"][0]["circuit"], "closed", "{ready}");
    let text = metrics_text(&server.url).await;
    assert!(
        text.contains("sluice_circuit_state{provider=\"mock\"} 0"),
        "{text}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_open_circuit_falls_back_to_the_next_provider() {
    let broken = mock(MockConfig {
        fault: Some(sluice_mock::Fault::ServerError),
        ..Default::default()
    })
    .await;
    let good = mock(MockConfig::default()).await;
    let mut cfg = fallback_config("m", ("broken", &broken, ""), ("good", &good, ""));
    cfg.upstream.retry.max_attempts = 1;
    cfg.upstream.breaker_failures = 2;
    let server = TestServer::start(cfg).await;
    let mut b = body(true, json!({"tokens": 2}));
    b["model"] = json!("m");
    for _ in 0..4 {
        assert!(read_stream(post(&server.chat_url(), &b).await).await.done);
    }
    assert_eq!(
        broken.stats().chat_requests,
        2,
        "skipped once its circuit opened"
    );
    assert_eq!(good.stats().chat_requests, 4);
    server.shutdown().await;
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_upstream_call() {
    let mock = mock(MockConfig {
        tokens: 12,
        token_delay: Duration::from_millis(40),
        ..Default::default()
    })
    .await;
    let mut cfg = config_for(&mock);
    cfg.guards.max_streams_per_key = 1_000;
    let server = TestServer::start(cfg).await;
    let mut req = body(true, json!({"tokens": 12, "token_ms": 40}));
    req["temperature"] = json!(0);
    let c = client();
    let runs = (0..200).map(|i| {
        let (c, url, mut req) = (c.clone(), server.chat_url(), req.clone());
        async move {
            if i % 2 == 1 {
                req["stream"] = json!(false);
                let v: Value = c
                    .post(&url)
                    .json(&req)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            } else {
                let r = read_stream(c.post(&url).json(&req).send().await.unwrap()).await;
                assert!(r.done, "{r:?}");
                r.text
            }
        }
    });
    let texts = futures::future::join_all(runs).await;
    assert!(texts.iter().all(|t| *t == full_reply(12)));
    assert_eq!(
        mock.stats().chat_requests,
        1,
        "one upstream call for all 200 clients"
    );
    server.shutdown().await;
}
