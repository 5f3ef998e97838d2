//! Request bodies that never arrive, or arrive a byte at a time, do not hold a connection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;
use sluice_mock::{MockConfig, full_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY_TIMEOUT: Duration = Duration::from_millis(400);

async fn server() -> (sluice_mock::MockServer, TestServer) {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.guards.body_timeout = BODY_TIMEOUT;
    let server = TestServer::start(cfg).await;
    (mock, server)
}

fn head(len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\n\r\n"
    )
}

/// Reads until the server closes the connection or `WAIT` passes.
async fn read_all(s: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the server never answered or closed")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn timeouts_counted(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("sluice_body_timeouts_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_head_then_silence_gets_408_within_the_body_timeout() {
    let (_mock, server) = server().await;
    let addr = server.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    s.write_all(head(100).as_bytes()).await.unwrap();
    let resp = read_all(&mut s).await;
    let took = started.elapsed();
    assert!(resp.starts_with("HTTP/1.1 408"), "got {resp:?}");
    assert!(resp.contains("\"code\":\"request_timeout\""), "{resp}");
    assert!(took >= BODY_TIMEOUT - Duration::from_millis(50), "{took:?}");
    assert!(took < BODY_TIMEOUT * 5, "{took:?}");
    assert_eq!(timeouts_counted(&metrics_text(&server.url).await), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_a_normal_large_body_still_works() {
    let (_mock, server) = server().await;
    let addr = server.url.trim_start_matches("http://").to_owned();
    let bytes = serde_json::to_vec(&body(false, json!({"tokens": 2}))).unwrap();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(head(bytes.len()).as_bytes()).await.unwrap();
    // One byte every 50 ms: each arrives well within any per-read timeout, the whole never
    // within the body timeout.
    let started = Instant::now();
    let trickle = async {
        for b in &bytes {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut peek = [0u8; 1];
            // Stops as soon as the server answers.
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(50), s.peek(&mut peek)).await
            {
                if n > 0 {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, trickle).await.unwrap();
    let resp = read_all(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "got {resp:?}");
    assert!(started.elapsed() < BODY_TIMEOUT * 5);

    // A large body sent at once: well within the timeout.
    let mut big = body(false, json!({"tokens": 2}));
    big["messages"][0]["content"] = json!("x".repeat(900_000));
    let r = client()
        .post(server.chat_url())
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], full_reply(2));
    assert_eq!(timeouts_counted(&metrics_text(&server.url).await), 1);
    server.shutdown().await;
}

/// The same over HTTP/2 (h2c): a stream whose body never ends gets its 408.
#[tokio::test]
async fn an_http2_body_that_never_ends_gets_408() {
    let (_mock, server) = server().await;
    sluice::upstream::sse::install_crypto_provider();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // One chunk, then nothing, forever.
    let chunks = futures::stream::once(async { Ok::<_, std::io::Error>("{\"model\":") })
        .chain(futures::stream::pending());
    let started = Instant::now();
    let r = tokio::time::timeout(
        WAIT,
        h2.post(server.chat_url())
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(chunks))
            .send(),
    )
    .await
    .expect("no answer")
    .unwrap();
    assert_eq!(r.status(), 408);
    assert!(started.elapsed() < BODY_TIMEOUT * 5);
    server.shutdown().await;
}
