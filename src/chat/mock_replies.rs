//! The mock upstream's non-streamed replies to its recorded scenarios are what sluice's
//! [`Accumulator`] makes of the same chunks, so tests that compare the two paths through
//! sluice compare like with like.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

use crate::domain::chunk::{Accumulator, Chunk, Payload};

const OPENAI_FIXTURES: [(&str, &str); 5] = [
    (
        "tool_call",
        include_str!("../../tests/fixtures/openai_tool_call.sse"),
    ),
    (
        "parallel_tool_calls",
        include_str!("../../tests/fixtures/openai_parallel_tool_calls.sse"),
    ),
    (
        "reasoning",
        include_str!("../../tests/fixtures/openai_reasoning.sse"),
    ),
    (
        "logprobs",
        include_str!("../../tests/fixtures/openai_logprobs.sse"),
    ),
    ("n", include_str!("../../tests/fixtures/openai_n.sse")),
];

/// What the OpenAI SDKs (and sluice) make of a fixture's chunks when it is not streamed.
fn accumulated(fixture: &str) -> Value {
    let mut acc = Accumulator::default();
    for block in fixture.split_terminator("\n\n") {
        let data = block
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .unwrap();
        if data == "[DONE]" {
            continue;
        }
        match Chunk::parse(data.as_bytes()).unwrap() {
            Payload::Chunk(c) => acc.add(&c),
            other => panic!("{other:?}"),
        }
    }
    acc.finish("unused", 0, "unused")
}

#[tokio::test]
async fn non_streamed_scenarios_are_the_accumulated_chunks() {
    let mock = sluice_mock::spawn(sluice_mock::MockConfig::default())
        .await
        .unwrap();
    crate::upstream::sse::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    for (name, fixture) in OPENAI_FIXTURES {
        let resp = http
            .post(format!("{}/chat/completions", mock.url()))
            .json(&json!({"mock": {"scenario": name}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, accumulated(fixture), "{name}");
    }
    mock.shutdown().await;
}
