//! Any OpenAI-compatible Chat Completions API: OpenAI, DeepSeek, vLLM, Ollama, llama.cpp…

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::sse::{self, ClientOptions, Polled, SseBody};
use super::{EventStream, Provider, UpstreamError};
use crate::chat::{ChatRequest, FinishReason, GenParams, Message, UpstreamEvent, Usage};
use crate::config::Secret;

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
    stream_options: StreamOptions,
    #[serde(flatten)]
    params: &'a GenParams,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    /// Always asked for, so usage is recorded even for clients that did not ask.
    include_usage: bool,
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
            stream_options: StreamOptions {
                include_usage: true,
            },
            params: &req.params,
            extra: &req.extra,
        };
        let rb = match self.endpoint() {
            Ok(url) => self.client.post(url),
            Err(raw) => self.client.post(raw),
        };
        let mut rb = rb
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key.expose());
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| sse::send_error(&self.name, e))?;
        if !resp.status().is_success() {
            return Err(sse::status_error(&self.name, resp).await);
        }
        Ok(translate_body(self.name.clone(), resp.bytes_stream()))
    }
}

/// One `chat.completion.chunk`, read in place from the event's bytes: the text borrows
/// from them unless it holds escapes, and only the first choice is kept, so a token
/// allocates nothing but its own text.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: FirstChoice<'a>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

/// The first element of `choices`. The others are still checked to be valid choices, as
/// a `Vec<Choice>` would, but are not kept.
#[derive(Default)]
struct FirstChoice<'a>(Option<Choice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct First<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for First<'a> {
            type Value = FirstChoice<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Choice<'a>>()?;
                while seq.next_element::<Choice<'_>>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        d.deserialize_seq(First(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Text<'a>>,
}

/// A JSON string borrowed from the input when it has no escapes. (serde borrows a bare
/// `Cow` field, but not one inside an `Option`.)
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// Items of one stream waiting to be handed out: a chunk carries at most a token, a finish
/// reason and usage.
type Pending = VecDeque<Result<UpstreamEvent, UpstreamError>>;

/// Interprets one event's `data`, queueing what it means; `Break` ends the stream (`[DONE]`
/// or an error).
fn on_data(provider: &str, data: &[u8], out: &mut Pending) -> ControlFlow<()> {
    let data = trim(data);
    if data.is_empty() {
        return ControlFlow::Continue(());
    }
    if data == b"[DONE]" {
        return ControlFlow::Break(());
    }
    // sonic-rs rather than serde_json: the same serde types and the same verdicts (see the
    // test `sonic_reads_chunks_as_serde_json_does`), in about two thirds of the time, and
    // this parse is the largest single cost of relaying a token.
    let chunk: Chunk<'_> = match sonic_rs::from_slice(data) {
        Ok(c) => c,
        Err(e) => {
            out.push_back(Err(UpstreamError::Malformed {
                provider: provider.to_owned(),
                message: format!("chunk is not valid JSON: {e}"),
            }));
            return ControlFlow::Break(());
        }
    };
    if let Some(err) = chunk.error {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| err.to_string());
        let code = err.get("code").and_then(Value::as_str).map(str::to_owned);
        out.push_back(Err(UpstreamError::InBand {
            provider: provider.to_owned(),
            message,
            code,
        }));
        return ControlFlow::Break(());
    }
    // Only the first choice is relayed: sluice requests one (`n` is not forwarded).
    if let Some(choice) = chunk.choices.0 {
        if let Some(Text(text)) = choice.delta.and_then(|d| d.content) {
            if !text.is_empty() {
                out.push_back(Ok(UpstreamEvent::Token(text.into_owned())));
            }
        }
        if let Some(Text(reason)) = choice.finish_reason {
            out.push_back(Ok(UpstreamEvent::Finish(FinishReason::parse(&reason))));
        }
    }
    if let Some(u) = chunk.usage {
        out.push_back(Ok(UpstreamEvent::Usage(Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        })));
    }
    ControlFlow::Continue(())
}

