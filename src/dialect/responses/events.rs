//! Relayed chunks as Responses streaming events, and the response object they add up to.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::request::{CreateResponse, new_id};
use crate::domain::{Chunk, FinishReason, Usage};

/// The response object's fields that echo the request: status `in_progress`, no output.
pub type ResponseShell = Value;

/// The response object fields that echo the request, status "in_progress", output [].
pub fn shell(req: &CreateResponse, id: &str, created_at: u64) -> ResponseShell {
    let reasoning = req.reasoning.as_ref().map_or_else(
        || json!({"effort": null, "summary": null}),
        |r| json!({"effort": r.effort, "summary": r.summary}),
    );
    let format = req
        .text
        .as_ref()
        .and_then(|t| t.format.clone())
        .map_or_else(|| json!({"type": "text"}), Value::Object);
    let mut text = json!({"format": format});
    if let Some(v) = req.text.as_ref().and_then(|t| t.verbosity.as_ref()) {
        text["verbosity"] = v.clone().into();
    }
    json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": req.background,
        "error": null,
        "incomplete_details": null,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata.clone().unwrap_or_default(),
        "model": req.model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": req.previous_response_id,
        "reasoning": reasoning,
        "store": req.store,
        "temperature": req.temperature,
        "text": text,
        "tool_choice": req.tool_choice.clone().unwrap_or_else(|| "auto".into()),
        "tools": req.tools.clone().unwrap_or_default(),
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": null,
        "user": req.user,
    })
}

/// One streaming event: its `type`, its sequence number, and its JSON (both included).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseEvent {
    pub seq: u64,
    pub kind: &'static str,
    pub data: String,
}

