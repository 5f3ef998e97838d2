//! One streamed piece of a reply.
//!
//! sluice's unit of a reply is an OpenAI `chat.completion.chunk` payload: the format every
//! OpenAI-compatible upstream sends and every OpenAI client reads. A chunk from such an
//! upstream is kept as the bytes it came in, so tool calls, reasoning, logprobs, several
//! choices and fields no one here knows of reach the client unchanged; sluice reads from it
//! only what it needs itself (the text, the reasoning, the finish reason, usage). Upstreams
//! with another wire format build chunks with [`ChunkEncoder`].

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{FinishReason, Usage};

/// A chunk, framed once as the SSE event `data: {json}\n\n`, with what sluice reads from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    frame: Bytes,
    content: Span,
    reasoning: Span,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    flags: u8,
}

/// The chunk carries a piece of the reply (text, reasoning, a tool call…): a token.
const TOKEN: u8 = 1;
/// The chunk is the usage report alone (no choices), withheld from clients that did not
/// ask for usage: sluice always asks the upstream for it.
const USAGE_ONLY: u8 = 2;
/// One choice, index 0, whose delta holds nothing but text (and maybe the role): what most
/// chunks are, merged into a whole reply without reading the JSON again.
const PLAIN: u8 = 4;

/// Where a piece of text is: inside the frame (it had no escapes), or decoded on its own.
#[derive(Clone, Debug, PartialEq, Default)]
enum Span {
    #[default]
    None,
    At(u32, u32),
    Owned(Box<str>),
}

impl Span {
    /// `text` borrowed from `base` is located by address, so the common unescaped token is
    /// not copied a second time.
    fn of(text: Option<Cow<'_, str>>, base: &[u8]) -> Self {
        match text {
            None => Span::None,
            Some(t) if t.is_empty() => Span::None,
            Some(Cow::Borrowed(t)) => {
                let start = (t.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
                match (u32::try_from(start), u32::try_from(t.len())) {
                    (Ok(s), Ok(n)) if start + t.len() <= base.len() => Span::At(s, n),
                    _ => Span::Owned(t.into()),
                }
            }
            Some(Cow::Owned(t)) => Span::Owned(t.into_boxed_str()),
        }
    }

    fn get<'a>(&'a self, frame: &'a [u8]) -> Option<&'a str> {
        match self {
            Span::None => None,
            Span::At(s, n) => frame
                .get(*s as usize..(*s as usize + *n as usize))
                .and_then(|b| std::str::from_utf8(b).ok()),
            Span::Owned(t) => Some(t),
        }
    }
}

/// What an upstream's `data:` payload was, besides a chunk.
#[derive(Debug, PartialEq)]
pub enum Payload {
    Chunk(Chunk),
    /// An error reported inside the stream (`{"error": {...}}`).
    Error {
        message: String,
        code: Option<String>,
    },
}

impl Chunk {
    /// Reads one `data:` payload of an OpenAI-compatible stream (not `[DONE]`). `Err` is a
    /// payload that is not a valid chunk.
    pub fn parse(payload: &[u8]) -> Result<Payload, String> {
        let frame = frame_of(payload);
        let json = &frame[DATA.len()..frame.len() - 2];
        // sonic-rs rather than serde_json: the same serde types and the same verdicts (see
        // the test `sonic_reads_chunks_as_serde_json_does`), in about two thirds of the
        // time, and this parse is the largest single cost of relaying a token.
        let wire: Wire<'_> =
            sonic_rs::from_slice(json).map_err(|e| format!("chunk is not valid JSON: {e}"))?;
        if let Some(err) = wire.error.filter(|e| !e.is_null()) {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| err.to_string());
            let code = err.get("code").and_then(Value::as_str).map(str::to_owned);
            return Ok(Payload::Error { message, code });
        }
        let usage = wire.usage.map(Usage::from);
        let mut flags = 0;
        if wire.choices.any_delta {
            flags |= TOKEN;
        }
        if wire.choices.count == 0 && usage.is_some() {
            flags |= USAGE_ONLY;
        }
        if wire.choices.count == 1 && wire.choices.plain && usage.is_none() {
            flags |= PLAIN;
        }
        let first = wire.choices.first;
        let base = frame.as_ref();
        let content = Span::of(first.content, base);
        let reasoning = Span::of(first.reasoning, base);
        Ok(Payload::Chunk(Chunk {
            content,
            reasoning,
            finish: first.finish.map(|r| FinishReason::parse(&r)),
            usage,
            flags,
            frame,
        }))
    }

