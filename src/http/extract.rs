//! A JSON body extractor whose rejections are OpenAI-shaped and precise: 415 for a wrong
//! content type, 413 over the body limit, 400 for broken JSON, 422 naming the field that
//! does not fit the schema, 408 for a body that does not arrive in time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::ops::metrics::Metrics;

/// In a request's extensions: set once its body missed the body timeout, so the extractors
/// answer 408 instead of a generic read error.
#[derive(Clone, Default)]
pub struct BodyTimer(Arc<AtomicBool>);

impl BodyTimer {
    fn expired(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A request body that must arrive in full within a deadline counted from the request
/// head, or it fails: hyper bounds the head, not the body, so a client sending a head and
/// then nothing (or a byte at a time) would hold its connection indefinitely.
pub struct TimedBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    /// Armed only once the body makes the reader wait: a body already in the buffer costs
    /// no timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timer: BodyTimer,
    metrics: Arc<Metrics>,
}

/// Wraps `req`'s body in a [`TimedBody`] and records its [`BodyTimer`] in the extensions.
pub fn time_body(
    req: axum::http::Request<Incoming>,
    timeout: Duration,
    metrics: &Arc<Metrics>,
) -> Request {
    let timer = BodyTimer::default();
    let mut req = req.map(|inner| {
        axum::body::Body::new(TimedBody {
            inner,
            deadline: tokio::time::Instant::now() + timeout,
            sleep: None,
            timer: timer.clone(),
            metrics: metrics.clone(),
        })
    });
    req.extensions_mut().insert(timer);
    req
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if !this.timer.0.swap(true, Ordering::Relaxed) {
            this.metrics.body_timeout();
        }
        Poll::Ready(Some(Err(
            "request body not received within the body timeout".into(),
        )))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn body_timeout() -> ApiError {
    ApiError::RequestTimeout(
        "the request body did not arrive within the body timeout (SLUICE_BODY_TIMEOUT_MS)".into(),
    )
}

fn expired(timer: Option<&BodyTimer>) -> bool {
    timer.is_some_and(BodyTimer::expired)
}

pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = json_body(req, state).await?;
        decode(&body).map(ApiJson)
    }
}

/// Like [`ApiJson`], for a body relayed to a provider and never stored: NUL is the
/// client's to send, and goes upstream unchanged.
pub struct RelayJson<T>(pub T);

impl<T, S> FromRequest<S> for RelayJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = json_body(req, state).await?;
        parse(&body).map(RelayJson)
    }
}

/// The body of a request that must be JSON, read within the body deadline.
async fn json_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    if !is_json(req.headers().get(header::CONTENT_TYPE)) {
        return Err(ApiError::UnsupportedMediaType(
            "expected a body with Content-Type: application/json".into(),
        ));
    }
    let timer = req.extensions().get::<BodyTimer>().cloned();
    Bytes::from_request(req, state).await.map_err(|r| {
        if expired(timer.as_ref()) {
            body_timeout()
        } else if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("request body exceeds the size limit".into())
        } else {
            ApiError::BadRequest(format!("cannot read request body: {}", r.body_text()))
        }
    })
}

/// Like [`ApiJson`], but an empty body is `None` (e.g. `POST /api/sessions` with no options).
pub struct OptionalJson<T>(pub Option<T>);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let has_type = req.headers().contains_key(header::CONTENT_TYPE);
        if !has_type {
            let timer = req.extensions().get::<BodyTimer>().cloned();
            let body = Bytes::from_request(req, state).await.map_err(|r| {
                if expired(timer.as_ref()) {
                    body_timeout()
                } else {
                    ApiError::BadRequest(r.body_text())
                }
            })?;
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Self(None));
            }
            return Err(ApiError::UnsupportedMediaType(
                "expected a body with Content-Type: application/json".into(),
            ));
        }
        ApiJson::<T>::from_request(req, state)
            .await
            .map(|ApiJson(v)| Self(Some(v)))
    }
}

