//! Per-request overrides of the process-wide [`MockConfig`].

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use serde_json::Value;

use super::scenario::{self, Api, Scenario};
use super::{Fault, MockConfig, Shared};

/// What one request will get, after knobs and `fail_times` are applied.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) tokens: usize,
    pub(crate) first_token_delay: Duration,
    pub(crate) token_delay: Duration,
    pub(crate) fault: Option<Fault>,
    /// With the `stamp` knob, when the request arrived (Unix ns): every token's text
    /// then ends in `@<arrived>@<sent>`, so a client can time the path to the mock and
    /// back to the nanosecond, whatever relays the text, instead of through the timer's
    /// millisecond ticks.
    pub(crate) stamp: Option<u128>,
    /// A recorded reply to play instead of the token text; `tokens` and `stamp` do not
    /// apply to it.
    pub(crate) scenario: Option<Scenario>,
}

/// Overrides found on one request. The outer `Option` is "not given"; the
/// inner one (for `fault`/`fail_times`) lets a request switch a process-wide
/// setting off.
#[derive(Debug, Default)]
struct Knobs {
    tokens: Option<usize>,
    first_token_ms: Option<u64>,
    token_ms: Option<u64>,
    fault: Option<Option<Fault>>,
    fail_times: Option<Option<u32>>,
    key: Option<String>,
    stamp: Option<bool>,
    scenario: Option<Option<Scenario>>,
}

const BODY_FIELDS: &[&str] = &[
    "tokens",
    "first_token_ms",
    "token_ms",
    "fault",
    "fail_times",
    "key",
    "stamp",
    "scenario",
];

/// Resolves the plan for a chat request and consumes one `fail_times` slot
/// of its key when a limited fault is in play.
pub(crate) fn plan(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Value,
    api: Api,
) -> Result<Plan, String> {
    let mut knobs = Knobs::default();
    from_headers(&mut knobs, headers)?;
    // Applied second so the body wins: requests relayed through sluice keep
    // unknown body fields but not arbitrary headers.
    from_body(&mut knobs, body)?;
    resolve(shared, knobs, api)
}

fn resolve(shared: &Shared, knobs: Knobs, api: Api) -> Result<Plan, String> {
    let config: &MockConfig = &shared.config;
    let scenario = match knobs.scenario {
        Some(asked) => asked.map(|s| s.on(api)).transpose()?,
        // One process-wide scenario serves both endpoints, so the endpoint it is not
        // for plays plain text.
        None => match config.scenario.as_deref() {
            Some(name) => scenario::parse(name)?.filter(|s| s.api() == api),
            None => None,
        },
    };
    let mut fault = knobs.fault.unwrap_or(config.fault);
    if let (Some(s), Some(f)) = (scenario, fault) {
        // Checked before `fail_times` is counted, so a refused request uses no budget.
        if !matches!(f, Fault::RateLimit | Fault::ServerError) {
            return Err(format!(
                "mock fault {f} cannot be combined with scenario {s}: a scenario plays its \
                 recording whole, so only the 429 and 500 faults apply to it"
            ));
        }
    }
    let fail_times = knobs.fail_times.unwrap_or(config.fail_times);
    if let (Some(_), Some(limit)) = (fault, fail_times) {
        let key = knobs.key.unwrap_or_default();
        let mut counts = shared
            .fault_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = counts.entry(key).or_insert(0);
        if *seen >= limit {
            fault = None;
        }
        *seen = seen.saturating_add(1);
    }
    Ok(Plan {
        tokens: knobs.tokens.unwrap_or(config.tokens),
        first_token_delay: knobs
            .first_token_ms
            .map_or(config.first_token_delay, Duration::from_millis),
        token_delay: knobs
            .token_ms
            .map_or(config.token_delay, Duration::from_millis),
        fault,
        stamp: knobs.stamp.unwrap_or(config.stamp).then(unix_ns),
        scenario,
    })
}