    /// The SSE event as the OpenAI transport writes it.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The chunk's JSON.
    pub fn payload(&self) -> &[u8] {
        &self.frame[DATA.len()..self.frame.len() - 2]
    }

    /// Reply text of the first choice carried by this chunk.
    pub fn content(&self) -> Option<&str> {
        self.content.get(&self.frame)
    }

    /// Reasoning ("thinking") text of the first choice: `reasoning_content`, or `reasoning`.
    pub fn reasoning(&self) -> Option<&str> {
        self.reasoning.get(&self.frame)
    }

    pub fn finish(&self) -> Option<&FinishReason> {
        self.finish.as_ref()
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the chunk carries a piece of the reply, counted as one token.
    pub fn is_token(&self) -> bool {
        self.flags & TOKEN != 0
    }

    /// Whether the chunk only reports usage (no choices).
    pub fn is_usage_only(&self) -> bool {
        self.flags & USAGE_ONLY != 0
    }
}

const DATA: &[u8] = b"data: ";

/// A chunk is stored (the response cache) as its JSON text, and read back by the same parse.
impl Serialize for Chunk {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.payload()) {
            Ok(text) => s.serialize_str(text),
            Err(_) => Err(serde::ser::Error::custom("a chunk is not UTF-8")),
        }
    }
}

impl<'de> Deserialize<'de> for Chunk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<'de, str>::deserialize(d)?;
        match Chunk::parse(text.as_bytes()) {
            Ok(Payload::Chunk(c)) => Ok(c),
            Ok(Payload::Error { message, .. }) => Err(de::Error::custom(message)),
            Err(e) => Err(de::Error::custom(e)),
        }
    }
}

/// `data: {payload}\n\n`, the payload trimmed. A raw line break inside a JSON payload can
/// only be whitespace between tokens (strings escape theirs), so it becomes a space: the
/// event stays one `data:` line and every offset into it stays put.
fn frame_of(payload: &[u8]) -> Bytes {
    let payload = trim(payload);
    let mut buf = Vec::with_capacity(DATA.len() + payload.len() + 2);
    buf.extend_from_slice(DATA);
    buf.extend_from_slice(payload);
    if memchr::memchr2(b'\n', b'\r', payload).is_some() {
        for b in &mut buf[DATA.len()..] {
            if matches!(b, b'\n' | b'\r') {
                *b = b' ';
            }
        }
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// `str::trim` on bytes, without a UTF-8 pass over every event in the common,
/// ASCII-bounded case.
pub fn trim(data: &[u8]) -> &[u8] {
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

/// The parts of a chunk sluice reads; everything else is skipped by the parser and kept in
/// the frame.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default, borrow)]
    choices: Choices<'a>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

/// What sluice takes from `choices`: the first choice's text, reasoning and finish reason
/// (index 0: sessions ask for one choice), and whether any choice carries a delta.
#[derive(Default)]
struct Choices<'a> {
    first: First<'a>,
    count: usize,
    any_delta: bool,
    /// The first choice is index 0 with a text-only delta, no logprobs and no finish.
    plain: bool,
}

#[derive(Default)]
struct First<'a> {
    content: Option<Cow<'a, str>>,
    reasoning: Option<Cow<'a, str>>,
    finish: Option<Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Choices<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence of choices")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Choices::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Choices::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Choices::default();
                let mut have_first = false;
                while let Some(c) = seq.next_element::<WireChoice<'a>>()? {
                    out.count += 1;
                    let delta = c.delta.unwrap_or_default();
                    let content = delta.content.and_then(|t| t.0);
                    let reasoning = delta
                        .reasoning_content
                        .and_then(|t| t.0)
                        .or(delta.reasoning.and_then(|t| t.0));
                    if content.as_ref().is_some_and(|t| !t.is_empty())
                        || reasoning.as_ref().is_some_and(|t| !t.is_empty())
                        || delta.others
                    {
                        out.any_delta = true;
                    }
                    if !have_first && c.index.unwrap_or(0) == 0 {
                        have_first = true;
                        out.plain = !delta.not_text
                            && c.logprobs.is_none()
                            && c.finish_reason.as_ref().is_none_or(|t| t.0.is_none());
                        out.first = First {
                            content,
                            reasoning,
                            finish: c.finish_reason.and_then(|t| t.0),
                        };
                    } else if out.first.finish.is_none() {
                        out.first.finish = c.finish_reason.and_then(|t| t.0);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_option(OptionSeq(V(std::marker::PhantomData)))
    }
}

/// `null` or a sequence, handed to the inner visitor either way.
struct OptionSeq<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for OptionSeq<V> {
    type Value = V::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none()
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self.0)
    }
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
    #[serde(default)]
    logprobs: Option<IgnoredAny>,
}

