//! CORS for browsers on other origins: only the origins listed in `SLUICE_CORS_ORIGINS`
//! (`*` for any) may call the API from a page; with none listed the server sends no CORS
//! headers at all, so browsers keep it same-origin.

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may reuse a preflight answer.
const PREFLIGHT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// `None` when no origin is configured. Credentials (cookies) are allowed only when asked
/// for; config validation refuses them together with `*`.
pub fn layer(origins: &[String], credentials: bool) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Browsers send `Origin` without a trailing slash, the config may have one.
        AllowOrigin::list(origins.iter().filter_map(|o| {
            HeaderValue::from_str(&o.trim_end_matches('/').to_ascii_lowercase()).ok()
        }))
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
            .max_age(PREFLIGHT_MAX_AGE),
    )
}
