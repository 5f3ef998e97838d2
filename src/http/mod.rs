//! HTTP routes. Handlers stay thin: parse, call the domain, pick a response shape.

pub mod auth;
pub mod caller;
pub mod catalog;
pub mod extract;
pub mod guards;
pub mod health;
pub mod messages;
pub mod ops;
pub mod path;
pub mod responses;
pub mod sessions;
pub mod tasks;
pub mod ui;
pub mod v1;
pub mod ws;

use axum::http::{Method, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::error::ApiError;
use crate::state::AppState;

/// Marks a response whose request logs its own line when it ends: a relayed completion's
/// `upstream call` line, in the request's span, carries what the access line would (method,
/// route, request id, key id) and the reply's outcome. Formatting and writing a log line
/// is about a tenth of a short completion's CPU, so it is written once.
#[derive(Clone, Copy, Debug)]
pub struct LogsAtEnd;

/// An SSE response counted in `sluice_connections{transport="sse"}` while it is open.
pub fn sse_response<S>(st: &AppState, events: S) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let open = st.metrics.connection("sse");
    crate::transport::sse::response(events.map(move |b| {
        let _ = &open;
        b
    }))
}

/// [`sse_response`] that keeps `hold` (a stream permit) until the stream ends: the stream
/// holds its place until the client or the upstream ends it.
pub fn sse_holding<S, T>(st: &AppState, events: S, hold: T) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
    T: Send + 'static,
{
    sse_response(
        st,
        events.map(move |b| {
            let _ = &hold;
            b
        }),
    )
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
