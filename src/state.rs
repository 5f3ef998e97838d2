//! What every handler shares, and how it is built from the configuration.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cache::ResponseCache;
use crate::chat::completions::{CompletionParts, Completions};
use crate::chat::responses::{ResponseParts, Responses};
use crate::chat::service::{ChatParts, ChatService, ChatSettings};
use crate::cluster::redis::RedisBus;
use crate::cluster::{Bus, LocalBus};
use crate::config::Config;
use crate::error::ApiError;
use crate::guard::Guards;
use crate::guard::quota::Quota;
use crate::guard::streams::StreamLimits;
use crate::hub::Hub;
use crate::ops::Lifecycle;
use crate::ops::metrics::Metrics;
use crate::queue::memory::MemoryQueue;
use crate::queue::{QueueError, TaskQueue};
use crate::store::finals::FinalWrites;
use crate::store::{self, KeyStore, Store};
use crate::tasks::service::{TaskService, TaskSettings};
use crate::upstream::{self, Upstreams};

/// Shared by every handler; cheap to clone.
/// Everything the handlers share. Cloned for every request and middleware layer, so it is
/// one `Arc`: a clone is one reference count, not one per service (which was measurably
/// a few percent of a request's cost).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Changing a field of a state already handed out copies it first: the copy is what
/// changes (used to build a state with other parts, as tests do).
impl std::ops::DerefMut for AppState {
    fn deref_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }
}

#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    /// Every provider and model route.
    pub upstreams: Arc<Upstreams>,
    /// Drain and stop signals, checked before new work and watched by running streams.
    pub lifecycle: Arc<Lifecycle>,
    pub store: Arc<dyn Store>,
    /// The store's keys, which every request's caller is looked up in.
    pub keys: Arc<dyn KeyStore>,
    /// Sessions and their generations.
    pub chat: Arc<ChatService>,
    /// With auth off, requests without a key act as this user. Shared: the state is cloned
    /// for every request and middleware layer, and a `String` here was an allocation each.
    pub local_user: Option<Arc<str>>,
    /// Signs WebSocket tokens.
    pub ws_secret: Arc<[u8]>,
    /// Prompt jobs and their workers.
    pub tasks: Arc<TaskService>,
    pub metrics: Arc<Metrics>,
    /// Replies to deterministic requests; `None` when turned off.
    pub cache: Option<Arc<dyn ResponseCache>>,
    pub guards: Arc<Guards>,
    /// `/v1/chat/completions`: cache, single-flight, stream caps and metering.
    pub completions: Arc<Completions>,
    /// `/v1/responses`: stored, chained and background responses.
    pub responses: Arc<Responses>,
    /// Shares generations with the other instances.
    pub bus: Arc<dyn Bus>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("task queue: {0}")]
    Queue(#[from] QueueError),
    #[error("cluster bus (Redis): {0}")]
    Bus(String),
}

