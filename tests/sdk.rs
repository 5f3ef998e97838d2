//! The official Python SDKs as clients: each test starts the mock upstream and sluice, then
//! runs one pytest file of tests/sdk/ with the venv's Python, which talks to sluice (and to
//! the mock directly, to compare) as a user's code would. scripts/test.sh provisions the
//! venv (target/sdk-venv, pinned by tests/sdk/requirements.txt).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use common::*;
use sha2::{Digest, Sha256};
use sluice::config::{ProviderConfig, ProviderKind, Secret};
use sluice::mock::{MockConfig, MockServer};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A pytest file runs a handful of short requests; a hung one fails the test instead of
/// holding the suite.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(120);

/// The venv's interpreter, if scripts/test.sh built it from the current requirements.
fn venv_python() -> PathBuf {
    let venv = Path::new(ROOT).join("target/sdk-venv");
    let python = venv.join("bin/python");
    let requirements = std::fs::read(Path::new(ROOT).join("tests/sdk/requirements.txt"))
        .expect("tests/sdk/requirements.txt");
    let want = hex::encode(Sha256::digest(&requirements));
    let have = std::fs::read_to_string(venv.join("requirements.sha256")).unwrap_or_default();
    assert!(
        python.exists() && have.trim() == want,
        "the SDK tests need the Python venv {} built from tests/sdk/requirements.txt \
         (missing or out of date): run scripts/test.sh, or just its venv step with \
         `bash -c '. scripts/lib.sh && ensure_sdk_venv'`",
        venv.display()
    );
    python
}

/// Runs `tests/sdk/<file>` under pytest with `env`, failing with its output if it fails.
async fn pytest(file: &str, env: &[(&str, String)]) {
    let python = venv_python();
    let mut cmd = tokio::process::Command::new(python);
    cmd.args([
        "-m",
        "pytest",
        "-q",
        "-rA",
        "--tb=short",
        "-p",
        "no:cacheprovider",
        file,
    ])
    .current_dir(Path::new(ROOT).join("tests/sdk"))
    .env("PYTHONDONTWRITEBYTECODE", "1")
    // Every URL is on 127.0.0.1: a proxy set in the environment must not be asked.
    .env("NO_PROXY", "127.0.0.1,localhost")
    .env("no_proxy", "127.0.0.1,localhost")
    .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(PYTHON_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("pytest {file} ran over {PYTHON_TIMEOUT:?}"))
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pytest {file} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Echoed so `cargo test -- --nocapture` shows which Python tests ran.
    println!("{stdout}");
}

/// What every Python test is told: sluice's and the mock's OpenAI base URLs, a key of
/// sluice's (it checks any key a client sends), and the mock's root for its own endpoints
/// (stats, last request).
async fn urls(server: &TestServer, mock: &MockServer) -> Vec<(&'static str, String)> {
    vec![
        ("SLUICE_BASE_URL", format!("{}/v1", server.url)),
        ("SLUICE_API_KEY", new_key(server).await),
        ("MOCK_BASE_URL", mock.url()),
        ("MOCK_ROOT", format!("http://{}", mock.addr)),
    ]
}

async fn new_key(server: &TestServer) -> String {
    let key = sluice::store::cli::generate_key();
    let store = &server.state.store;
    let user = store.ensure_user("sdk").await.unwrap();
    store
        .create_api_key(
            &user.id,
            "sdk tests",
            &sluice::store::cli::hash_key(&key),
            &key[..12],
            false,
        )
        .await
        .unwrap();
    key
}

/// Runs `file` against a mock and a sluice of its own, so no other test's requests fill its
/// cache or count in its mock's stats.
async fn run_openai(file: &str) {
    let (mock, server) = mock_and_server().await;
    pytest(file, &urls(&server, &mock).await).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_plain_text_through_sluice_matches_direct() {
    run_openai("test_plain.py").await;
}

#[tokio::test]
async fn sdk_tool_call_loop_matches_direct() {
    run_openai("test_tools.py").await;
}

#[tokio::test]
async fn sdk_reasoning_logprobs_and_n_match_direct() {
    run_openai("test_features.py").await;
}

#[tokio::test]
async fn sdk_every_message_shape_reaches_upstream_unchanged() {
    run_openai("test_messages.py").await;
}

#[tokio::test]
async fn sdk_cached_tool_call_reply_replays_identically() {
    run_openai("test_cache.py").await;
}

#[tokio::test]
async fn sdk_single_flight_pair_shares_one_upstream_reply() {
    run_openai("test_single_flight.py").await;
}

#[tokio::test]
async fn sdk_anthropic_tool_use_loop() {
    let mock = mock(MockConfig::default()).await;
    let front = scenario_front(&mock, "tool_use").await;
    let mut cfg = config_for(&mock);
    cfg.upstream.providers = vec![ProviderConfig {
        name: "claude".into(),
        kind: ProviderKind::Anthropic,
        base_url: Some(front),
        base_urls: vec![],
        api_key: Some(Secret::new("test-key")),
        api_key_env: None,
        models: vec!["claude-*".into()],
        http2: false,
    }];
    let server = TestServer::start(cfg).await;
    pytest("test_anthropic.py", &urls(&server, &mock).await).await;
    server.shutdown().await;
}

/// A pass-through to the mock that adds `x-mock-scenario: <scenario>` to every request,
/// returning its `/v1` base URL: the Anthropic dialect takes no body knobs, and sluice
/// forwards no client headers, so the scenario is set on the way in.
async fn scenario_front(mock: &MockServer, scenario: &'static str) -> String {
    let target = format!("http://{}", mock.addr);
    let app = axum::Router::new().fallback(move |req: Request| {
        let target = target.clone();
        async move { forward(&target, scenario, req).await }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

async fn forward(target: &str, scenario: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = parts.headers;
    headers.remove(http::header::HOST);
    headers.remove(http::header::CONTENT_LENGTH);
    headers.insert("x-mock-scenario", scenario.parse().unwrap());
    let resp = client()
        .request(parts.method, format!("{target}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    let mut out = Response::builder().status(resp.status());
    // Only what describes the body: framing headers belong to each hop.
    for name in [http::header::CONTENT_TYPE, http::header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name) {
            out = out.header(name, v);
        }
    }
    out.body(Body::from_stream(resp.bytes_stream())).unwrap()
}
