//! The OpenAI-compatible API: any OpenAI SDK pointed at `http://host/v1` is a client.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::auth::Principal;
use super::extract::RelayJson;
use crate::cache::{self, CachedReply, ResponseCache};
use crate::error::ApiError;
use crate::state::AppState;
use crate::transport::openai::{self, CompletionRequest, ResponseMeta};
use crate::upstream::{ModelInfo, Relay, UpstreamError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        // A wildcard: upstream model ids may hold slashes (`meta-llama/Llama-3.1-8B`).
        .route("/v1/models/{*id}", get(model))
}

async fn chat_completions(
    State(st): State<AppState>,
    who: Principal,
    RelayJson(req): RelayJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    st.ensure_accepting()?;
    let (mut chat, opts) = req.into_domain().map_err(ApiError::Unprocessable)?;
    let permit = st
        .guards
        .streams
        .try_acquire(Some(who.key_id.as_deref().unwrap_or(&who.user_id)))
        .map_err(|l| ApiError::from(crate::chat::service::ChatError::TooManyStreams(l)))?;
    let cache_key = match &st.cache {
        Some(_) if cache::is_cacheable(&chat) => Some(cache::key(&chat)),
        _ => None,
    };
    chat.extra.remove("cache");
    // Uncached, the relay is this request's own upstream call, which logs the request's
    // line when it ends; a cache hit or a shared flight logs no such line here.
    let logs_at_end = cache_key.is_none();
    let relay = match (&st.cache, &cache_key) {
        (Some(c), Some(k)) => match c.get(k).await {
            Some(hit) => {
                st.metrics.cache(true);
                replay(&chat.model, hit)
            }
            None => {
                st.metrics.cache(false);
                let open = async {
                    let relay = st.upstreams.open(&chat).await?;
                    Ok(record(relay, c.clone(), k.clone()))
                };
                st.flights.join(k, &chat.model, open).await?
            }
        },
        _ => st.upstreams.open(&chat).await?,
    };
    let relay = match (&st.guards.quota, &who.key_id) {
        (Some(q), Some(k)) => metered(relay, q.clone(), k.clone()),
        _ => relay,
    };
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        model: chat.model,
    };
    let mut response = if opts.stream {
        let events = openai::chunk_stream(
            relay,
            meta,
            opts.include_usage,
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
        let completion = relay.collect().await?;
        drop(permit);
        Json(openai::completion_json(&meta, completion)).into_response()
    };
    if logs_at_end {
        response.extensions_mut().insert(super::LogsAtEnd);
    }
    Ok(response)
}

fn model_object(m: &ModelInfo) -> serde_json::Value {
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by})
}

async fn models(State(st): State<AppState>, _who: Principal) -> Json<serde_json::Value> {
    let data: Vec<_> = st
        .upstreams
        .models()
        .await
        .iter()
        .map(model_object)
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// One model of the list, as OpenAI's `models.retrieve` expects it.
async fn model(
    State(st): State<AppState>,
    _who: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    st.upstreams
        .models()
        .await
        .iter()
        .find(|m| m.id == id)
        .map(|m| Json(model_object(m)))
        .ok_or_else(|| UpstreamError::UnknownModel(id).into())
}

/// A cached reply as a stream, so a hit is served exactly like a live reply.
fn replay(model: &str, hit: CachedReply) -> Relay {
    Relay {
        provider: "cache".into(),
        model: model.to_owned(),
        events: Box::pin(futures::stream::iter(hit.chunks.into_iter().map(Ok))),
    }
}

/// Passes a live reply through and, if it ends well, stores it before the stream ends.
fn record(relay: Relay, cache: std::sync::Arc<dyn ResponseCache>, key: String) -> Relay {
    let Relay {
        provider,
        model,
        events,
    } = relay;
    let events = Box::pin(async_stream::stream! {
        let mut events = events;
        let mut reply = CachedReply { chunks: Vec::new() };
        while let Some(ev) = futures::StreamExt::next(&mut events).await {
            match &ev {
                Ok(chunk) => reply.chunks.push(chunk.clone()),
                // A failed reply is not cached.
                Err(_) => {
                    yield ev;
                    return;
                }
            }
            yield ev;
        }
        cache.put(&key, &reply).await;
    });
    Relay {
        provider,
        model,
        events,
    }
}

/// Counts the reply's tokens against the key's tokens-per-minute quota as they stream. The
/// tally goes with the stream: a client that leaves, or an upstream error that ends the
/// reply, still charges every token already relayed.
fn metered(
    relay: Relay,
    meter: std::sync::Arc<crate::guard::quota::Quota>,
    key_id: String,
) -> Relay {
    let Relay {
        provider,
        model,
        events,
    } = relay;
    let mut tally = crate::guard::quota::Tally::new(meter, key_id);
    let events = Box::pin(async_stream::stream! {
        let mut events = events;
        while let Some(ev) = futures::StreamExt::next(&mut events).await {
            if ev.as_ref().is_ok_and(|c| c.is_token()) {
                tally.token().await;
            }
            yield ev;
        }
        tally.flush().await;
    });
    Relay {
        provider,
        model,
        events,
    }
}
