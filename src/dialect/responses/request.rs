//! `POST /v1/responses` bodies, and their translation to a chat request: input items become
//! chat messages, function tools chat tools, `text.format` a `response_format`.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::domain::{ChatRequest, GenParams, Message};

/// A `POST /v1/responses` body as clients send it.
#[derive(Debug, Clone, Deserialize)]
pub struct CreateResponse {
    pub model: String,
    /// A string, or a list of input items.
    #[serde(default)]
    pub input: Option<Input>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub reasoning: Option<Reasoning>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default = "yes")]
    pub store: bool,
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Everything else, forwarded to OpenAI-compatible upstreams (an SDK's `extra_body`)
    /// except the Responses-only fields a chat upstream would refuse (see [`DROPPED`]).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Reasoning {
    #[serde(default)]
    pub effort: Option<String>,
    /// Kept to echo it; chat upstreams have no such knob.
    #[serde(default)]
    pub summary: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<Map<String, Value>>,
    #[serde(default)]
    pub verbosity: Option<String>,
}

/// Responses-only fields with no chat counterpart: forwarding them would have an
/// OpenAI-compatible upstream refuse the request.
const DROPPED: &[&str] = &[
    "include",
    "truncation",
    "max_tool_calls",
    "conversation",
    "prompt",
    "stream_options",
    "top_logprobs",
    "context_management",
];

impl CreateResponse {
    /// The new input as a list of items (a string input becomes one user `message` item
    /// with an `input_text` part); each item gets an `id` if it has none.
    pub fn input_items(&self) -> Vec<Value> {
        let items = match &self.input {
            None => Vec::new(),
            Some(Input::Text(t)) => vec![json!({
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": t}],
            })],
            Some(Input::Items(items)) => items.clone(),
        };
        items
            .into_iter()
            .map(|mut item| {
                if let Value::Object(o) = &mut item {
                    if o.get("id").is_none_or(Value::is_null) {
                        let prefix = match o.get("type").and_then(Value::as_str) {
                            Some("function_call") => "fc",
                            Some("function_call_output") => "fco",
                            Some("reasoning") => "rs",
                            _ => "msg",
                        };
                        o.insert("id".into(), new_id(prefix).into());
                    }
                    if o.get("type").is_none() && o.contains_key("role") {
                        o.insert("type".into(), "message".into());
                    }
                }
                item
            })
            .collect()
    }

    /// Checks what serde cannot, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.trim().is_empty() {
            return Err("model: must not be empty".into());
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err("temperature: must be between 0 and 2".into());
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err("top_p: must be between 0 and 1".into());
            }
        }
        if self.max_output_tokens == Some(0) {
            return Err("max_output_tokens: must be a positive integer".into());
        }
        if let Some(Input::Text(t)) = &self.input {
            if t.is_empty() {
                return Err("input: must not be empty".into());
            }
        }
        Ok(())
    }
}