/// A delta's text fields, and whether it carries anything else of the reply.
#[derive(Default)]
struct WireDelta<'a> {
    content: Option<Text<'a>>,
    reasoning_content: Option<Text<'a>>,
    reasoning: Option<Text<'a>>,
    /// A non-null `tool_calls`, `function_call`, `refusal`, `audio` or any other field but
    /// `role`.
    others: bool,
    /// Any key but `content` and `role`, even a null one.
    not_text: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireDelta<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = WireDelta<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a delta object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = WireDelta::default();
                while let Some(key) = map.next_key::<DeltaKey>()? {
                    match key {
                        DeltaKey::Content => out.content = map.next_value()?,
                        DeltaKey::ReasoningContent => {
                            out.reasoning_content = map.next_value()?;
                            out.not_text = true;
                        }
                        DeltaKey::Reasoning => {
                            out.reasoning = map.next_value()?;
                            out.not_text = true;
                        }
                        DeltaKey::Role => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        DeltaKey::Other => {
                            let v: Option<IgnoredAny> = map.next_value()?;
                            out.others |= v.is_some();
                            out.not_text = true;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A delta's key, told apart without copying it (a `String` key was an allocation per token).
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DeltaKey {
    Content,
    ReasoningContent,
    Reasoning,
    Role,
    #[serde(other)]
    Other,
}

/// A field that is text when it is a string; any other value is skipped, not an error, so
/// a provider that puts an object where others put a string does not break the stream.
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            reasoning_tokens: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
            cached_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        }
    }
}

/// Usage as OpenAI reports it, details included when there are any.
#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<PromptDetailsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<CompletionDetailsOut>,
}

#[derive(Serialize)]
struct PromptDetailsOut {
    cached_tokens: u32,
}

#[derive(Serialize)]
struct CompletionDetailsOut {
    reasoning_tokens: u32,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total(),
            prompt_tokens_details: (u.cached_tokens > 0).then_some(PromptDetailsOut {
                cached_tokens: u.cached_tokens,
            }),
            completion_tokens_details: (u.reasoning_tokens > 0).then_some(CompletionDetailsOut {
                reasoning_tokens: u.reasoning_tokens,
            }),
        }
    }
}

