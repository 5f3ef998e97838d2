//! Server-Sent Events responses.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures::{Stream, StreamExt};

/// Keeps idle connections (and proxies with read timeouts) alive; a comment line, so
/// `EventSource` and SDK parsers ignore it.
pub const PING: Bytes = Bytes::from_static(b": ping\n\n");

/// Wraps a stream of ready-framed SSE bytes in a response that no proxy buffers or
/// compresses: `X-Accel-Buffering: no` for nginx, `no-cache` for everything else.
pub fn response<S>(events: S) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let mut resp = Response::new(Body::from_stream(events.map(Ok::<_, Infallible>)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Frames one `data:` event. The payload is JSON, so it never contains a raw newline and
/// cannot break the framing whatever the model writes.
pub fn data_event(json: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(json.len() + 8);
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(json);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}