/// A fresh item or response id: `<prefix>_` and 32 hex digits, time-ordered.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// The chat request for `req`, whose conversation is `history` (items of earlier responses:
/// their input items and output items, in order) followed by req's input. `instructions`
/// become the first system message (not carried from history).
pub fn to_chat(req: &CreateResponse, history: &[Value]) -> Result<ChatRequest, String> {
    req.validate()?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = req.instructions.as_deref().filter(|i| !i.is_empty()) {
        messages.push(json!({"role": "system", "content": i}));
    }
    let input = req.input_items();
    let mut conv = Conversation::default();
    for (i, item) in history.iter().enumerate() {
        conv.add(item, &format!("history[{i}]"))?;
    }
    for (i, item) in input.iter().enumerate() {
        conv.add(item, &format!("input[{i}]"))?;
    }
    messages.extend(conv.messages);
    if messages.is_empty() {
        return Err("input: must contain at least one item".into());
    }
    let messages = messages
        .into_iter()
        .map(serde_json::from_value::<Message>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("input: {e}"))?;

    let mut extra = req.extra.clone();
    for f in DROPPED {
        extra.remove(*f);
    }
    if let Some(tools) = &req.tools {
        let chat_tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| chat_tool(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        if !chat_tools.is_empty() {
            extra.insert("tools".into(), Value::Array(chat_tools));
        }
    }
    if let Some(choice) = &req.tool_choice {
        extra.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    if let Some(p) = req.parallel_tool_calls {
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            extra.insert("parallel_tool_calls".into(), p.into());
        }
    }
    if let Some(effort) = req.reasoning.as_ref().and_then(|r| r.effort.as_deref()) {
        extra.insert("reasoning_effort".into(), effort.into());
    }
    if let Some(text) = &req.text {
        if let Some(format) = &text.format {
            if let Some(rf) = response_format(format)? {
                extra.insert("response_format".into(), rf);
            }
        }
        if let Some(v) = &text.verbosity {
            extra.insert("verbosity".into(), v.clone().into());
        }
    }
    if let Some(u) = &req.user {
        extra.insert("user".into(), u.clone().into());
    }
    Ok(ChatRequest {
        model: req.model.clone(),
        messages,
        params: GenParams {
            temperature: req.temperature,
            top_p: req.top_p,
            max_tokens: req.max_output_tokens,
            stop: None,
            ..GenParams::default()
        },
        extra,
    })
}

/// Chat messages being built from items. Consecutive `function_call` items, and an
/// assistant message right before them, are one assistant turn with `tool_calls`: the shape
/// chat upstreams require before the `tool` messages answering them.
#[derive(Default)]
struct Conversation {
    messages: Vec<Value>,
    /// The last message is an assistant turn that later calls may join.
    open_assistant: bool,
}

impl Conversation {
    fn add(&mut self, item: &Value, at: &str) -> Result<(), String> {
        let Some(obj) = item.as_object() else {
            return Err(format!("{at}: must be an object"));
        };
        let kind = match obj.get("type") {
            None | Some(Value::Null) if obj.contains_key("role") => "message",
            None | Some(Value::Null) => return Err(format!("{at}.type: missing")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(format!("{at}.type: must be a string")),
        };
        match kind {
            "message" => self.message(obj, at),
            "function_call" => {
                let call_id = string(obj, "call_id", at)?;
                let name = string(obj, "name", at)?;
                let arguments = match obj.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    None | Some(Value::Null) => "{}".into(),
                    Some(_) => return Err(format!("{at}.arguments: must be a string")),
                };
                let call = json!({
                    "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments},
                });
                match self.messages.last_mut() {
                    Some(Value::Object(last)) if self.open_assistant => {
                        match last.get_mut("tool_calls") {
                            Some(Value::Array(calls)) => calls.push(call),
                            _ => {
                                last.insert("tool_calls".into(), Value::Array(vec![call]));
                            }
                        }
                    }
                    _ => {
                        self.messages.push(
                            json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                        );
                        self.open_assistant = true;
                    }
                }
                Ok(())
            }
            "function_call_output" => {
                let call_id = string(obj, "call_id", at)?;
                let content = match obj.get("output") {
                    Some(Value::String(s)) => Value::String(s.clone()),
                    Some(Value::Array(parts)) => {
                        let mut out = Vec::with_capacity(parts.len());
                        for (j, p) in parts.iter().enumerate() {
                            let at = format!("{at}.output[{j}]");
                            match p.get("type").and_then(Value::as_str) {
                                Some("input_text" | "output_text" | "text") => out.push(
                                    json!({"type": "text", "text": string_of(p, "text", &at)?}),
                                ),
                                Some(t) => {
                                    return Err(format!(
                                        "{at}.type: '{t}' is not supported in a function call output; send text"
                                    ));
                                }
                                None => return Err(format!("{at}.type: missing")),
                            }
                        }
                        Value::Array(out)
                    }
                    _ => return Err(format!("{at}.output: must be a string or a list of parts")),
                };
                self.messages
                    .push(json!({"role": "tool", "tool_call_id": call_id, "content": content}));
                self.open_assistant = false;
                Ok(())
            }
            // Reasoning is the model's own; chat upstreams take none back.
            "reasoning" => Ok(()),
            other => Err(format!(
                "{at}.type: '{other}' is not supported; expected message, function_call, function_call_output or reasoning"
            )),
        }
    }

    fn message(&mut self, obj: &Map<String, Value>, at: &str) -> Result<(), String> {
        let role = match obj.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "system" | "developer" | "assistant")) => r,
            Some(r) => {
                return Err(format!(
                    "{at}.role: '{r}' is not one of user, system, developer, assistant"
                ));
            }
            None => return Err(format!("{at}.role: must be a string")),
        };
        let content = match obj.get("content") {
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    out.push(chat_part(p, &format!("{at}.content[{j}]"))?);
                }
                if role == "assistant" {
                    // Chat assistant turns are text: the parts' texts, joined.
                    Value::String(
                        out.iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<String>(),
                    )
                } else {
                    Value::Array(out)
                }
            }
            _ => return Err(format!("{at}.content: must be a string or a list of parts")),
        };
        self.messages
            .push(json!({"role": role, "content": content}));
        self.open_assistant = role == "assistant";
        Ok(())
    }
}

