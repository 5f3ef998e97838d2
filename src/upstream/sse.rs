//! Shared plumbing for HTTP upstreams: one pooled client per provider, SSE decoding and the
//! mapping of transport failures to [`UpstreamError`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use eventsource_stream::Event;
use futures::{Stream, StreamExt};

use super::UpstreamError;

/// Longest error body read from a failed upstream response; the rest is not needed to
/// explain the failure and must not be buffered without bound.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Flow-control windows of h2c upstream connections; see [`client`].
const H2_CONNECTION_WINDOW: u32 = 64 << 20;
const H2_STREAM_WINDOW: u32 = 2 << 20;

pub use crate::config::DEFAULT_MAX_EVENT_BYTES;

/// Settings for the pooled HTTP client of one provider.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Speak HTTP/2 without TLS negotiation (h2c): one connection carries many streams.
    pub http2_prior_knowledge: bool,
    pub limits: BodyLimits,
}

/// What one upstream body may make sluice buffer.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    /// Longest line, and most `data` one event may gather; past it the stream fails as
    /// `upstream_malformed`, so an upstream cannot make sluice buffer without limit.
    pub max_event_bytes: usize,
    /// Counts the streams failed for passing `max_event_bytes`.
    pub oversized: metrics::Counter,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            oversized: metrics::Counter::noop(),
        }
    }
}

/// Makes ring the process's rustls crypto provider unless one is installed already. reqwest
/// is built without a provider of its own (see Cargo.toml) and panics building a client
/// without one, so everything that builds a `reqwest::Client` calls this first.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn client(opts: &ClientOptions) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(4096)
        // A chat completion is a POST with credentials: a redirect is a misconfigured base
        // URL to report, not to follow. (The redirect layer was also a few percent of a
        // request's cost.)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")));
    if opts.http2_prior_knowledge {
        b = b
            .http2_prior_knowledge()
            // h2 charges every buffered DATA frame under 256 bytes against a budget of half
            // the connection window, and tears the whole connection down ("too_many_data_frames",
            // ENHANCE_YOUR_CALM) when it runs out. A token is exactly such a frame: with the
            // adaptive window's 64 KiB start, 1,000 multiplexed streams one token behind
            // killed every stream on the connection. A fixed 64 MiB window gives a 32 MiB
            // budget, a lag of about a million tokens; it is also the most one upstream
            // connection can make sluice buffer.
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true);
    }
    b.build()
}

/// Maps a failure to send a request or read its head.
pub fn send_error(provider: &str, err: reqwest::Error) -> UpstreamError {
    UpstreamError::Connect {
        provider: provider.to_owned(),
        message: error_chain(&err),
    }
}

/// Reads a non-success response into an error, keeping the upstream's own message and its
/// `Retry-After` so a 429 can be honoured and passed on.
pub async fn status_error(provider: &str, resp: reqwest::Response) -> UpstreamError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = MAX_ERROR_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    let message = error_message(&body).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        if text.is_empty() {
            format!("HTTP {status}")
        } else {
            text.chars().take(300).collect()
        }
    });
    UpstreamError::Status {
        provider: provider.to_owned(),
        status,
        message,
        retry_after,
    }
}

/// The message of an error body in OpenAI's (`{"error":{"message"}}`) or Anthropic's
/// (`{"type":"error","error":{"message"}}`) shape, or a plain `{"message"}`.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error").unwrap_or(&v);
    err.get("message")
        .and_then(|m| m.as_str())
        .or_else(|| err.as_str())
        .map(str::to_owned)
}

/// Decodes an upstream body as Server-Sent Events: CR, LF and CRLF line ends, comments, a
/// leading BOM, and events or UTF-8 sequences split across network chunks.
pub fn events(
    provider: String,
    limits: BodyLimits,
    resp: reqwest::Response,
) -> impl Stream<Item = Result<Event, UpstreamError>> + Send + 'static {
    decode_limited(provider, limits, resp.bytes_stream())
}

