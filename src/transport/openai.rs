//! The OpenAI Chat Completions wire format on the client side: request parsing and the
//! `chat.completion.chunk` stream.

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::sse::{PING, data_event};
use crate::chat::{ChatRequest, FinishReason, GenParams, Message, UpstreamEvent, Usage};
use crate::error::ErrorBody;
use crate::upstream::{Completion, Relay, UpstreamError};

/// `POST /v1/chat/completions` as clients send it.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only 1 is supported: one reply per request keeps the relay a single stream.
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(flatten)]
    pub params: GenParams,
    /// Everything else is forwarded to OpenAI-compatible upstreams untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What the response needs besides the generation itself.
#[derive(Debug, Clone)]
pub struct ResponseOptions {
    pub stream: bool,
    pub include_usage: bool,
}

impl CompletionRequest {
    /// Checks what serde cannot, naming the field at fault.
    pub fn into_domain(self) -> Result<(ChatRequest, ResponseOptions), String> {
        if self.model.trim().is_empty() {
            return Err("model: must not be empty".into());
        }
        if self.messages.is_empty() {
            return Err("messages: must contain at least one message".into());
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err("n: only 1 is supported".into());
            }
        }
        if let Some(t) = self.params.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err("temperature: must be between 0 and 2".into());
            }
        }
        if let Some(p) = self.params.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err("top_p: must be between 0 and 1".into());
            }
        }
        let opts = ResponseOptions {
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        };
        Ok((
            ChatRequest {
                model: self.model,
                messages: self.messages,
                params: self.params,
                extra: self.extra,
            },
            opts,
        ))
    }
}

/// Encodes `chat.completion.chunk` events. The part of every chunk before the delta is
/// rendered once, so a token costs one JSON string escape and one buffer.
pub struct ChunkEncoder {
    head: Vec<u8>,
}

impl ChunkEncoder {
    pub fn new(id: &str, created: u64, model: &str) -> Self {
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"{\"id\":");
        write_json(&mut head, id);
        head.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        head.extend_from_slice(created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        write_json(&mut head, model);
        head.extend_from_slice(b",\"choices\":[");
        Self { head }
    }

    /// `extra` is the exact length `body` writes when known: a `Vec` filled to its capacity
    /// becomes `Bytes` as is, while one with room left costs a second allocation.
    fn frame(&self, body: impl FnOnce(&mut Vec<u8>), extra: usize) -> Bytes {
        let mut buf = Vec::with_capacity(FRAMING + self.head.len() + extra);
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(&self.head);
        body(&mut buf);
        buf.extend_from_slice(b"\n\n");
        Bytes::from(buf)
    }

    pub fn role(&self) -> Bytes {
        const ROLE: &[u8] =
            br#"{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        self.frame(|b| b.extend_from_slice(ROLE), ROLE.len())
    }

    pub fn token(&self, text: &str) -> Bytes {
        let mut buf = Vec::with_capacity(self.token_len(text));
        self.write_token(&mut buf, text);
        Bytes::from(buf)
    }

    /// The length of [`token`](Self::token)'s event.
    pub fn token_len(&self, text: &str) -> usize {
        FRAMING + self.head.len() + TOKEN_OPEN.len() + json_len(text) + TOKEN_CLOSE.len()
    }

    /// Appends [`token`](Self::token)'s event to `buf`, so several can share one buffer.
    pub fn write_token(&self, buf: &mut Vec<u8>, text: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(&self.head);
        buf.extend_from_slice(TOKEN_OPEN);
        write_json(buf, text);
        buf.extend_from_slice(TOKEN_CLOSE);
        buf.extend_from_slice(b"\n\n");
    }

    pub fn finish(&self, reason: &FinishReason) -> Bytes {
        const OPEN: &[u8] = br#"{"index":0,"delta":{},"finish_reason":"#;
        let reason = reason.as_str();
        self.frame(
            |b| {
                b.extend_from_slice(OPEN);
                write_json(b, reason);
                b.extend_from_slice(b"}]}");
            },
            OPEN.len() + json_len(reason) + 3,
        )
    }