/// The resume point of an SSE client: the `Last-Event-ID` header (sent by `EventSource` on
/// reconnect), or `?last_event_id=` for clients that cannot set headers.
pub struct LastEventId(pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for LastEventId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let query = || {
            parts.uri.query().and_then(|q| {
                q.split('&').find_map(|kv| {
                    kv.strip_prefix("last_event_id=")
                        .map(|v| v.replace("%2E", ".").replace("%2e", "."))
                })
            })
        };
        Ok(Self(header.or_else(query).filter(|v| !v.is_empty())))
    }
}

fn is_json(value: Option<&header::HeaderValue>) -> bool {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A body sluice stores, as [`ApiJson`] reads it: NUL refused, then [`parse`]d.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    refuse_nul(body)?;
    parse(body)
}

/// JSON nested deeper than serde_json's recursion limit (128) is refused as invalid JSON
/// (400) in both passes, including into `serde_json::Value` and flattened fields, so no
/// body can overflow the stack.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // The path-tracking pass costs about 3 % of a short request's CPU; a body that parses
    // needs no path, so it is only run to explain a body that does not.
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::Unprocessable(if path == "." {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            }),
            _ => ApiError::BadRequest(format!("invalid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// Client text with NUL (U+0000) is refused, naming the field, rather than stored altered:
/// PostgreSQL cannot hold it and the client can resend. JSON can carry NUL only as the
/// escape `\u0000`, so bodies without one skip the walk.
fn refuse_nul(body: &[u8]) -> Result<(), ApiError> {
    if !body.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(());
    };
    let mut path = String::new();
    if nul_at(&value, &mut path) {
        let field = if path.is_empty() { "." } else { path.as_str() };
        return Err(ApiError::Unprocessable(format!(
            "{field}: must not contain NUL (\\u0000)"
        )));
    }
    Ok(())
}

/// Whether `v` holds a NUL in a string or a key; `path` is then where, as `a.b[0].c`.
fn nul_at(v: &serde_json::Value, path: &mut String) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = nul_at(item, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        Value::Object(map) => map.iter().any(|(k, item)| {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
            let found = k.contains('\0') || nul_at(item, path);
            if !found {
                path.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        b: Vec<Inner>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        c: String,
    }

    #[test]
    fn syntax_errors_are_400_schema_errors_422_with_the_field() {
        assert_eq!(parse::<T>(b"{\"a\":").unwrap_err().status(), 400);
        assert_eq!(
            parse::<T>(br#"{"a":1,"b":[]} x"#).unwrap_err().status(),
            400
        );
        let e = parse::<T>(br#"{"a":1,"b":[{"c":5}]}"#).unwrap_err();
        assert_eq!(e.status(), 422);
        assert!(e.to_string().contains("b[0].c"), "{e}");
        let e = parse::<T>(br#"{"b":[]}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `a`"), "{e}");
    }

    #[test]
    fn nul_in_any_string_is_422_naming_where() {
        let e = refuse_nul(br#"{"a":1,"b":[{"c":"x"},{"c":"y\u0000"}]}"#).unwrap_err();
        assert_eq!(e.status(), 422);
        assert!(
            e.to_string().starts_with("b[1].c: must not contain NUL"),
            "{e}"
        );
        // Also in a field the schema ignores, and in a key.
        let e = refuse_nul(br#"{"a":1,"b":[],"extra":{"k\u0000":1}}"#).unwrap_err();
        assert!(e.to_string().starts_with("extra.k"), "{e}");
        // An escaped backslash before `u0000` is text, not NUL.
        assert!(refuse_nul(br#"{"a":1,"b":[{"c":"\\u0000"}]}"#).is_ok());
    }

    #[test]
    fn content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.x+json",
        ] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "json"] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::domain::Message;
    use crate::transport::openai::CompletionRequest;

    /// Shaped like the request types: unknown fields refused, optional and free-form parts.
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        content: String,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        meta: Option<Value>,
    }

    const VALID: [&str; 4] = [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"temperature":0.5,"extra":{"a":[1,2,{"b":null}]}}"#,
        r#"{"content":"hello","model":"m","tags":["a","b"],"meta":{"x":[true,1.5e3,"\u00e9"]}}"#,
        r#"[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"t"}]}]"#,
        r#"{"content":"a\u0000b"}"#,
    ];

    /// Every way the request parser can answer `body`, for each request shape: a value or
    /// a 4xx, and never a panic.
    fn outcomes(body: &[u8]) -> Vec<Result<(), u16>> {
        let status = |r: Result<(), ApiError>| r.map_err(|e| e.status().as_u16());
        vec![
            status(decode::<CompletionRequest>(body).map(drop)),
            status(parse::<CompletionRequest>(body).map(drop)),
            status(decode::<Strict>(body).map(drop)),
            status(decode::<Vec<Message>>(body).map(drop)),
            status(decode::<Value>(body).map(drop)),
        ]
    }

    /// A valid body with bytes replaced, inserted or cut, at random places.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        (
            0..VALID.len(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        )
            .prop_map(|(which, edits)| {
                let mut b = VALID[which].as_bytes().to_vec();
                for (at, byte, how) in edits {
                    let i = at.index(b.len() + 1);
                    match how {
                        0 if i < b.len() => b[i] = byte,
                        1 => b.insert(i, byte),
                        _ => b.truncate(i),
                    }
                }
                b
            })
    }

    /// Deeply nested arrays and objects, alone or inside a field of each kind.
    fn nested(depth: usize, open: &str, close: &str, inner: &str) -> Vec<u8> {
        let mut s = String::with_capacity(depth * (open.len() + close.len()) + inner.len());
        for _ in 0..depth {
            s.push_str(open);
        }
        s.push_str(inner);
        for _ in 0..depth {
            s.push_str(close);
        }
        s.into_bytes()
    }

    proptest! {
        #[test]
        fn random_bodies_are_parsed_or_refused_with_a_4xx(
            body in prop_oneof![mutated(), proptest::collection::vec(any::<u8>(), 0..64)],
        ) {
            for outcome in outcomes(&body) {
                if let Err(status) = outcome {
                    prop_assert!((400..500).contains(&status), "{} for {:?}", status, String::from_utf8_lossy(&body));
                }
            }
        }

        #[test]
        fn nesting_past_the_limit_is_a_400_wherever_it_is(
            depth in prop_oneof![129usize..400, Just(10_000usize), Just(30_000usize)],
            shape in 0u8..2,
            at in 0u8..4,
        ) {
            let (open, close) = if shape == 0 { ("[", "]") } else { (r#"{"a":"#, "}") };
            let deep = String::from_utf8(nested(depth, open, close, "1")).unwrap();
            let body = match at {
                0 => deep,
                // A flattened field of the relay request, kept as `serde_json::Value`.
                1 => format!(r#"{{"model":"m","messages":[],"x":{deep}}}"#),
                // A message's content, a `Value` too.
                2 => format!(r#"{{"model":"m","messages":[{{"role":"user","content":{deep}}}]}}"#),
                _ => format!(r#"{{"content":"\u0000","meta":{deep}}}"#),
            };
            let got = outcomes(body.as_bytes());
            // A schema may refuse the body (422) before reaching the depth; never accepted.
            for outcome in &got {
                prop_assert!(matches!(outcome, Err(400 | 422)), "{:?}", got);
            }
            // Where the deep part is read as JSON, the limit is what refuses it.
            prop_assert_eq!(got[4], Err(400));
            if at == 1 || at == 2 {
                prop_assert_eq!(got[0], Err(400));
                prop_assert_eq!(got[1], Err(400));
            }
            if at == 3 {
                prop_assert_eq!(got[2], Err(400));
            }
        }
    }

    /// Nesting up to the limit still parses: the limit refuses only what is deeper.
    #[test]
    fn nesting_within_the_limit_parses() {
        let body = nested(100, "[", "]", "1");
        assert!(parse::<Value>(&body).is_ok());
        let body = format!(
            r#"{{"model":"m","messages":[],"x":{}}}"#,
            String::from_utf8(nested(100, "[", "]", "1")).unwrap()
        );
        assert!(parse::<CompletionRequest>(body.as_bytes()).is_ok());
    }
}
