//! What a request writes to the log. Its own test binary: it installs the process's
//! global tracing subscriber, which captures every line the server writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{Value, json};

/// Log lines as they are written; `count` changes with every line, so a test waits on it.
#[derive(Clone)]
struct Lines {
    text: Arc<Mutex<Vec<u8>>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.lock().unwrap().extend_from_slice(buf);
        let lines = buf.iter().filter(|&&b| b == b'\n').count();
        self.count.send_modify(|n| *n += lines);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn install() -> Self {
        let lines = Lines {
            text: Arc::default(),
            count: tokio::sync::watch::channel(0).0,
        };
        let writer = lines.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_env_filter("info")
            .with_writer(move || writer.clone())
            .init();
        lines
    }

    fn parsed(&self) -> Vec<Value> {
        let text = self.text.lock().unwrap().clone();
        String::from_utf8(text)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The lines of one request, once `done` holds for them.
    async fn of_request(&self, id: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let of = |lines: Vec<Value>| -> Vec<Value> {
            lines
                .into_iter()
                .filter(|l| l["span"]["request_id"] == id)
                .collect()
        };
        let mut rx = self.count.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|_| done(&of(self.parsed()))))
            .await
            .expect("the request's lines within the wait")
            .unwrap();
        of(self.parsed())
    }
}

fn messages(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["message"].as_str().unwrap_or(""))
        .collect()
}

/// A relayed completion writes one line, at its end, with the request's id and route and
/// what the upstream call did; other requests keep their access line.
#[tokio::test]
async fn a_completion_logs_one_line_when_it_ends() {
    let lines = Lines::install();
    let (_mock, server) = mock_and_server().await;
    let has_call = |l: &[Value]| messages(l).contains(&"upstream call");

    for stream in [true, false] {
        let resp = post(&server.chat_url(), &body(stream, json!({"tokens": 3}))).await;
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let _ = resp.bytes().await.unwrap();
        let got = lines.of_request(&id, has_call).await;
        assert_eq!(
            messages(&got),
            ["upstream call"],
            "stream {stream}: {got:#?}"
        );
        let call = &got[0];
        assert_eq!(call["span"]["route"], "/v1/chat/completions");
        assert_eq!(call["tokens"], 3);
        assert_eq!(call["outcome"], "complete");
        assert!(call["duration_ms"].is_u64(), "{call}");
    }

    // A client that leaves mid-stream: the line is written when hyper drops the stream,
    // outside the request's span, and still names the request.
    let resp = post(
        &server.chat_url(),
        &body(true, json!({"tokens": 1000, "token_ms": 20})),
    )
    .await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut chunks = resp.bytes_stream();
    let _ = futures::StreamExt::next(&mut chunks).await;
    drop(chunks);
    let got = lines.of_request(&id, has_call).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["outcome"], "cancelled");

    // Anything else: the access line.
    let resp = client()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let got = lines
        .of_request(&id, |l| {
            messages(l).contains(&"finished processing request")
        })
        .await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["status"], 200);
    server.shutdown().await;
}