/// One content part of a message item as a chat content part.
fn chat_part(p: &Value, at: &str) -> Result<Value, String> {
    match p.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text") => {
            Ok(json!({"type": "text", "text": string_of(p, "text", at)?}))
        }
        Some("refusal") => Ok(json!({"type": "text", "text": string_of(p, "refusal", at)?})),
        Some("input_image") => {
            if p.get("file_id").is_some_and(|f| !f.is_null()) {
                return Err(format!(
                    "{at}.file_id: files are not supported; send the image as image_url"
                ));
            }
            let url = match p.get("image_url") {
                Some(Value::String(u)) => u.clone(),
                _ => return Err(format!("{at}.image_url: must be a string")),
            };
            let mut image = json!({"url": url});
            if let Some(d) = p.get("detail").and_then(Value::as_str) {
                image["detail"] = d.into();
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        Some(t) => Err(format!(
            "{at}.type: '{t}' is not supported; expected input_text, input_image or output_text"
        )),
        None => Err(format!("{at}.type: must be a string")),
    }
}

fn string(obj: &Map<String, Value>, field: &str, at: &str) -> Result<String, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(format!("{at}.{field}: must be a string")),
    }
}

fn string_of(v: &Value, field: &str, at: &str) -> Result<String, String> {
    match v.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(format!("{at}.{field}: must be a string")),
    }
}

/// A function tool in chat's shape (`{type, function: {name, description, parameters,
/// strict}}`); other tool kinds run on OpenAI's side and have no chat counterpart.
fn chat_tool(t: &Value, i: usize) -> Result<Value, String> {
    let at = format!("tools[{i}]");
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(format!(
                "{at}.type: '{other}' is not supported; only function tools are"
            ));
        }
        None => return Err(format!("{at}.type: must be a string")),
    }
    let name = string_of(t, "name", &at)?;
    let mut function = Map::new();
    function.insert("name".into(), name.into());
    for f in ["description", "parameters", "strict"] {
        if let Some(v) = t.get(f).filter(|v| !v.is_null()) {
            function.insert(f.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, String> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err("tool_choice.name: must be a string".into()),
            }
        }
        _ => Err(
            "tool_choice: must be auto, none, required or {\"type\": \"function\", \"name\": …}"
                .into(),
        ),
    }
}

