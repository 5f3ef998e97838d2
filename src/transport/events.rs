//! Hub events over SSE: `retry:` first, every event with its id, `: ping`
//! comments while nothing happens, and `error {code:"lagged"}` for a subscriber that fell
//! behind the replay log — it can resume from its last id.

use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream};
use tokio_util::sync::CancellationToken;

use super::sse::PING;
use crate::hub::{End, Event, EventFeed};

/// Browsers' `EventSource` waits this long before reconnecting with `Last-Event-ID`.
const RETRY: Bytes = Bytes::from_static(b"retry: 2000\n\n");

const LAGGED: Bytes = Bytes::from_static(
    b"event: error\ndata: {\"code\":\"lagged\",\"message\":\"this client fell behind the stream; reconnect with Last-Event-ID to resume\",\"retryable\":true}\n\n",
);

/// Sent when the instance stops serving the stream (it is restarting): reconnect soon,
/// with `Last-Event-ID`, and land on another instance.
const RECONNECT: Bytes = Bytes::from_static(
    b"retry: 250\nevent: reconnect\ndata: {\"reason\":\"restarting\",\"message\":\"this instance is restarting; reconnect with Last-Event-ID to resume\"}\n\n",
);

/// The frames of a batch as one buffer: a lone event as it is, with no copy.
fn joined(batch: &mut Vec<Event>) -> Bytes {
    if batch.len() == 1 {
        return batch.pop().map(|e| e.sse).unwrap_or_default();
    }
    let mut buf = Vec::with_capacity(batch.iter().map(|e| e.sse.len()).sum());
    for e in batch.drain(..) {
        buf.extend_from_slice(&e.sse);
    }
    Bytes::from(buf)
}

/// Frames a feed as SSE. Ends when the feed ends, when it lags, or at `stop` (this instance
/// is going away): the client is told to reconnect, on another instance behind a proxy.
pub fn sse<F: EventFeed + 'static>(
    mut feed: F,
    ping_every: Duration,
    stop: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        yield RETRY;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<Event> = Vec::with_capacity(64);
        // Made once: a `cancelled()` per batch would take and release the lock of the
        // process-wide token's waiter list twice per event, for every subscriber.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    // What is already in the log goes out first, so the client holds an
                    // id to resume from even when the stop came right after it connected.
                    while let Some(Ok(())) = feed.next_batch(&mut batch).now_or_never() {
                        yield joined(&mut batch);
                    }
                    yield RECONNECT;
                    return;
                }
                r = feed.next_batch(&mut batch) => match r {
                    // Events that were ready together leave in one write.
                    Ok(()) => yield joined(&mut batch),
                    Err(End::Finished) => return,
                    Err(End::Lagged) => {
                        yield LAGGED;
                        return;
                    }
                },
                _ = ping.tick() => yield PING,
            }
        }
    }
}
