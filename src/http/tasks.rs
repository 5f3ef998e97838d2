//! Prompt jobs: `202` at once with where to follow the task, or the result
//! with `?sync=true`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth::Principal;
use super::extract::{ApiJson, LastEventId};
use crate::domain::Message;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Task;
use crate::tasks::QueueError;
use crate::tasks::service::TaskError;
use crate::transport::events;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/scenes/{scene}/run", post(run_scene))
        .route("/api/tasks", post(create))
        .route("/api/tasks/{id}", get(get_one).delete(cancel))
        .route("/api/tasks/{id}/events", get(task_events))
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Chat(c) => c.into(),
            TaskError::Queue(QueueError::Full) => ApiError::Unavailable {
                message: "the task queue is full; retry later".into(),
                code: "queue_full",
                retry_after: 5,
            },
            TaskError::Queue(QueueError::Unavailable(m)) => ApiError::Unavailable {
                message: format!("task queue unavailable: {m}"),
                code: "queue_unavailable",
                retry_after: 1,
            },
        }
    }
}

#[derive(Deserialize)]
struct SyncQuery {
    #[serde(default)]
    sync: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunScene {
    #[serde(default)]
    variables: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTask {
    #[serde(default)]
    agent: Option<String>,
    messages: Vec<Message>,
}

async fn run_scene(
    State(st): State<AppState>,
    who: Principal,
    Path(scene): Path<String>,
    Query(q): Query<SyncQuery>,
    ApiJson(b): ApiJson<RunScene>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    let task = st
        .tasks
        .create_from_scene(&who.caller(), &scene, &b.variables)
        .await?;
    respond(&st, &who, task, q.sync).await
}

async fn create(
    State(st): State<AppState>,
    who: Principal,
    Query(q): Query<SyncQuery>,
    ApiJson(b): ApiJson<NewTask>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    let task = st
        .tasks
        .create(&who.caller(), b.agent.as_deref(), None, b.messages)
        .await?;
    respond(&st, &who, task, q.sync).await
}

async fn respond(
    st: &AppState,
    who: &Principal,
    task: Task,
    sync: Option<bool>,
) -> Result<Response, ApiError> {
    if sync.unwrap_or(!st.config.tasks.async_default) {
        let view = st.tasks.wait(&who.caller(), &task.id).await?;
        return Ok(Json(view).into_response());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "task_id": task.id,
            "status": task.status,
            "status_url": format!("/api/tasks/{}", task.id),
            "events_url": format!("/api/tasks/{}/events", task.id),
        })),
    )
        .into_response())
}

async fn get_one(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.tasks.get(&who.caller(), &id).await?).into_response())
}

async fn cancel(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let before = st.tasks.cancel(&who.caller(), &id).await?;
    Ok(Json(json!({ "cancelled": !before.is_final(), "previous_status": before })).into_response())
}

async fn task_events(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    LastEventId(last): LastEventId,
) -> Result<Response, ApiError> {
    let sub = st.tasks.events(&who.caller(), &id, last.as_deref()).await?;
    // The task has ended and the client holds its last event (an `EventSource` coming
    // back after the stream closed): 204 is what makes a browser stop reconnecting.
    if sub.is_exhausted() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(super::sse_response(
        &st,
        events::sse(
            sub,
            st.config.server.ping_interval,
            st.lifecycle.stop_token(),
        ),
    ))
}