/// `text.format` as chat's `response_format`; plain text is chat's default, sent as nothing.
fn response_format(format: &Map<String, Value>) -> Result<Option<Value>, String> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            match format.get("name") {
                Some(Value::String(n)) => schema.insert("name".into(), n.clone().into()),
                _ => return Err("text.format.name: must be a string".into()),
            };
            match format.get("schema") {
                Some(s @ Value::Object(_)) => schema.insert("schema".into(), s.clone()),
                _ => return Err("text.format.schema: must be an object".into()),
            };
            for f in ["strict", "description"] {
                if let Some(v) = format.get(f).filter(|v| !v.is_null()) {
                    schema.insert(f.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(t) => Err(format!(
            "text.format.type: '{t}' is not one of text, json_object, json_schema"
        )),
        None => Err("text.format.type: must be a string".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(body: Value) -> CreateResponse {
        serde_json::from_value(body).unwrap()
    }

    fn chat(body: Value) -> Result<ChatRequest, String> {
        to_chat(&req(body), &[])
    }

    #[test]
    fn a_string_input_is_one_user_message_after_the_instructions() {
        let c = chat(
            json!({"model": "m", "input": "hi", "instructions": "be brief",
            "max_output_tokens": 7, "temperature": 0.5, "mock": {"tokens": 3}, "store": false,
            "metadata": {"a": "b"}, "include": ["x"]}),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&c.messages).unwrap(),
            json!([{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        );
        assert_eq!(c.params.max_tokens, Some(7));
        assert_eq!(c.params.temperature, Some(0.5));
        assert!(c.extra.contains_key("mock"));
        for gone in ["store", "metadata", "include", "input", "instructions"] {
            assert!(!c.extra.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn calls_join_the_assistant_turn_and_outputs_become_tool_messages() {
        let c = chat(json!({"model": "m", "input": [
            {"role": "user", "content": "weather?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see.", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "18C"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "20C"}]},
        ]}))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&c.messages).unwrap(),
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "Let me see.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "20C"}]},
            ])
        );
    }

    #[test]
    fn tools_choice_reasoning_and_format_become_chat_fields() {
        let c = chat(json!({"model": "m", "input": "x",
            "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": true}}}))
        .unwrap();
        assert_eq!(
            c.extra["tools"],
            json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            c.extra["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(c.extra["parallel_tool_calls"], json!(false));
        assert_eq!(c.extra["reasoning_effort"], json!("low"));
        assert_eq!(
            c.extra["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": true}})
        );
    }

    #[test]
    fn history_comes_before_the_input() {
        let history = [
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]}),
            json!({"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "b", "annotations": [], "logprobs": []}]}),
        ];
        let c = to_chat(
            &req(json!({"model": "m", "input": "c", "instructions": "sys"})),
            &history,
        )
        .unwrap();
        let texts: Vec<_> = c.messages.iter().map(|m| m.text()).collect();
        assert_eq!(texts, ["sys", "a", "b", "c"]);
    }

    #[test]
    fn input_items_get_ids_and_types() {
        let r = req(
            json!({"model": "m", "input": [{"role": "user", "content": "hi"},
            {"type": "function_call_output", "call_id": "c", "output": "x", "id": "mine"}]}),
        );
        let items = r.input_items();
        assert_eq!(items[0]["type"], "message");
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(items[1]["id"], "mine");
        let r = req(json!({"model": "m", "input": "hi"}));
        assert_eq!(r.input_items()[0]["content"][0]["type"], "input_text");
    }

    #[test]
    fn bad_input_names_the_field() {
        for (body, want) in [
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "function"}]}),
                "tools[0].name",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
                "input[0].content[0].file_id",
            ),
            (
                json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"model": "m", "input": [{"type": "web_search_call"}]}),
                "input[0].type",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call", "name": "f"}]}),
                "input[0].call_id",
            ),
            (
                json!({"model": "m", "input": "x", "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format.type",
            ),
            (
                json!({"model": "m", "input": "x", "temperature": 3}),
                "temperature",
            ),
            (json!({"model": "m"}), "input"),
            (json!({"model": "", "input": "x"}), "model"),
        ] {
            let err = chat(body.clone()).unwrap_err();
            assert!(err.starts_with(want), "{body}: {err}");
        }
    }
}
