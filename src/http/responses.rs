//! OpenAI's Responses API: `POST /v1/responses`, served by any upstream through the same
//! relay as `/v1/chat/completions` (cache, single-flight, stream caps, quotas, metrics),
//! and the stored side: retrieve (or stream again), delete, cancel, list input items.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::auth::Principal;
use super::extract::RelayJson;
use crate::chat::responses::{Answer, Created, ItemPage, ResponseFeed};
use crate::dialect::responses::CreateResponse;
use crate::error::ApiError;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{id}", get(retrieve).delete(delete))
        .route("/v1/responses/{id}/cancel", post(cancel))
        .route("/v1/responses/{id}/input_items", get(input_items))
}

async fn create(
    State(st): State<AppState>,
    who: Principal,
    RelayJson(req): RelayJson<CreateResponse>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    let Created {
        answer,
        logs_at_end,
    } = st.responses.create(&who.caller(), req).await?;
    let mut response = match answer {
        Answer::Events(feed) => {
            let id = feed.response_id().to_owned();
            events_response(&st, feed, id)
        }
        Answer::Object(body) => Json(body).into_response(),
    };
    if logs_at_end {
        response.extensions_mut().insert(super::LogsAtEnd);
    }
    Ok(response)
}

/// Query parameters arrive as text, so a bad value is a JSON 422 naming it rather than
/// the framework's plain-text rejection.
#[derive(Deserialize, Default)]
struct RetrieveQuery {
    stream: Option<String>,
    starting_after: Option<String>,
}

async fn retrieve(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Query(q): Query<RetrieveQuery>,
) -> Result<Response, ApiError> {
    let stream = match q.stream.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::Unprocessable(format!(
                "stream: '{v}' is not true or false"
            )));
        }
    };
    if !stream {
        if q.starting_after.is_some() {
            return Err(ApiError::Unprocessable(
                "starting_after: only with stream=true".into(),
            ));
        }
        return Ok(Json(st.responses.get(&who.caller(), &id).await?).into_response());
    }
    let after = match q.starting_after.as_deref() {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::Unprocessable(format!("starting_after: '{v}' is not a sequence number"))
        })?),
    };
    let feed = st.responses.events(&who.caller(), &id, after).await?;
    Ok(events_response(&st, feed, id))
}

/// A response's events as SSE. A background response's reader leaves when this instance
/// starts draining in a cluster (it resumes elsewhere); a streamed one's runs to its end.
fn events_response(st: &AppState, feed: ResponseFeed, id: String) -> Response {
    let leave = if feed.background {
        st.handoff_token()
    } else {
        tokio_util::sync::CancellationToken::new()
    };
    let events = crate::transport::responses::sse(feed, id, st.config.server.ping_interval, leave);
    super::sse_response(st, events)
}

async fn delete(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(st.responses.delete(&who.caller(), &id).await?))
}

async fn cancel(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(st.responses.cancel(&who.caller(), &id).await?))
}

#[derive(Deserialize, Default)]
struct ItemsQuery {
    limit: Option<String>,
    order: Option<String>,
    after: Option<String>,
}

async fn input_items(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Query(q): Query<ItemsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => {
                return Err(ApiError::Unprocessable(format!(
                    "limit: '{v}' is not a number from 1 to 100"
                )));
            }
        },
    };
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(v) => {
            return Err(ApiError::Unprocessable(format!(
                "order: '{v}' is not asc or desc"
            )));
        }
    };
    let page = ItemPage {
        limit,
        ascending,
        after: q.after,
    };
    Ok(Json(
        st.responses.input_items(&who.caller(), &id, page).await?,
    ))
}
