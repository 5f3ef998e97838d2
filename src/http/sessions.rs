//! Chat sessions: stateful, resumable conversations.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::Principal;
use super::extract::{ApiJson, LastEventId, OptionalJson};
use crate::error::ApiError;
use crate::state::AppState;
use crate::transport::events;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/me", get(me))
        .route("/api/sessions", post(create).get(list))
        .route(
            "/api/sessions/{id}",
            get(get_one).delete(delete).patch(rename),
        )
        .route(
            "/api/sessions/{id}/messages",
            get(messages).post(post_message),
        )
        .route("/api/sessions/{id}/stream", get(stream))
        .route("/api/sessions/{id}/cancel", post(cancel))
}

/// Who the key (or its absence) stands for: lets a UI decide whether to ask for a key and
/// whether to show admin views.
async fn me(State(st): State<AppState>, who: Principal) -> Json<serde_json::Value> {
    Json(json!({
        "user_id": who.user_id,
        "key_id": who.key_id,
        "is_admin": who.is_admin,
        "auth_required": st.local_user.is_none(),
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewSession {
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

async fn create(
    State(st): State<AppState>,
    who: Principal,
    OptionalJson(body): OptionalJson<NewSession>,
) -> Result<Response, ApiError> {
    let b = body.unwrap_or_default();
    let s = st
        .chat
        .create_session(&who.caller(), b.agent.as_deref(), b.title.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default = "default_limit")]
    limit: u32,
    #[serde(default)]
    cursor: Option<String>,
}

fn default_limit() -> u32 {
    20
}

async fn list(
    State(st): State<AppState>,
    who: Principal,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let page = st
        .chat
        .list_sessions(&who.caller(), q.cursor.as_deref(), q.limit)
        .await?;
    Ok(Json(page).into_response())
}

async fn get_one(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.chat.get_session(&who.caller(), &id).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    title: Option<String>,
}

async fn rename(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<Rename>,
) -> Result<Response, ApiError> {
    let s = st
        .chat
        .rename_session(&who.caller(), &id, b.title.as_deref())
        .await?;
    Ok(Json(s).into_response())
}

async fn delete(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.chat.delete_session(&who.caller(), &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn messages(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let data = st.chat.messages(&who.caller(), &id).await?;
    Ok(Json(json!({ "data": data })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    content: String,
    /// This reply's model instead of the session agent's.
    #[serde(default)]
    model: Option<String>,
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Starts a generation. With `Accept: text/event-stream` the response is its live stream;
/// otherwise `202` with the ids to follow it by.
async fn post_message(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<PostMessage>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    let started = st
        .chat
        .post_message(&who.caller(), &id, &b.content, b.model.as_deref())
        .await?;
    if wants_sse(&headers) {
        let sub = started.channel.subscribe(None);
        return Ok(super::sse_response(
            &st,
            events::sse(sub, st.config.server.ping_interval, st.handoff_token()),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "generation_id": started.generation_id,
            "message_id": started.message_id,
            "user_message_id": started.user_message_id,
            "stream_url": format!("/api/sessions/{id}/stream"),
        })),
    )
        .into_response())
}

/// Follows the session's generations; `Last-Event-ID` (header, or `?last_event_id=` for
/// clients that cannot set headers) resumes right after that event.
async fn stream(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    LastEventId(last): LastEventId,
) -> Result<Response, ApiError> {
    let feed = st.chat.feed(&who.caller(), &id, last.as_deref()).await?;
    Ok(super::sse_response(
        &st,
        events::sse(feed, st.config.server.ping_interval, st.handoff_token()),
    ))
}

async fn cancel(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let generation = st.chat.cancel(&who.caller(), &id).await?;
    Ok(Json(json!({
        "cancelled": generation.is_some(),
        "generation_id": generation,
    }))
    .into_response())
}
