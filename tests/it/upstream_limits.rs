//! What a hostile or broken upstream can make sluice hold: a line or event over
//! `SLUICE_UPSTREAM_MAX_EVENT_BYTES` fails the stream as `upstream_malformed`, and sluice
//! stops reading it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const CAP: usize = 64 * 1024;

/// An OpenAI-compatible upstream (HTTP/1.1 written by hand) that answers every request with
/// `first`, then one line that never ends. For each connection it reports how many bytes
/// it wrote before the connection was closed under it.
async fn endless_line_upstream(first: &'static str) -> (String, mpsc::UnboundedReceiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // The request head and its body, announced by Content-Length.
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let body_end = loop {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&req[..i]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        break i + 4 + len;
                    }
                };
                while req.len() < body_end {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "request body cut short");
                    req.extend_from_slice(&buf[..n]);
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                let mut written = 0;
                let mut out = format!("{head}{first}data: ").into_bytes();
                let line = vec![b'x'; 16 * 1024];
                while sock.write_all(&out).await.is_ok() {
                    written += out.len();
                    out.clone_from(&line);
                }
                let _ = tx.send(written);
            });
        }
    });
    (format!("http://{addr}/v1"), rx)
}

/// The upstream as a provider with a model list, so that its own list is never asked for.
fn raw_provider(url: &str) -> sluice::config::ProviderConfig {
    let mut p = sluice::config::ProviderConfig::openai("raw", url, None);
    p.models = vec!["mock-model".into()];
    p
}

#[tokio::test]
async fn a_line_over_the_limit_fails_the_stream_and_closes_the_upstream() {
    let token = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    let (url, mut closed) = endless_line_upstream(token).await;
    let mut cfg = base_config();
    cfg.upstream.providers = vec![raw_provider(&url)];
    cfg.upstream.max_event_bytes = CAP;
    // Far beyond the test's wait: only the limit can end these streams in time.
    cfg.upstream.timeouts.first_token = Duration::from_secs(60);
    cfg.upstream.timeouts.idle = Duration::from_secs(60);
    let server = TestServer::start(cfg).await;

    // Streamed: the token, then the existing in-band error for a malformed upstream.
    let r = read_stream(post(&server.chat_url(), &body(true, json!({}))).await).await;
    assert_eq!(r.text, "hi");
    assert!(!r.done);
    assert_eq!(r.error.unwrap()["code"], "upstream_malformed");
    // sluice stopped reading and closed the connection: the upstream's writes fail, a
    // bounded way past the limit (what the sockets and the HTTP client buffer).
    let written = tokio::time::timeout(WAIT, closed.recv())
        .await
        .expect("the upstream connection stays open")
        .unwrap();
    assert!(written < CAP + (32 << 20), "{written} bytes read");

    server.shutdown().await;
}

#[tokio::test]
async fn an_endless_first_line_is_a_502_and_is_counted() {
    let (url, mut closed) = endless_line_upstream("").await;
    let mut cfg = base_config();
    cfg.upstream.providers = vec![raw_provider(&url)];
    cfg.upstream.max_event_bytes = CAP;
    cfg.upstream.timeouts.first_token = Duration::from_secs(60);
    let server = TestServer::start(cfg).await;
    let series = "sluice_upstream_oversized_events_total{provider=\"raw\"}";
    let count = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .map(|v| v.trim().to_owned())
    };
    let before = metrics_text(&server.url).await;
    assert_eq!(count(&before).as_deref(), Some("0"), "{before}");

    let resp = tokio::time::timeout(WAIT, post(&server.chat_url(), &body(false, json!({}))))
        .await
        .expect("answered before the timeouts");
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_malformed", "{v}");
    tokio::time::timeout(WAIT, closed.recv())
        .await
        .expect("the upstream connection stays open");

    let after = metrics_text(&server.url).await;
    assert_eq!(count(&after).as_deref(), Some("1"), "{after}");
    server.shutdown().await;
}
