//! The real binary: what it prints at start, configuration errors before binding, and
//! SIGTERM draining.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice_mock::{MockConfig, full_reply};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Proc {
    child: Child,
    url: String,
    /// What it printed up to its "listening" line, that line included.
    early: Vec<String>,
    lines: tokio::sync::mpsc::Receiver<String>,
}

/// Starts `sluice` on an ephemeral port and waits for its "listening" line.
async fn start(envs: &[(&str, String)]) -> Proc {
    start_in(&tempfile::tempdir().unwrap().keep(), envs).await
}

/// Same, in `dir` (where the embedded store lives).
async fn start_in(dir: &std::path::Path, envs: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE_ADDR", "127.0.0.1:0")
        .env("SLUICE_LOG", "info")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let mut r = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = r.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut early = Vec::new();
    let url = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            early.push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                // Text or JSON log line: the URL ends at the first character a URL lacks here.
                return rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || ":/.".contains(*c))
                    .collect::<String>();
            }
        }
        panic!("sluice exited before listening");
    })
    .await
    .expect("sluice did not start");
    Proc {
        child,
        url,
        early,
        lines,
    }
}

impl Proc {
    async fn next_line(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.recv())
            .await
            .expect("no next line")
            .expect("output ended")
    }

    async fn wait_line(&mut self, needle: &str) {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return;
                }
            }
            panic!("output ended before '{needle}'");
        })
        .await
        .unwrap_or_else(|_| panic!("no '{needle}' line"))
    }

    fn sigterm(&self) {
        let pid = self.child.id().unwrap().to_string();
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(st.success());
    }

    async fn exit_code(mut self) -> i32 {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("sluice did not exit")
            .unwrap()
            .code()
            .expect("exited by signal")
    }
}

