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
use crate::domain::chunk::Accumulator;
use crate::domain::{ChatRequest, ChunkEncoder, FinishReason, GenParams, Message};
use crate::error::ErrorBody;
use crate::upstream::{Relay, UpstreamError};

/// `POST /v1/chat/completions` as clients send it.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub params: GenParams,
    /// Everything else is forwarded to OpenAI-compatible upstreams untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
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
        match self.extra.get("n") {
            None | Some(Value::Null) => {}
            Some(n) if n.as_u64().is_some_and(|n| n >= 1) => {}
            Some(_) => return Err("n: must be a positive integer".into()),
        }
        match self.extra.get("stream_options") {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(_) => return Err("stream_options: must be an object".into()),
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
            include_usage: self
                .extra
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
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

/// Most events, and bytes, one frame may gather from a burst: a bound on what one poll
/// does, so an upstream flooding tokens cannot keep a task busy or build a huge buffer.
const MAX_BATCH_EVENTS: usize = 256;
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Events closer than this to the one before count as a burst, worth waiting a scheduler
/// pass or two for the rest of (see `chunk_stream`). Models write tokens tens of ms apart.
const BURST_GAP: Duration = Duration::from_millis(1);
const BURST_YIELDS: u32 = 2;

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

/// Identity of one response.
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    /// The model name the client asked for, echoed back.
    pub model: String,
}

