//! The guards as HTTP middleware: each asks its limiter in `guard` for a decision and
//! answers a refusal with the status, headers and JSON body clients know.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::auth::{self, Principal};
use crate::error::ApiError;
use crate::guard::quota::{Refusal, RetryAfter};
use crate::guard::rate::{self, Client, RouteClass};
use crate::guard::{cors, host};
use crate::state::AppState;

/// The class of a request, or `None` for what is never limited: health, metrics, the
/// WebSocket upgrade (its messages have their own limits) and the UI.
pub fn classify(method: &Method, path: &str) -> Option<RouteClass> {
    classify_normal(method, &super::path::normalize(path))
}

/// [`classify`] of a path in the admin gate's normal form, so the two never disagree on
/// what is admin.
pub fn classify_normal(method: &Method, norm: &str) -> Option<RouteClass> {
    let mut segs = norm.split('/').filter(|s| !s.is_empty());
    let (first, second, third, fourth) = (segs.next(), segs.next(), segs.next(), segs.next());
    let more = segs.next().is_some();
    let post = method == Method::POST;
    match (first, second, third, fourth) {
        (Some("api"), Some("admin"), ..) => Some(RouteClass::Admin),
        (Some("v1"), Some("chat"), Some("completions"), None)
        | (Some("v1"), Some("messages"), None, None)
        | (Some("api"), Some("tasks"), None, None)
            if post =>
        {
            Some(RouteClass::Chat)
        }
        (Some("api"), Some("sessions"), Some(_), Some("messages"))
        | (Some("api"), Some("scenes"), Some(_), Some("run"))
            if post && !more =>
        {
            Some(RouteClass::Chat)
        }
        (Some("api"), ..) | (Some("v1"), ..) => Some(RouteClass::Api),
        _ => None,
    }
}

fn too_many(wait: Duration) -> ApiError {
    ApiError::TooManyRequests {
        message: "rate limit exceeded; retry after the time in the Retry-After header".into(),
        code: "rate_limited",
        retry_after: rate::secs(wait),
    }
}

/// The caller of a request, with failed authentications counted against `address`: once
/// its budget of `class` is spent, its bearer tokens get 429 without a store lookup.
pub async fn authenticate(
    st: &AppState,
    class: RouteClass,
    headers: &HeaderMap,
    address: &Client,
) -> Result<Principal, ApiError> {
    let rate = &st.guards.rate;
    let bearer = auth::Bearer::read(st, headers)?;
    if !bearer.local {
        if let Some(wait) = rate.failing(class, address).await {
            // Keys in use from the same address (an office's NAT) keep working.
            let known = bearer.hash.as_ref().is_some_and(|h| rate.knows(h));
            if !known {
                st.metrics.rate_limited();
                return Err(too_many(wait));
            }
        }
    }
    match auth::resolve(st, &bearer).await {
        Ok(who) => {
            if let Some(hash) = bearer.hash.filter(|_| who.key_id.is_some()) {
                rate.remember(hash).await;
            }
            Ok(who)
        }
        Err(e @ ApiError::Unauthorized(_)) => match rate.failed(class, address).await {
            Ok(()) => Err(e),
            Err(wait) => {
                st.metrics.rate_limited();
                Err(too_many(wait))
            }
        },
        other => other,
    }
}

/// The checks one request of `class` from `client` passes: its rate limit, then for chat
/// the key's quota (`key_id` when the caller is known already, as on a WebSocket opened
/// with a token). Also applied to each `chat` op of a WebSocket.
pub async fn admit(
    st: &AppState,
    class: RouteClass,
    client: &Client,
    key_id: Option<&str>,
) -> Result<(), ApiError> {
    let guards = &st.guards;
    if let Err(wait) = guards.rate.check(class, client) {
        st.metrics.rate_limited();
        return Err(too_many(wait));
    }
    let quota = guards.quota.as_ref().filter(|_| class == RouteClass::Chat);
    if let Some(quota) = quota {
        let key_id = match (key_id, client) {
            (Some(k), _) => Some(k.to_owned()),
            (None, Client::Key(id)) => Some(id.clone()),
            (None, Client::Ip(_)) => None,
        };
        if let Some(key_id) = key_id {
            if let Err(refusal) = quota.check_request(&key_id).await {
                if refusal.is_over_quota() {
                    st.metrics.rate_limited();
                }
                return Err(ApiError::from(refusal));
            }
        }
    }
    Ok(())
}

/// The `Host` check (see `guard::host`), mounted only on servers that need no key.
pub async fn check_host(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // HTTP/2 names the host in the URI; HTTP/1.1 in the header. A request naming none
    // comes from no browser, so no page can have sent it.
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match authority {
        Some(a) if !host::allowed(a, &st.config.server.allowed_hosts) => {
            ApiError::Forbidden(format!(
                "host '{}' is not served: this server needs no API key, so it answers only to \
             loopback names (localhost, 127.0.0.1, [::1]); to serve this name, add it to \
             SLUICE_ALLOWED_HOSTS (or require keys with SLUICE_AUTH=required)",
                host::host_name(a)
            ))
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// The CORS layer; `None` when no origin is configured. Credentials (cookies) are allowed
/// only when asked for; config validation refuses them together with `*`.
pub fn cors_layer(origins: &[String], credentials: bool) -> Option<CorsLayer> {
    let allow = match cors::origins(origins)? {
        cors::Origins::Any => AllowOrigin::any(),
        cors::Origins::Listed(list) => {
            AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        }
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([header::RETRY_AFTER, HeaderName::from_static("x-request-id")])
            .allow_credentials(credentials)
            .max_age(cors::PREFLIGHT_MAX_AGE),
    )
}

impl From<RetryAfter> for ApiError {
    fn from(r: RetryAfter) -> Self {
        let over = |what: &str| ApiError::TooManyRequests {
            message: format!(
                "this API key's {what} quota for the current minute is spent; retry after the time in the Retry-After header"
            ),
            code: "quota_exceeded",
            retry_after: r.secs,
        };
        match r.reason {
            Refusal::Requests => over("requests-per-minute"),
            Refusal::Tokens => over("tokens-per-minute"),
            Refusal::Unavailable => ApiError::Unavailable {
                message: "the quota service is unavailable".into(),
                code: "quota_unavailable",
                retry_after: r.secs,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            classify(&post, "/v1/chat/completions"),
            Some(RouteClass::Chat)
        );
        assert_eq!(
            classify(&post, "/api/sessions/abc/messages"),
            Some(RouteClass::Chat)
        );
        assert_eq!(classify(&post, "/api/tasks"), Some(RouteClass::Chat));
        assert_eq!(classify(&post, "/api/scenes/x/run"), Some(RouteClass::Chat));
        assert_eq!(classify(&get, "/api/tasks"), Some(RouteClass::Api));
        assert_eq!(classify(&get, "/v1/models"), Some(RouteClass::Api));
        assert_eq!(
            classify(&get, "/API//%61dmin/keys"),
            Some(RouteClass::Admin)
        );
        for free in [
            "/health",
            "/health/ready",
            "/metrics",
            "/ws",
            "/",
            "/ui/app.js",
        ] {
            assert_eq!(classify(&get, free), None, "{free}");
        }
    }
}
