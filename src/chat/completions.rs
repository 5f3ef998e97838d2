//! `/v1/chat/completions` as a service: one request's reply, from the response cache, a
//! flight shared with identical requests, or its own upstream call; within the caller's
//! stream cap, and metered against its key's token quota as it streams.

use std::sync::Arc;

use super::flight::Flights;
use super::service::ChatError;
use crate::cache::{self, CachedReply, ResponseCache};
use crate::domain::{ChatRequest, TokenMeter};
use crate::guard::quota::Tally;
use crate::guard::streams::{StreamLimits, StreamPermit};
use crate::ops::metrics::Metrics;
use crate::upstream::{Relay, UpstreamError, Upstreams};

#[derive(Debug, thiserror::Error)]
pub enum CompletionError {
    /// The caller's stream cap.
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

pub struct CompletionParts {
    pub upstreams: Arc<Upstreams>,
    /// `None` when the cache is off.
    pub cache: Option<Arc<dyn ResponseCache>>,
    pub flights: Arc<Flights>,
    pub streams: Arc<StreamLimits>,
    /// The token quota; `None` without one.
    pub meter: Option<Arc<dyn TokenMeter>>,
    pub metrics: Arc<Metrics>,
}

pub struct Completions {
    parts: CompletionParts,
}

/// A reply being relayed, with what must live as long as it.
pub struct Completion {
    pub relay: Relay,
    /// The caller's place among open streams, held until the reply ends.
    pub permit: StreamPermit,
    /// The model the client asked for, as its reply names it.
    pub model: String,
    /// The relay is this request's own upstream call, which logs the request's line when it
    /// ends; a cache hit or a shared flight logs no such line.
    pub own_call: bool,
}

impl Completions {
    pub fn new(parts: CompletionParts) -> Self {
        Self { parts }
    }

    /// Opens the reply to `chat` for the caller `user_id` (with `key_id`, when it used a key).
    pub async fn open(
        &self,
        user_id: &str,
        key_id: Option<&str>,
        mut chat: ChatRequest,
    ) -> Result<Completion, CompletionError> {
        let p = &self.parts;
        let permit = p
            .streams
            .try_acquire(Some(key_id.unwrap_or(user_id)))
            .map_err(ChatError::TooManyStreams)?;
        let cached = match &p.cache {
            Some(c) if cache::is_cacheable(&chat) => Some((c, cache::key(&chat))),
            _ => None,
        };
        chat.extra.remove("cache");
        let own_call = cached.is_none();
        let relay = match cached {
            Some((c, k)) => match c.get(&k).await {
                Some(hit) => {
                    p.metrics.cache(true);
                    replay(&chat.model, hit)
                }
                None => {
                    p.metrics.cache(false);
                    let open = async {
                        let relay = p.upstreams.open(&chat).await?;
                        Ok(record(relay, c.clone(), k.clone()))
                    };
                    p.flights.join(&k, &chat.model, open).await?
                }
            },
            None => p.upstreams.open(&chat).await?,
        };
        let relay = match (&p.meter, key_id) {
            (Some(m), Some(k)) => metered(relay, Tally::new(m.clone(), k.to_owned())),
            _ => relay,
        };
        Ok(Completion {
            relay,
            permit,
            model: chat.model,
            own_call,
        })
    }
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
fn record(relay: Relay, cache: Arc<dyn ResponseCache>, key: String) -> Relay {
    relay.map_events(|mut events| {
        Box::pin(async_stream::stream! {
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
        })
    })
}

/// Counts the reply's tokens against the key's tokens-per-minute quota as they stream,
/// through the same [`Tally`] a session's generation uses. The tally goes with the stream:
/// a client that leaves, or an upstream error that ends the reply, still charges every
/// token already relayed.
fn metered(relay: Relay, mut tally: Tally) -> Relay {
    relay.map_events(|mut events| {
        Box::pin(async_stream::stream! {
            while let Some(ev) = futures::StreamExt::next(&mut events).await {
                if ev.as_ref().is_ok_and(|c| c.is_token()) {
                    tally.token().await;
                }
                yield ev;
            }
            tally.flush().await;
        })
    })
}
