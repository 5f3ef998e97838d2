//! What a request writes to the log, captured by a subscriber scoped to the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

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
    /// A subscriber of this test's own, in force while the guard lives. The test runs on a
    /// current-thread runtime, so the server's tasks, on that thread too, write to it, and
    /// tests running beside it in the same process do not.
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let lines = Lines {
            text: Arc::default(),
            count: tokio::sync::watch::channel(0).0,
        };
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_env_filter("info")
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // Callsites first reached by other tests' threads while no subscriber wanted them
        // may still hold that answer; ask again now that this one does.
        tracing::callsite::rebuild_interest_cache();
        (lines, guard)
    }

    fn parsed(&self) -> Vec<Value> {
        let text = self.text.lock().unwrap().clone();
        String::from_utf8(text)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The lines `pick` keeps, once there is one.
    async fn wait_for(&self, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|_| self.parsed().iter().any(&pick)))
            .await
            .expect("the line within the wait")
            .unwrap();
        self.parsed().into_iter().filter(|l| pick(l)).collect()
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
        if tokio::time::timeout(WAIT, rx.wait_for(|_| done(&of(self.parsed()))))
            .await
            .is_err()
        {
            panic!(
                "the lines of request {id} within the wait; all lines: {:#?}",
                self.parsed()
            );
        }
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
    let (lines, _log) = Lines::capture();
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

/// The binary at `SLUICE_LOG=trace`, on PostgreSQL and Redis, with every line it writes to
/// stdout and stderr.
struct Traced {
    child: tokio::process::Child,
    url: String,
    out: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traced {
    async fn start(envs: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncReadExt;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.env_clear()
            .env("SLUICE_ADDR", "127.0.0.1:0")
            .env("SLUICE_LOG", "trace")
            .current_dir(tempfile::tempdir().unwrap().keep())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        // Both pipes are read all along: a full pipe would stall the server.
        let mut readers = Vec::new();
        let pipes: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for mut pipe in pipes {
            let out = out.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }));
        }
        let deadline = std::time::Instant::now() + WAIT;
        let url = loop {
            let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
            if let Some(rest) = text.split("listening on ").nth(1) {
                break rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || ":/.".contains(*c))
                    .collect::<String>();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not listening: {text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        Self {
            child,
            url,
            out,
            readers,
        }
    }

    /// Stops the server and hands back everything it wrote.
    async fn finish(mut self) -> String {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        for r in self.readers {
            r.await.unwrap();
        }
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }
}

