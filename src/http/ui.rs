//! The chat UI: the files of `static/`, embedded in the binary so a single binary serves
//! it offline. `/` is the app shell; its scripts, styles and icons live under `/ui/`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;

/// In release builds the files are compiled in; debug builds read `static/` from disk,
/// so editing the UI needs no rebuild.
#[derive(rust_embed::Embed)]
#[folder = "static/"]
struct Assets;

/// Only our own scripts and styles may run or apply: model output rendered by the UI can
/// therefore never execute, even if a rendering bug let markup through. `connect-src
/// 'self'` covers the same-origin WebSocket as well.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/ui/{*path}", get(asset))
}

async fn index(headers: HeaderMap) -> Result<Response, ApiError> {
    serve("index.html", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(format!("no UI file /ui/{path}"));
    // The folder's README documents the UI for developers; it is not part of the app.
    // No `..` either: debug builds read from disk, and nothing outside `static/` is served.
    if path.ends_with(".md") || path.split(['/', '\\']).any(|seg| seg == "..") {
        return Err(not_found());
    }
    let file = Assets::get(path).ok_or_else(not_found)?;
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let content_type = if is_text(path) && mime.get_param("charset").is_none() {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    // `no-cache` means "revalidate", not "do not store": each load costs a 304 per file,
    // and a browser can never mix modules of two versions after an upgrade (the file
    // names carry no version, so a long max-age could).
    let mut resp = if if_none_match(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        file.data.into_owned().into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(resp)
}

fn is_text(path: &str) -> bool {
    [".html", ".css", ".js", ".svg", ".json", ".txt"]
        .iter()
        .any(|ext| path.ends_with(ext))
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}
