//! The Responses API on the wire: a relay's chunks, through a
//! [`ResponseBuilder`], as SSE events (`event: <type>` then `data: <json>`), or as the one
//! response object they add up to.

use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::sse::PING;
use crate::dialect::responses::{ResponseBuilder, ResponseEvent};
use crate::upstream::{Relay, UpstreamError};

/// Most chunks one frame gathers: a bound on one poll's work and buffer.
const MAX_BATCH_EVENTS: usize = 256;

/// Events produced by one step, as one SSE frame: one write for a chunk's several events.
fn frame(events: &mut Vec<ResponseEvent>) -> Option<Bytes> {
    if events.is_empty() {
        return None;
    }
    let mut buf = Vec::with_capacity(
        events
            .iter()
            .map(|e| e.data.len() + e.kind.len() + 16)
            .sum(),
    );
    for e in events.drain(..) {
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(e.kind.as_bytes());
        buf.extend_from_slice(b"\ndata: ");
        buf.extend_from_slice(e.data.as_bytes());
        buf.extend_from_slice(b"\n\n");
    }
    Some(Bytes::from(buf))
}

/// The `response.error.code` for a relay that failed, in the API's vocabulary; the
/// message says what happened.
fn failure_code(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Status { status: 429, .. } => "rate_limit_exceeded",
        _ => "server_error",
    }
}

/// Streams `relay` as Responses events: `response.created` first, a `response.completed`
/// (or `.incomplete`, or `.failed`) last, `: ping` comments while the upstream is silent.
/// Dropping the stream (the client went away) drops the upstream request with it; at
/// `stop` (shutdown) the response fails cleanly.
pub fn event_stream(
    relay: Relay,
    mut builder: ResponseBuilder,
    ping_every: Duration,
    stop: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let mut out = Vec::with_capacity(8);
        builder.begin(&mut out);
        if let Some(f) = frame(&mut out) {
            yield f;
        }
        let mut events = relay.events;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                ev = events.next() => {
                    // This event and whatever else is ready now leave as one frame.
                    let mut next = Some(ev);
                    let mut batched = 0;
                    let mut ended = false;
                    while let Some(ev) = next.take() {
                        match ev {
                            Some(Ok(chunk)) => builder.push(&chunk, &mut out),
                            Some(Err(e)) => {
                                tracing::warn!(provider = %relay.provider, error = %e, "stream failed after it started");
                                builder.fail(failure_code(&e), &e.to_string(), &mut out);
                                ended = true;
                            }
                            None => {
                                builder.complete(&mut out);
                                ended = true;
                            }
                        }
                        batched += 1;
                        if !ended && batched < MAX_BATCH_EVENTS {
                            next = events.next().now_or_never();
                        }
                    }
                    if let Some(f) = frame(&mut out) {
                        yield f;
                    }
                    if ended {
                        return;
                    }
                }
                _ = ping.tick() => yield PING,
                _ = &mut stopped => {
                    builder.fail("server_error", "the server is shutting down; retry the request", &mut out);
                    break;
                }
            }
        }
        if let Some(f) = frame(&mut out) {
            yield f;
        }
    }
}

/// Reads `relay` to its end through `builder`: the whole response object, for clients that
/// asked for no stream. A relay that fails is the request's error.
pub async fn collect(relay: Relay, mut builder: ResponseBuilder) -> Result<Value, UpstreamError> {
    let mut events = relay.events;
    let mut out = Vec::new();
    builder.begin(&mut out);
    while let Some(chunk) = events.next().await {
        builder.push(&chunk?, &mut out);
        // Nobody reads the events; only the object they build counts.
        out.clear();
    }
    builder.complete(&mut out);
    Ok(builder.response())
}