/// [`events`] over any byte stream, with the default limits, so the decoding is testable
/// without a socket.
pub fn decode<S, B, E>(
    provider: String,
    body: S,
) -> impl Stream<Item = Result<Event, UpstreamError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + 'static,
{
    decode_limited(provider, BodyLimits::default(), body)
}

/// [`decode`] with the given limits.
pub fn decode_limited<S, B, E>(
    provider: String,
    limits: BodyLimits,
    body: S,
) -> impl Stream<Item = Result<Event, UpstreamError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + 'static,
{
    Decode {
        body: SseBody::with_limits(provider.clone(), limits, body),
        provider,
    }
}

/// An upstream body being read into an [`SseParser`]: the part of decoding shared by
/// [`decode`], which hands out owned [`Event`]s, and the providers' relay paths, which read
/// each event in place and allocate nothing for it.
pub struct SseBody<S> {
    body: Pin<Box<S>>,
    parser: SseParser,
    provider: String,
    oversized: metrics::Counter,
    ended: bool,
}

/// What [`SseBody::poll_event`] found.
pub enum Polled<'a> {
    Event(SseEvent<'a>),
    Failed(UpstreamError),
    End,
}

impl<S, B, E> SseBody<S>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::error::Error,
{
    /// A body read with the default limits.
    pub fn new(provider: String, body: S) -> Self {
        Self::with_limits(provider, BodyLimits::default(), body)
    }

    pub fn with_limits(provider: String, limits: BodyLimits, body: S) -> Self {
        Self {
            body: Box::pin(body),
            parser: SseParser::with_limit(limits.max_event_bytes),
            provider,
            oversized: limits.oversized,
            ended: false,
        }
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The next complete event, reading the body as far as needed. After `Failed` or `End`
    /// the body is not read again.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Polled<'_>> {
        loop {
            if self.parser.has_event() {
                break;
            }
            if self.ended {
                return Poll::Ready(Polled::End);
            }
            if self.parser.oversized() {
                // The body is not read again: dropping it closes the upstream connection.
                self.ended = true;
                self.oversized.increment(1);
                return Poll::Ready(Polled::Failed(UpstreamError::Malformed {
                    provider: self.provider.clone(),
                    message: format!(
                        "a line or event longer than {} bytes (SLUICE_UPSTREAM_MAX_EVENT_BYTES)",
                        self.parser.max
                    ),
                }));
            }
            match self.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.parser.push(chunk.as_ref()),
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    return Poll::Ready(Polled::Failed(UpstreamError::Transport {
                        provider: self.provider.clone(),
                        message: error_chain(&e),
                    }));
                }
                Poll::Ready(None) => {
                    // An event not closed by a blank line before EOF is incomplete, and
                    // dropped, as browsers do.
                    self.ended = true;
                    return Poll::Ready(Polled::End);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.parser.next_event() {
            Some(ev) => Poll::Ready(Polled::Event(ev)),
            None => Poll::Ready(Polled::End),
        }
    }
}

struct Decode<S> {
    body: SseBody<S>,
    provider: String,
}

impl<S, B, E> Stream for Decode<S>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::error::Error,
{
    type Item = Result<Event, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let ev = match this.body.poll_event(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Polled::End) => return Poll::Ready(None),
            Poll::Ready(Polled::Failed(e)) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Polled::Event(ev)) => ev,
        };
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|e| UpstreamError::Malformed {
                    provider: this.provider.clone(),
                    message: format!("invalid UTF-8: {e}"),
                })
        };
        // The type and the id are decoded as the spec says, bad bytes as U+FFFD: they carry
        // no content, and an id carries over, so refusing it would fail every later event.
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let owned = text(ev.data).map(|data| Event {
            event: if ev.event.is_empty() {
                "message".to_owned()
            } else {
                lossy(ev.event)
            },
            data,
            id: lossy(ev.id),
            retry: ev.retry,
        });
        Poll::Ready(Some(owned))
    }
}

/// One Server-Sent Event, borrowed from the parser until the next call to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The `event:` field; empty for the default type, `message`.
    pub event: &'a [u8],
    /// The `data:` lines, joined with `\n`.
    pub data: &'a [u8],
    /// The last event id seen so far on the stream (it carries over, as the spec says).
    pub id: &'a [u8],
    pub retry: Option<Duration>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The index of the first CR or LF. Eight bytes at a time: this scan is most of what
