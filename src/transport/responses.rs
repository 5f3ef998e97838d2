//! A response's events over SSE as the Responses API frames them: `event: <type>` and
//! the event's JSON, `: ping` comments while nothing happens, no `[DONE]`.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::sse::PING;
use crate::chat::responses::{FeedEvent, ResponseFeed};
use crate::hub::{End, Event, EventKind};

#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
}

/// The SSE frame of one event of a response.
fn frame(e: &FeedEvent, response_id: &str, out: &mut Vec<u8>) {
    match e {
        FeedEvent::Direct(ev) => write(ev.kind, ev.data.as_bytes(), out),
        FeedEvent::Hub(ev) => hub_frame(ev, response_id, out),
    }
}

fn write(kind: &str, json: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// The SSE frame of one hub event of a response. An `interrupted` event (its instance was
/// lost) becomes `response.failed` with the same sequence number.
fn hub_frame(e: &Event, response_id: &str, out: &mut Vec<u8>) {
    let data = e.data();
    let failed;
    let (kind, json): (Cow<'_, str>, &[u8]) = match e.kind {
        EventKind::Response | EventKind::ResponseEnd => {
            match serde_json::from_slice::<Typed<'_>>(&data) {
                Ok(t) => (t.kind, &data[..]),
                Err(_) => return,
            }
        }
        EventKind::Interrupted => {
            failed = serde_json::json!({
                "type": "response.failed",
                "sequence_number": e.seq,
                "response": {
                    "id": response_id,
                    "object": "response",
                    "status": "failed",
                    "error": {
                        "code": "server_error",
                        "message": "the instance running this response stopped before it ended",
                    },
                    "output": [],
                },
            })
            .to_string();
            ("response.failed".into(), failed.as_bytes())
        }
        _ => return,
    };
    write(&kind, json, out);
}

/// Frames a response's feed. Ends after its last event, or at `leave` (this instance is
/// going away: a background response's reader resumes with `starting_after` elsewhere).
pub fn sse(
    feed: ResponseFeed,
    response_id: String,
    ping_every: Duration,
    leave: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        // The whole feed moves in: a field captured alone would leave the rest (the
        // guard that cancels the response when its reader leaves) to drop right here.
        let mut feed = feed;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<FeedEvent> = Vec::with_capacity(64);
        let left = leave.cancelled();
        tokio::pin!(left);
        loop {
            tokio::select! {
                biased;
                _ = &mut left => return,
                r = feed.next_batch(&mut batch) => match r {
                    Ok(()) => {
                        let mut buf = Vec::new();
                        for e in &batch {
                            frame(e, &response_id, &mut buf);
                        }
                        if !buf.is_empty() {
                            yield Bytes::from(buf);
                        }
                    }
                    Err(End::Finished) => return,
                    Err(End::Lagged) => {
                        yield lagged(&response_id);
                        return;
                    }
                },
                _ = ping.tick() => yield PING,
            }
        }
    }
}

fn lagged(response_id: &str) -> Bytes {
    let event = serde_json::json!({
        "type": "error",
        "code": "lagged",
        "message": format!("this client fell behind response {response_id}; stream it again with starting_after"),
        "param": null,
        "sequence_number": 0,
    });
    Bytes::from(format!("event: error\ndata: {event}\n\n"))
}