/// `str::trim` on bytes: SSE data is trimmed as text was before, without a UTF-8 pass over
/// every event in the common, ASCII-bounded case.
fn trim(data: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r');
    let start = data.iter().position(|b| !ws(b)).unwrap_or(data.len());
    let end = data.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    let data = &data[start..end];
    match (data.first(), data.last()) {
        (Some(&f), Some(&l)) if f >= 0x80 || l >= 0x80 => match std::str::from_utf8(data) {
            Ok(s) => s.trim().as_bytes(),
            Err(_) => data,
        },
        _ => data,
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
        let mut pending = Pending::with_capacity(3);
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let flow = on_data(&provider, ev.data.as_bytes(), &mut pending);
            while let Some(item) = pending.pop_front() {
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
    Box::pin(Relay {
        body: SseBody::new(provider.clone(), body),
        provider,
        pending: Pending::with_capacity(3),
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
    type Item = Result<UpstreamEvent, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.pop_front() {
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let flow = match this.body.poll_event(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Polled::End) => ControlFlow::Break(()),
                Poll::Ready(Polled::Failed(e)) => {
                    this.pending.push_back(Err(e));
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
    async fn run(raw: &[u8], piece: usize) -> Vec<Result<UpstreamEvent, UpstreamError>> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = raw
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let events = sse::decode("p".into(), futures::stream::iter(chunks));
        translate("p".into(), events).collect().await
    }

    /// The decoding sluice used before its own parser: the eventsource-stream crate.
    async fn run_eventsource(
        raw: &[u8],
        piece: usize,
    ) -> Vec<Result<UpstreamEvent, UpstreamError>> {
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
    async fn run_body(raw: &[u8], piece: usize) -> Vec<Result<UpstreamEvent, UpstreamError>> {
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
        assert_eq!(events[0], Ok(UpstreamEvent::Token("a".into())));
        assert!(matches!(
            &events[1],
            Err(UpstreamError::Transport { message, .. }) if message.contains("reset")
        ));
        assert_eq!(events.len(), 2);
    }

    fn text(events: &[Result<UpstreamEvent, UpstreamError>]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(UpstreamEvent::Token(t)) => Some(t.as_str()),
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
        assert!(whole.contains(&Ok(UpstreamEvent::Finish(FinishReason::Stop))));
        assert!(whole.contains(&Ok(UpstreamEvent::Usage(Usage {
            prompt_tokens: 5,
            completion_tokens: 3
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
        assert_eq!(events, vec![Ok(UpstreamEvent::Token("a".into()))]);
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

    /// What a chunk means, for comparing the two parsers.
    fn meaning(c: &Chunk<'_>) -> String {
        let choice = c.choices.0.as_ref();
        format!(
            "{:?} {:?} {:?} {:?}",
            choice
                .and_then(|c| c.delta.as_ref())
                .and_then(|d| d.content.as_ref())
                .map(|t| &t.0),
            choice.and_then(|c| c.finish_reason.as_ref()).map(|t| &t.0),
            c.usage
                .as_ref()
                .map(|u| (u.prompt_tokens, u.completion_tokens)),
            c.error,
        )
    }

    /// Chunks are read with sonic-rs (SIMD, about a third less time per token than
    /// serde_json); it must accept, refuse and read exactly what serde_json does.
    #[test]
    fn sonic_reads_chunks_as_serde_json_does() {
        let cases: &[&[u8]] = &[
            br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
            br#"{"choices":[{"delta":{"content":"caf\u00e9 \ud83d\ude00 \"q\" \\ \/ \t"}}]}"#,
            "{\"choices\":[{\"delta\":{\"content\":\"caf\u{e9} \u{1f600}\"}}]}".as_bytes(),
            br#"{"choices":[{"delta":{"content":"lone \ud800"}}]}"#,
            br#"{"choices":[{"delta":{"content":"bad \x"}}]}"#,
            b"{\"choices\":[{\"delta\":{\"content\":\"raw \xff\xfe\"}}]}",
            b"{\"choices\":[{\"delta\":{\"content\":\"ctl \x01\"}}]}",
            br#"{"choices":[{"delta":{"content":"a"},"logprobs":{"content":[{"token":"a","logprob":-0.1,"bytes":[97],"top_logprobs":[]}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"details":{"x":[1,2.5e3,true,null]}}}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            br#"{"choices":[{"delta":{"role":"assistant"}},{"delta":{"content":"second"}}]}"#,
            br#"{"choices":[{"delta":{"content":"a"}}, 5]}"#,
            br#"{"choices":null,"usage":null,"error":null}"#,
            br#"{"error":{"message":"overloaded","code":"busy","param":null}}"#,
            br#"{"choices":[{"delta":{"content":null},"finish_reason":"length"}]}"#,
            br#"{"choices":[{"delta":{"content":"a"}}]} "#,
            br#"{"choices":[{"delta":{"content":"a"}}]}x"#,
            br#"{"choices":[{"delta":{"content":"a"}}]}{}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],"choices":[]}"#,
            br#"{"usage":{"prompt_tokens":1.5,"completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":4294967296,"completion_tokens":1}}"#,
            br#"{"created":1e400,"choices":[]}"#,
            br#"{"choices":[{"delta":{"content":"a"}}],}"#,
            br#"{"choices":[{"delta":{"content":"a"}}]"#,
            br#"{"choices":[{"delta":"text"}]}"#,
            br#"null"#,
            br#"[]"#,
            br#"{}"#,
            br#"{"choices":[{"delta":{"content":"a"}}], "id":"x\u0000"}"#,
        ];
        for case in cases {
            let sonic = sonic_rs::from_slice::<Chunk<'_>>(case).map(|c| meaning(&c));
            let serde = serde_json::from_slice::<Chunk<'_>>(case).map(|c| meaning(&c));
            assert_eq!(
                sonic.as_ref().ok(),
                serde.as_ref().ok(),
                "{}: sonic {sonic:?}, serde_json {serde:?}",
                String::from_utf8_lossy(case)
            );
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
