//! The one error type of the HTTP surface: each variant maps to a status code and an
//! OpenAI-shaped body `{"error":{"message","type","code"}}`, which every OpenAI SDK parses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON.
    #[error("{0}")]
    BadRequest(String),
    /// Valid JSON that does not fit the schema; the message names the field.
    /// A request head that cannot be read one way only (two `Authorization` headers).
    #[error("{0}")]
    BadHeader(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body did not arrive within the body timeout.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The resource is busy (a generation already runs in the session).
    #[error("{message}")]
    Conflict { message: String, code: &'static str },
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The server cannot take this work now (draining, overloaded); the client may retry.
    #[error("{message}")]
    Unavailable {
        message: String,
        code: &'static str,
        retry_after: u64,
    },
    /// A rate limit or quota of the caller is spent; `code` says which (`rate_limited`,
    /// `quota_exceeded`).
    #[error("{message}")]
    TooManyRequests {
        message: String,
        code: &'static str,
        retry_after: u64,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub code: &'a str,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: ErrorBody<'a>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::BadHeader(_) => StatusCode::BAD_REQUEST,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream(e) => upstream_status(e),
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_)
            | Self::BadHeader(_)
            | Self::Unprocessable(_)
            | Self::UnsupportedMediaType(_)
            | Self::PayloadTooLarge(_)
            | Self::RequestTimeout(_)
            | Self::NotFound(_)
            | Self::Conflict { .. }
            | Self::MethodNotAllowed(_) => "invalid_request_error",
            Self::Unauthorized(_) => "authentication_error",
            Self::Forbidden(_) => "permission_error",
            Self::Unavailable { .. } => "service_unavailable",
            Self::TooManyRequests { .. } => "rate_limit_error",
            Self::Upstream(e) => match e {
                UpstreamError::UnknownModel(_) | UpstreamError::Untranslatable { .. } => {
                    "invalid_request_error"
                }
                UpstreamError::Status { status: 429, .. } => "rate_limit_error",
                UpstreamError::Status {
                    status: 400 | 404 | 413 | 422,
                    ..
                } => "invalid_request_error",
                UpstreamError::Timeout { .. } => "timeout_error",
                _ => "upstream_error",
            },
            Self::Internal(_) => "server_error",
        }
    }

    pub fn code(&self) -> &str {
        match self {
            Self::BadRequest(_) => "invalid_json",
            Self::BadHeader(_) => "invalid_header",
            Self::Unprocessable(_) => "invalid_request",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            Self::NotFound(_) => "not_found",
            Self::Unauthorized(_) => "invalid_api_key",
            Self::Forbidden(_) => "forbidden",
            Self::Conflict { code, .. } => code,
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Unavailable { code, .. } => code,
            Self::TooManyRequests { code, .. } => code,
            Self::Upstream(e) => e.code(),
            Self::Internal(_) => "internal_error",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Unavailable { retry_after, .. } => Some(*retry_after),
            // Whole seconds, never 0: clients treat 0 as "now" and would spin.
            Self::TooManyRequests { retry_after, .. } => Some((*retry_after).max(1)),
            Self::Upstream(UpstreamError::Status {
                status: 429,
                retry_after,
                ..
            }) => Some(retry_after.map(|d| d.as_secs().max(1)).unwrap_or(1)),
            Self::Upstream(UpstreamError::Busy { .. }) => Some(1),
            Self::Upstream(UpstreamError::CircuitOpen { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }

    /// The message shown to the client. Internal details stay in the log.
    pub fn message(&self) -> String {
        match self {
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Upstream failures a client can act on keep their status (429, request errors); the rest
/// are the gateway's problem: 502 for a bad upstream, 504 for a slow one. An upstream 401
/// or 403 is sluice's credential at fault, not the caller's, so it is a 502 too.
fn upstream_status(e: &UpstreamError) -> StatusCode {
    match e {
        UpstreamError::UnknownModel(_) => StatusCode::NOT_FOUND,
        UpstreamError::Untranslatable { .. } => StatusCode::BAD_REQUEST,
        UpstreamError::Status { status, .. } => match *status {
            429 => StatusCode::TOO_MANY_REQUESTS,
            s @ (400 | 404 | 413 | 422) => {
                StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            _ => StatusCode::BAD_GATEWAY,
        },
        UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Busy { .. } | UpstreamError::CircuitOpen { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl From<crate::chat::service::ChatError> for ApiError {
    fn from(e: crate::chat::service::ChatError) -> Self {
        use crate::chat::service::ChatError;
        use crate::store::StoreError;
        match e {
            ChatError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            ChatError::Busy { generation_id } => Self::Conflict {
                message: format!(
                    "a generation is already running in this session ({generation_id}); cancel it or wait for it to end"
                ),
                code: "generation_running",
            },
            ChatError::Invalid(m) => Self::Unprocessable(m),
            ChatError::TooManyStreams(_) => Self::Unavailable {
                message: e.to_string(),
                code: "too_many_streams",
                retry_after: 1,
            },
            ChatError::Store(StoreError::Unavailable(m)) => Self::Unavailable {
                message: format!("store unavailable: {m}"),
                code: "store_unavailable",
                retry_after: 1,
            },
            ChatError::Store(e) => Self::Internal(e.to_string()),
        }
    }
}

impl From<crate::chat::completions::CompletionError> for ApiError {
    fn from(e: crate::chat::completions::CompletionError) -> Self {
        use crate::chat::completions::CompletionError;
        match e {
            CompletionError::Chat(e) => e.into(),
            CompletionError::Upstream(e) => e.into(),
        }
    }
}

impl From<crate::chat::responses::ResponseError> for ApiError {
    fn from(e: crate::chat::responses::ResponseError) -> Self {
        use crate::chat::responses::ResponseError;
        match e {
            ResponseError::Chat(e) => e.into(),
            ResponseError::Completion(e) => e.into(),
            ResponseError::State(m) => Self::BadRequest(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let message = self.message();
        let body = Envelope {
            error: ErrorBody {
                message: &message,
                kind: self.kind(),
                code: self.code(),
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