/// Seconds since the Unix epoch, for a chunk's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Builds the chunks of one reply for upstreams that do not speak OpenAI's format (and the
/// finish sluice adds when an upstream ends without one). The part of every chunk before
/// the choices is rendered once.
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

    /// A new reply's first chunk, `{"role":"assistant","content":""}`.
    pub fn role(&self) -> Chunk {
        self.plain_delta(
            br#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
        )
    }

    /// A piece of the reply text.
    pub fn content(&self, text: &str) -> Chunk {
        let (frame, at) = self.text_frame(CONTENT_OPEN, text);
        Chunk {
            content: span_in(&frame, at, text),
            ..Chunk::plain(frame, PLAIN | if text.is_empty() { 0 } else { TOKEN })
        }
    }

    /// A piece of reasoning, as `reasoning_content` (DeepSeek's and vLLM's name for it).
    pub fn reasoning(&self, text: &str) -> Chunk {
        let (frame, at) = self.text_frame(REASONING_OPEN, text);
        Chunk {
            reasoning: span_in(&frame, at, text),
            ..Chunk::plain(frame, if text.is_empty() { 0 } else { TOKEN })
        }
    }

    /// The start of tool call `index`: its id and function name, arguments to follow.
    pub fn tool_call(&self, index: u32, id: &str, name: &str) -> Chunk {
        let delta = serde_json::json!({"tool_calls": [{
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }]});
        self.json_delta(&delta, TOKEN)
    }

    /// A fragment of tool call `index`'s JSON arguments.
    pub fn tool_arguments(&self, index: u32, fragment: &str) -> Chunk {
        let delta = serde_json::json!({"tool_calls": [{
            "index": index, "function": {"arguments": fragment},
        }]});
        self.json_delta(&delta, TOKEN)
    }

    pub fn finish(&self, reason: &FinishReason) -> Chunk {
        let mut body = Vec::with_capacity(80);
        body.extend_from_slice(br#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"#);
        write_json(&mut body, reason.as_str());
        body.extend_from_slice(b"}]}");
        Chunk {
            finish: Some(reason.clone()),
            ..Chunk::plain(self.frame(&body), 0)
        }
    }

    /// The usage report: no choices, as OpenAI sends it last.
    pub fn usage(&self, u: Usage) -> Chunk {
        let mut body = b"],\"usage\":".to_vec();
        let _ = serde_json::to_writer(&mut body, &UsageOut::from(u));
        body.push(b'}');
        Chunk {
            usage: Some(u),
            ..Chunk::plain(self.frame(&body), USAGE_ONLY)
        }
    }

    /// A chunk whose first choice's delta is `delta`, any part of a reply the methods above
    /// do not name (a provider's own fields, such as signed thinking blocks).
    pub fn delta<T: Serialize>(&self, delta: &T) -> Chunk {
        self.json_delta(delta, TOKEN)
    }

    fn json_delta<T: Serialize>(&self, delta: &T, flags: u8) -> Chunk {
        let mut body = br#"{"index":0,"delta":"#.to_vec();
        let _ = serde_json::to_writer(&mut body, delta);
        body.extend_from_slice(br#","logprobs":null,"finish_reason":null}]}"#);
        Chunk::plain(self.frame(&body), flags)
    }

    fn plain_delta(&self, rest: &[u8]) -> Chunk {
        Chunk::plain(self.frame(rest), PLAIN)
    }

    fn frame(&self, rest: &[u8]) -> Bytes {
        let mut buf = Vec::with_capacity(DATA.len() + self.head.len() + rest.len() + 2);
        buf.extend_from_slice(DATA);
        buf.extend_from_slice(&self.head);
        buf.extend_from_slice(rest);
        buf.extend_from_slice(b"\n\n");
        Bytes::from(buf)
    }

    /// A text delta in one exactly sized buffer, and where the JSON string starts in it.
    fn text_frame(&self, open: &[u8], text: &str) -> (Bytes, usize) {
        let len = DATA.len() + self.head.len() + open.len() + json_len(text) + TEXT_CLOSE.len() + 2;
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(DATA);
        buf.extend_from_slice(&self.head);
        buf.extend_from_slice(open);
        let at = buf.len();
        write_json(&mut buf, text);
        buf.extend_from_slice(TEXT_CLOSE);
        buf.extend_from_slice(b"\n\n");
        (Bytes::from(buf), at)
    }
}

impl Chunk {
    fn plain(frame: Bytes, flags: u8) -> Self {
        Chunk {
            frame,
            content: Span::None,
            reasoning: Span::None,
            finish: None,
            usage: None,
            flags,
        }
    }
}

/// The span of `text` written as a JSON string at `at`: in place when it needed no escapes.
fn span_in(frame: &[u8], at: usize, text: &str) -> Span {
    if text.is_empty() {
        return Span::None;
    }
    let inner = at + 1;
    match (u32::try_from(inner), u32::try_from(text.len())) {
        (Ok(s), Ok(n)) if frame.get(inner..inner + text.len()) == Some(text.as_bytes()) => {
            Span::At(s, n)
        }
        _ => Span::Owned(text.into()),
    }
}

const CONTENT_OPEN: &[u8] = br#"{"index":0,"delta":{"content":"#;
const REASONING_OPEN: &[u8] = br#"{"index":0,"delta":{"reasoning_content":"#;
const TEXT_CLOSE: &[u8] = br#"},"logprobs":null,"finish_reason":null}]}"#;

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

/// Builds the `chat.completion` object of a non-streamed reply from its chunks, the way the
/// OpenAI SDKs rebuild a streamed one: each choice's deltas merged into its `message`
/// (strings appended, objects merged, list items with an `index` merged by it), logprobs
/// lists joined, the last finish reason and usage kept. Fields no one here knows of are
/// merged the same way, so they reach the client too.
#[derive(Default)]
pub struct Accumulator {
    head: Map<String, Value>,
    choices: std::collections::BTreeMap<u64, Map<String, Value>>,
    usage: Option<Value>,
}

impl Accumulator {
    pub fn add(&mut self, chunk: &Chunk) {
        if chunk.flags & PLAIN != 0 && self.add_text(chunk.content()) {
            return;
        }
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(chunk.payload()) else {
            return;
        };
        for (k, v) in obj {
            match k.as_str() {
                "choices" => {
                    for c in v.as_array().into_iter().flatten() {
                        if let Some(c) = c.as_object() {
                            self.add_choice(c);
                        }
                    }
                }
                "usage" if !v.is_null() => self.usage = Some(v),
                "usage" | "object" => {}
                _ if v.is_null() && self.head.contains_key(&k) => {}
                _ => {
                    self.head.insert(k, v);
                }
            }
        }
    }

    /// Appends a plain chunk's text to the first choice's, once that choice has begun.
    fn add_text(&mut self, text: Option<&str>) -> bool {
        let Some(Value::Object(msg)) = self.choices.get_mut(&0).and_then(|c| c.get_mut("message"))
        else {
            return false;
        };
        match (msg.get_mut("content"), text) {
            (_, None) => true,
            (Some(Value::String(have)), Some(t)) => {
                have.push_str(t);
                true
            }
            _ => false,
        }
    }

    fn add_choice(&mut self, c: &Map<String, Value>) {
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
        let acc = self.choices.entry(index).or_default();
        for (k, v) in c {
            match k.as_str() {
                "delta" => {
                    if let Some(delta) = v.as_object() {
                        let msg = acc
                            .entry("message")
                            .or_insert_with(|| Value::Object(Map::new()));
                        if let Value::Object(msg) = msg {
                            merge(msg, delta);
                        }
                    }
                }
                "logprobs" => match (acc.get_mut("logprobs"), v) {
                    (Some(Value::Object(have)), Value::Object(more)) => {
                        for (lk, lv) in more {
                            match (have.get_mut(lk), lv) {
                                (Some(Value::Array(a)), Value::Array(b)) => a.extend(b.clone()),
                                (Some(_), Value::Null) => {}
                                _ => {
                                    have.insert(lk.clone(), lv.clone());
                                }
                            }
                        }
                    }
                    (Some(_), Value::Null) => {}
                    _ => {
                        acc.insert(k.clone(), v.clone());
                    }
                },
                _ if v.is_null() && acc.contains_key(k) => {}
                _ => {
                    acc.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// The reply; `id`, `created` and `model` fill in what no chunk said.
    pub fn finish(self, id: &str, created: u64, model: &str) -> Value {
        let mut out = self.head;
        out.entry("id").or_insert_with(|| id.into());
        out.insert("object".into(), "chat.completion".into());
        out.entry("created").or_insert_with(|| created.into());
        out.entry("model").or_insert_with(|| model.into());
        let mut choices: Vec<Value> = Vec::with_capacity(self.choices.len().max(1));
        let mut all = self.choices;
        all.entry(0).or_default();
        for (index, mut c) in all {
            c.insert("index".into(), index.into());
            let msg = c
                .entry("message")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(msg) = msg {
                msg.entry("role").or_insert_with(|| "assistant".into());
                msg.entry("content").or_insert(Value::Null);
                // Indexes place streamed fragments; a whole message's calls are in order.
                if let Some(Value::Array(calls)) = msg.get_mut("tool_calls") {
                    for call in calls.iter_mut().filter_map(Value::as_object_mut) {
                        call.remove("index");
                    }
                }
            }
            c.entry("logprobs").or_insert(Value::Null);
            match c.get("finish_reason") {
                Some(Value::String(_)) => {}
                _ => {
                    c.insert("finish_reason".into(), "stop".into());
                }
            }
            choices.push(Value::Object(c));
        }
        out.insert("choices".into(), Value::Array(choices));
        if let Some(u) = self.usage {
            out.insert("usage".into(), u);
        }
        Value::Object(out)
    }
}

/// Merges a delta into what came before it (the OpenAI SDKs' `accumulate_delta`).
fn merge(acc: &mut Map<String, Value>, delta: &Map<String, Value>) {
    for (k, dv) in delta {
        let Some(av) = acc.get_mut(k).filter(|v| !v.is_null()) else {
            acc.insert(k.clone(), dv.clone());
            continue;
        };
        // `index` and `type` identify an entry rather than add to it; `role` is repeated
        // by some servers in every delta.
        if matches!(k.as_str(), "index" | "type" | "role") {
            *av = dv.clone();
            continue;
        }
        match (av, dv) {
            (Value::String(a), Value::String(b)) => a.push_str(b),
            (Value::Object(a), Value::Object(b)) => merge(a, b),
            (Value::Array(a), Value::Array(b)) => {
                for entry in b {
                    let at = entry.get("index").and_then(Value::as_u64).and_then(|i| {
                        a.iter()
                            .position(|e| e.get("index").and_then(Value::as_u64) == Some(i))
                    });
                    match (at, entry) {
                        (Some(at), Value::Object(more)) => {
                            if let Some(Value::Object(have)) = a.get_mut(at) {
                                merge(have, more);
                            }
                        }
                        _ => a.push(entry.clone()),
                    }
                }
            }
            (_, Value::Null) => {}
            (av, dv) => *av = dv.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: &str) -> Chunk {
        match Chunk::parse(s.as_bytes()) {
            Ok(Payload::Chunk(c)) => c,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn unescaped_text_is_read_in_place() {
        let c = chunk(r#"{"choices":[{"index":0,"delta":{"content":"Hé 🦀"}}]}"#);
        assert_eq!(c.content(), Some("Hé 🦀"));
        assert!(matches!(c.content, Span::At(..)), "{:?}", c.content);
        let c = chunk(r#"{"choices":[{"delta":{"content":"say \"hi\"\n"}}]}"#);
        assert_eq!(c.content(), Some("say \"hi\"\n"));
        assert!(c.is_token());
    }

    #[test]
    fn the_frame_is_the_payload_as_sent() {
        let raw = r#"{"id":"x","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"logprobs":null,"finish_reason":null}],"new_field":{"a":[1]}}"#;
        let c = chunk(&format!("  {raw} \r\n"));
        assert_eq!(c.payload(), raw.as_bytes());
        assert_eq!(&c.frame()[..], format!("data: {raw}\n\n").as_bytes());
        assert!(c.is_token(), "a tool call fragment is a token");
        assert_eq!(c.content(), None);
    }

    #[test]
    fn a_payload_over_several_lines_stays_one_event() {
        let c = chunk("{\"choices\":\n[{\"delta\":{\"content\":\"a\"}}]}");
        assert_eq!(
            &c.frame()[..],
            b"data: {\"choices\": [{\"delta\":{\"content\":\"a\"}}]}\n\n"
        );
        assert_eq!(c.content(), Some("a"));
    }

    #[test]
    fn reasoning_under_either_name() {
        let c = chunk(r#"{"choices":[{"delta":{"reasoning_content":"think"}}]}"#);
        assert_eq!(c.reasoning(), Some("think"));
        let c = chunk(r#"{"choices":[{"delta":{"reasoning":"hmm","content":null}}]}"#);
        assert_eq!(c.reasoning(), Some("hmm"));
        assert!(c.is_token());
        // An object where others put a string is skipped, not an error.
        let c = chunk(r#"{"choices":[{"delta":{"reasoning":{"summary":"x"},"content":"a"}}]}"#);
        assert_eq!(c.reasoning(), None);
        assert_eq!(c.content(), Some("a"));
    }

    #[test]
    fn role_only_and_empty_deltas_are_not_tokens() {
        let c = chunk(
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        );
        assert!(!c.is_token());
        let c =
            chunk(r#"{"choices":[{"index":0,"delta":{"refusal":null},"finish_reason":"stop"}]}"#);
        assert!(!c.is_token());
        assert_eq!(c.finish(), Some(&FinishReason::Stop));
    }

    #[test]
    fn usage_with_details() {
        let c = chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":4}}}"#,
        );
        assert!(c.is_usage_only());
        assert_eq!(
            c.usage(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 9,
                reasoning_tokens: 4,
                cached_tokens: 2
            })
        );
    }

    #[test]
    fn second_choice_text_is_not_the_first_choices() {
        let c = chunk(r#"{"choices":[{"index":1,"delta":{"content":"b"}}]}"#);
        assert_eq!(c.content(), None);
        assert!(c.is_token());
    }

    #[test]
    fn in_band_error() {
        let p = Chunk::parse(br#"{"error":{"message":"overloaded","code":"busy"}}"#).unwrap();
        assert_eq!(
            p,
            Payload::Error {
                message: "overloaded".into(),
                code: Some("busy".into())
            }
        );
    }

    #[test]
    fn encoded_chunks_read_back_as_they_were_built() {
        let enc = ChunkEncoder::new("chatcmpl-1", 7, "m\"odel");
        for text in ["plain", "line\nbreak \"q\" 🦀", ""] {
            let built = enc.content(text);
            let back = chunk(std::str::from_utf8(built.payload()).unwrap());
            assert_eq!(built.content(), back.content(), "{text:?}");
            assert_eq!(built.is_token(), back.is_token(), "{text:?}");
            let built = enc.reasoning(text);
            let back = chunk(std::str::from_utf8(built.payload()).unwrap());
            assert_eq!(built.reasoning(), back.reasoning(), "{text:?}");
        }
        for built in [
            enc.role(),
            enc.tool_call(1, "call_9", "get_weather"),
            enc.tool_arguments(1, "{\"city\":"),
            enc.finish(&FinishReason::ToolCalls),
            enc.usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                reasoning_tokens: 2,
                cached_tokens: 0,
            }),
        ] {
            let back = chunk(std::str::from_utf8(built.payload()).unwrap());
            assert_eq!(back, built);
        }
    }

    #[test]
    fn accumulates_parallel_tool_calls_reasoning_and_logprobs() {
        let mut acc = Accumulator::default();
        for s in [
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":"Let"},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"reasoning_content":" me"},"logprobs":{"content":[{"token":"a","logprob":-0.1}]},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"f","arguments":""}},{"index":1,"id":"call_b","type":"function","function":{"name":"g","arguments":"{}"}}]},"logprobs":{"content":[{"token":"b","logprob":-0.2}]},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":"}}]},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]},"finish_reason":null}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":1,"delta":{"role":"assistant","content":"other"},"finish_reason":"length"}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        ] {
            acc.add(&chunk(s));
        }
        let got = acc.finish("unused", 0, "unused");
        let want = serde_json::json!({
            "id": "c1", "object": "chat.completion", "created": 5, "model": "m",
            "system_fingerprint": "fp",
            "choices": [
                {"index": 0, "message": {
                    "role": "assistant", "content": null, "reasoning_content": "Let me",
                    "tool_calls": [
                        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                    ]},
                 "logprobs": {"content": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.2}]},
                 "finish_reason": "tool_calls"},
                {"index": 1, "message": {"role": "assistant", "content": "other"},
                 "logprobs": null, "finish_reason": "length"},
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        });
        assert_eq!(got, want);
    }

    /// Text-only chunks are merged without reading their JSON again; the reply must be the
    /// one the full merge builds.
    #[test]
    fn plain_chunks_merge_like_any_other() {
        let payloads = [
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","obfuscation":"a","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","obfuscation":"a","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","obfuscation":"a","choices":[{"index":0,"delta":{"content":"lo \"x\""},"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":null,"refusal":null},"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"!"},"logprobs":{"content":[]},"finish_reason":null}]}"#,
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ];
        let chunks: Vec<Chunk> = payloads.iter().map(|p| chunk(p)).collect();
        assert!(chunks[1].flags & PLAIN != 0 && chunks[2].flags & PLAIN != 0);
        assert!(chunks[4].flags & PLAIN == 0, "logprobs are merged in full");
        assert!(chunks[5].flags & PLAIN == 0, "a finish is merged in full");
        let (mut fast, mut full) = (Accumulator::default(), Accumulator::default());
        for c in &chunks {
            fast.add(c);
            let mut slow = c.clone();
            slow.flags &= !PLAIN;
            full.add(&slow);
        }
        let fast = fast.finish("x", 0, "x");
        assert_eq!(fast, full.finish("x", 0, "x"));
        assert_eq!(fast["choices"][0]["message"]["content"], "Hello \"x\"!");
    }

    /// Chunks are read with sonic-rs; it must accept, refuse and read exactly what
    /// serde_json does.
    #[test]
    fn sonic_reads_chunks_as_serde_json_does() {
        fn meaning(w: &Wire<'_>) -> String {
            format!(
                "{:?} {:?} {:?} {} {} {} {:?} {:?}",
                w.choices.first.content,
                w.choices.first.reasoning,
                w.choices.first.finish,
                w.choices.count,
                w.choices.any_delta,
                w.choices.plain,
                w.usage
                    .as_ref()
                    .map(|u| (u.prompt_tokens, u.completion_tokens)),
                w.error,
            )
        }
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
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\""}}]}}]}"#,
            br#"{"choices":[{"delta":{"reasoning":{"x":1},"reasoning_content":"r"}}]}"#,
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
            br#"{"choices":[{"index":"0","delta":{}}]}"#,
            br#"null"#,
            br#"[]"#,
            br#"{}"#,
            br#"{"choices":[{"delta":{"content":"a"}}], "id":"x\u0000"}"#,
        ];
        for case in cases {
            let sonic = sonic_rs::from_slice::<Wire<'_>>(case).map(|c| meaning(&c));
            let serde = serde_json::from_slice::<Wire<'_>>(case).map(|c| meaning(&c));
            assert_eq!(
                sonic.as_ref().ok(),
                serde.as_ref().ok(),
                "{}: sonic {sonic:?}, serde_json {serde:?}",
                String::from_utf8_lossy(case)
            );
        }
    }
}
