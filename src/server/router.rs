//! The router: every route behind the middleware stack, and the access line.

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Request, Response};
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::http::LogsAtEnd;
use crate::state::AppState;

/// The access line at INFO, except for responses marked [`LogsAtEnd`].
#[derive(Clone, Copy, Debug)]
struct AccessLine;

impl<B> tower_http::trace::OnResponse<B> for AccessLine {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &tracing::Span) {
        if response.extensions().get::<LogsAtEnd>().is_none() {
            DefaultOnResponse::new()
                .level(Level::INFO)
                .on_response(response, latency, span);
        }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const INSTANCE: HeaderName = HeaderName::from_static("x-sluice-instance");

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.server.max_body_bytes;
    let trace = TraceLayer::new_for_http()
        // The span carries method, path and request id only: never headers, so neither
        // `Authorization` nor a key can reach a log line.
        .make_span_with(|req: &Request<_>| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let route = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map(|p| p.as_str())
                .unwrap_or("unmatched");
            tracing::info_span!(
                "request",
                method = %req.method(),
                route,
                request_id = %id,
                key_id = tracing::field::Empty,
            )
        })
        .on_response(AccessLine);
    // hyper refuses a larger head with 431 too, but cannot be set below 8 KiB; this holds
    // smaller limits to the same answer.
    let max_head = state.config.guards.max_header_bytes;
    let head_limit = move |req: Request<axum::body::Body>, next: axum::middleware::Next| async move {
        let size = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
            + req
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if size > max_head {
            return axum::response::IntoResponse::into_response(
                axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            );
        }
        next.run(req).await
    };
    // Innermost first: the caller (authentication, rate limits, quotas, admin gate), the Host
    // check of keyless servers (before any key is looked up), the head limit, CORS outside
    // them so a 429 still carries CORS headers and preflights are never limited, then
    // metrics, request id and tracing around everything.
    let routes = Router::new()
        .merge(crate::http::v1::router())
        .merge(crate::http::responses::router())
        .merge(crate::http::messages::router())
        .merge(crate::http::health::router())
        .merge(crate::http::sessions::router())
        .merge(crate::http::ws::router())
        .merge(crate::http::auth::router())
        .merge(crate::http::catalog::router())
        .merge(crate::http::tasks::router())
        .merge(crate::http::ui::router())
        .merge(crate::http::ops::router())
        .fallback(crate::http::not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::caller::resolve,
        ));
    // Only a server that needs no key checks `Host`: with keys, the key keeps other pages out.
    let routes = match state.local_user {
        Some(_) => routes.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::guards::check_host,
        )),
        None => routes,
    };
    let routes = routes.layer(axum::middleware::from_fn(head_limit));
    let routes = match crate::http::guards::cors_layer(
        &state.config.server.cors_origins,
        state.config.guards.cors_credentials,
    ) {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::ops::track,
        ))
        // Outside every layer that can refuse a request, so all its refusals are reshaped.
        .layer(axum::middleware::from_fn(
            crate::http::messages::anthropic_errors,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(trace)
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                // Which instance answered: behind a load balancer, for following a
                // session's stickiness and for reading the right instance's logs.
                .layer(SetResponseHeaderLayer::overriding(
                    INSTANCE,
                    HeaderValue::from_str(&state.config.server.server_id)
                        .unwrap_or(HeaderValue::from_static("sluice")),
                )),
        )
        .with_state(state)
}