impl AppState {
    /// Builds providers and opens (and migrates) the store, then the services on top, in
    /// the order their side effects need: the store's repairs before anything runs, the
    /// queue before the bus, the task workers last among what can fail.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let metrics = Metrics::new();
        let upstreams = build_upstreams(&config, &metrics).await?;
        let (store, finals) = open_store(&config).await?;
        crate::chat::agent::ensure_default_agent(store.as_ref(), upstreams.default_model()).await?;
        let local_user = local_user(&config, store.as_ref()).await?;
        let lifecycle = Arc::new(Lifecycle::new());
        let hub = Arc::new(Hub::new(
            config.chat.replay_max_events,
            config.chat.replay_ttl,
        ));
        let streams = Arc::new(StreamLimits::new(
            config.guards.max_streams,
            config.guards.max_streams_per_key,
        ));
        let flights = Arc::new(crate::chat::flight::Flights::new(
            hub.clone(),
            lifecycle.stop_token(),
        ));
        // Connected before the bus, whose tasks would outlive a start that fails here.
        let (queue, recover) = connect_queue(&config).await?;
        let quota = connect_quota(&config).await;
        let bus = connect_bus(&config, &hub, &store, &lifecycle).await?;
        let chat = Arc::new(ChatService::new(ChatParts {
            store: store.clone(),
            upstreams: upstreams.clone(),
            hub: hub.clone(),
            settings: chat_settings(&config),
            stop: lifecycle.stop_token(),
            streams: streams.clone(),
            meter: quota
                .clone()
                .map(|q| q as Arc<dyn crate::domain::TokenMeter>),
            bus: bus.clone(),
            finals,
        }));
        let tasks = start_tasks(
            &config, &store, &upstreams, hub, queue, recover, &lifecycle, &bus,
        )
        .await?;
        let cache = response_cache(&config).await;
        let completions = Arc::new(Completions::new(CompletionParts {
            upstreams: upstreams.clone(),
            cache: cache.clone(),
            flights,
            streams: streams.clone(),
            meter: quota
                .clone()
                .map(|q| q as Arc<dyn crate::domain::TokenMeter>),
            metrics: metrics.clone(),
        }));
        let responses = Arc::new(Responses::new(ResponseParts {
            completions: completions.clone(),
            upstreams: upstreams.clone(),
            store: store.clone(),
            hub: chat.hub().clone(),
            bus: bus.clone(),
            tasks: chat.tasks().clone(),
            stop: lifecycle.stop_token(),
            server_id: config.server.server_id.clone(),
        }));
        let guards = Arc::new(Guards {
            config: config.guards.clone(),
            rate: crate::guard::rate::RateLimits::new(&config.guards),
            quota,
            streams: streams.clone(),
        });
        let ws_secret = ws_secret(&config);
        Ok(Self(Arc::new(Shared {
            config: Arc::new(config),
            upstreams,
            lifecycle,
            keys: store.clone(),
            store,
            chat,
            local_user,
            ws_secret,
            tasks,
            metrics,
            cache,
            guards,
            completions,
            responses,
            bus,
        })))
    }

    /// When streams of sessions leave this instance: with other instances sharing them,
    /// as soon as draining starts (clients resume elsewhere while the generation goes on
    /// here); alone, at the end of the drain window.
    pub fn handoff_token(&self) -> CancellationToken {
        if self.bus.is_shared() {
            self.lifecycle.drain_token()
        } else {
            self.lifecycle.stop_token()
        }
    }

    /// When WebSockets are closed (with 1001): in a cluster as soon as draining starts,
    /// like session streams; alone, when the drain is over, however it ended.
    pub fn ws_close_token(&self) -> CancellationToken {
        if self.bus.is_shared() {
            self.lifecycle.drain_token()
        } else {
            self.lifecycle.close_token()
        }
    }

    /// New generations are refused while draining, so the instance can empty out.
    pub fn ensure_accepting(&self) -> Result<(), ApiError> {
        if self.lifecycle.is_draining() {
            return Err(ApiError::Unavailable {
                message: "this instance is shutting down; retry on another".into(),
                code: "draining",
                retry_after: 1,
            });
        }
        Ok(())
    }
}