/// Now, in nanoseconds since the Unix epoch: the clock every process on the machine shares.
pub(crate) fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn from_headers(knobs: &mut Knobs, headers: &HeaderMap) -> Result<(), String> {
    let get = |name: &str| -> Result<Option<&str>, String> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| format!("header {name} is not visible ASCII"))
            })
            .transpose()
    };
    if let Some(v) = get("x-mock-tokens")? {
        knobs.tokens = Some(parse_num(v, "x-mock-tokens")?);
    }
    if let Some(v) = get("x-mock-first-token-ms")? {
        knobs.first_token_ms = Some(parse_num(v, "x-mock-first-token-ms")?);
    }
    if let Some(v) = get("x-mock-token-ms")? {
        knobs.token_ms = Some(parse_num(v, "x-mock-token-ms")?);
    }
    if let Some(v) = get("x-mock-fault")? {
        knobs.fault = Some(parse_fault(v)?);
    }
    if let Some(v) = get("x-mock-fail-times")? {
        knobs.fail_times = Some(Some(parse_num(v, "x-mock-fail-times")?));
    }
    if let Some(v) = get("x-mock-key")? {
        knobs.key = Some(v.to_owned());
    }
    if let Some(v) = get("x-mock-stamp")? {
        knobs.stamp = Some(matches!(v, "1" | "true"));
    }
    if let Some(v) = get("x-mock-scenario")? {
        knobs.scenario = Some(scenario::parse(v)?);
    }
    Ok(())
}

fn from_body(knobs: &mut Knobs, body: &Value) -> Result<(), String> {
    let Some(mock) = body.get("mock") else {
        return Ok(());
    };
    if mock.is_null() {
        return Ok(());
    }
    let Some(mock) = mock.as_object() else {
        return Err("\"mock\" must be an object".to_owned());
    };
    // A misspelt knob silently ignored would make a fault test pass for the
    // wrong reason, so unknown names are rejected.
    if let Some(unknown) = mock.keys().find(|k| !BODY_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown mock knob {unknown:?}; expected one of {BODY_FIELDS:?}"
        ));
    }
    if let Some(v) = mock.get("tokens") {
        knobs.tokens = Some(json_num(v, "mock.tokens")?);
    }
    if let Some(v) = mock.get("first_token_ms") {
        knobs.first_token_ms = Some(json_num(v, "mock.first_token_ms")?);
    }
    if let Some(v) = mock.get("token_ms") {
        knobs.token_ms = Some(json_num(v, "mock.token_ms")?);
    }
    if let Some(v) = mock.get("fault") {
        knobs.fault = Some(match v {
            Value::Null => None,
            Value::String(s) => parse_fault(s)?,
            // Allows `"fault": 429`, the natural spelling for status faults.
            Value::Number(n) => parse_fault(&n.to_string())?,
            _ => return Err("mock.fault must be a string or null".to_owned()),
        });
    }
    if let Some(v) = mock.get("fail_times") {
        knobs.fail_times = Some(match v {
            Value::Null => None,
            v => Some(json_num(v, "mock.fail_times")?),
        });
    }
    if let Some(v) = mock.get("key") {
        knobs.key = Some(match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err("mock.key must be a string".to_owned()),
        });
    }
    if let Some(v) = mock.get("stamp") {
        knobs.stamp = Some(
            v.as_bool()
                .ok_or_else(|| "mock.stamp must be true or false".to_owned())?,
        );
    }
    if let Some(v) = mock.get("scenario") {
        knobs.scenario = Some(match v {
            Value::Null => None,
            Value::String(s) => scenario::parse(s)?,
            _ => return Err("mock.scenario must be a string or null".to_owned()),
        });
    }
    Ok(())
}

/// `None` means "explicitly no fault", so a request can opt out of a
/// process-wide `--fault`.
pub(crate) fn parse_fault(s: &str) -> Result<Option<Fault>, String> {
    match s.trim() {
        "" | "none" => Ok(None),
        other => Fault::from_str(other).map(Some),
    }
}

fn parse_num<T: FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{what} must be a non-negative integer, got {s:?}"))
}

fn json_num<T: TryFrom<u64>>(v: &Value, what: &str) -> Result<T, String> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("{what} must be a non-negative integer, got {v}"))
}