/// Relays a generation as `chat.completion.chunk` events, each chunk as the upstream sent
/// it, with nothing held back, and `: ping` comments while the upstream is silent. The
/// usage report is withheld unless the client asked for it. Dropping the stream (the client
/// went away) drops the upstream request with it.
pub fn chunk_stream(
    relay: Relay,
    meta: ResponseMeta,
    include_usage: bool,
    ping_every: Duration,
    stop: CancellationToken,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let mut events = relay.events;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finished = false;
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
                    let mut frame = Frame::default();
                    let mut next = ev;
                    let mut batched = 0;
                    let mut failed = None;
                    let mut ended = false;
                    let mut yielded = 0u32;
                    loop {
                        match next {
                            Some(Ok(chunk)) => {
                                finished |= chunk.finish().is_some();
                                if include_usage || !chunk.is_usage_only() {
                                    frame.push(chunk.frame());
                                }
                            }
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
                    if let Some(frame) = frame.take() {
                        yield frame;
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
        if !finished {
            let enc = ChunkEncoder::new(&meta.id, meta.created, &meta.model);
            yield enc.finish(&FinishReason::Stop).frame().clone();
        }
        yield DONE;
    }
}

/// Events ready at once, as one buffer: a lone chunk's frame is passed on as it is, several
/// are joined so they leave in one write.
#[derive(Default)]
struct Frame {
    one: Option<Bytes>,
    joined: Vec<u8>,
}

impl Frame {
    fn push(&mut self, b: &Bytes) {
        if self.joined.is_empty() {
            match self.one.take() {
                None => {
                    self.one = Some(b.clone());
                    return;
                }
                Some(first) => self.joined.extend_from_slice(&first),
            }
        }
        self.joined.extend_from_slice(b);
    }

    fn len(&self) -> usize {
        self.one.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    fn take(self) -> Option<Bytes> {
        match self.one {
            Some(b) => Some(b),
            None if self.joined.is_empty() => None,
            None => Some(Bytes::from(self.joined)),
        }
    }
}

/// The `chat.completion` object of a non-streamed reply: every choice's whole message,
/// merged from the chunks the upstream streamed.
pub fn completion_json(meta: &ResponseMeta, reply: Accumulator) -> Value {
    reply.finish(&meta.id, meta.created, &meta.model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::chunk::Payload;
    use crate::domain::{Chunk, Usage};
    use serde_json::json;

    fn relay_of(events: Vec<Result<Chunk, UpstreamError>>) -> Relay {
        Relay {
            provider: "p".into(),
            model: "m".into(),
            events: Box::pin(futures::stream::iter(events)),
        }
    }

    fn parsed(s: &str) -> Chunk {
        match Chunk::parse(s.as_bytes()) {
            Ok(Payload::Chunk(c)) => c,
            other => panic!("{other:?}"),
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

    fn event(c: &Chunk) -> String {
        std::str::from_utf8(c.frame())
            .unwrap()
            .trim_end()
            .to_owned()
    }

    /// Each chunk leaves as the upstream sent it: tool calls, reasoning, logprobs, other
    /// choices and fields sluice has never heard of included.
    #[tokio::test]
    async fn chunks_are_relayed_as_the_upstream_sent_them() {
        let upstream = [
            r#"{"id":"u1","object":"chat.completion.chunk","created":9,"model":"gpt-x","system_fingerprint":"fp_1","service_tier":"default","choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":"Thinking"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"u1","object":"chat.completion.chunk","created":9,"model":"gpt-x","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":{"content":[{"token":"x","logprob":-0.5,"bytes":[120],"top_logprobs":[]}]},"finish_reason":null}],"usage":null,"brand_new":{"x":1}}"#,
            r#"{"id":"u1","object":"chat.completion.chunk","created":9,"model":"gpt-x","choices":[{"index":1,"delta":{"content":"second choice"},"finish_reason":null}],"usage":null}"#,
            r#"{"id":"u1","object":"chat.completion.chunk","created":9,"model":"gpt-x","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}"#,
            r#"{"id":"u1","object":"chat.completion.chunk","created":9,"model":"gpt-x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8,"completion_tokens_details":{"reasoning_tokens":2}}}"#,
        ];
        let chunks: Vec<Chunk> = upstream.iter().map(|s| parsed(s)).collect();
        for include_usage in [true, false] {
            let (_, got) = body_events(
                relay_of(chunks.iter().cloned().map(Ok).collect()),
                include_usage,
            )
            .await;
            let mut want: Vec<String> = upstream.iter().map(|s| format!("data: {s}")).collect();
            if !include_usage {
                want.pop();
            }
            want.push("data: [DONE]".into());
            assert_eq!(got, want, "include_usage {include_usage}");
        }
    }

    #[tokio::test]
    async fn a_burst_leaves_as_one_frame_with_every_event_intact() {
        let enc = ChunkEncoder::new("chatcmpl-1", 1, "m");
        let mut chunks = vec![enc.role()];
        chunks.extend((0..300).map(|i| enc.content(&format!("t{i} "))));
        chunks.push(enc.finish(&FinishReason::Length));
        chunks.push(enc.usage(Usage {
            prompt_tokens: 1,
            completion_tokens: 300,
            ..Usage::default()
        }));
        let (frames, got) =
            body_events(relay_of(chunks.iter().cloned().map(Ok).collect()), true).await;
        // 256 events; the other 47; [DONE].
        assert_eq!(frames, 3);
        let mut want: Vec<String> = chunks.iter().map(event).collect();
        want.push("data: [DONE]".into());
        assert_eq!(got, want);
    }

    /// An upstream that hands its burst over one event at a time through a one-slot
    /// channel filled by another task, as hyper's HTTP/1 client does with a body it has
    /// already read in full.
    #[tokio::test]
    async fn a_burst_handed_over_one_event_at_a_time_still_leaves_in_few_frames() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let producer = tokio::spawn(async move {
            let enc = ChunkEncoder::new("chatcmpl-1", 1, "m");
            for i in 0..100 {
                if tx.send(Ok(enc.content(&format!("t{i} ")))).await.is_err() {
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
        // The finish sluice adds (the upstream sent none) and [DONE] are frames of their own.
        assert_eq!(got.len(), 102);
        assert!(
            got[100].contains(r#""finish_reason":"stop""#),
            "{}",
            got[100]
        );
        assert!(frames <= 2 + 10, "{frames} frames for 100 tokens");
    }

    #[tokio::test]
    async fn tokens_before_a_failure_are_sent_then_the_error_and_no_done() {
        let enc = ChunkEncoder::new("chatcmpl-1", 1, "m");
        let events = vec![
            Ok(enc.content("a")),
            Ok(enc.content("b")),
            Err(UpstreamError::Transport {
                provider: "p".into(),
                message: "reset".into(),
            }),
            Ok(enc.content("never")),
        ];
        let (_, got) = body_events(relay_of(events), false).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].contains(r#""content":"a""#));
        assert!(got[1].contains(r#""content":"b""#));
        assert!(got[2].contains(r#""code":"upstream_disconnected""#));
    }

    #[test]
    fn unknown_fields_are_kept_for_upstream() {
        let req: CompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5, "seed": 42, "mock": {"tokens": 3}, "n": 2,
            "stream_options": {"include_usage": true, "include_obfuscation": false}
        }))
        .unwrap();
        let (chat, opts) = req.into_domain().unwrap();
        assert_eq!(chat.params.temperature, Some(0.5));
        assert_eq!(chat.extra.get("seed"), Some(&serde_json::json!(42)));
        assert_eq!(chat.extra.get("n"), Some(&serde_json::json!(2)));
        assert!(chat.extra.contains_key("mock"));
        assert!(!chat.extra.contains_key("temperature"));
        assert!(opts.include_usage);
    }

    #[test]
    fn every_message_shape_is_accepted_as_sent() {
        let messages = serde_json::json!([
            {"role": "developer", "content": "be terse", "name": "ops"},
            {"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
            ]},
            {"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
            {"role": "assistant", "content": null, "function_call": {"name": "legacy", "arguments": "{}"}},
            {"role": "function", "name": "legacy", "content": "{\"ok\":true}"},
            {"role": "assistant", "content": "", "audio": {"id": "audio_1"}, "x_vendor": {"a": [1, 2]}},
            {"role": "user", "content": "thanks"}
        ]);
        let req: CompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": messages.clone()
        }))
        .unwrap();
        let (chat, _) = req.into_domain().unwrap();
        assert_eq!(serde_json::to_value(&chat.messages).unwrap(), messages);
        assert_eq!(chat.messages[2].text(), "what is this?");
    }

    #[test]
    fn malformed_messages_name_the_field() {
        for (message, want) in [
            (json!({"role": "robot", "content": "x"}), "messages[0].role"),
            (json!({"content": "x"}), "messages[0]"),
            (json!({"role": "user", "content": 5}), "messages[0].content"),
            (
                json!({"role": "user", "content": ["x"]}),
                "messages[0].content",
            ),
            (
                json!({"role": "assistant", "tool_calls": {}}),
                "messages[0].tool_calls",
            ),
            (
                json!({"role": "tool", "tool_call_id": 3}),
                "messages[0].tool_call_id",
            ),
        ] {
            let body = json!({"model": "m", "messages": [message]}).to_string();
            let de = &mut serde_json::Deserializer::from_str(&body);
            let err = serde_path_to_error::deserialize::<_, CompletionRequest>(de).unwrap_err();
            assert_eq!(err.path().to_string(), want, "{message}: {err}");
        }
    }
}
