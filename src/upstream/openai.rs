//! Any OpenAI-compatible Chat Completions API: OpenAI, DeepSeek, vLLM, Ollama, llama.cpp…

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value};

use super::sse::{self, BodyLimits, ClientOptions, Polled, SseBody};
use super::{EventStream, Provider, UpstreamError};
use crate::config::Secret;
use crate::domain::chunk::{self, Chunk, Payload};
use crate::domain::{ChatRequest, GenParams, Message};

pub struct OpenAi {
    name: String,
    client: reqwest::Client,
    /// Completion endpoints of every configured base URL; requests rotate over them so one
    /// provider can spread streams over several upstream hosts or ports. Parsed once: a URL
    /// parse per request was several percent of a request's cost. One that does not parse
    /// is kept as text, so the request fails as it always did.
    endpoints: Vec<Result<reqwest::Url, String>>,
    next: AtomicUsize,
    api_key: Option<Secret>,
    limits: BodyLimits,
}

impl OpenAi {
    pub fn new(
        name: String,
        base_urls: &[String],
        api_key: Option<Secret>,
        opts: &ClientOptions,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            name,
            client: sse::client(opts)?,
            endpoints: base_urls
                .iter()
                .map(|u| {
                    let url = format!("{}/chat/completions", u.trim_end_matches('/'));
                    reqwest::Url::parse(&url).map_err(|_| url)
                })
                .collect(),
            next: AtomicUsize::new(0),
            api_key,
            limits: opts.limits.clone(),
        })
    }

    fn endpoint(&self) -> Result<reqwest::Url, &str> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len().max(1);
        match self.endpoints.get(i) {
            Some(Ok(url)) => Ok(url.clone()),
            Some(Err(raw)) => Err(raw),
            None => Err(""),
        }
    }
}

/// The body sent upstream. Borrowing from the request avoids copying the conversation.
#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: &'a [Message],
    stream: bool,
    stream_options: StreamOptions<'a>,
    #[serde(flatten)]
    params: &'a GenParams,
    #[serde(flatten)]
    extra: Without<'a>,
}

/// The client's `stream_options` (they may hold options sluice does not know), with usage
/// always asked for, so it is recorded even for clients that did not ask.
struct StreamOptions<'a>(Option<&'a Map<String, Value>>);

impl Serialize for StreamOptions<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let theirs = self
            .0
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "include_usage");
        let mut m = s.serialize_map(None)?;
        for (k, v) in theirs {
            m.serialize_entry(k, v)?;
        }
        m.serialize_entry("include_usage", &true)?;
        m.end()
    }
}

/// The fields sluice forwards as they are: all but those it writes itself.
struct Without<'a>(&'a Map<String, Value>);

impl Serialize for Without<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.0 {
            if !matches!(
                k.as_str(),
                "stream_options" | "stream" | "model" | "messages"
            ) {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

#[async_trait]
impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, req: &ChatRequest, model: &str) -> Result<EventStream, UpstreamError> {
        let body = Body {
            model,
            messages: &req.messages,
            stream: true,
            stream_options: StreamOptions(
                req.extra.get("stream_options").and_then(Value::as_object),
            ),
            params: &req.params,
            extra: Without(&req.extra),
        };
        let rb = match self.endpoint() {
            Ok(url) => self.client.post(url),
            Err(raw) => self.client.post(raw),
        };
        let rb = rb
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        let resp = self.send(rb).await?;
        Ok(translate_body_limited(
            self.name.clone(),
            self.limits.clone(),
            resp.bytes_stream(),
        ))
    }

    async fn list_models(&self) -> Option<Result<Vec<String>, UpstreamError>> {
        Some(self.fetch_models().await)
    }
}