#[tokio::test]
async fn sigterm_drains_a_running_stream_to_its_end_then_exits_zero() {
    let mock = mock(MockConfig::default()).await;
    let mut p = start(&[
        ("OPENAI_BASE_URL", mock.url()),
        ("SLUICE_DRAIN_SECS", "30".into()),
    ])
    .await;
    let url = format!("{}/v1/chat/completions", p.url);
    let resp = post(&url, &body(true, json!({"tokens": 12, "token_ms": 100}))).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(read_stream(resp));
    wait_stats(&mock, WAIT, |s| s.active_streams == 1).await;

    p.sigterm();
    p.wait_line("draining").await;
    // New connections are refused while the running stream finishes.
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            match client().get(format!("{}/health", p.url)).send().await {
                Err(e) if e.is_connect() => return,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert!(refused.is_ok(), "listener still accepting after SIGTERM");

    let r = reader.await.unwrap();
    assert!(r.done, "the stream was cut: {r:?}");
    assert_eq!(r.text, full_reply(12));
    assert_eq!(p.exit_code().await, 0);
}

#[tokio::test]
async fn streams_past_the_drain_window_end_with_an_error_event() {
    let mock = mock(MockConfig::default()).await;
    let p = start(&[
        ("OPENAI_BASE_URL", mock.url()),
        ("SLUICE_DRAIN_SECS", "1".into()),
    ])
    .await;
    let url = format!("{}/v1/chat/completions", p.url);
    let resp = post(
        &url,
        &body(true, json!({"fault": "endless", "token_ms": 20})),
    )
    .await;
    let reader = tokio::spawn(read_stream(resp));
    wait_stats(&mock, WAIT, |s| s.active_streams == 1).await;
    p.sigterm();
    let r = reader.await.unwrap();
    assert!(!r.done);
    assert_eq!(r.error.unwrap()["code"], "server_shutting_down");
    assert!(!r.text.is_empty());
    assert_eq!(p.exit_code().await, 0);
    wait_stats(&mock, Duration::from_secs(2), |s| s.active_streams == 0).await;
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from a kept-alive connection.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("no response")
            .unwrap_or(0);
        if n == 0 {
            return text;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// An idle keep-alive connection is closed at SIGTERM, as the README says, so a client
/// (or a proxy) sends its next request elsewhere instead of into a draining instance; a
/// running stream on another connection goes on to its end.
#[tokio::test]
async fn a_keep_alive_connection_opened_before_sigterm_is_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = mock(MockConfig::default()).await;
    let p = start(&[
        ("OPENAI_BASE_URL", mock.url()),
        ("SLUICE_DRAIN_SECS", "30".into()),
    ])
    .await;
    let addr = p.url.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"));
    // A stream keeps the drain going meanwhile.
    let resp = post(
        &format!("{}/v1/chat/completions", p.url),
        &body(true, json!({"tokens": 30, "token_ms": 100})),
    )
    .await;
    let reader = tokio::spawn(read_stream(resp));
    wait_stats(&mock, WAIT, |s| s.active_streams == 1).await;

    p.sigterm();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("the idle connection stayed open")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(!reader.is_finished(), "closed only when the drain ended");

    assert!(reader.await.unwrap().done);
    assert_eq!(p.exit_code().await, 0);
}

/// The events a WebSocket received up to the server's Close, and that Close.
async fn ws_until_close(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (Vec<Value>, u16, String) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut events = Vec::new();
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no Close frame within the wait");
        match msg {
            Some(Ok(Message::Text(t))) => events.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(Some(f)))) => {
                // Read on, as a client does: that sends the answer to the server's Close.
                while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
                return (events, f.code.into(), f.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => panic!("a Close frame without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the socket failed before a Close frame: {e} ({events:?})"),
            None => panic!("the socket ended without a Close frame ({events:?})"),
        }
    }
}

/// Whatever ends the drain, an open WebSocket gets a Close with 1001 and a reason: with
/// nothing running (the drain ends at once), after the reply it follows finished within the
/// drain window, and when the drain window ran out under a reply.
#[tokio::test]
async fn an_open_websocket_is_closed_with_1001_on_every_shutdown_path() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    struct Case {
        name: &'static str,
        /// Tokens of the reply the socket follows; 0: no reply.
        tokens: usize,
        drain_secs: u64,
        /// The last event the socket received before the Close.
        last_event: Option<&'static str>,
    }
    for case in [
        Case {
            name: "nothing running",
            tokens: 0,
            drain_secs: 30,
            last_event: None,
        },
        Case {
            name: "reply finished within the drain",
            tokens: 15,
            drain_secs: 30,
            last_event: Some("done"),
        },
        Case {
            name: "drain window over",
            tokens: 5_000,
            drain_secs: 1,
            last_event: Some("interrupted"),
        },
    ] {
        let mock = mock(MockConfig {
            tokens: case.tokens.max(1),
            token_delay: Duration::from_millis(50),
            ..Default::default()
        })
        .await;
        let mut p = start(&[
            ("OPENAI_BASE_URL", mock.url()),
            ("SLUICE_DEFAULT_MODEL", "mock-model".into()),
            ("SLUICE_DRAIN_SECS", case.drain_secs.to_string()),
        ])
        .await;
        let ws_url = format!("{}/ws", p.url.replace("http://", "ws://"));
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        if case.tokens > 0 {
            let s: Value = client()
                .post(format!("{}/api/sessions", p.url))
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let chat = json!({"op": "chat", "session_id": s["id"], "content": "go on"});
            ws.send(Message::Text(chat.to_string().into()))
                .await
                .unwrap();
            wait_stats(&mock, WAIT, |s| s.active_streams == 1).await;
        } else {
            ws.send(Message::Text(r#"{"op":"ping"}"#.into()))
                .await
                .unwrap();
        }
        p.sigterm();
        p.wait_line("draining").await;
        let (events, code, reason) = ws_until_close(&mut ws).await;
        assert_eq!(code, 1001, "{}: {reason}", case.name);
        assert!(!reason.is_empty(), "{}: no reason", case.name);
        if let Some(last) = case.last_event {
            let kinds: Vec<_> = events.iter().filter_map(|e| e["event"].as_str()).collect();
            assert_eq!(kinds.last(), Some(&last), "{}: {kinds:?}", case.name);
        }
        assert_eq!(p.exit_code().await, 0, "{}", case.name);
    }
}

#[tokio::test]
async fn the_first_lines_say_where_to_chat_whether_keys_are_needed_and_which_model_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start_in(dir.path(), &[]).await;
    let mut lines = p.early.clone();
    for _ in 0..3 {
        lines.push(p.next_line().await);
    }
    let text = lines.join("\n");
    let base = &p.url;
    assert!(
        text.contains(&format!(
            "chat UI at {base}/ · OpenAI-compatible API at {base}/v1"
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "API keys not required (loopback address): requests without a key, or with an SDK's placeholder key, act as the local user"
        ),
        "{text}"
    );
    assert!(text.contains("sluice keys create --name NAME"), "{text}");
    assert!(text.contains("providers: demo"), "{text}");
    assert!(text.contains("default model: demo"), "{text}");
    // Library chatter stays below INFO; the store it migrated is still named.
    for line in &lines {
        let info = line.contains(" INFO ");
        assert!(!(info && line.contains("refinery")), "{line}");
        assert!(!(info && line.contains("open file")), "{line}");
    }
    assert!(text.contains("sqlite store migrated"), "{text}");
}

#[tokio::test]
async fn a_port_in_use_is_refused_with_a_clear_message_before_any_data_is_created() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env_clear()
            .env("SLUICE_ADDR", &addr)
            .current_dir(dir.path())
            .output(),
    )
    .await
    .expect("sluice did not exit")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr} (SLUICE_ADDR / PORT)")),
        "{err}"
    );
    assert!(err.contains("PORT=8081"), "no way out suggested: {err}");
    let created: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(created.is_empty(), "created {created:?}");
}

