//! One HTTP/1.1 connection of the load client, and the scan that timestamps SSE events.
//!
//! The client shares a core with the mock upstream, so every microsecond it spends is taken
//! from the thing it measures against. It therefore drives each connection inside the task
//! that reads it (no connection task, no cross-task wake per event), and finds events with
//! a byte scan for the blank line that ends them instead of a full SSE parser.

use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::BenchError;

/// A chat completions endpoint on the loopback interface.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

impl Target {
    /// Accepts `http://127.0.0.1:PORT/path` only: the load client must never be pointed at
    /// another machine.
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("--url {url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url:?}: only http:// is supported").into());
        }
        let ip: std::net::Ipv4Addr = uri
            .host()
            .and_then(|h| h.parse().ok())
            .filter(|ip| *ip == std::net::Ipv4Addr::LOCALHOST)
            .ok_or_else(|| format!("--url {url:?}: the host must be 127.0.0.1"))?;
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self {
            addr: SocketAddr::from((ip, port)),
            authority: format!("{ip}:{port}"),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    pub fn request(&self, body: Bytes) -> Result<Request<Full<Bytes>>, BenchError> {
        Ok(Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream, application/json")
            .body(Full::new(body))?)
    }

    /// The same server at another path.
    pub fn at(&self, path: &str) -> Self {
        Self {
            addr: self.addr,
            authority: self.authority.clone(),
            path: path.to_owned(),
        }
    }

    /// `POST` of a JSON body that asks for a JSON answer, not a stream.
    pub fn post_json(&self, body: Bytes) -> Result<Request<Full<Bytes>>, BenchError> {
        Ok(Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(body))?)
    }

    /// `GET` of an event stream.
    pub fn get_stream(&self) -> Result<Request<Full<Bytes>>, BenchError> {
        Ok(Request::get(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::ACCEPT, "text/event-stream")
            .body(Full::new(Bytes::new()))?)
    }
}