/// parsing costs, and a byte loop over a 200-byte event was a tenth of sluice's
/// instructions per relayed token.
fn find_line_end(hay: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each zero byte of `v` is set; bits above the first zero byte may
    // be set spuriously, which the lowest-bit search below never reads.
    let zeros = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut chunks = hay.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        let hits = zeros(v ^ (ONES * u64::from(b'\n'))) | zeros(v ^ (ONES * u64::from(b'\r')));
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|i| at + i)
}

/// An incremental Server-Sent Events parser (the WHATWG algorithm) over raw bytes.
///
/// It replaces eventsource-stream on the relay path, which copied the unparsed rest of its
/// buffer once per line and allocated four strings per event. Here every buffer is reused:
/// after warm-up an event costs a copy of its bytes and no allocation. Bytes are not
/// checked for UTF-8 here; the event's consumer does that where it reads text.
///
/// A line, or the data of one event, longer than its limit stops the parser for good
/// ([`oversized`](Self::oversized)): the checks run per line and per read, never per byte.
#[derive(Debug)]
pub struct SseParser {
    /// Received bytes; `buf[pos..]` is not parsed yet.
    buf: Vec<u8>,
    pos: usize,
    /// Bytes of `buf[pos..]` known to hold no line end, so a long line arriving in small
    /// pieces is scanned once.
    scanned: usize,
    /// The stream's first bytes were checked for a byte order mark.
    started: bool,
    /// The last line ended with a CR that was the last byte received; an LF right after
    /// it completes that CRLF rather than ending an empty line.
    after_cr: bool,
    data: Vec<u8>,
    /// At least one `data` field was seen, even an empty one: such an event is dispatched.
    has_data: bool,
    event: Vec<u8>,
    id: Vec<u8>,
    retry: Option<Duration>,
    /// An event was handed out; its fields are cleared before parsing on.
    dispatched: bool,
    /// A complete event is waiting in `data`, `event`, `id` and `retry`.
    ready: bool,
    /// Longest line, and most data one event may gather.
    max: usize,
    oversized: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser whose lines, and events' data, may be at most `max` bytes long.
    pub fn with_limit(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            started: false,
            after_cr: false,
            data: Vec::new(),
            has_data: false,
            event: Vec::new(),
            id: Vec::new(),
            retry: None,
            dispatched: false,
            ready: false,
            max,
            oversized: false,
        }
    }

    /// A line or an event passed the limit: no event follows, whatever is pushed.
    pub fn oversized(&self) -> bool {
        self.oversized
    }

    /// Appends received bytes; none once the parser is [`oversized`](Self::oversized).
    pub fn push(&mut self, chunk: &[u8]) {
        if self.oversized {
            return;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Whether [`next_event`](Self::next_event) will return an event; parses as far as
    /// needed to know.
    pub fn has_event(&mut self) -> bool {
        if !self.ready && !self.oversized {
            self.ready = self.parse();
        }
        self.ready
    }

    /// The next complete event, if the bytes pushed so far hold one.
    pub fn next_event(&mut self) -> Option<SseEvent<'_>> {
        if !self.has_event() {
            return None;
        }
        self.ready = false;
        self.dispatched = true;
        Some(SseEvent {
            event: &self.event,
            data: &self.data,
            id: &self.id,
            retry: self.retry,
        })
    }

    /// Parses lines until an event is complete (`true`) or the bytes run out (`false`).
    fn parse(&mut self) -> bool {
        if self.dispatched {
            self.dispatched = false;
            self.reset_event();
        }
        if !self.started {
            let rest = &self.buf[self.pos..];
            if rest.len() < BOM.len() && BOM.starts_with(rest) {
                // Too short to tell a BOM from data yet.
                return false;
            }
            if rest.starts_with(BOM) {
                self.pos += BOM.len();
            }
            self.started = true;
        }
        loop {
            if self.after_cr && self.pos < self.buf.len() {
                self.after_cr = false;
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                }
            }
            let from = self.pos + self.scanned;
            let Some(off) = find_line_end(&self.buf[from..]) else {
                self.scanned = self.buf.len() - self.pos;
                if self.scanned > self.max {
                    // The unfinished line is too long already: stop before it grows further.
                    self.overflow();
                }
                return false;
            };
            let end = from + off;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                match self.buf.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let start = self.pos;
            self.pos = next;
            self.scanned = 0;
            if self.line(start, end) {
                if self.oversized {
                    self.overflow();
                    return false;
                }
                return true;
            }
        }
    }

    /// Stops for good, and frees what was buffered: the stream it came from is failed.
    fn overflow(&mut self) {
        self.oversized = true;
        self.buf = Vec::new();
        self.pos = 0;
        self.scanned = 0;
        self.data = Vec::new();
        self.event = Vec::new();
        self.id = Vec::new();
    }

    /// Handles the line `buf[start..end]`; `true` when it completed an event or passed the
    /// limit.
    fn line(&mut self, start: usize, end: usize) -> bool {
        if end - start > self.max {
            self.oversized = true;
            return true;
        }
        let line = &self.buf[start..end];
        if line.is_empty() {
            if self.has_data {
                return true;
            }
            // A blank line with no data ends nothing, but clears the event type.
            self.reset_event();
            return false;
        }
        if line[0] == b':' {
            return false;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.data.len() + usize::from(self.has_data) + value.len() > self.max {
                    self.oversized = true;
                    return true;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            // An id with a NUL is ignored, as the spec says.
            b"id" if !value.contains(&0) => {
                self.id.clear();
                self.id.extend_from_slice(value);
            }
            // ASCII digits only, as the spec says (`+5` is not a number here); a value too
            // large for milliseconds in a u64 is ignored too.
            b"retry" if !value.is_empty() => {
                let ms = value.iter().try_fold(0u64, |n, &b| {
                    if b.is_ascii_digit() {
                        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
                    } else {
                        None
                    }
                });
                if let Some(ms) = ms {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        false
    }

    fn reset_event(&mut self) {
        self.data.clear();
        self.has_data = false;
        self.event.clear();
        self.retry = None;
    }
}

/// reqwest's top-level message is often just "error sending request"; the cause chain says
/// what actually happened (refused, reset, incomplete body).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of `raw` fed in pieces of `piece` bytes, as (event, data, id, retry).
    fn parse(raw: &[u8], piece: usize) -> Vec<(String, String, String, Option<u64>)> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in raw.chunks(piece) {
            p.push(c);
            while let Some(ev) = p.next_event() {
                let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                out.push((
                    s(ev.event),
                    s(ev.data),
                    s(ev.id),
                    ev.retry.map(|d| d.as_millis() as u64),
                ));
            }
        }
        out
    }

    /// reqwest has no crypto provider of its own here; `client` must install ring first.
    /// (Run alone, as `cargo test client_brings_its_tls_provider`, so that no other test has
    /// installed it.)
    #[test]
    fn client_brings_its_tls_provider() {
        for h2c in [false, true] {
            let opts = ClientOptions {
                connect_timeout: Duration::from_secs(1),
                http2_prior_knowledge: h2c,
                limits: BodyLimits::default(),
            };
            assert!(client(&opts).is_ok());
        }
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn parser_follows_the_spec_at_every_split() {
        let raw = concat!(
            "\u{feff}: comment\n",
            "data: one\n\n",
            "event: custom\nid: 42\ndata:two\ndata:  lines\nretry: 1500\n\n",
            "data\n\n",
            "event: dropped\n\n",
            "data: id carries over\nignored: field\n\n",
            "id: bad\u{0}id\nretry: x\ndata: héllo 🦀\r\n\r\n",
            "data: cr\r\rdata: tail never ends",
        );
        let want = vec![
            ("".into(), "one".into(), "".into(), None),
            (
                "custom".into(),
                "two\n lines".into(),
                "42".into(),
                Some(1500),
            ),
            ("".into(), "".into(), "42".into(), None),
            ("".into(), "id carries over".into(), "42".into(), None),
            ("".into(), "héllo 🦀".into(), "42".into(), None),
            ("".into(), "cr".into(), "42".into(), None),
        ];
        for piece in 1..=raw.len() {
            assert_eq!(parse(raw.as_bytes(), piece), want, "pieces of {piece}");
        }
    }

    #[test]
    fn line_ends_are_found_at_every_offset() {
        for len in 0..40 {
            for at in 0..=len {
                for end in [b'\n', b'\r'] {
                    // Bytes just around the searched values, and 0x80, to trip the word trick.
                    let mut hay: Vec<u8> = (0..len)
                        .map(|i| [0x0B, 0x0C, 0x09, 0x0E, 0x80, 0x8A, 0x8D, b'a'][i % 8])
                        .collect();
                    if at < len {
                        hay[at] = end;
                        hay.extend_from_slice(b"\n\r");
                    }
                    let want = hay.iter().position(|&b| b == b'\n' || b == b'\r');
                    assert_eq!(find_line_end(&hay), want, "{hay:?}");
                }
            }
        }
    }

    #[test]
    fn crlf_split_between_chunks_is_one_line_end() {
        let mut p = SseParser::default();
        p.push(b"data: a\r");
        assert!(p.next_event().is_none());
        p.push(b"\n\r");
        assert_eq!(p.next_event().map(|e| e.data.to_vec()), Some(b"a".to_vec()));
        p.push(b"\ndata: b\n\n");
        assert_eq!(p.next_event().map(|e| e.data.to_vec()), Some(b"b".to_vec()));
        assert!(p.next_event().is_none());
    }

    #[test]
    fn retry_takes_ascii_digits_only() {
        let retry = |value: &str| {
            let raw = format!("retry:{value}\ndata: x\n\n");
            parse(raw.as_bytes(), usize::MAX)[0].3
        };
        assert_eq!(retry("5"), Some(5));
        assert_eq!(retry(" 5"), Some(5), "one leading space is the separator's");
        assert_eq!(retry("007"), Some(7));
        for not_digits in [
            "+5",
            "-5",
            "  5",
            "5 ",
            "5a",
            "0x10",
            "",
            "\u{0665}",
            "18446744073709551616",
        ] {
            assert_eq!(retry(not_digits), None, "retry:{not_digits}");
        }
    }

    /// Events of `raw` pushed in `piece`-byte reads into a parser limited to `max`, and
    /// whether it stopped on the limit.
    fn parse_limited(raw: &[u8], piece: usize, max: usize) -> (Vec<Vec<u8>>, bool) {
        let mut p = SseParser::with_limit(max);
        let mut out = Vec::new();
        for c in raw.chunks(piece) {
            p.push(c);
            while let Some(ev) = p.next_event() {
                out.push(ev.data.to_vec());
            }
        }
        (out, p.oversized())
    }

    #[test]
    fn a_line_or_event_over_the_limit_stops_the_parser() {
        let max = 64;
        let long = "x".repeat(max - 6);
        // A line of exactly the limit passes; one byte more does not, whether it arrives
        // whole, in pieces, or never ends.
        let at_limit = format!("data: ok\n\ndata: {long}\n\n");
        let over = format!("data: ok\n\ndata: {long}x\n\ndata: never\n\n");
        let unended = format!("data: ok\n\ndata: {long}x");
        // Data lines each within the limit, together over it (the joining LF counts).
        let many = format!(
            "data: ok\n\ndata: {}\ndata: {}\n\n",
            "y".repeat(32),
            "z".repeat(32)
        );
        for piece in [1, 5, 64, usize::MAX] {
            let (events, stopped) = parse_limited(at_limit.as_bytes(), piece, max);
            assert_eq!(events, [b"ok".to_vec(), long.clone().into_bytes()]);
            assert!(!stopped);
            for raw in [&over, &unended, &many] {
                assert_eq!(
                    parse_limited(raw.as_bytes(), piece, max),
                    (vec![b"ok".to_vec()], true),
                    "{raw:?} in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn a_stopped_parser_holds_and_takes_nothing() {
        let mut p = SseParser::with_limit(1024);
        for _ in 0..64 {
            p.push(&[b'a'; 100]);
            assert!(p.next_event().is_none());
            if p.oversized() {
                break;
            }
        }
        assert!(p.oversized());
        p.push(&[b'a'; 4096]);
        p.push(b"\n\ndata: late\n\n");
        assert!(p.next_event().is_none());
        assert_eq!(p.buf.capacity(), 0, "the unfinished line is freed");
    }

    #[tokio::test]
    async fn an_oversized_body_fails_as_malformed_and_is_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let oversized = metrics::Recorder::register_counter(
            &recorder,
            &metrics::Key::from_name("oversized"),
            &metrics::Metadata::new("t", metrics::Level::INFO, None),
        );
        let limits = BodyLimits {
            max_event_bytes: 1024,
            oversized,
        };
        let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = read.clone();
        // An endless line: only the limit ends it.
        let body =
            futures::stream::once(async { Ok::<_, std::io::Error>(b"data: {}\n\n".to_vec()) })
                .chain(futures::stream::repeat_with(move || {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(vec![b'x'; 100])
                }));
        let got: Vec<_> = decode_limited("p".into(), limits, body).collect().await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().map(|e| e.data.as_str()), Ok("{}"));
        assert!(
            matches!(&got[1], Err(UpstreamError::Malformed { message, .. })
                if message.contains("1024 bytes")),
            "{:?}",
            got[1]
        );
        // The body was read just past the limit, and no further.
        assert_eq!(read.load(std::sync::atomic::Ordering::Relaxed), 11);
        assert!(
            recorder.handle().render().contains("oversized 1"),
            "{}",
            recorder.handle().render()
        );
    }

    #[tokio::test]
    async fn a_bad_event_type_or_id_does_not_fail_the_stream() {
        let chunks: Vec<Result<&[u8], std::io::Error>> = vec![Ok(
            b"event: \xFFping\nid: \xC3\ndata: {}\n\ndata: next\n\ndata: \xFF\n\n",
        )];
        let got: Vec<_> = decode("p".into(), futures::stream::iter(chunks))
            .collect()
            .await;
        assert_eq!(
            got[..2],
            [
                Ok(Event {
                    event: "\u{FFFD}ping".into(),
                    data: "{}".into(),
                    id: "\u{FFFD}".into(),
                    retry: None,
                }),
                Ok(Event {
                    event: "message".into(),
                    data: "next".into(),
                    id: "\u{FFFD}".into(),
                    retry: None,
                }),
            ]
        );
        // Data that is not UTF-8 is still malformed: it is the content.
        assert!(matches!(got[2], Err(UpstreamError::Malformed { .. })));
    }

    #[tokio::test]
    async fn decode_keeps_eventsource_events() {
        let chunks: Vec<Result<&[u8], std::io::Error>> =
            vec![Ok(b"event: ping\ndata: {}\n\nda"), Ok(b"ta: x\n\n")];
        let got: Vec<_> = decode("p".into(), futures::stream::iter(chunks))
            .collect()
            .await;
        assert_eq!(
            got,
            vec![
                Ok(Event {
                    event: "ping".into(),
                    data: "{}".into(),
                    ..Event::default()
                }),
                Ok(Event {
                    event: "message".into(),
                    data: "x".into(),
                    ..Event::default()
                }),
            ]
        );
    }

    #[test]
    fn error_messages_of_both_shapes() {
        assert_eq!(
            error_message(br#"{"error":{"message":"slow down","type":"rate_limit"}}"#).as_deref(),
            Some("slow down")
        );
        assert_eq!(
            error_message(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            )
            .as_deref(),
            Some("Overloaded")
        );
        assert_eq!(error_message(b"<html>"), None);
    }
}

/// Property tests: `PROPTEST_CASES` sets how many cases each runs (256 by default).
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// (type, data, id, retry in ms) of one event, its bytes decoded as the spec decodes them.
    type Ev = (String, String, String, Option<u64>);

    /// The WHATWG "interpret an event stream" algorithm, read plainly: decode the stream as
    /// UTF-8 (bad bytes as U+FFFD, one leading BOM dropped), split it into lines at CRLF, LF
    /// or CR, and act on each line. The last line has no end and is dropped, as is an event
    /// that no blank line dispatched. `retry` is kept with the event it came in, as sluice
    /// reads it (the spec sets the reconnection time at once).
    fn reference(raw: &[u8]) -> Vec<Ev> {
        let decoded = String::from_utf8_lossy(raw);
        let mut rest: &str = decoded.strip_prefix('\u{feff}').unwrap_or(&decoded);
        let mut lines = Vec::new();
        while let Some(i) = rest.find(['\r', '\n']) {
            lines.push(&rest[..i]);
            let end = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
            rest = &rest[i + end..];
        }
        let mut out = Vec::new();
        let (mut data, mut event, mut id, mut retry) =
            (String::new(), String::new(), String::new(), None);
        for line in lines {
            if line.is_empty() {
                // Dispatch: nothing when the data buffer is empty (no `data` field at all).
                if !data.is_empty() {
                    data.pop();
                    out.push((event.clone(), data.clone(), id.clone(), retry));
                }
                data.clear();
                event.clear();
                retry = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => event = value.to_owned(),
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" if !value.contains('\0') => id = value.to_owned(),
                "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                    if let Ok(ms) = value.parse() {
                        retry = Some(ms);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The events of `raw` read in pieces cut at `cuts`, by a parser limited to `max`, and
    /// whether it stopped on the limit.
    fn run(raw: &[u8], cuts: &[prop::sample::Index], max: usize) -> (Vec<Ev>, bool) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(raw.len() + 1)).collect();
        at.push(0);
        at.push(raw.len());
        at.sort_unstable();
        let mut p = SseParser::with_limit(max);
        let mut out = Vec::new();
        for w in at.windows(2) {
            p.push(&raw[w[0]..w[1]]);
            while let Some(ev) = p.next_event() {
                let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                out.push((
                    s(ev.event),
                    s(ev.data),
                    s(ev.id),
                    ev.retry.map(|d| d.as_millis() as u64),
                ));
            }
        }
        (out, p.oversized())
    }

    /// Bytes of event streams: field names, separators, line ends, BOMs, NULs, numbers,
    /// multi-byte and broken UTF-8, and any bytes at all.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            prop::sample::select(vec![
                &b"data"[..],
                b"data:",
                b"data: ",
                b"event:",
                b"event: ",
                b"id:",
                b"id: ",
                b"retry:",
                b"retry: ",
                b":",
                b" ",
                b"\n",
                b"\r",
                b"\r\n",
                b"\n\n",
                b"\r\n\r\n",
                b"\xEF\xBB\xBF",
                b"\0",
                b"+5",
                b"42",
                "é🦀".as_bytes(),
                b"\xFF",
                b"\xE2\x82",
                b"\xF0\x9F\xA6",
            ])
            .prop_map(<[u8]>::to_vec),
            "[a-z0-9 ]{0,6}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..6),
        ];
        prop::collection::vec(piece, 0..64).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn agrees_with_the_whatwg_algorithm(
            raw in stream(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let (events, stopped) = run(&raw, &cuts, DEFAULT_MAX_EVENT_BYTES);
            prop_assert!(!stopped);
            prop_assert_eq!(events, reference(&raw));
        }

        #[test]
        fn the_same_bytes_split_anywhere_give_the_same_events(
            raw in stream(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..16),
            max in prop_oneof![Just(DEFAULT_MAX_EVENT_BYTES), 1usize..48],
        ) {
            let whole = run(&raw, &[], max);
            prop_assert_eq!(&run(&raw, &cuts, max), &whole);
            // With a limit, the events before it are the spec's; without one hit, all are.
            let want = reference(&raw);
            if whole.1 {
                prop_assert!(want.starts_with(&whole.0), "{:?} vs {:?}", whole.0, want);
            } else {
                prop_assert_eq!(&whole.0, &want);
            }
        }
    }
}
