//! `GET /ws` and `POST /api/ws-token`.

use axum::extract::{FromRequestParts, Query, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::auth::{self, Principal, WS_TOKEN_TTL_MS, issue_ws_token};
use crate::error::ApiError;
use crate::guard::rate::{Client, RouteClass};
use crate::http::guards;
use crate::state::AppState;
use crate::store::now_millis;
use std::sync::Arc;

use crate::transport::ws::{self, Admit, Refusal, WsContext};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/api/ws-token", post(token))
}

async fn token(State(st): State<AppState>, who: Principal) -> Json<serde_json::Value> {
    Json(json!({
        "token": issue_ws_token(&who, &st.ws_secret, now_millis()),
        "expires_in": WS_TOKEN_TTL_MS / 1000,
    }))
}

#[derive(Deserialize)]
struct WsQuery {
    #[serde(default)]
    token: Option<String>,
}

/// Browsers always send `Origin` on a WebSocket; it must be this server or an allowed
/// origin, or any page on the web could act with a user's token. Clients that are not
/// browsers send none.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, h)| h);
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
}

async fn upgrade(
    State(st): State<AppState>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
    parts: RequestParts,
) -> Result<Response, ApiError> {
    if !origin_allowed(&headers, &st.config.server.cors_origins) {
        return Err(ApiError::Forbidden(
            "origin not allowed: add it to SLUICE_CORS_ORIGINS".into(),
        ));
    }
    let peer = parts
        .0
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let address = st.guards.rate.address(&headers, peer);
    let who = match q.token {
        Some(t) => {
            // Two Authorization headers are refused even beside a token: the request is
            // ambiguous. (Without a token, authentication reads the header.)
            auth::bearer(&headers)?;
            auth::ws_token_principal(&st, &t).await?
        }
        None => guards::authenticate(&st, RouteClass::Api, &headers, &address).await?,
    };
    st.ensure_accepting()?;
    let settings = st.config.server.ws.clone();
    let metrics = st.metrics.clone();
    let admit: Arc<dyn Admit> = Arc::new(ChatAdmission {
        client: who.key_id.clone().map_or(address, Client::Key),
        key_id: who.key_id.clone(),
        st: st.clone(),
    });
    let ctx = WsContext {
        admit: Some(admit),
        chat: st.chat.clone(),
        tasks: st.tasks.clone(),
        caller: who.caller(),
        settings,
        stop: st.ws_close_token(),
    };
    // The process waits for the connection's closing handshake before it exits.
    let held = st.lifecycle.websocket();
    Ok(ws
        // Frames up to 1 MiB are read so an oversized message gets a clean 1009 close;
        // beyond that the WebSocket layer refuses them.
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| async move {
            let _held = held;
            let _open = metrics.connection("ws");
            let (write, read) = socket.split();
            ws::serve(write, read, ctx).await;
        })
        .into_response())
}

/// Each `chat` op passes the checks a `POST …/messages` would: the rate limit of the
/// connection's client (its key, else its address) and the key's quota; each `chat` and
/// `subscribe` op first finds the key still active.
struct ChatAdmission {
    st: AppState,
    client: Client,
    key_id: Option<String>,
}

fn refusal(e: &ApiError) -> Refusal {
    Refusal {
        code: e.code().to_owned(),
        message: e.message(),
        fatal: matches!(e, ApiError::Unauthorized(_)),
    }
}

#[async_trait::async_trait]
impl Admit for ChatAdmission {
    async fn authorize(&self) -> Result<(), Refusal> {
        auth::check_still_active(&self.st, self.key_id.as_deref())
            .await
            .map_err(|e| refusal(&e))
    }

    async fn chat(&self) -> Result<(), Refusal> {
        guards::admit(
            &self.st,
            RouteClass::Chat,
            &self.client,
            self.key_id.as_deref(),
        )
        .await
        .map_err(|e| Refusal {
            fatal: false,
            ..refusal(&e)
        })
    }
}

/// The request head, for running the key extractor after the token check.
struct RequestParts(Parts);

impl<S: Send + Sync> FromRequestParts<S> for RequestParts {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.clone()))
    }
}
