//! The OpenAI-compatible API in front of the mock upstream: streaming, faults, retries,
//! timeouts, cancellation and request validation, as a client sees them and as the
//! upstream saw them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_mock::{MockConfig, full_reply};

#[tokio::test]
async fn tokens_arrive_one_by_one_before_upstream_finishes() {
    let (mock, server) = mock_and_server().await;
    let resp = post(
        &server.chat_url(),
        &body(true, json!({"tokens": 8, "token_ms": 150})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream().eventsource();
    let mut text = String::new();
    let mut contents = 0;
    while let Some(Ok(ev)) = tokio::time::timeout(WAIT, events.next()).await.unwrap() {
        if ev.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            if t.is_empty() {
                continue;
            }
            contents += 1;
            text.push_str(t);
            if contents == 1 {
                // The upstream is still generating: nothing was held back for it to finish.
                let s = mock.stats();
                assert_eq!(
                    s.completed_streams, 0,
                    "first token arrived after the upstream finished"
                );
                assert_eq!(s.active_streams, 1);
            }
        }
    }
    assert_eq!(contents, 8, "one chunk per upstream token");
    assert_eq!(text, full_reply(8));
    server.shutdown().await;
}

#[tokio::test]
async fn stream_headers_disable_buffering_and_compression() {
    let (_mock, server) = mock_and_server().await;
    let resp = client()
        .post(server.chat_url())
        .header("accept-encoding", "gzip, br")
        .json(&body(true, json!({"tokens": 2})))
        .send()
        .await
        .unwrap();
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(h.get("content-encoding").is_none());
    assert!(h.get("x-request-id").is_some());
    read_stream(resp).await;
    server.shutdown().await;
}

#[tokio::test]
async fn pings_while_waiting_for_the_first_token() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.server.ping_interval = Duration::from_millis(50);
    let server = TestServer::start(cfg).await;
    let resp = post(
        &server.chat_url(),
        &body(true, json!({"tokens": 2, "first_token_ms": 600})),
    )
    .await;
    let mut raw = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(WAIT, bytes.next()).await.unwrap() {
        raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    // Token chunks are the only ones whose delta starts with content (the first has a role).
    let first_token = raw.find(r#""delta":{"content":"#).expect("a token");
    let first_ping = raw.find(": ping\n\n").expect("a ping comment");
    assert!(
        first_ping < first_token,
        "ping came after the first token:\n{raw}"
    );
    assert!(raw.ends_with("data: [DONE]\n\n"));
    server.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let mock = mock(MockConfig {
        retry_after_secs: 1,
        ..Default::default()
    })
    .await;
    let server = TestServer::start(config_for(&mock)).await;
    let started = Instant::now();
    let resp = post(
        &server.chat_url(),
        &body(
            false,
            json!({"tokens": 2, "fault": "429", "fail_times": 1, "key": "ra"}),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // Backoff alone is 10 ms here; only Retry-After explains a wait of a second.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mock.stats().chat_requests, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn no_retry_after_the_first_token() {
    for fault in ["reset_mid", "error_chunk", "malformed", "stall_mid"] {
        let mock = mock(MockConfig::default()).await;
        let mut cfg = config_for(&mock);
        cfg.upstream.timeouts.idle = Duration::from_millis(300);
        let server = TestServer::start(cfg).await;
        let r = read_stream(
            post(
                &server.chat_url(),
                &body(true, json!({"tokens": 10, "fault": fault})),
            )
            .await,
        )
        .await;
        assert_eq!(
            r.text,
            full_reply(5),
            "{fault}: the tokens before the failure arrive"
        );
        assert!(!r.done, "{fault}: a failed stream must not end with [DONE]");
        let err = r
            .error
            .unwrap_or_else(|| panic!("{fault}: no in-band error"));
        let expected_code = match fault {
            "reset_mid" => "upstream_disconnected",
            "error_chunk" => "upstream_error",
            "malformed" => "upstream_malformed",
            _ => "idle_timeout",
        };
        assert_eq!(err["code"], expected_code, "{fault}: {err}");
        assert!(err["message"].is_string());
        if fault == "error_chunk" {
            assert!(
                err["message"]
                    .as_str()
                    .unwrap()
                    .contains("mock in-band error")
            );
        }
        assert_eq!(
            mock.stats().chat_requests,
            1,
            "{fault}: retried after the first token"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn first_token_timeout() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.upstream.timeouts.first_token = Duration::from_millis(300);
    let server = TestServer::start(cfg).await;

    let r = read_stream(
        post(
            &server.chat_url(),
            &body(true, json!({"fault": "stall_first"})),
        )
        .await,
    )
    .await;
    assert!(!r.done);
    assert_eq!(r.text, "");
    assert_eq!(r.error.unwrap()["code"], "first_token_timeout");

    let resp = post(
        &server.chat_url(),
        &body(false, json!({"fault": "stall_first"})),
    )
    .await;
    assert_eq!(resp.status(), 504);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "first_token_timeout");
    assert_eq!(v["error"]["type"], "timeout_error");
    server.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_closes_the_upstream_within_a_second() {
    let (mock, server) = mock_and_server().await;
    let resp = post(
        &server.chat_url(),
        &body(true, json!({"fault": "endless", "token_ms": 5})),
    )
    .await;
    let mut events = resp.bytes_stream().eventsource();
    for _ in 0..3 {
        events.next().await.unwrap().unwrap();
    }
    assert_eq!(mock.stats().active_streams, 1);
    drop(events);
    let s = wait_stats(&mock, Duration::from_secs(1), |s| s.active_streams == 0).await;
    assert_eq!(s.aborted_streams, 1);
    server.shutdown().await;
}

/// The most common failure: the provider answers the request, then sends nothing. Past
/// the first-token timeout the alias's next target answers, streamed or not.
#[tokio::test]
async fn a_target_that_stalls_before_its_first_token_falls_back_to_the_next() {
    let stalled = mock(MockConfig {
        fault: Some(sluice_mock::Fault::StallFirst),
        ..Default::default()
    })
    .await;
    let good = mock(MockConfig::default()).await;
    let mut cfg = fallback_config(
        "smart",
        ("stalled", &stalled, ":big"),
        ("good", &good, ":small"),
    );
    cfg.upstream.timeouts.first_token = Duration::from_millis(300);
    let server = TestServer::start(cfg).await;
    let mut b = body(true, json!({"tokens": 3}));
    b["model"] = json!("smart");
    let r = read_stream(post(&server.chat_url(), &b).await).await;
    assert!(r.done, "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.text, full_reply(3));
    assert_eq!(r.chunks[0]["model"], "small");

    b["stream"] = json!(false);
    let resp = post(&server.chat_url(), &b).await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], full_reply(3));
    assert_eq!(stalled.stats().chat_requests, 2);
    assert_eq!(good.stats().chat_requests, 2);
    server.shutdown().await;
}

/// An upstream that always answers `status` and counts what it got.
pub(crate) async fn fixed_status_upstream(
    status: u16,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    axum::Json(json!({"error": {"message": format!("upstream says {status}"), "type": "x"}})),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), hits)
}

#[tokio::test]
async fn total_time_limit_ends_a_never_ending_stream() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.upstream.timeouts.total = Duration::from_millis(400);
    let server = TestServer::start(cfg).await;
    let r = read_stream(
        post(
            &server.chat_url(),
            &body(true, json!({"fault": "endless", "token_ms": 10})),
        )
        .await,
    )
    .await;
    assert!(!r.done);
    assert!(!r.text.is_empty());
    assert_eq!(r.error.unwrap()["code"], "total_timeout");
    wait_stats(&mock, Duration::from_secs(1), |s| s.active_streams == 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn draining_refuses_new_generations_with_503() {
    let (_mock, server) = mock_and_server().await;
    // A keep-alive connection opened before the drain, as a client of a proxy would hold.
    let c = client();
    let ready = c
        .get(format!("{}/health/ready", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    server.state.lifecycle.start_drain();
    let resp = c
        .post(server.chat_url())
        .json(&body(true, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "draining");
    let ready = c
        .get(format!("{}/health/ready", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let live: Value = c
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(live["status"], "draining");
    server.shutdown().await;
}

#[tokio::test]
async fn http2_upstream_carries_many_streams_on_one_connection() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.upstream.providers[0].http2 = true;
    let server = TestServer::start(cfg).await;
    let runs = (0..20).map(|_| {
        let url = server.chat_url();
        async move {
            read_stream(post(&url, &body(true, json!({"tokens": 5, "token_ms": 20}))).await).await
        }
    });
    for r in futures::future::join_all(runs).await {
        assert!(r.done);
        assert_eq!(r.text, full_reply(5));
    }
    assert_eq!(
        mock.stats().total_connections,
        1,
        "h2c multiplexes every stream"
    );
    server.shutdown().await;
}