/// Polls a session until its last reply is complete.
async fn wait_complete(url: &str, key: &str, session: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v: Value = client()
            .get(format!("{url}/api/sessions/{session}/messages"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done = v["data"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| m["role"] == "assistant" && m["status"] == "complete")
        });
        if done {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no reply: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What the traced server wrote while a prompt went through `/v1`, a session and a
/// WebSocket, and the secrets it was given: (log, prompt marker, API key, upstream key).
async fn traced_run(wire: bool) -> (String, String, String, String) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mock = mock(sluice_mock::MockConfig::default()).await;
    let db = common::db::fresh(common::db::Backend::Postgres).await;
    let database_url = db.database_url().unwrap().to_owned();
    let prefix = format!("sluice-test-{}", sluice::store::new_id());
    let marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
    let upstream_key = format!("sk-upstream-{}", uuid::Uuid::new_v4().simple());
    let mock_url = mock.url();
    let redis_url = common::need::redis_url();
    let envs = [
        ("DATABASE_URL", database_url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("SLUICE_REDIS_PREFIX", prefix.as_str()),
        ("OPENAI_BASE_URL", mock_url.as_str()),
        ("OPENAI_API_KEY", upstream_key.as_str()),
        ("SLUICE_DEFAULT_MODEL", "mock-model"),
        ("SLUICE_LOG_WIRE", if wire { "1" } else { "0" }),
    ];
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env_clear()
        .env("DATABASE_URL", &database_url)
        .args(["keys", "create", "--name", "traced"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let p = Traced::start(&envs).await;

    // /v1, streamed.
    let mut req = body(true, json!({"tokens": 3}));
    req["messages"][0]["content"] = json!(format!("say {marker}"));
    let resp = client()
        .post(format!("{}/v1/chat/completions", p.url))
        .bearer_auth(&key)
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(read_stream(resp).await.done);

    // A session message.
    let s = create_session(&p.url, Some(&key)).await;
    let r = client()
        .post(format!("{}/api/sessions/{s}/messages", p.url))
        .bearer_auth(&key)
        .json(&json!({"content": format!("session {marker}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_complete(&p.url, &key, &s).await;

    // A WebSocket chat, followed to its end.
    let s = create_session(&p.url, Some(&key)).await;
    let mut ws_req = format!("{}/ws", p.url.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    ws_req
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_req).await.unwrap();
    let chat = json!({"op": "chat", "session_id": s, "content": format!("ws {marker}")});
    ws.send(Message::Text(chat.to_string().into()))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if serde_json::from_str::<Value>(t.as_str()).unwrap()["event"] == "done" {
                    return;
                }
            }
        }
        panic!("the socket ended before done");
    })
    .await
    .unwrap();
    ws.close(None).await.unwrap();

    (p.finish().await, marker, key, upstream_key)
}

/// At `SLUICE_LOG=trace` the HTTP, WebSocket, PostgreSQL and Redis libraries would write
/// frames, bodies and statements: no prompt and no key may reach the log through them.
#[tokio::test]
async fn at_trace_level_no_prompt_or_key_reaches_the_log() {
    crate::require!(Postgres, Redis);
    let (log, marker, key, upstream_key) = traced_run(false).await;
    assert!(log.contains(" DEBUG "), "not a debug-level log");
    for (what, secret) in [
        ("prompt", marker.as_str()),
        ("API key", key.as_str()),
        ("upstream key", upstream_key.as_str()),
    ] {
        if let Some(at) = log.find(secret) {
            let from = log[..at].rfind('\n').map_or(0, |i| i + 1);
            let to = log[at..].find('\n').map_or(log.len(), |i| at + i);
            panic!("{what} logged: {}", &log[from..to]);
        }
    }
}

/// `SLUICE_LOG_WIRE=1` is the one way to see what passes through those libraries.
#[tokio::test]
async fn log_wire_lets_the_libraries_log_what_passes_through() {
    crate::require!(Postgres, Redis);
    let (log, marker, _, _) = traced_run(true).await;
    assert!(
        log.contains(&marker),
        "SLUICE_LOG_WIRE=1 showed no statement"
    );
}

/// A call no provider took (its one slot busy past the queue wait) writes its line like any
/// other: on `/v1` with the request's id, in a session with the session and generation, in a
/// task with the task.
#[tokio::test]
async fn a_call_refused_as_upstream_busy_logs_its_line() {
    let (lines, _log) = Lines::capture();
    let m = mock(sluice_mock::MockConfig::default()).await;
    let mut config = config_for(&m);
    config.upstream.provider_concurrency = 1;
    config.upstream.provider_queue = std::time::Duration::from_millis(50);
    let server = TestServer::start(config).await;

    // The one slot, held by a long stream.
    let long = post(
        &server.chat_url(),
        &body(true, json!({"tokens": 100_000, "token_ms": 20})),
    )
    .await;
    assert_eq!(long.status(), 200);
    let mut held = long.bytes_stream();
    let _ = futures::StreamExt::next(&mut held).await;

    let busy = |l: &Value| l["message"] == "upstream call" && l["code"] == "upstream_busy";
    let resp = post(&server.chat_url(), &body(false, json!({"tokens": 3}))).await;
    assert!(!resp.status().is_success(), "{}", resp.status());
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let got = lines.of_request(&id, |l| l.iter().any(&busy)).await;
    let call = got.iter().find(|l| busy(l)).unwrap();
    assert_eq!(call["outcome"], "failed", "{call}");
    assert_eq!(call["provider"], "mock", "{call}");
    assert_eq!(call["model"], "mock-model", "{call}");
    assert_eq!(call["level"], "WARN", "{call}");

    let s: Value = post(&format!("{}/api/sessions", server.url), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let s = s["id"].as_str().unwrap();
    let r = post(
        &format!("{}/api/sessions/{s}/messages", server.url),
        &json!({"content": "hello"}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let g = r.json::<Value>().await.unwrap()["generation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = lines
        .wait_for(|l| busy(l) && l["span"]["generation_id"] == g.as_str())
        .await;
    assert_eq!(got.len(), 1, "one line per failed generation: {got:#?}");
    assert_eq!(got[0]["span"]["session_id"], s, "{:#}", got[0]);
    assert_eq!(got[0]["provider"], "mock", "{:#}", got[0]);

    // A prompt job: its line names the task.
    let r = post(
        &format!("{}/api/tasks?sync=false", server.url),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let t = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = lines
        .wait_for(|l| busy(l) && l["span"]["task_id"] == t.as_str())
        .await;
    assert_eq!(got.len(), 1, "one line per failed task run: {got:#?}");
    drop(held);
    server.shutdown().await;
}
