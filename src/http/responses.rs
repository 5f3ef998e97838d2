//! `POST /v1/responses`: OpenAI's Responses API, served by any upstream through the same
//! relay as `/v1/chat/completions` (cache, single-flight, stream caps, quotas, metrics).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::auth::Principal;
use super::extract::RelayJson;
use crate::chat::completions::Completion;
use crate::dialect::responses::{self, CreateResponse, ResponseBuilder};
use crate::error::ApiError;
use crate::state::AppState;
use crate::transport::responses as wire;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/responses", post(create))
}

async fn create(
    State(st): State<AppState>,
    who: Principal,
    RelayJson(req): RelayJson<CreateResponse>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    if req.background {
        return Err(ApiError::Unprocessable(
            "background: background responses are not supported yet".into(),
        ));
    }
    if req.previous_response_id.is_some() {
        return Err(ApiError::Unprocessable(
            "previous_response_id: chaining responses is not supported yet; send the whole conversation as input".into(),
        ));
    }
    let chat = responses::to_chat(&req, &[]).map_err(ApiError::Unprocessable)?;
    let Completion {
        relay,
        permit,
        own_call,
        ..
    } = st
        .completions
        .open(&who.user_id, who.key_id.as_deref(), chat)
        .await?;
    let id = responses::new_id("resp");
    let builder = ResponseBuilder::new(responses::shell(
        &req,
        &id,
        crate::domain::chunk::unix_now(),
    ));
    let mut response = if req.stream {
        let events = wire::event_stream(
            relay,
            builder,
            st.config.server.ping_interval,
            st.lifecycle.stop_token(),
        );
        // The stream holds its place until the client or the upstream ends it.
        super::sse_response(
            &st,
            futures::StreamExt::map(events, move |b| {
                let _ = &permit;
                b
            }),
        )
    } else {
        let body = wire::collect(relay, builder).await?;
        drop(permit);
        Json(body).into_response()
    };
    if own_call {
        response.extensions_mut().insert(super::LogsAtEnd);
    }
    Ok(response)
}
