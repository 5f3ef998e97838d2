//! A listener that counts TCP connections, so tests can prove that a client
//! really closed (or reused) its upstream connection, and the accept loop
//! that serves them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;

/// Streams one HTTP/2 connection may carry. hyper's default (200) would make
/// a relay that multiplexes thousands of streams over h2c queue all but the
/// first 200, so the mock, not the relay, would set the limit of a load test.
const MAX_H2_STREAMS: u32 = 1 << 20;

/// Serves `app` on HTTP/1.1 and h2c until `shutdown` completes, then asks
/// every connection to finish gracefully and waits for all of them. This is
/// `axum::serve` with the one setting it does not expose: the HTTP/2 stream
/// limit.
pub(crate) async fn serve(
    mut listener: CountingListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let conns = TaskTracker::new();
    let closing = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let closing = closing.clone();
        conns.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = closing.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!("mock: connection ended with an error: {err}");
            }
        });
    }
    // No new connections; open ones finish their in-flight requests (bodies
    // end through `Shared::cancel`) and close.
    drop(listener);
    closing.cancel();
    conns.close();
    conns.wait().await;
    Ok(())
}

pub(crate) struct CountingListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl CountingListener {
    pub(crate) fn new(inner: TcpListener, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl axum::serve::Listener for CountingListener {
    type Io = CountedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Token-sized writes must not sit in Nagle's buffer, or
                    // inter-token timing measured by clients is fiction.
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!("mock: set_nodelay failed: {err}");
                    }
                    self.shared.stats.send_modify(|s| {
                        s.open_connections += 1;
                        s.total_connections += 1;
                    });
                    let io = CountedIo {
                        inner: stream,
                        shared: Arc::clone(&self.shared),
                    };
                    return (io, addr);
                }
                Err(err) if is_per_connection(&err) => {}
                Err(err) => {
                    // Typically EMFILE under a load test: back off briefly so
                    // the accept loop does not spin, then let closing
                    // connections free descriptors.
                    tracing::warn!("mock: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A `TcpStream` whose drop is the moment the connection stops counting as
/// open: hyper drops the IO exactly when it is done with the connection.
pub(crate) struct CountedIo {
    inner: TcpStream,
    shared: Arc<Shared>,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.shared.stats.send_modify(|s| {
            s.open_connections = s.open_connections.saturating_sub(1);
        });
    }
}

impl AsyncRead for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper switches to writev (one syscall per frame instead of several)
        // only when the IO says it supports it.
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
