//! The official Python SDKs as clients: each test starts the mock upstream and sluice, then
//! runs one pytest file of tests/sdk/ with the venv's Python, which talks to sluice (and to
//! the mock directly, to compare) as a user's code would. scripts/test.sh provisions the
//! venv (target/sdk-venv, pinned by tests/sdk/requirements.txt).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use sluice_mock::{MockConfig, MockServer};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A pytest file runs a handful of short requests; a hung one fails the test instead of
/// holding the suite.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(120);

/// The venv's interpreter, if scripts/test.sh built it from the current requirements.
pub(crate) fn venv_python() -> PathBuf {
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
pub(crate) async fn pytest(file: &str, env: &[(&str, String)]) {
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

/// What every Python test is told: sluice's and the mock's OpenAI base URLs, a real key of
/// sluice's (checked, as it has sluice's key prefix), and the mock's root for its own
/// endpoints (stats, last request).
async fn urls(server: &TestServer, mock: &MockServer) -> Vec<(&'static str, String)> {
    vec![
        ("SLUICE_BASE_URL", format!("{}/v1", server.url)),
        ("SLUICE_API_KEY", api_key(server, "sdk", false).await),
        ("MOCK_BASE_URL", mock.url()),
        ("MOCK_ROOT", format!("http://{}", mock.addr)),
    ]
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
    crate::require!(SdkVenv);
    run_openai("test_plain.py").await;
}

#[tokio::test]
async fn sdk_tool_call_loop_matches_direct() {
    crate::require!(SdkVenv);
    run_openai("test_tools.py").await;
}

#[tokio::test]
async fn sdk_reasoning_logprobs_and_n_match_direct() {
    crate::require!(SdkVenv);
    run_openai("test_features.py").await;
}

#[tokio::test]
async fn sdk_every_message_shape_reaches_upstream_unchanged() {
    crate::require!(SdkVenv);
    run_openai("test_messages.py").await;
}

#[tokio::test]
async fn sdk_cached_tool_call_reply_replays_identically() {
    crate::require!(SdkVenv);
    run_openai("test_cache.py").await;
}

#[tokio::test]
async fn sdk_single_flight_pair_shares_one_upstream_reply() {
    crate::require!(SdkVenv);
    run_openai("test_single_flight.py").await;
}

#[tokio::test]
async fn sdk_readme_examples_run_as_written() {
    crate::require!(SdkVenv);
    // The example names a real model; this upstream takes any name, and its process-wide
    // scenario answers with parallel tool calls, then (after the results) the answer.
    let mock = mock(MockConfig {
        scenario: Some("parallel_tool_calls".into()),
        ..Default::default()
    })
    .await;
    let server = TestServer::start(config_for(&mock)).await;
    pytest("test_readme.py", &urls(&server, &mock).await).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_placeholder_key_works_on_a_default_local_server() {
    crate::require!(SdkVenv);
    // Auth `auto` on loopback, as a fresh install runs: no key is created.
    let (mock, server) = mock_and_server().await;
    let env = [
        ("SLUICE_BASE_URL", format!("{}/v1", server.url)),
        ("SLUICE_API_KEY", "unused".to_owned()),
        ("MOCK_BASE_URL", mock.url()),
        ("MOCK_ROOT", format!("http://{}", mock.addr)),
    ];
    pytest("test_placeholder.py", &env).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_anthropic_tool_use_loop() {
    crate::require!(SdkVenv);
    // The Anthropic dialect takes no body knobs and sluice forwards no client headers, so
    // the scenario is the mock's own setting.
    let (mock, server) = claude_server("tool_use").await;
    pytest("test_anthropic.py", &urls(&server, &mock).await).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_responses_text_tools_reasoning_and_fields() {
    crate::require!(SdkVenv);
    run_openai("test_responses.py").await;
}

#[tokio::test]
async fn sdk_responses_over_an_anthropic_upstream() {
    crate::require!(SdkVenv);
    // The scenario is the mock's own setting: sluice forwards no knobs to Anthropic.
    let (mock, server) = claude_server("tool_use").await;
    pytest("test_responses_anthropic.py", &urls(&server, &mock).await).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_responses_stored_chained_background_and_resumed() {
    crate::require!(SdkVenv);
    let (mock, server) = mock_and_server().await;
    let mut env = urls(&server, &mock).await;
    env.push((
        "SLUICE_OTHER_KEY",
        api_key(&server, "someone-else", false).await,
    ));
    pytest("test_responses_stored.py", &env).await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_anthropic_messages_from_an_openai_compatible_upstream() {
    crate::require!(SdkVenv);
    run_openai("test_anthropic_messages.py").await;
}

#[tokio::test]
async fn sdk_anthropic_messages_tool_use_loop_through_the_anthropic_provider() {
    crate::require!(SdkVenv);
    let (mock, server) = claude_server("tool_use").await;
    pytest(
        "test_anthropic_messages_tool_use.py",
        &urls(&server, &mock).await,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn sdk_anthropic_messages_thinking_through_the_anthropic_provider() {
    crate::require!(SdkVenv);
    let (mock, server) = claude_server("thinking").await;
    pytest(
        "test_anthropic_messages_thinking.py",
        &urls(&server, &mock).await,
    )
    .await;
    server.shutdown().await;
}