/// An output item being streamed.
#[derive(Debug)]
enum Open {
    /// Text: a `message` item with one `output_text` part, or a `reasoning` item with one
    /// `reasoning_text` part.
    Text {
        index: usize,
        id: String,
        reasoning: bool,
        text: String,
    },
    Call {
        index: usize,
        id: String,
        /// The chunk's `tool_calls[].index`, which later argument fragments name.
        slot: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Turns relayed chunks into the Responses API's streaming events, numbering them from 0
/// without a gap, and keeps the response object they add up to.
pub struct ResponseBuilder {
    response: Map<String, Value>,
    output: Vec<Value>,
    /// Items still streaming, in output order: text and reasoning one at a time, parallel
    /// tool calls together.
    open: Vec<Open>,
    seq: u64,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    done: bool,
}

impl ResponseBuilder {
    pub fn new(shell: ResponseShell) -> Self {
        let response = match shell {
            Value::Object(o) => o,
            _ => Map::new(),
        };
        Self {
            response,
            output: Vec::new(),
            open: Vec::new(),
            seq: 0,
            usage: None,
            finish: None,
            done: false,
        }
    }

    /// `response.created` then `response.in_progress` (status in_progress).
    pub fn begin(&mut self, out: &mut Vec<ResponseEvent>) {
        self.response.insert("status".into(), "in_progress".into());
        let response = self.response();
        self.emit(out, "response.created", json!({"response": response}));
        let response = self.response();
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    pub fn push(&mut self, chunk: &Chunk, out: &mut Vec<ResponseEvent>) {
        if self.done {
            return;
        }
        if let Some(r) = chunk.reasoning() {
            self.text_delta(true, r, out);
        }
        if let Some(t) = chunk.content() {
            self.text_delta(false, t, out);
        }
        // Only a chunk that names tool calls is read again, as JSON.
        if memchr::memmem::find(chunk.payload(), b"\"tool_calls\"").is_some() {
            for call in tool_calls(chunk.payload()) {
                self.call_delta(call, out);
            }
        }
        if let Some(f) = chunk.finish() {
            self.finish = Some(f.clone());
        }
        if let Some(u) = chunk.usage() {
            self.usage = Some(u);
        }
    }

    /// The relay ended: closes open parts and items, then `response.completed`, or
    /// `response.incomplete` when the output was cut short (length, content filter).
    pub fn complete(&mut self, out: &mut Vec<ResponseEvent>) {
        if self.done {
            return;
        }
        let reason = match self.finish {
            Some(FinishReason::Length) => Some("max_output_tokens"),
            Some(FinishReason::ContentFilter) => Some("content_filter"),
            _ => None,
        };
        let item_status = if reason.is_some() {
            "incomplete"
        } else {
            "completed"
        };
        self.close_all(item_status, out);
        self.set_usage();
        match reason {
            Some(reason) => {
                self.response.insert("status".into(), "incomplete".into());
                self.response
                    .insert("incomplete_details".into(), json!({"reason": reason}));
                self.end(out, "response.incomplete");
            }
            None => {
                self.response.insert("status".into(), "completed".into());
                self.response.insert(
                    "completed_at".into(),
                    crate::domain::chunk::unix_now().into(),
                );
                self.end(out, "response.completed");
            }
        }
    }

    /// The relay failed mid-way: closes open items (as incomplete), then `response.failed`
    /// with `response.error`.
    pub fn fail(&mut self, code: &str, message: &str, out: &mut Vec<ResponseEvent>) {
        if self.done {
            return;
        }
        self.close_all("incomplete", out);
        self.set_usage();
        self.response.insert("status".into(), "failed".into());
        self.response
            .insert("error".into(), json!({"code": code, "message": message}));
        self.end(out, "response.failed");
    }

    /// Stopped on request: closes open items (as incomplete), status `cancelled`. The API
    /// has no event of its own for this; `response.incomplete` is the final event SDKs
    /// already treat as an end that is not a failure.
    pub fn cancel(&mut self, out: &mut Vec<ResponseEvent>) {
        if self.done {
            return;
        }
        self.close_all("incomplete", out);
        self.set_usage();
        self.response.insert("status".into(), "cancelled".into());
        self.end(out, "response.incomplete");
    }

    /// The response object as it stands: status, output so far (open items included, as
    /// they stand), usage once known.
    pub fn response(&self) -> Value {
        let mut r = self.response.clone();
        let mut output = self.output.clone();
        output.extend(self.open.iter().map(|o| item_of(o, "in_progress")));
        r.insert("output".into(), Value::Array(output));
        Value::Object(r)
    }

    pub fn is_final(&self) -> bool {
        self.done
    }

    /// Opens an output item: `response.output_item.added`.
    fn add_item(&mut self, open: Open, out: &mut Vec<ResponseEvent>) {
        let index = match &open {
            Open::Text { index, .. } | Open::Call { index, .. } => *index,
        };
        let item = item_of(&open, "in_progress");
        self.open.push(open);
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
    }

    fn end(&mut self, out: &mut Vec<ResponseEvent>, kind: &'static str) {
        self.done = true;
        let response = self.response();
        self.emit(out, kind, json!({"response": response}));
    }

    fn set_usage(&mut self) {
        if let Some(u) = self.usage {
            self.response.insert(
                "usage".into(),
                json!({
                    "input_tokens": u.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                    "output_tokens": u.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                    "total_tokens": u.total(),
                }),
            );
        }
    }

    fn emit(&mut self, out: &mut Vec<ResponseEvent>, kind: &'static str, mut data: Value) {
        if let Value::Object(o) = &mut data {
            o.insert("type".into(), kind.into());
            o.insert("sequence_number".into(), self.seq.into());
        }
        out.push(ResponseEvent {
            seq: self.seq,
            kind,
            data: data.to_string(),
        });
        self.seq += 1;
    }

    fn text_delta(&mut self, reasoning: bool, delta: &str, out: &mut Vec<ResponseEvent>) {
        let same =
            matches!(self.open.as_slice(), [Open::Text { reasoning: r, .. }] if *r == reasoning);
        if !same {
            self.close_all("completed", out);
            let index = self.output.len();
            let id = new_id(if reasoning { "rs" } else { "msg" });
            let open = Open::Text {
                index,
                id: id.clone(),
                reasoning,
                text: String::new(),
            };
            self.add_item(open, out);
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part(reasoning, "")}),
            );
        }
        let Some(Open::Text {
            index, id, text, ..
        }) = self.open.last_mut()
        else {
            return;
        };
        text.push_str(delta);
        let (index, id) = (*index, id.clone());
        if reasoning {
            self.emit(
                out,
                "response.reasoning_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta}),
            );
        } else {
            self.emit(
                out,
                "response.output_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}),
            );
        }
    }