type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// A keep-alive connection whose I/O is driven by whoever awaits it.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: Pin<Box<Connection>>,
    /// The connection future finished: the server closed, or the connection broke.
    closed: bool,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Self, BenchError> {
        let tcp = TcpStream::connect(addr).await?;
        // Token-sized requests and reads: Nagle would only add latency to the measurement.
        tcp.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        Ok(Self {
            sender,
            conn: Box::pin(conn),
            closed: false,
        })
    }

    /// Whether another request can be sent on this connection.
    pub fn is_reusable(&self) -> bool {
        !self.closed && !self.sender.is_closed()
    }

    /// Sends `req` and waits for the response head.
    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, BenchError> {
        let Self {
            sender,
            conn,
            closed,
        } = self;
        if *closed {
            return Err("connection closed".into());
        }
        let exchange = async {
            sender.ready().await?;
            sender.send_request(req).await
        };
        tokio::select! {
            // The connection first: its poll writes the request and reads the head, which
            // the exchange then finds ready in the same wake-up.
            biased;
            r = conn.as_mut() => {
                *closed = true;
                match r {
                    Ok(()) => Err("connection closed before the response".into()),
                    Err(e) => Err(e.into()),
                }
            }
            r = exchange => Ok(r?),
        }
    }

    /// The next piece of `body`, or `None` at its end.
    pub async fn next_data(&mut self, body: &mut Incoming) -> Result<Option<Bytes>, BenchError> {
        loop {
            let frame = if self.closed {
                body.frame().await
            } else {
                tokio::select! {
                    biased;
                    r = self.conn.as_mut() => {
                        // What the connection read before it ended is still in the body.
                        self.closed = true;
                        if let Err(e) = r {
                            return Err(e.into());
                        }
                        continue;
                    }
                    f = body.frame() => f,
                }
            };
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// Reads `body` to its end, keeping at most `limit` bytes.
    pub async fn read_all(
        &mut self,
        body: &mut Incoming,
        limit: usize,
    ) -> Result<Vec<u8>, BenchError> {
        let mut out = Vec::new();
        while let Some(data) = self.next_data(body).await? {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
        Ok(out)
    }
}

/// What one SSE event of a chat completion stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A chunk with text: `"delta":{"content":…`.
    Token,
    Done,
    /// An in-band error: `data: {"error":…`.
    Error,
    /// Role, finish and usage chunks, comments such as `: ping`.
    Other,
}

const TOKEN_MARK: &[u8] = b"\"delta\":{\"content\":";

fn classify(event: &[u8]) -> EventKind {
    let Some(data) = event.strip_prefix(b"data:") else {
        return EventKind::Other;
    };
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data.starts_with(b"[DONE]") {
        EventKind::Done
    } else if data.starts_with(b"{\"error\"") {
        EventKind::Error
    } else if data.windows(TOKEN_MARK.len()).any(|w| w == TOKEN_MARK) {
        EventKind::Token
    } else {
        EventKind::Other
    }
}

/// The `@<arrived>@<sent>` the mock's `stamp` knob ends a token's text with: when the
/// request reached the mock and when this token left it, in Unix nanoseconds.
pub fn stamp(event: &[u8]) -> Option<(u128, u128)> {
    let digits_before = |end: usize| -> Option<(u128, usize)> {
        let start = event[..end]
            .iter()
            .rposition(|b| !b.is_ascii_digit())
            .map_or(0, |i| i + 1);
        let n = std::str::from_utf8(&event[start..end]).ok()?.parse().ok()?;
        Some((n, start))
    };
    let at = event.iter().rposition(|&b| b == b'@')?;
    let end = at
        + 1
        + event[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
    let (sent, _) = digits_before(end)?;
    if at == 0 || event[at - 1] == b'@' {
        return None;
    }
    let (arrived, start) = digits_before(at)?;
    (start > 0 && event[start - 1] == b'@').then_some((arrived, sent))
}

/// Now, in nanoseconds since the Unix epoch: the clock the mock stamps with.
pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Splits a body into events at `\n\n` (sluice and the mock both frame with LF only),
/// carrying a partial event over to the next piece in a reused buffer.
#[derive(Debug, Default)]
pub struct SseScan {
    partial: Vec<u8>,
}

impl SseScan {
    pub fn feed(&mut self, mut data: &[u8], mut on_event: impl FnMut(EventKind, &[u8])) {
        while !data.is_empty() {
            let mut prev = self.partial.last().copied();
            let mut end = None;
            for (i, &b) in data.iter().enumerate() {
                if b == b'\n' && prev == Some(b'\n') {
                    end = Some(i);
                    break;
                }
                prev = Some(b);
            }
            let Some(end) = end else {
                self.partial.extend_from_slice(data);
                return;
            };
            if self.partial.is_empty() {
                let event = &data[..end];
                on_event(classify(event), event);
            } else {
                self.partial.extend_from_slice(&data[..end]);
                on_event(classify(&self.partial), &self.partial);
                self.partial.clear();
            }
            data = &data[end + 1..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_found_across_pieces() {
        let raw = concat!(
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            ": ping\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\\n\\n\"}}]}\n\n",
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"m\"}}\n\n",
            "data: [DONE]\n\n",
        );
        let want = vec![
            EventKind::Other,
            EventKind::Other,
            EventKind::Token,
            EventKind::Token,
            EventKind::Error,
            EventKind::Done,
        ];
        for piece in 1..raw.len() {
            let mut scan = SseScan::default();
            let mut got = Vec::new();
            for c in raw.as_bytes().chunks(piece) {
                scan.feed(c, |k, _| got.push(k));
            }
            assert_eq!(got, want, "pieces of {piece}");
        }
    }

    #[test]
    fn stamps_are_read_back() {
        let ev = br#"data: {"choices":[{"delta":{"content":"say "hi"@1700000000000000001@1700000000050000002 "}}]}"#;
        assert_eq!(
            stamp(ev),
            Some((1_700_000_000_000_000_001, 1_700_000_000_050_000_002))
        );
        assert_eq!(stamp(br#"data: {"content":"a@ b@12 "}"#), None);
        assert_eq!(stamp(br#"data: {"content":"plain "}"#), None);
    }

    #[test]
    fn only_loopback_targets() {
        assert!(Target::parse("http://127.0.0.1:9/v1/chat/completions").is_ok());
        for url in [
            "http://10.0.0.1:9/v1",
            "http://localhost:9/v1",
            "https://127.0.0.1/v1",
            "http://[::1]:9/v1",
        ] {
            assert!(Target::parse(url).is_err(), "{url}");
        }
    }
}