/// An upstream that answers its model list slowly is skipped rather than waited for.
const LIST_MODELS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl OpenAi {
    /// Sends with the provider's key; a status other than success is the provider's error.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, UpstreamError> {
        let rb = match &self.api_key {
            Some(key) => rb.bearer_auth(key.expose()),
            None => rb,
        };
        let resp = rb
            .send()
            .await
            .map_err(|e| sse::send_error(&self.name, e))?;
        if !resp.status().is_success() {
            return Err(sse::status_error(&self.name, resp).await);
        }
        Ok(resp)
    }

    /// `GET <base>/models` of the first base URL: the ids, in the upstream's order.
    async fn fetch_models(&self) -> Result<Vec<String>, UpstreamError> {
        let completions = match self.endpoints.first() {
            Some(Ok(u)) => u.as_str(),
            Some(Err(raw)) => raw.as_str(),
            None => "",
        };
        let base = completions
            .strip_suffix("/chat/completions")
            .unwrap_or(completions);
        let url = format!("{base}/models");
        let resp = self
            .send(self.client.get(url).timeout(LIST_MODELS_TIMEOUT))
            .await?;
        let malformed = |message: String| UpstreamError::Malformed {
            provider: self.name.clone(),
            message,
        };
        // Read up to the provider's limit, not whole: an upstream could send without end.
        let max = self.limits.max_event_bytes;
        let mut body = Vec::new();
        let mut chunks = resp.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| malformed(format!("model list: {e}")))?;
            if body.len() + chunk.len() > max {
                return Err(malformed(format!(
                    "model list longer than {max} bytes (SLUICE_UPSTREAM_MAX_EVENT_BYTES)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| malformed(format!("model list: {e}")))?;
        let data = v["data"]
            .as_array()
            .ok_or_else(|| malformed("model list without `data`".into()))?;
        Ok(data
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect())
    }
}

/// Items of one stream waiting to be handed out: a payload yields one chunk or one error.
type Pending = Option<Result<Chunk, UpstreamError>>;

/// Interprets one event's `data`; `Break` ends the stream (`[DONE]` or an error).
fn on_data(provider: &str, data: &[u8], out: &mut Pending) -> ControlFlow<()> {
    let data = chunk::trim(data);
    if data.is_empty() {
        return ControlFlow::Continue(());
    }
    if data == b"[DONE]" {
        return ControlFlow::Break(());
    }
    match Chunk::parse(data) {
        Ok(Payload::Chunk(c)) => {
            *out = Some(Ok(c));
            ControlFlow::Continue(())
        }
        Ok(Payload::Error { message, code }) => {
            *out = Some(Err(UpstreamError::InBand {
                provider: provider.to_owned(),
                message,
                code,
            }));
            ControlFlow::Break(())
        }
        Err(message) => {
            *out = Some(Err(UpstreamError::Malformed {
                provider: provider.to_owned(),
                message,
            }));
            ControlFlow::Break(())
        }
    }
}

/// Turns OpenAI `chat.completion.chunk` events into upstream events. The stream ends at
/// `[DONE]`, at EOF (some servers never send `[DONE]`), or after the first error.
pub fn translate<S>(provider: String, events: S) -> EventStream
where
    S: Stream<Item = Result<eventsource_stream::Event, UpstreamError>> + Send + 'static,
{
    Box::pin(async_stream::stream! {
        futures::pin_mut!(events);
        let mut pending: Pending = None;
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let flow = on_data(&provider, ev.data.as_bytes(), &mut pending);
            if let Some(item) = pending.take() {
                yield item;
            }
            if flow.is_break() {
                return;
            }
        }
    })
}

/// [`translate`] straight from the response body: the relay path. Events are parsed where
/// they lie in the parser's buffer, so a token costs one allocation, its text.
pub fn translate_body<S, B, E>(provider: String, body: S) -> EventStream
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + 'static,
{
    translate_body_limited(provider, BodyLimits::default(), body)
}

/// [`translate_body`] with the provider's limits.
pub fn translate_body_limited<S, B, E>(provider: String, limits: BodyLimits, body: S) -> EventStream
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + 'static,
{
    Box::pin(Relay {
        body: SseBody::with_limits(provider.clone(), limits, body),
        provider,
        pending: None,
        done: false,
    })
}

struct Relay<S> {
    body: SseBody<S>,
    provider: String,
    pending: Pending,
    done: bool,
}

impl<S, B, E> Stream for Relay<S>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::error::Error,
{
    type Item = Result<Chunk, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.take() {
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let flow = match this.body.poll_event(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Polled::End) => ControlFlow::Break(()),
                Poll::Ready(Polled::Failed(e)) => {
                    this.pending = Some(Err(e));
                    ControlFlow::Break(())
                }
                Poll::Ready(Polled::Event(ev)) => {
                    on_data(&this.provider, ev.data, &mut this.pending)
                }
            };
            this.done = flow.is_break();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Feeds `raw` through SSE decoding and translation, cut into pieces of `piece` bytes.
    async fn run(raw: &[u8], piece: usize) -> Vec<Result<Chunk, UpstreamError>> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = raw
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let events = sse::decode("p".into(), futures::stream::iter(chunks));
        translate("p".into(), events).collect().await
    }

    /// The decoding sluice used before its own parser: the eventsource-stream crate.
    async fn run_eventsource(raw: &[u8], piece: usize) -> Vec<Result<Chunk, UpstreamError>> {
        use eventsource_stream::Eventsource;
        let chunks: Vec<Result<Bytes, std::io::Error>> = raw
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let events = futures::stream::iter(chunks).eventsource().map(|r| {
            r.map_err(|e| UpstreamError::Malformed {
                provider: "p".into(),
                message: e.to_string(),
            })
        });
        translate("p".into(), events).collect().await
    }

    /// The relay path over the same pieces; it must agree with [`run`] everywhere.
    async fn run_body(raw: &[u8], piece: usize) -> Vec<Result<Chunk, UpstreamError>> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = raw
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        translate_body("p".into(), futures::stream::iter(chunks))
            .collect()
            .await
    }

    #[tokio::test]
    async fn relay_path_agrees_with_translate() {
        let fixtures = [
            STREAM.to_owned(),
            STREAM.replace('\n', "\r\n"),
            STREAM.replace('\n', "\r"),
            format!("\u{feff}{STREAM}"),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n".to_owned(),
            concat!(
                "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
                "data: {\"error\":{\"message\":\"overloaded\",\"code\":\"busy\"}}\n\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
            )
            .to_owned(),
            "data: {\"choices\":[{\"delta\":{\"content\":\n\n".to_owned(),
            // Escapes (an owned token), several choices, a null choice list, data over two
            // lines, whitespace around the payload, an event name, an unterminated last event.
            concat!(
                "event: delta\nid: 7\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"hi\\\"\\n\"}},",
                "{\"delta\":{\"content\":\"other\"}}]}\n\n",
                "data: {\"choices\":\ndata: [{\"delta\":{\"content\":\"two lines\"}}]}\n\n",
                "data:  \t{\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"length\"}]} \n\n",
                "data: {\"choices\":null}\n\n",
            )
            .to_owned(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}, 5]}\n\ndata: [DONE]\n\n".to_owned(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"del".to_owned(),
            "data: [DONE]\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"late\"}}]}\n\n".to_owned(),
        ];
        for raw in &fixtures {
            let want = run(raw.as_bytes(), usize::MAX).await;
            for piece in [1, 2, 3, 5, 7, 64, usize::MAX] {
                let got = run_body(raw.as_bytes(), piece).await;
                assert_eq!(
                    format!("{got:?}"),
                    format!("{want:?}"),
                    "{raw:?} in pieces of {piece}"
                );
                let old = run(raw.as_bytes(), piece).await;
                assert_eq!(
                    format!("{old:?}"),
                    format!("{want:?}"),
                    "{raw:?} in pieces of {piece}"
                );
                // eventsource-stream panics on a byte order mark (it slices inside it).
                if !raw.starts_with('\u{feff}') {
                    let reference = run_eventsource(raw.as_bytes(), piece).await;
                    assert_eq!(
                        format!("{reference:?}"),
                        format!("{want:?}"),
                        "{raw:?} in pieces of {piece}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_model_list_over_the_limit_is_refused_without_reading_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"data\":\"".to_vec();
            let mut written = 0;
            while sock.write_all(&out).await.is_ok() {
                written += out.len();
                out = vec![b'x'; 16 * 1024];
            }
            let _ = tx.send(written);
        });
        let opts = ClientOptions {
            connect_timeout: std::time::Duration::from_secs(1),
            http2_prior_knowledge: false,
            limits: BodyLimits {
                max_event_bytes: 64 * 1024,
                ..BodyLimits::default()
            },
        };
        let p = OpenAi::new("p".into(), &[format!("http://{addr}/v1")], None, &opts).unwrap();
        match p.fetch_models().await {
            Err(UpstreamError::Malformed { message, .. }) => {
                assert!(message.contains("longer than 65536 bytes"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // The connection is closed, a bounded way past the limit (socket buffers).
        let written = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap();
        assert!(written < 32 << 20, "{written} bytes read");
    }

    #[tokio::test]
    async fn relay_path_reports_a_broken_body() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            )),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset",
            )),
        ];
        let events: Vec<_> = translate_body("p".into(), futures::stream::iter(chunks))
            .collect()
            .await;
        assert_eq!(events[0].as_ref().map(|c| c.content()), Ok(Some("a")));
        assert!(matches!(
            &events[1],
            Err(UpstreamError::Transport { message, .. }) if message.contains("reset")
        ));
        assert_eq!(events.len(), 2);
    }

    fn text(events: &[Result<Chunk, UpstreamError>]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(c) => c.content(),
                _ => None,
            })
            .collect()
    }

    const STREAM: &str = concat!(
        ": keep-alive comment\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hé\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo 世界 🦀\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n",
        "data: [DONE]\n\n",
    );

    #[tokio::test]
    async fn every_split_point_yields_the_same_events() {
        let whole = run(STREAM.as_bytes(), usize::MAX).await;
        assert_eq!(text(&whole), "Héllo 世界 🦀");
        assert!(whole.iter().any(|c| {
            c.as_ref()
                .is_ok_and(|c| c.finish() == Some(&crate::domain::FinishReason::Stop))
        }));
        assert!(whole.iter().any(|c| c.as_ref().is_ok_and(|c| c.usage()
            == Some(crate::domain::Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                ..Default::default()
            }))));
        for piece in 1..8 {
            let split = run(STREAM.as_bytes(), piece).await;
            assert_eq!(format!("{split:?}"), format!("{whole:?}"), "piece {piece}");
        }
    }

    #[tokio::test]
    async fn crlf_and_cr_line_ends() {
        for sep in ["\r\n", "\r"] {
            let raw = STREAM.replace('\n', sep);
            let events = run(raw.as_bytes(), 3).await;
            assert_eq!(text(&events), "Héllo 世界 🦀", "separator {sep:?}");
        }
    }

    #[tokio::test]
    async fn eof_without_done_ends_cleanly() {
        let raw = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let events = run(raw.as_bytes(), 4).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].as_ref().map(|c| c.content()), Ok(Some("a")));
    }

    #[tokio::test]
    async fn in_band_error_ends_the_stream() {
        let raw = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"overloaded\",\"code\":\"busy\"}}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
        );
        let events = run(raw.as_bytes(), 7).await;
        assert_eq!(events.len(), 2);
        match &events[1] {
            Err(UpstreamError::InBand { message, code, .. }) => {
                assert_eq!(message, "overloaded");
                assert_eq!(code.as_deref(), Some("busy"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_chunk_is_an_error() {
        let raw = "data: {\"choices\":[{\"delta\":{\"content\":\n\n";
        let events = run(raw.as_bytes(), 5).await;
        assert!(matches!(
            events.as_slice(),
            [Err(UpstreamError::Malformed { .. })]
        ));
    }
}

/// Property tests: `PROPTEST_CASES` sets how many cases each runs (256 by default).
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// One piece of a reply, as a `delta` says it.
    #[derive(Debug, Clone, PartialEq)]
    enum Piece {
        Text(String),
        Reasoning(String),
        /// A tool call's arguments fragment: (call index, fragment).
        Args(u32, String),
    }

    fn piece() -> impl Strategy<Value = Piece> {
        let text = "(?s).{0,12}";
        prop_oneof![
            text.prop_map(Piece::Text),
            text.prop_map(Piece::Reasoning),
            (0u32..3, text).prop_map(|(i, t)| Piece::Args(i, t)),
        ]
    }

    fn chunk_json(p: &Piece) -> Value {
        let delta = match p {
            Piece::Text(t) => json!({"content": t}),
            Piece::Reasoning(t) => json!({"reasoning_content": t}),
            Piece::Args(i, t) => {
                json!({"tool_calls": [{"index": i, "function": {"arguments": t}}]})
            }
        };
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
    }

    /// The pieces a chunk's delta carries, read back from its JSON.
    fn pieces_of(c: &Chunk) -> Vec<Piece> {
        let v: Value = serde_json::from_slice(c.payload()).unwrap_or_default();
        let delta = &v["choices"][0]["delta"];
        let mut out = Vec::new();
        let text = |k: &str| delta[k].as_str().map(str::to_owned);
        out.extend(text("content").map(Piece::Text));
        out.extend(text("reasoning_content").map(Piece::Reasoning));
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = call["index"].as_u64().unwrap_or(u64::MAX) as u32;
            let args = call["function"]["arguments"].as_str().unwrap_or_default();
            out.push(Piece::Args(i, args.to_owned()));
        }
        out
    }

    /// An upstream body: each chunk framed with a random line end, some with an event type,
    /// an id (bytes that need not be UTF-8) or a comment before them; maybe `[DONE]`.
    fn body(pieces: &[Piece], framing: &[(u8, Vec<u8>)], done: bool) -> Vec<u8> {
        let mut raw = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let (how, extra) = &framing[i % framing.len()];
            let eol: &[u8] = [&b"\n"[..], b"\r\n", b"\r"][usize::from(how % 3)];
            match how / 3 % 4 {
                1 => raw.extend_from_slice(b"event: delta"),
                2 => raw.extend_from_slice(b"id: "),
                3 => raw.extend_from_slice(b": "),
                _ => {}
            }
            if how / 3 % 4 != 0 {
                raw.extend_from_slice(extra);
                raw.extend_from_slice(eol);
            }
            raw.extend_from_slice(b"data: ");
            raw.extend_from_slice(chunk_json(p).to_string().as_bytes());
            raw.extend_from_slice(eol);
            raw.extend_from_slice(eol);
        }
        if done {
            raw.extend_from_slice(b"data: [DONE]\n\n");
        }
        raw
    }

    fn framing() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        let extra = prop::collection::vec(any::<u8>(), 0..6).prop_map(|b| {
            b.into_iter()
                .filter(|b| !matches!(b, b'\r' | b'\n'))
                .collect::<Vec<u8>>()
        });
        prop::collection::vec((any::<u8>(), extra), 1..8)
    }

    /// Both decoding paths over `raw` cut at `cuts`; they must agree.
    fn translate_both(
        raw: &[u8],
        cuts: &[prop::sample::Index],
    ) -> Vec<Result<Chunk, UpstreamError>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(raw.len() + 1)).collect();
        at.extend([0, raw.len()]);
        at.sort_unstable();
        let chunks = || -> Vec<Result<Vec<u8>, std::io::Error>> {
            at.windows(2)
                .map(|w| Ok(raw[w[0]..w[1]].to_vec()))
                .collect()
        };
        let relay: Vec<_> = futures::executor::block_on(
            translate_body("p".into(), futures::stream::iter(chunks())).collect(),
        );
        let owned: Vec<_> = futures::executor::block_on(
            translate(
                "p".into(),
                sse::decode("p".into(), futures::stream::iter(chunks())),
            )
            .collect(),
        );
        // The same chunks, and the same failure (its message may differ).
        let same = |r: &Result<Chunk, UpstreamError>| match r {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(e.code().to_owned()),
        };
        assert_eq!(
            relay.iter().map(same).collect::<Vec<_>>(),
            owned.iter().map(same).collect::<Vec<_>>()
        );
        relay
    }

    proptest! {
        #[test]
        fn every_piece_of_a_valid_stream_arrives_in_order(
            pieces in prop::collection::vec(piece(), 0..24),
            framing in framing(),
            done in any::<bool>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let out = translate_both(&body(&pieces, &framing, done), &cuts);
            prop_assert_eq!(out.len(), pieces.len());
            prop_assert!(out.iter().all(Result::is_ok), "{:?}", out);
            let got: Vec<Piece> = out.iter().flatten().flat_map(pieces_of).collect();
            prop_assert_eq!(got, pieces);
        }

        /// Cut, garbled or padded streams: never a panic; each event with data is one item,
        /// a chunk as it came or an error, and an error is the last item.
        #[test]
        fn a_mutated_stream_is_relayed_or_failed_never_dropped(
            pieces in prop::collection::vec(piece(), 1..12),
            framing in framing(),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), 0usize..4, prop::collection::vec(any::<u8>(), 0..4)),
                1..6,
            ),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut raw = body(&pieces, &framing, true);
            for (at, kind, bytes) in edits {
                let i = at.index(raw.len() + 1);
                match kind {
                    0 => raw.truncate(i),
                    1 => drop(raw.splice(i..i, bytes)),
                    2 => drop(raw.drain(i..(i + bytes.len()).min(raw.len()))),
                    _ => {
                        if let Some(b) = raw.get_mut(i) {
                            *b ^= bytes.first().copied().unwrap_or(0x20) | 1;
                        }
                    }
                }
            }
            let out = translate_both(&raw, &cuts);
            // What each event's data should become, from the parser the other props check.
            let mut want = Vec::new();
            let mut p = sse::SseParser::default();
            p.push(&raw);
            while let Some(ev) = p.next_event() {
                let data = chunk::trim(ev.data);
                if data.is_empty() {
                    continue;
                }
                if data == b"[DONE]" {
                    break;
                }
                match Chunk::parse(data) {
                    Ok(Payload::Chunk(_)) => want.push(Ok(data.to_vec())),
                    Ok(Payload::Error { .. }) => { want.push(Err("upstream_error")); break; }
                    Err(_) => { want.push(Err("upstream_malformed")); break; }
                }
            }
            prop_assert_eq!(out.len(), want.len());
            for (got, want) in out.iter().zip(&want) {
                match (got, want) {
                    (Ok(c), Ok(data)) => {
                        let same: Vec<u8> = data
                            .iter()
                            .map(|&b| if matches!(b, b'\r' | b'\n') { b' ' } else { b })
                            .collect();
                        prop_assert_eq!(c.payload(), &same[..]);
                    }
                    (Err(e), Err(code)) => prop_assert_eq!(e.code(), *code),
                    (got, want) => {
                        return Err(TestCaseError::fail(format!("{got:?} where {want:?}")));
                    }
                }
            }
        }
    }
}