    fn call_delta(&mut self, call: WireCall, out: &mut Vec<ResponseEvent>) {
        let slot = call.index.unwrap_or(0);
        let known = self
            .open
            .iter()
            .any(|o| matches!(o, Open::Call { slot: s, .. } if *s == slot));
        let function = call.function.unwrap_or_default();
        if !known {
            // A call starts: a text or reasoning item before it is over.
            if matches!(self.open.as_slice(), [Open::Text { .. }]) {
                self.close_all("completed", out);
            }
            let index = self.output.len() + self.open.len();
            let open = Open::Call {
                index,
                id: new_id("fc"),
                slot,
                call_id: call.id.unwrap_or_else(|| new_id("call")),
                name: function.name.unwrap_or_default(),
                arguments: String::new(),
            };
            self.add_item(open, out);
        }
        let Some(fragment) = function.arguments.filter(|a| !a.is_empty()) else {
            return;
        };
        let Some(Open::Call {
            index,
            id,
            arguments,
            ..
        }) = self
            .open
            .iter_mut()
            .find(|o| matches!(o, Open::Call { slot: s, .. } if *s == slot))
        else {
            return;
        };
        arguments.push_str(&fragment);
        let (index, id) = (*index, id.clone());
        self.emit(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": fragment}),
        );
    }

    /// Ends every open item, in output order, with its closing events.
    fn close_all(&mut self, status: &str, out: &mut Vec<ResponseEvent>) {
        let open = std::mem::take(&mut self.open);
        for o in open {
            match &o {
                Open::Text {
                    index,
                    id,
                    reasoning,
                    text,
                } => {
                    let (kind, extra) = if *reasoning {
                        ("response.reasoning_text.done", json!({}))
                    } else {
                        ("response.output_text.done", json!({"logprobs": []}))
                    };
                    let mut done = json!({"item_id": id, "output_index": index, "content_index": 0, "text": text});
                    if let (Value::Object(d), Value::Object(e)) = (&mut done, extra) {
                        d.extend(e);
                    }
                    self.emit(out, kind, done);
                    self.emit(
                        out,
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "part": part(*reasoning, text)}),
                    );
                }
                Open::Call {
                    index,
                    id,
                    arguments,
                    ..
                } => {
                    self.emit(
                        out,
                        "response.function_call_arguments.done",
                        json!({"item_id": id, "output_index": index, "arguments": arguments}),
                    );
                }
            }
            let index = match &o {
                Open::Text { index, .. } | Open::Call { index, .. } => *index,
            };
            let item = item_of(&o, status);
            self.output.push(item.clone());
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
        }
    }
}

fn part(reasoning: bool, text: &str) -> Value {
    if reasoning {
        json!({"type": "reasoning_text", "text": text})
    } else {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }
}

/// The output item `o` with `status`. An item just added has no content yet: its part
/// comes with `response.content_part.added`.
fn item_of(o: &Open, status: &str) -> Value {
    match o {
        Open::Text {
            id,
            reasoning,
            text,
            ..
        } => {
            let content = if status == "in_progress" && text.is_empty() {
                Vec::new()
            } else {
                vec![part(*reasoning, text)]
            };
            if *reasoning {
                json!({"id": id, "type": "reasoning", "summary": [], "content": content, "status": status})
            } else {
                json!({"id": id, "type": "message", "role": "assistant", "status": status, "content": content})
            }
        }
        Open::Call {
            id,
            call_id,
            name,
            arguments,
            ..
        } => json!({
            "id": id, "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments,
        }),
    }
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: u64,
    #[serde(default)]
    delta: Option<WireDelta>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    tool_calls: Option<Vec<WireCall>>,
}

#[derive(Deserialize)]
struct WireCall {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Deserialize, Default)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// The first choice's tool call deltas.
fn tool_calls(payload: &[u8]) -> Vec<WireCall> {
    serde_json::from_slice::<WireChunk>(payload)
        .ok()
        .and_then(|c| c.choices.into_iter().find(|c| c.index == 0))
        .and_then(|c| c.delta)
        .and_then(|d| d.tool_calls)
        .unwrap_or_default()
}