    pub fn usage(&self, u: Usage) -> Bytes {
        self.frame(
            |b| {
                b.extend_from_slice(b"],\"usage\":");
                let _ = serde_json::to_writer(&mut *b, &WireUsage::from(u));
                b.push(b'}');
            },
            80,
        )
    }
}

/// `data: ` and the blank line after the JSON.
const FRAMING: usize = 8;
const TOKEN_OPEN: &[u8] = br#"{"index":0,"delta":{"content":"#;
const TOKEN_CLOSE: &[u8] = br#"},"finish_reason":null}]}"#;

/// Most events, and bytes, one frame may gather from a burst: a bound on what one poll
/// does, so an upstream flooding tokens cannot keep a task busy or build a huge buffer.
const MAX_BATCH_EVENTS: usize = 256;
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Events closer than this to the one before count as a burst, worth waiting a scheduler
/// pass or two for the rest of (see `chunk_stream`). Models write tokens tens of ms apart.
const BURST_GAP: Duration = Duration::from_millis(1);
const BURST_YIELDS: u32 = 2;

fn write_json(buf: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// The length of `s` as serde_json writes it: quoted, with `"` `\\` and control characters
/// escaped (the short forms where JSON has one, `\u00XX` otherwise).
fn json_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0A | 0x0C | 0x0D => 2,
            0x00..=0x1F => 6,
            _ => 1,
        })
        .sum::<usize>()
}

pub const DONE: Bytes = Bytes::from_static(b"data: [DONE]\n\n");

/// An in-band error: the stream already carries a 200 status, so the failure travels as a
/// final `data: {"error":…}` event, with no `[DONE]` after it.
pub fn error_event(message: &str, kind: &str, code: &str) -> Bytes {
    #[derive(Serialize)]
    struct Envelope<'a> {
        error: ErrorBody<'a>,
    }
    let body = Envelope {
        error: ErrorBody {
            message,
            kind,
            code,
        },
    };
    data_event(&serde_json::to_vec(&body).unwrap_or_default())
}

fn upstream_error_event(e: &UpstreamError) -> Bytes {
    let kind = match e {
        UpstreamError::Timeout { .. } => "timeout_error",
        _ => "upstream_error",
    };
    error_event(&e.to_string(), kind, e.code())
}

#[derive(Serialize)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total(),
        }
    }
}

/// Identity of one response.
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    /// The model name the client asked for, echoed back.
    pub model: String,
}

