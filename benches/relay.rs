//! Hot paths of the relay: decoding an upstream SSE body into events, and encoding events
//! for clients. `cargo bench --bench relay`.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use sluice::domain::ChunkEncoder;
use sluice::upstream::{openai, sse};
use sluice_mock::token_text;

/// A 64-token OpenAI stream as an upstream sends it, cut into network-sized pieces.
fn upstream_body(tokens: usize, piece: usize) -> Vec<Bytes> {
    let enc = ChunkEncoder::new("chatcmpl-bench", 1, "m");
    let mut raw = Vec::new();
    raw.extend_from_slice(enc.role().frame());
    for i in 0..tokens {
        raw.extend_from_slice(enc.content(&token_text(i)).frame());
    }
    raw.extend_from_slice(b"data: [DONE]\n\n");
    raw.chunks(piece).map(Bytes::copy_from_slice).collect()
}

fn parse(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("upstream_parse");
    for piece in [64usize, 4096] {
        let body = upstream_body(64, piece);
        g.throughput(Throughput::Elements(64));
        // What the relay runs: events parsed in place from the body.
        g.bench_function(format!("openai_64_tokens_{piece}B_reads"), |b| {
            b.iter(|| {
                let chunks: Vec<Result<Bytes, std::io::Error>> =
                    body.iter().cloned().map(Ok).collect();
                let events = openai::translate_body("bench".into(), futures::stream::iter(chunks));
                black_box(rt.block_on(events.count()))
            })
        });
        // Owned `eventsource_stream::Event`s first, as the Anthropic provider reads them.
        g.bench_function(
            format!("openai_64_tokens_{piece}B_reads_owned_events"),
            |b| {
                b.iter(|| {
                    let chunks: Vec<Result<Bytes, std::io::Error>> =
                        body.iter().cloned().map(Ok).collect();
                    let events = sse::decode("bench".into(), futures::stream::iter(chunks));
                    black_box(rt.block_on(openai::translate("bench".into(), events).count()))
                })
            },
        );
        // The eventsource-stream crate, which decoded upstream bodies before: the baseline.
        g.bench_function(
            format!("openai_64_tokens_{piece}B_reads_eventsource_stream"),
            |b| {
                b.iter(|| {
                    use eventsource_stream::Eventsource;
                    let chunks: Vec<Result<Bytes, std::io::Error>> =
                        body.iter().cloned().map(Ok).collect();
                    let events = futures::stream::iter(chunks).eventsource().map(|r| {
                        r.map_err(|e| sluice::upstream::UpstreamError::Malformed {
                            provider: "bench".into(),
                            message: e.to_string(),
                        })
                    });
                    black_box(rt.block_on(openai::translate("bench".into(), events).count()))
                })
            },
        );
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let enc = ChunkEncoder::new("chatcmpl-bench", 1, "gpt-4o-mini");
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("openai_chunk", |b| {
        b.iter(|| black_box(enc.content(black_box(" token"))))
    });
    g.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);
