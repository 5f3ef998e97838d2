//! The deadline for a connection's first bytes, before hyper's own header timeout can run.

use std::future::Future;
use std::time::Duration;

/// The HTTP/2 prior-knowledge preface; the version sniffing reads until the first byte
/// differs from it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's header timeout starts only once hyper-util has told HTTP/1 from HTTP/2, and
/// that sniffing waits for bytes forever: a client that connects and sends nothing (or
/// a slice of the HTTP/2 preface) would hold its connection. This ends such a connection
/// after the header timeout; the first byte that settles the version disarms it.
pub(super) struct HeadDeadline<I> {
    io: I,
    /// Bytes read so far, while they are still a prefix of the HTTP/2 preface.
    seen: usize,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I> HeadDeadline<I> {
    pub(super) fn new(io: I, timeout: Option<Duration>) -> Self {
        Self {
            io,
            seen: 0,
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HeadDeadline<I> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                for &b in &buf.filled()[before..] {
                    if H2_PREFACE.get(this.seen) != Some(&b) {
                        this.deadline = None;
                        break;
                    }
                    this.seen += 1;
                }
                if this.seen >= H2_PREFACE.len() {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request head within the header timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HeadDeadline<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::time::Instant;

    use super::{H2_PREFACE, HeadDeadline};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn pair() -> (DuplexStream, HeadDeadline<DuplexStream>) {
        let (client, server) = duplex(1024);
        (client, HeadDeadline::new(server, Some(TIMEOUT)))
    }

    /// Serves one connection the way the accept loop does, answering every request 200.
    async fn serve(io: HeadDeadline<DuplexStream>) -> Result<(), String> {
        let service = hyper_util::service::TowerToHyperService::new(tower::service_fn(
            |_req: Request<hyper::body::Incoming>| async {
                Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::from("ok")))
            },
        ));
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Some(TIMEOUT));
        builder
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service)
            .await
            .map_err(|e| e.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connection_is_closed_at_the_deadline() {
        let (_client, server) = pair();
        let start = Instant::now();
        let served = serve(server).await;
        assert!(
            served.is_err(),
            "a silent connection must end with an error"
        );
        assert_eq!(start.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn connection_with_a_request_is_served() {
        let (mut client, server) = pair();
        let conn = tokio::spawn(serve(server));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        let reply = String::from_utf8(reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("ok"), "{reply}");
        assert!(conn.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn no_bytes_within_the_deadline_is_a_timeout() {
        let (_client, mut server) = pair();
        let start = Instant::now();
        let err = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn part_of_the_http2_preface_keeps_the_deadline() {
        let (mut client, mut server) = pair();
        client.write_all(&H2_PREFACE[..8]).await.unwrap();
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &H2_PREFACE[..8]);
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn first_http1_byte_disarms_and_bytes_pass_unchanged() {
        let (mut client, mut server) = pair();
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HT");
        // Long past the deadline, the connection still reads: hyper's own timeout rules now.
        tokio::time::sleep(TIMEOUT * 3).await;
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"TP/1.1\r\n");
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn whole_http2_preface_disarms() {
        let (mut client, mut server) = pair();
        client.write_all(H2_PREFACE).await.unwrap();
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], H2_PREFACE);
        tokio::time::sleep(TIMEOUT * 3).await;
        client.write_all(b"\0\0").await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"\0\0");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_silent_connection_waits() {
        let (_client, server) = duplex(64);
        let mut server = HeadDeadline::new(server, None);
        let read = tokio::time::timeout(TIMEOUT * 100, server.read(&mut [0u8; 16])).await;
        assert!(read.is_err(), "no deadline: the read is still pending");
    }
}