/// Relays a generation as `chat.completion.chunk` events, token by token with nothing held
/// back, with `: ping` comments while the upstream is silent. Dropping the stream (the
/// client went away) drops the upstream request with it.
pub fn chunk_stream(
    relay: Relay,
    meta: ResponseMeta,
    include_usage: bool,
    ping_every: Duration,
    stop: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let enc = ChunkEncoder::new(&meta.id, meta.created, &meta.model);
        yield enc.role();
        let mut events = relay.events;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finish = None;
        let mut usage = None;
        // Made once: a `cancelled()` per event would take and release the lock of the
        // process-wide stop token's waiter list twice per token, across every stream.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let mut last_event = std::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                ev = events.next() => {
                    // Close on the heels of the one before: the upstream is bursting (or
                    // sluice is catching up), so more is likely already read. See below.
                    let now = std::time::Instant::now();
                    let burst = now.duration_since(last_event) < BURST_GAP;
                    last_event = now;
                    // This event and every one already waiting behind it (a burst that
                    // arrived in one read, or a backlog after a busy spell) leave as one
                    // frame: one write and one pass through the HTTP stack instead of one
                    // per token. Nothing is held back: only events that are ready now join.
                    let mut frame: Vec<u8> = Vec::new();
                    let mut next = ev;
                    let mut batched = 0;
                    let mut failed = None;
                    let mut ended = false;
                    let mut yielded = 0u32;
                    loop {
                        match next {
                            Some(Ok(UpstreamEvent::Token(t))) => {
                                // Exact for a lone token, so it becomes `Bytes` as it is.
                                let len = enc.token_len(&t);
                                if frame.is_empty() {
                                    frame.reserve_exact(len);
                                } else {
                                    frame.reserve(len);
                                }
                                enc.write_token(&mut frame, &t);
                            }
                            Some(Ok(UpstreamEvent::Finish(r))) => finish = Some(r),
                            Some(Ok(UpstreamEvent::Usage(u))) => usage = Some(u),
                            Some(Err(e)) => {
                                failed = Some(e);
                                break;
                            }
                            None => {
                                ended = true;
                                break;
                            }
                        }
                        batched += 1;
                        if batched >= MAX_BATCH_EVENTS || frame.len() >= MAX_BATCH_BYTES {
                            break;
                        }
                        // One poll with this task's own waker: when nothing is ready, the
                        // wake-up for the next event is already registered.
                        let polled = loop {
                            match std::future::poll_fn(|cx| Poll::Ready(events.poll_next_unpin(cx))).await {
                                Poll::Ready(ev) => break Some(ev),
                                Poll::Pending if burst && yielded < BURST_YIELDS => {
                                    // hyper's HTTP/1 client hands a body over one chunk at a
                                    // time through a one-slot channel filled by the
                                    // connection's own task, so a burst that arrived in one
                                    // read is never ready here at once: measured, every frame
                                    // held one token, one write each. Stepping aside lets that
                                    // task (woken by the take above) refill the slot, and what
                                    // it finds joins this frame; two yields are what the
                                    // refill takes. A frame costs a write through the whole
                                    // TCP stack, a yield a task switch. Tokens that come
                                    // apart (a model's usual pace) leave at once, unyielded.
                                    tokio::task::yield_now().await;
                                    yielded += 1;
                                }
                                Poll::Pending => break None,
                            }
                        };
                        match polled {
                            Some(ev) => {
                                next = ev;
                                yielded = 0;
                            }
                            None => break,
                        }
                    }
                    if !frame.is_empty() {
                        yield Bytes::from(frame);
                    }
                    if let Some(e) = failed {
                        tracing::warn!(provider = %relay.provider, error = %e, "stream failed after it started");
                        yield upstream_error_event(&e);
                        return;
                    }
                    if ended {
                        break;
                    }
                }
                _ = ping.tick() => yield PING,
                _ = &mut stopped => {
                    yield error_event(
                        "the server is shutting down; retry the request",
                        "service_unavailable",
                        "server_shutting_down",
                    );
                    return;
                }
            }
        }
        // An upstream that ends without a finish reason (EOF without [DONE]) ended normally.
        yield enc.finish(&finish.unwrap_or(FinishReason::Stop));
        if include_usage {
            if let Some(u) = usage {
                yield enc.usage(u);
            }
        }
        yield DONE;
    }
}

