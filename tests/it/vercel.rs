//! The Vercel AI SDK as a client: `createOpenAI({baseURL})(model)`, its default provider
//! call, uses `POST /v1/responses`. tests/node/sdk/vercel-ai.mjs runs `streamText` and
//! `generateText` against sluice in front of the mock and checks each gets the mock's whole
//! reply. Needs tests/node's packages (`npm ci` in tests/node; scripts/test.sh does it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Two short requests; a hung one fails the test instead of holding the suite.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn vercel_ai_sdk_stream_text_and_generate_text_get_the_whole_reply() {
    crate::require!(NodeModules);
    let (mock, server) = mock_and_server().await;
    // What the mock answers this prompt, asked directly.
    let direct: Value = client()
        .post(format!("{}/chat/completions", mock.url()))
        .json(&json!({"model": "mock-model",
            "messages": [{"role": "user", "content": "Say something plain."}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = direct["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!expected.is_empty());
    let out = tokio::time::timeout(
        NODE_TIMEOUT,
        tokio::process::Command::new("node")
            .arg("sdk/vercel-ai.mjs")
            .current_dir(Path::new(ROOT).join("tests/node"))
            .env("SLUICE_BASE_URL", format!("{}/v1", server.url))
            .env("SLUICE_API_KEY", api_key(&server, "vercel", false).await)
            .env("EXPECTED_TEXT", &expected)
            // Every URL is on 127.0.0.1: a proxy set in the environment must not be asked.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node ran over its timeout")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vercel-ai.mjs failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!("{stdout}");
    server.shutdown().await;
}
