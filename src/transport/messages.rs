//! Anthropic's Messages API on the client side: a relayed generation as Anthropic's SSE
//! events, or added up into one `message`.

use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::dialect::messages::{Encoder, Event, MessageBuilder, error_type};
use crate::error::ApiError;
use crate::upstream::{Relay, UpstreamError};

/// Most events, and bytes, one write gathers from a burst (as on `/v1/chat/completions`).
const MAX_BATCH_EVENTS: usize = 256;
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Anthropic's error type for a failure of the upstream: its own type when it reported one
/// in Anthropic's words (the Anthropic provider relays `overloaded_error` as it came), else
/// the type of the status sluice answers it with before a stream starts.
pub fn upstream_error_type(e: &UpstreamError) -> &'static str {
    if let UpstreamError::InBand {
        code: Some(code), ..
    } = e
    {
        const OWN: [&str; 6] = [
            "overloaded_error",
            "rate_limit_error",
            "api_error",
            "timeout_error",
            "invalid_request_error",
            "billing_error",
        ];
        if let Some(kind) = OWN.iter().find(|k| **k == code.as_str()) {
            return kind;
        }
    }
    error_type(ApiError::Upstream(e.clone()).status().as_u16())
}

/// Relays a generation as Anthropic's events: `message_start` at once, each chunk's blocks
/// and deltas as soon as it arrives, `ping` while the upstream is silent, and
/// `message_delta` + `message_stop` at the end. A failure ends the stream with an `error`
/// event; dropping the stream (the client went away) drops the upstream call with it.
pub fn event_stream(
    relay: Relay,
    id: String,
    model: String,
    ping_every: Duration,
    stop: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let mut events = relay.events;
        yield Event::MessageStart { id, model }.sse();
        let mut enc = Encoder::default();
        let mut out = Vec::new();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                ev = events.next() => {
                    // This chunk and those already waiting behind it leave in one write.
                    let mut next = Some(ev);
                    let mut batched = 0;
                    let mut frame = Vec::new();
                    let mut failed = None;
                    let mut ended = false;
                    while let Some(ev) = next.take() {
                        match ev {
                            Some(Ok(chunk)) => enc.chunk(&chunk, &mut out),
                            Some(Err(e)) => {
                                failed = Some(e);
                                break;
                            }
                            None => {
                                ended = true;
                                break;
                            }
                        }
                        for e in out.drain(..) {
                            frame.extend_from_slice(&e.sse());
                        }
                        batched += 1;
                        if batched < MAX_BATCH_EVENTS && frame.len() < MAX_BATCH_BYTES {
                            next = events.next().now_or_never();
                        }
                    }
                    if !frame.is_empty() {
                        yield Bytes::from(frame);
                    }
                    if let Some(e) = failed {
                        tracing::warn!(provider = %relay.provider, error = %e, "stream failed after it started");
                        yield Event::Error { kind: upstream_error_type(&e), message: e.to_string() }.sse();
                        return;
                    }
                    if ended {
                        break;
                    }
                }
                _ = ping.tick() => yield Event::Ping.sse(),
                _ = &mut stopped => {
                    yield Event::Error {
                        kind: "overloaded_error",
                        message: "the server is shutting down; retry the request".into(),
                    }.sse();
                    return;
                }
            }
        }
        enc.end(&mut out);
        let mut frame = Vec::new();
        for e in out.drain(..) {
            frame.extend_from_slice(&e.sse());
        }
        yield Bytes::from(frame);
    }
}

/// Reads a generation to its end as one `message`: the events the stream would carry,
/// added up.
pub async fn collect(relay: Relay, id: String, model: String) -> Result<Value, UpstreamError> {
    let mut events = relay.events;
    let mut msg = MessageBuilder::default();
    let mut enc = Encoder::default();
    let mut out = vec![Event::MessageStart { id, model }];
    while let Some(chunk) = events.next().await {
        enc.chunk(&chunk?, &mut out);
        for e in out.drain(..) {
            msg.apply(&e);
        }
    }
    enc.end(&mut out);
    for e in out.drain(..) {
        msg.apply(&e);
    }
    Ok(msg.finish())
}