/// Every provider, with the default model chosen and, with Redis, limits shared.
async fn build_upstreams(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Arc<Upstreams>, StartError> {
    let mut upstreams = upstream::from_config(&config.upstream, metrics.clone())?;
    upstreams
        .choose_default_model(&config.chat.default_model)
        .await;
    // A provider's limit is its account's: with Redis, every instance counts against it.
    if let Some(r) = config.redis.as_ref().filter(|_| upstreams.has_limits()) {
        match crate::upstream::slots::Shared::connect(
            r.url.expose(),
            &r.prefix,
            &config.server.server_id,
        ) {
            Ok((shared, renewal)) => upstreams.share_limits(shared, renewal),
            Err(e) => {
                tracing::warn!(error = %e, "provider limits apply per instance: Redis URL refused")
            }
        }
    }
    Ok(Arc::new(upstreams))
}

/// Opens the store and repairs what the last process left: kept final writes, then the
/// replies it left streaming.
async fn open_store(config: &Config) -> Result<(Arc<dyn Store>, Arc<FinalWrites>), StartError> {
    let store = store::open(&config.store).await?;
    // Final writes a stopped process could not store go in before anything else.
    let finals = Arc::new(FinalWrites::new(store.clone(), &config.store.data_dir));
    let repaired = finals.repair().await?;
    if repaired > 0 {
        tracing::info!(
            messages = repaired,
            "replies kept while the store was away are stored"
        );
    }
    if store.backend() == "sqlite" || config.redis.is_none() {
        // Without the bus nothing else ends the replies a lost process left streaming.
        // SQLite has one instance: all of them were its own. A shared PostgreSQL may
        // have other instances running theirs: only replies no other instance holds a
        // live claim on are ended. (With the bus, leases end a lost instance's.)
        let n = if store.backend() == "sqlite" {
            store.interrupt_streaming(store::now_millis()).await?
        } else {
            store
                .interrupt_streaming_of(&config.server.server_id, store::now_millis())
                .await?
        };
        if n > 0 {
            tracing::warn!(
                messages = n,
                "replies cut by the last shutdown marked interrupted"
            );
        }
    }
    // A stored response runs on the instance that took it: what this instance (all of
    // them, for SQLite) left unfinished can no longer end.
    let own = (store.backend() != "sqlite").then_some(config.server.server_id.as_str());
    let n = store
        .fail_unfinished_responses(own, store::now_millis())
        .await?;
    if n > 0 {
        tracing::warn!(
            responses = n,
            "background responses cut by the last shutdown marked failed"
        );
    }
    Ok((store, finals))
}

/// With auth off, the user keyless requests act as; created on first start.
async fn local_user(config: &Config, store: &dyn Store) -> Result<Option<Arc<str>>, StartError> {
    if config.auth_required() {
        return Ok(None);
    }
    let user = store
        .ensure_user(&store::User::new("local", store::now_millis()))
        .await?;
    Ok(Some(Arc::from(user.id)))
}

/// The task queue, and whether its jobs are recovered from the store (embedded: the store
/// is the queue's memory across restarts).
async fn connect_queue(config: &Config) -> Result<(Arc<dyn TaskQueue>, bool), StartError> {
    Ok(match &config.redis {
        Some(r) => (
            Arc::new(
                crate::queue::redis::RedisQueue::connect(
                    r.url.expose(),
                    &r.prefix,
                    config.tasks.reclaim_idle,
                )
                .await?,
            ),
            false,
        ),
        None => (Arc::new(MemoryQueue::new(config.tasks.queue_max)), true),
    })
}

/// Token quotas, counted in Redis; none without it.
async fn connect_quota(config: &Config) -> Option<Arc<Quota>> {
    match &config.redis {
        Some(r) => Quota::connect(r.url.expose(), &r.prefix, &config.guards)
            .await
            .map(Arc::new),
        None => None,
    }
}

/// The bus to the other instances: Redis, or in process when alone.
async fn connect_bus(
    config: &Config,
    hub: &Arc<Hub>,
    store: &Arc<dyn Store>,
    lifecycle: &Lifecycle,
) -> Result<Arc<dyn Bus>, StartError> {
    Ok(match &config.redis {
        Some(r) => Arc::new(
            RedisBus::connect(
                crate::cluster::redis::Settings {
                    url: r.url.expose().to_owned(),
                    prefix: r.prefix.clone(),
                    server_id: config.server.server_id.clone(),
                    replay_ttl: config.chat.replay_ttl,
                    replay_max_events: config.chat.replay_max_events,
                },
                hub.clone(),
                store.clone(),
                lifecycle.stop_token(),
            )
            .await
            .map_err(|e| StartError::Bus(e.to_string()))?,
        ),
        None => Arc::new(LocalBus),
    })
}

fn chat_settings(config: &Config) -> ChatSettings {
    ChatSettings {
        history_max_chars: config.chat.history_max_chars,
        max_message_chars: config.chat.max_message_chars,
        server_id: config.server.server_id.clone(),
        claim_for: crate::chat::service::claim_lifetime(
            config.upstream.timeouts.total,
            config.server.drain,
        ),
    }
}

/// Prompt jobs and their workers, started; a start that fails stops what it began.
#[allow(clippy::too_many_arguments)]
async fn start_tasks(
    config: &Config,
    store: &Arc<dyn Store>,
    upstreams: &Arc<Upstreams>,
    hub: Arc<Hub>,
    queue: Arc<dyn TaskQueue>,
    recover: bool,
    lifecycle: &Lifecycle,
    bus: &Arc<dyn Bus>,
) -> Result<Arc<TaskService>, StartError> {
    let tasks = TaskService::new(
        store.clone(),
        upstreams.clone(),
        hub,
        queue,
        TaskSettings {
            workers: config.tasks.workers,
            server_id: config.server.server_id.clone(),
            shared: config.redis.is_some(),
            data_dir: config.store.data_dir.clone(),
        },
        lifecycle.drain_token(),
        lifecycle.stop_token(),
    );
    if let Err(e) = tasks.start(recover).await {
        // A start that is retried leaves nothing running behind it.
        lifecycle.stop();
        bus.shutdown().await;
        return Err(match e {
            crate::tasks::service::TaskError::Queue(q) => StartError::Queue(q),
            crate::tasks::service::TaskError::Chat(c) => {
                StartError::Store(store::StoreError::Backend(c.to_string().into()))
            }
        });
    }
    Ok(tasks)
}

/// The reply cache: in process, with Redis behind it when there is one; `None` when off.
async fn response_cache(config: &Config) -> Option<Arc<dyn ResponseCache>> {
    if config.cache.ttl.is_zero() {
        return None;
    }
    let l2: Option<Arc<dyn ResponseCache>> = match &config.redis {
        Some(r) => match crate::cache::redis::RedisCache::connect(
            r.url.expose(),
            &r.prefix,
            config.cache.ttl,
        )
        .await
        {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "Redis response cache unavailable; in-process cache only");
                None
            }
        },
        None => None,
    };
    Some(Arc::new(crate::cache::Tiered::new(
        crate::cache::memory::MemoryCache::new(config.cache.max_entries, config.cache.ttl),
        l2,
    )))
}

/// The WebSocket token key: configured, so every instance accepts every token, or random.
fn ws_secret(config: &Config) -> Arc<[u8]> {
    match &config.server.ws_token_secret {
        Some(s) => s.expose().as_bytes().into(),
        None => {
            let mut key = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut key[..]);
            key.into()
        }
    }
}
