//! Application state, the router, and serving with graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::cache::ResponseCache;
use crate::chat::service::{ChatParts, ChatService, ChatSettings};
use crate::cluster::redis::RedisBus;
use crate::cluster::{Bus, LocalBus};
use crate::config::Config;
use crate::error::ApiError;
use crate::guard::Guards;
use crate::hub::Hub;
use crate::ops::Lifecycle;
use crate::ops::metrics::Metrics;
use crate::queue::memory::MemoryQueue;
use crate::queue::{QueueError, TaskQueue};
use crate::store::{self, Store};
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
    /// Identical deterministic requests in flight share one upstream call.
    pub flights: Arc<crate::chat::flight::Flights>,
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
    /// Builds providers and opens (and migrates) the store.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let metrics = Metrics::new();
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
        let upstreams = Arc::new(upstreams);
        let store = store::open(&config.store).await?;
        // Final writes a stopped process could not store go in before anything else.
        let finals = Arc::new(store::finals::FinalWrites::new(
            store.clone(),
            &config.store.data_dir,
        ));
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
        crate::chat::agent::ensure_default_agent(store.as_ref(), upstreams.default_model()).await?;
        let local_user = if config.auth_required() {
            None
        } else {
            Some(Arc::from(
                store
                    .ensure_user(&store::User::new("local", store::now_millis()))
                    .await?
                    .id,
            ))
        };
        let lifecycle = Arc::new(Lifecycle::new());
        let hub = Arc::new(Hub::new(
            config.chat.replay_max_events,
            config.chat.replay_ttl,
        ));
        let streams = Arc::new(crate::guard::streams::StreamLimits::new(
            config.guards.max_streams,
            config.guards.max_streams_per_key,
        ));
        let flights = Arc::new(crate::chat::flight::Flights::new(
            hub.clone(),
            lifecycle.stop_token(),
        ));
        // Connected before the bus, whose tasks would outlive a start that fails here.
        let (queue, recover): (Arc<dyn TaskQueue>, bool) = match &config.redis {
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
            // Embedded: the store is the queue's memory across restarts.
            None => (Arc::new(MemoryQueue::new(config.tasks.queue_max)), true),
        };
        let quota = match &config.redis {
            Some(r) => {
                crate::guard::quota::Quota::connect(r.url.expose(), &r.prefix, &config.guards)
                    .await
                    .map(Arc::new)
            }
            None => None,
        };
        let bus: Arc<dyn Bus> = match &config.redis {
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
        };
        let chat = Arc::new(ChatService::new(ChatParts {
            store: store.clone(),
            upstreams: upstreams.clone(),
            hub: hub.clone(),
            settings: ChatSettings {
                history_max_chars: config.chat.history_max_chars,
                max_message_chars: config.chat.max_message_chars,
                server_id: config.server.server_id.clone(),
                claim_for: crate::chat::service::claim_lifetime(
                    config.upstream.timeouts.total,
                    config.server.drain,
                ),
            },
            stop: lifecycle.stop_token(),
            streams: streams.clone(),
            meter: quota.clone().map(|q| q as Arc<dyn crate::chat::TokenMeter>),
            bus: bus.clone(),
            finals,
        }));
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
        let cache: Option<Arc<dyn ResponseCache>> = if config.cache.ttl.is_zero() {
            None
        } else {
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
        };
        let guards = Arc::new(Guards {
            config: config.guards.clone(),
            rate: crate::guard::rate::RateLimits::new(&config.guards),
            quota,
            streams: streams.clone(),
        });
        let ws_secret: Arc<[u8]> = match &config.server.ws_token_secret {
            Some(s) => s.expose().as_bytes().into(),
            None => {
                let mut key = [0u8; 32];
                rand::Rng::fill(&mut rand::rng(), &mut key[..]);
                key.into()
            }
        };
        Ok(Self(Arc::new(Shared {
            config: Arc::new(config),
            upstreams,
            lifecycle,
            store,
            chat,
            local_user,
            ws_secret,
            tasks,
            metrics,
            cache,
            guards,
            flights,
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

/// Marks a response whose request logs its own line when it ends: a relayed completion's
/// `upstream call` line, in the request's span, carries what the access line would (method,
/// route, request id, key id) and the reply's outcome. Formatting and writing a log line
/// is about a tenth of a short completion's CPU, so it is written once.
#[derive(Clone, Copy, Debug)]
pub struct LogsAtEnd;

/// The access line at INFO, except for responses marked [`LogsAtEnd`].
#[derive(Clone, Copy, Debug)]
struct AccessLine;

impl<B> tower_http::trace::OnResponse<B> for AccessLine {
    fn on_response(self, response: &Response<B>, latency: Duration, span: &tracing::Span) {
        if response.extensions().get::<LogsAtEnd>().is_none() {
            DefaultOnResponse::new()
                .level(Level::INFO)
                .on_response(response, latency, span);
        }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const INSTANCE: HeaderName = HeaderName::from_static("x-sluice-instance");

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.server.max_body_bytes;
    let trace = TraceLayer::new_for_http()
        // The span carries method, path and request id only: never headers, so neither
        // `Authorization` nor a key can reach a log line.
        .make_span_with(|req: &Request<_>| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let route = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map(|p| p.as_str())
                .unwrap_or("unmatched");
            tracing::info_span!(
                "request",
                method = %req.method(),
                route,
                request_id = %id,
                key_id = tracing::field::Empty,
            )
        })
        .on_response(AccessLine);
    // hyper refuses a larger head with 431 too, but cannot be set below 8 KiB; this holds
    // smaller limits to the same answer.
    let max_head = state.config.guards.max_header_bytes;
    let head_limit = move |req: Request<axum::body::Body>, next: axum::middleware::Next| async move {
        let size = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
            + req
                .headers()
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if size > max_head {
            return axum::response::IntoResponse::into_response(
                axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            );
        }
        next.run(req).await
    };
    // Innermost first: admin check, then authentication, rate limits and quotas, the Host
    // check of keyless servers (before any key is looked up), the head limit, CORS outside
    // them so a 429 still carries CORS headers and preflights are never limited, then
    // metrics, request id and tracing around everything.
    let routes = Router::new()
        .merge(crate::http::v1::router())
        .merge(crate::http::health::router())
        .merge(crate::http::sessions::router())
        .merge(crate::http::ws::router())
        .merge(crate::http::auth::router())
        .merge(crate::http::catalog::router())
        .merge(crate::http::tasks::router())
        .merge(crate::http::ui::router())
        .merge(crate::http::ops::router())
        .fallback(crate::http::not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::ops::guard_admin,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::guards::limit,
        ));
    // Only a server that needs no key checks `Host`: with keys, the key keeps other pages out.
    let routes = match state.local_user {
        Some(_) => routes.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::guards::check_host,
        )),
        None => routes,
    };
    let routes = routes.layer(axum::middleware::from_fn(head_limit));
    let routes = match crate::http::guards::cors_layer(
        &state.config.server.cors_origins,
        state.config.guards.cors_credentials,
    ) {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::ops::track,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(trace)
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                // Which instance answered: behind a load balancer, for following a
                // session's stickiness and for reading the right instance's logs.
                .layer(SetResponseHeaderLayer::overriding(
                    INSTANCE,
                    HeaderValue::from_str(&state.config.server.server_id)
                        .unwrap_or(HeaderValue::from_static("sluice")),
                )),
        )
        .with_state(state)
}

/// How long streams get to write their final event after the drain window, and
/// WebSockets to close, before the process exits regardless.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The part of [`STOP_GRACE`] kept for WebSockets to send their Close and hear the answer.
const WS_CLOSE_GRACE: Duration = Duration::from_millis(1_500);

/// Serves until `shutdown` resolves, then drains: the listener closes, running streams get
/// the drain window to finish, and whatever still runs after it ends with an error event;
/// last, open WebSockets are closed with 1001.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let bus = state.bus.clone();
    let upstreams = state.upstreams.clone();
    let served = serve_until_drained(state, listener, shutdown).await;
    bus.shutdown().await;
    upstreams.shutdown().await;
    served
}

