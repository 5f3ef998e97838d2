//! Agents, scenes and the knowledge base. Anyone may read; writes need an admin key.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::Principal;
use super::extract::ApiJson;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{Agent, KnowledgeDoc, Scene, StoreError, new_id, now_millis};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/agents", get(list_agents).post(create_agent))
        .route(
            "/api/agents/{name}",
            get(get_agent).put(put_agent).delete(delete_agent),
        )
        .route("/api/scenes", get(list_scenes).post(create_scene))
        .route(
            "/api/scenes/{name}",
            get(get_scene).put(put_scene).delete(delete_scene),
        )
        .route("/api/knowledge", post(add_knowledge))
        .route("/api/knowledge/search", get(search_knowledge))
}

fn admin(who: &Principal) -> Result<(), ApiError> {
    if who.is_admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden("this needs an admin key".into()))
    }
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict(m) => ApiError::Conflict {
            message: m.to_string(),
            code: "already_exists",
        },
        StoreError::Unavailable(m) => ApiError::Unavailable {
            message: format!("store unavailable: {m}"),
            code: "store_unavailable",
            retry_after: 1,
        },
        other => ApiError::Internal(other.to_string()),
    }
}

fn valid_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(format!(
            "{field}: 1-64 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentBody {
    name: String,
    #[serde(default)]
    provider: Option<String>,
    model: String,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    fallback_models: Vec<String>,
    #[serde(default)]
    knowledge: bool,
    #[serde(default = "yes")]
    is_active: bool,
}

fn yes() -> bool {
    true
}

impl AgentBody {
    fn check(&self, st: &AppState) -> Result<(), ApiError> {
        valid_name("name", &self.name)?;
        if self.model.trim().is_empty() {
            return Err(ApiError::Unprocessable("model: must not be empty".into()));
        }
        if let Some(p) = &self.provider {
            if st.upstreams.provider(p).is_none() {
                return Err(ApiError::Unprocessable(format!(
                    "provider: no provider named '{p}'"
                )));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::Unprocessable(
                    "temperature: must be between 0 and 2".into(),
                ));
            }
        }
        if self.max_tokens.is_some_and(|t| t < 1) {
            return Err(ApiError::Unprocessable(
                "max_tokens: must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn into_agent(self, id: String, created_at: i64) -> Agent {
        Agent {
            id,
            name: self.name,
            provider: self.provider,
            model: self.model,
            system_prompt: self.system_prompt,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            fallback_models: self.fallback_models,
            knowledge: self.knowledge,
            is_active: self.is_active,
            created_at,
            updated_at: now_millis(),
        }
    }
}

async fn list_agents(State(st): State<AppState>, _who: Principal) -> Result<Response, ApiError> {
    let data = st.store.list_agents().await.map_err(store_err)?;
    Ok(Json(json!({ "data": data })).into_response())
}

async fn get_agent(
    State(st): State<AppState>,
    _who: Principal,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let a = st.store.get_agent(&name).await.map_err(store_err)?;
    a.map(|a| Json(a).into_response())
        .ok_or_else(|| ApiError::NotFound("agent not found".into()))
}

async fn create_agent(
    State(st): State<AppState>,
    who: Principal,
    ApiJson(b): ApiJson<AgentBody>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    b.check(&st)?;
    let a = b.into_agent(new_id(), now_millis());
    st.store.create_agent(&a).await.map_err(store_err)?;
    Ok((StatusCode::CREATED, Json(a)).into_response())
}

async fn put_agent(
    State(st): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<AgentBody>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    b.check(&st)?;
    if b.name != name {
        return Err(ApiError::Unprocessable("name: must match the path".into()));
    }
    let old = st
        .store
        .get_agent(&name)
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::NotFound("agent not found".into()))?;
    let a = b.into_agent(old.id, old.created_at);
    st.store.update_agent(&a).await.map_err(store_err)?;
    Ok(Json(a).into_response())
}

async fn delete_agent(
    State(st): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    if name == crate::chat::agent::DEFAULT_AGENT {
        return Err(ApiError::Unprocessable(
            "name: the default agent cannot be deleted (set is_active instead)".into(),
        ));
    }
    if st.store.delete_agent(&name).await.map_err(store_err)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound("agent not found".into()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SceneBody {
    name: String,
    agent: String,
    template: String,
}

impl SceneBody {
    async fn check(&self, st: &AppState) -> Result<(), ApiError> {
        valid_name("name", &self.name)?;
        if crate::chat::agent::placeholders(&self.template).is_empty()
            && self.template.trim().is_empty()
        {
            return Err(ApiError::Unprocessable(
                "template: must not be empty".into(),
            ));
        }
        if st
            .store
            .get_agent(&self.agent)
            .await
            .map_err(store_err)?
            .is_none()
        {
            return Err(ApiError::Unprocessable(format!(
                "agent: no agent named '{}'",
                self.agent
            )));
        }
        Ok(())
    }
}

async fn list_scenes(State(st): State<AppState>, _who: Principal) -> Result<Response, ApiError> {
    let data = st.store.list_scenes().await.map_err(store_err)?;
    Ok(Json(json!({ "data": data })).into_response())
}

async fn get_scene(
    State(st): State<AppState>,
    _who: Principal,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let s = st.store.get_scene(&name).await.map_err(store_err)?;
    s.map(|s| {
        let vars: Vec<String> = crate::chat::agent::placeholders(&s.template)
            .into_iter()
            .collect();
        let mut v = serde_json::to_value(&s).unwrap_or_default();
        v["variables"] = json!(vars);
        Json(v).into_response()
    })
    .ok_or_else(|| ApiError::NotFound("scene not found".into()))
}

async fn create_scene(
    State(st): State<AppState>,
    who: Principal,
    ApiJson(b): ApiJson<SceneBody>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    b.check(&st).await?;
    let now = now_millis();
    let s = Scene {
        id: new_id(),
        name: b.name,
        agent: b.agent,
        template: b.template,
        created_at: now,
        updated_at: now,
    };
    st.store.create_scene(&s).await.map_err(store_err)?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

async fn put_scene(
    State(st): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    ApiJson(b): ApiJson<SceneBody>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    b.check(&st).await?;
    if b.name != name {
        return Err(ApiError::Unprocessable("name: must match the path".into()));
    }
    let old = st
        .store
        .get_scene(&name)
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::NotFound("scene not found".into()))?;
    let s = Scene {
        id: old.id,
        name: b.name,
        agent: b.agent,
        template: b.template,
        created_at: old.created_at,
        updated_at: now_millis(),
    };
    st.store.update_scene(&s).await.map_err(store_err)?;
    Ok(Json(s).into_response())
}

async fn delete_scene(
    State(st): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    if st.store.delete_scene(&name).await.map_err(store_err)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound("scene not found".into()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KnowledgeBody {
    title: String,
    content: String,
    #[serde(default)]
    tags: Vec<String>,
}

async fn add_knowledge(
    State(st): State<AppState>,
    who: Principal,
    ApiJson(b): ApiJson<KnowledgeBody>,
) -> Result<Response, ApiError> {
    admin(&who)?;
    if b.title.trim().is_empty() || b.content.trim().is_empty() {
        return Err(ApiError::Unprocessable(
            "title and content: must not be empty".into(),
        ));
    }
    let d = KnowledgeDoc {
        id: new_id(),
        title: b.title,
        content: b.content,
        tags: b.tags,
        created_at: now_millis(),
    };
    st.store.add_knowledge(&d).await.map_err(store_err)?;
    Ok((StatusCode::CREATED, Json(d)).into_response())
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
    #[serde(default = "default_hits")]
    limit: u32,
}

fn default_hits() -> u32 {
    5
}

async fn search_knowledge(
    State(st): State<AppState>,
    _who: Principal,
    Query(q): Query<SearchQuery>,
) -> Result<Response, ApiError> {
    let hits = st
        .store
        .search_knowledge(&q.q, q.limit.clamp(1, 50))
        .await
        .map_err(store_err)?;
    Ok(Json(json!({ "data": hits })).into_response())
}
