//! The accept loop: every connection served by hyper behind the head and body deadlines.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{Request, Response};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::deadline::HeadDeadline;
use super::router::router;
use crate::ops::metrics::Metrics;
use crate::state::AppState;

/// Like `axum::serve`: a client that gave up is no reason to stop; running out of file
/// descriptors is, for a moment, so connections can close first.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Accepts connections until `signal` resolves, each one watched by `graceful` so the
/// drain can wait for it; the listener closes on return.
pub(super) async fn accept_until(
    state: AppState,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
    graceful: &GracefulShutdown,
) {
    // Our own accept loop instead of `axum::serve`, which cannot bound the request head:
    // hyper refuses a head over `max_header_bytes` with 431 and drops a client that takes
    // longer than `header_timeout` to send it (slowloris). HTTP/1.1 and h2c as before.
    let guards = &state.config.guards;
    let header_timeout = Some(guards.header_timeout).filter(|t| !t.is_zero());
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper's floor; smaller limits are held by the router (see `router`).
        .max_buf_size(guards.max_header_bytes.max(8_192));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        // WebSockets over HTTP/2 (RFC 8441), as `axum::serve` allows.
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(guards.max_header_bytes).unwrap_or(u32::MAX));
    let edge = Arc::new(Edge {
        body_timeout: Some(guards.body_timeout).filter(|t| !t.is_zero()),
        metrics: state.metrics.clone(),
        app: router(state),
    });
    {
        tokio::pin!(signal);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                },
                _ = &mut signal => break,
            };
            // Tokens are small writes: without this, Nagle holds each back up to an RTT.
            let _ = stream.set_nodelay(true);
            let edge = edge.clone();
            let service = hyper_util::service::TowerToHyperService::new(tower::service_fn(
                move |req: Request<hyper::body::Incoming>| {
                    let edge = edge.clone();
                    async move { Ok::<_, std::convert::Infallible>(edge.handle(peer, req).await) }
                },
            ));
            let io = hyper_util::rt::TokioIo::new(HeadDeadline::new(stream, header_timeout));
            let conn = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            // Watched: on shutdown idle connections close at once (a proxy then sends the
            // next request elsewhere), busy ones after their response (an SSE stream
            // included); upgraded WebSockets close through the lifecycle's `close`.
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    }
}

/// In front of the router on every connection: the client's address and the body deadline.
struct Edge {
    app: Router,
    metrics: Arc<Metrics>,
    body_timeout: Option<Duration>,
}

impl Edge {
    async fn handle(
        &self,
        peer: SocketAddr,
        req: Request<hyper::body::Incoming>,
    ) -> Response<axum::body::Body> {
        let mut req = match self.body_timeout {
            // A request without a body (most GETs) needs no deadline.
            Some(t) if !hyper::body::Body::is_end_stream(req.body()) => {
                crate::http::extract::time_body(req, t, &self.metrics)
            }
            _ => req.map(axum::body::Body::new),
        };
        // What `into_make_service_with_connect_info` provided: the TCP peer, for the rate
        // limits' client address.
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
        match tower::ServiceExt::oneshot(self.app.clone(), req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}