async fn serve_until_drained(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    /// Like `axum::serve`: a client that gave up is no reason to stop; running out of file
    /// descriptors is, for a moment, so connections can close first.
    async fn accept_error(e: std::io::Error) {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
        if matches!(
            e.kind(),
            ConnectionAborted | ConnectionRefused | ConnectionReset
        ) {
            return;
        }
        tracing::error!(error = %e, "accept error");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// The HTTP/2 prior-knowledge preface; the version sniffing reads until the first byte
    /// differs from it.
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// hyper's header timeout starts only once hyper-util has told HTTP/1 from HTTP/2, and
    /// that sniffing waits for bytes forever: a client that connects and sends nothing (or
    /// a slice of the HTTP/2 preface) would hold its connection. This ends such a connection
    /// after the header timeout; the first byte that settles the version disarms it.
    struct HeadDeadline<I> {
        io: I,
        /// Bytes read so far, while they are still a prefix of the HTTP/2 preface.
        seen: usize,
        deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl<I> HeadDeadline<I> {
        fn new(io: I, timeout: Option<Duration>) -> Self {
            Self {
                io,
                seen: 0,
                deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            }
        }
    }

    impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HeadDeadline<I> {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            use std::task::Poll;
            let this = self.get_mut();
            let before = buf.filled().len();
            let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
            let Some(deadline) = this.deadline.as_mut() else {
                return polled;
            };
            match polled {
                Poll::Ready(Ok(())) => {
                    for &b in &buf.filled()[before..] {
                        if H2_PREFACE.get(this.seen) != Some(&b) {
                            this.deadline = None;
                            break;
                        }
                        this.seen += 1;
                    }
                    if this.seen >= H2_PREFACE.len() {
                        this.deadline = None;
                    }
                    Poll::Ready(Ok(()))
                }
                Poll::Pending => match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request head within the header timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                },
                other => other,
            }
        }
    }

    impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HeadDeadline<I> {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.io.is_write_vectored()
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    let lifecycle = state.lifecycle.clone();
    let drain = state.config.server.drain;
    let generations = state.chat.tasks().clone();
    let workers = state.tasks.workers().clone();
    // Quota counts of replies that ended last, sent in the background.
    let flushes = state
        .guards
        .quota
        .as_ref()
        .map(|q| q.tasks().clone())
        .unwrap_or_default();
    let signal = {
        let lifecycle = lifecycle.clone();
        async move {
            shutdown.await;
            lifecycle.start_drain();
        }
    };
    // Our own accept loop instead of `axum::serve`, which cannot bound the request head:
    // hyper refuses a head over `max_header_bytes` with 431 and drops a client that takes
    // longer than `header_timeout` to send it (slowloris). HTTP/1.1 and h2c as before.
    let guards = &state.config.guards;
    let header_timeout = Some(guards.header_timeout).filter(|t| !t.is_zero());
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper's floor; smaller limits are held by the router (see `router`).
        .max_buf_size(guards.max_header_bytes.max(8_192));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        // WebSockets over HTTP/2 (RFC 8441), as `axum::serve` allows.
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(guards.max_header_bytes).unwrap_or(u32::MAX));
    let edge = Arc::new(Edge {
        body_timeout: Some(guards.body_timeout).filter(|t| !t.is_zero()),
        metrics: state.metrics.clone(),
        app: router(state),
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    {
        tokio::pin!(signal);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                },
                _ = &mut signal => break,
            };
            // Tokens are small writes: without this, Nagle holds each back up to an RTT.
            let _ = stream.set_nodelay(true);
            let edge = edge.clone();
            let service = hyper_util::service::TowerToHyperService::new(tower::service_fn(
                move |req: Request<hyper::body::Incoming>| {
                    let edge = edge.clone();
                    async move { Ok::<_, std::convert::Infallible>(edge.handle(peer, req).await) }
                },
            ));
            let io = hyper_util::rt::TokioIo::new(HeadDeadline::new(stream, header_timeout));
            let conn = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            // Watched: on shutdown idle connections close at once (a proxy then sends the
            // next request elsewhere), busy ones after their response (an SSE stream
            // included); upgraded WebSockets close through the lifecycle's `close`.
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    }
    drop(listener);
    let connections = graceful.shutdown();
    tokio::pin!(connections);
    let mut connections_done = false;

    // Connections and generations whose clients left both get the drain window.
    generations.close();
    workers.close();
    flushes.close();
    let running = async {
        (&mut connections).await;
        connections_done = true;
        generations.wait().await;
        workers.wait().await;
        flushes.wait().await;
    };
    if tokio::time::timeout(drain, running).await.is_ok() {
        tracing::info!("drained: every stream and generation finished");
    } else {
        tracing::warn!(
            drain_secs = drain.as_secs(),
            "drain window over: ending streams still running"
        );
        lifecycle.stop();
    }
    // Streams ended by `stop` write their last events first; then WebSockets relay what
    // they hold and get their Close frame, whether or not every stream managed to end.
    let streams_end = async {
        if !connections_done {
            (&mut connections).await;
        }
        generations.wait().await;
        workers.wait().await;
        flushes.wait().await;
    };
    if tokio::time::timeout(STOP_GRACE - WS_CLOSE_GRACE, streams_end)
        .await
        .is_err()
    {
        tracing::warn!("streams still running after stop; closing connections anyway");
    }
    lifecycle.close_connections();
    if tokio::time::timeout(WS_CLOSE_GRACE, lifecycle.websockets_closed())
        .await
        .is_err()
    {
        tracing::warn!("WebSockets still open after their Close; exiting anyway");
    }
    Ok(())
}

/// In front of the router on every connection: the client's address and the body deadline.
struct Edge {
    app: Router,
    metrics: Arc<Metrics>,
    body_timeout: Option<Duration>,
}

impl Edge {
    async fn handle(
        &self,
        peer: SocketAddr,
        req: Request<hyper::body::Incoming>,
    ) -> Response<axum::body::Body> {
        let mut req = match self.body_timeout {
            // A request without a body (most GETs) needs no deadline.
            Some(t) if !hyper::body::Body::is_end_stream(req.body()) => {
                crate::http::extract::time_body(req, t, &self.metrics)
            }
            _ => req.map(axum::body::Body::new),
        };
        // What `into_make_service_with_connect_info` provided: the TCP peer, for the rate
        // limits' client address.
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
        match tower::ServiceExt::oneshot(self.app.clone(), req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}