/// The `chat.completion` object of a non-streamed reply.
pub fn completion_json(meta: &ResponseMeta, c: &Completion) -> Value {
    let usage = c.usage.unwrap_or_default();
    serde_json::json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish.as_ref().unwrap_or(&FinishReason::Stop).as_str(),
        }],
        "usage": WireUsage::from(usage),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(frame: &Bytes) -> Value {
        let s = std::str::from_utf8(frame).unwrap();
        let data = s
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn chunks_are_valid_json_whatever_the_text() {
        let enc = ChunkEncoder::new("chatcmpl-1", 7, "m\"odel");
        let nasty = "line\nbreak\r\ndata: [DONE]\n\n\"quoted\" 🦀";
        let v = json_of(&enc.token(nasty));
        assert_eq!(v["choices"][0]["delta"]["content"], nasty);
        assert_eq!(v["model"], "m\"odel");
        assert_eq!(v["object"], "chat.completion.chunk");
        let v = json_of(&enc.finish(&FinishReason::Length));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let v = json_of(&enc.usage(Usage {
            prompt_tokens: 2,
            completion_tokens: 3,
        }));
        assert_eq!(v["usage"]["total_tokens"], 5);
        assert_eq!(v["choices"].as_array().unwrap().len(), 0);
        let v = json_of(&enc.role());
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
    }

    fn relay_of(events: Vec<Result<UpstreamEvent, UpstreamError>>) -> Relay {
        Relay {
            provider: "p".into(),
            model: "m".into(),
            events: Box::pin(futures::stream::iter(events)),
        }
    }

    /// The number of frames, and the body as a client reads it: frames joined, then cut
    /// into events.
    async fn body_events(relay: Relay, include_usage: bool) -> (usize, Vec<String>) {
        let meta = ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
        };
        let frames: Vec<Bytes> = chunk_stream(
            relay,
            meta,
            include_usage,
            Duration::from_secs(60),
            CancellationToken::new(),
        )
        .collect()
        .await;
        let body: Vec<u8> = frames.concat();
        let events = String::from_utf8(body)
            .unwrap()
            .split_terminator("\n\n")
            .map(str::to_owned)
            .collect();
        (frames.len(), events)
    }

    #[tokio::test]
    async fn a_burst_leaves_as_one_frame_with_every_event_intact() {
        let tokens: Vec<String> = (0..300).map(|i| format!("t{i} ")).collect();
        let mut events: Vec<_> = tokens
            .iter()
            .map(|t| Ok(UpstreamEvent::Token(t.clone())))
            .collect();
        events.push(Ok(UpstreamEvent::Finish(FinishReason::Length)));
        events.push(Ok(UpstreamEvent::Usage(Usage {
            prompt_tokens: 1,
            completion_tokens: 300,
        })));
        let (frames, got) = body_events(relay_of(events), true).await;
        // Role; 256 tokens; the other 44; finish, usage and [DONE].
        assert_eq!(frames, 6);
        let enc = ChunkEncoder::new("chatcmpl-1", 1, "m");
        let mut want = vec![enc.role()];
        want.extend(tokens.iter().map(|t| enc.token(t)));
        want.push(enc.finish(&FinishReason::Length));
        want.push(enc.usage(Usage {
            prompt_tokens: 1,
            completion_tokens: 300,
        }));
        want.push(DONE);
        let want: Vec<String> = want
            .iter()
            .map(|b| std::str::from_utf8(b).unwrap().trim_end().to_owned())
            .collect();
        assert_eq!(got, want);
    }

    /// An upstream that hands its burst over one event at a time through a one-slot
    /// channel filled by another task, as hyper's HTTP/1 client does with a body it has
    /// already read in full.
    #[tokio::test]
    async fn a_burst_handed_over_one_event_at_a_time_still_leaves_in_few_frames() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let producer = tokio::spawn(async move {
            for i in 0..100 {
                if tx
                    .send(Ok(UpstreamEvent::Token(format!("t{i} "))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let relay = Relay {
            provider: "p".into(),
            model: "m".into(),
            events: Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx))),
        };
        let (frames, got) = body_events(relay, false).await;
        producer.await.unwrap();
        // Role, finish and [DONE] are frames of their own.
        assert_eq!(got.len(), 103);
        assert!(frames <= 3 + 10, "{frames} frames for 100 tokens");
    }

    #[tokio::test]
    async fn tokens_before_a_failure_are_sent_then_the_error_and_no_done() {
        let events = vec![
            Ok(UpstreamEvent::Token("a".into())),
            Ok(UpstreamEvent::Token("b".into())),
            Err(UpstreamError::Transport {
                provider: "p".into(),
                message: "reset".into(),
            }),
            Ok(UpstreamEvent::Token("never".into())),
        ];
        let (_, got) = body_events(relay_of(events), false).await;
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[1].contains(r#""content":"a""#));
        assert!(got[2].contains(r#""content":"b""#));
        assert!(got[3].contains(r#""code":"upstream_disconnected""#));
    }

    #[test]
    fn json_len_matches_serde_json() {
        for s in [
            "",
            "plain",
            "line\nbreak\r\ttab \u{8}\u{c}",
            "\u{0}\u{1f}\u{7f}",
            "\"quoted\" back\\slash",
            "héllo 世界 🦀",
        ] {
            assert_eq!(
                json_len(s),
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_kept_for_upstream() {
        let req: CompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5, "seed": 42, "mock": {"tokens": 3}
        }))
        .unwrap();
        let (chat, _) = req.into_domain().unwrap();
        assert_eq!(chat.params.temperature, Some(0.5));
        assert_eq!(chat.extra.get("seed"), Some(&serde_json::json!(42)));
        assert!(chat.extra.contains_key("mock"));
        assert!(!chat.extra.contains_key("temperature"));
    }
}