#[tokio::test]
async fn invalid_configuration_is_refused_before_binding_with_the_setting_named() {
    for (var, value) in [
        ("SLUICE_ADDR", "not-an-address"),
        ("SLUICE_DRAIN_SECS", "soon"),
        ("OPENAI_BASE_URL", "ftp://example"),
        ("SLUICE_CONFIG", "/nonexistent/sluice.toml"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env_clear()
            .env(var, value)
            .current_dir(tempfile::tempdir().unwrap().keep())
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{var}={value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{var}: message does not name it: {err}");
    }
}

#[tokio::test]
async fn json_logs_carry_request_ids_and_never_secrets() {
    let mock = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap().keep();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_clear()
        .args(["keys", "create", "--name", "logger"])
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("sk-"), "{key}");
    let mut p = start_in(
        &dir,
        &[
            ("OPENAI_BASE_URL", mock.url()),
            ("OPENAI_API_KEY", "sk-upstream-secret-4242".into()),
            ("SLUICE_LOG_FORMAT", "json".into()),
            ("RUST_LOG", "trace".into()),
        ],
    )
    .await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", p.url))
        .bearer_auth(&key)
        .header("x-request-id", "req-test-1")
        .json(&body(true, json!({"tokens": 3})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-test-1");
    assert!(read_stream(resp).await.done);
    assert!(
        mock.stats().last_request.is_some(),
        "the request went upstream"
    );
    p.sigterm();
    let mut lines = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(WAIT, p.lines.recv()).await {
        lines.push(line);
    }
    assert_eq!(p.exit_code().await, 0);
    let mut saw_request_id = false;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        saw_request_id |= line.contains("req-test-1") && v.is_object();
        assert!(
            !line.contains("sk-client-secret-1717"),
            "client key logged: {line}"
        );
        assert!(
            !line.contains("sk-upstream-secret-4242"),
            "upstream key logged: {line}"
        );
        assert!(
            !line.to_ascii_lowercase().contains("bearer"),
            "authorization logged: {line}"
        );
    }
    assert!(saw_request_id, "no log line carries the request id");
}

/// Polls the session's last reply until `pred` holds.
async fn wait_reply(url: &str, session: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = get_json(&format!("{url}/api/sessions/{session}/messages")).await;
        let last = v["data"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "assistant").cloned())
            .unwrap_or(Value::Null);
        if pred(&last) {
            return last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reply never matched: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_crash_loses_at_most_the_last_seconds_of_a_reply() {
    let mock = mock(MockConfig {
        tokens: 2000,
        token_delay: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("OPENAI_BASE_URL", mock.url()),
        ("SLUICE_DEFAULT_MODEL", "mock-model".to_owned()),
    ];
    let mut p = start_in(dir.path(), &envs).await;
    let s: Value = client()
        .post(format!("{}/api/sessions", p.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s = s["id"].as_str().unwrap().to_owned();
    let r = client()
        .post(format!("{}/api/sessions/{s}/messages", p.url))
        .json(&json!({"content": "go on"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Saved while it streams, not only at the end.
    let saved = wait_reply(&p.url, &s, |m| {
        m["status"] == "streaming" && !m["content"].as_str().unwrap_or("").is_empty()
    })
    .await;
    let saved = saved["content"].as_str().unwrap().to_owned();

    p.child.kill().await.unwrap();
    let p = start_in(dir.path(), &envs).await;
    let m = wait_reply(&p.url, &s, |m| m["status"] == "interrupted").await;
    let kept = m["content"].as_str().unwrap();
    assert!(kept.len() >= saved.len(), "{kept:?}");
    assert!(full_reply(2000).starts_with(kept));
}
