//! Model → provider routing, retries before the first token, fallback, and the timeouts
//! every generation runs under.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rand::Rng;
use tokio::time::{Instant, Sleep};

use super::{EventStream, Provider, TimeoutKind, UpstreamError};
pub use crate::config::{RetryPolicy, Timeouts};
use crate::domain::{ChatRequest, Chunk};
use crate::guard::breaker::{Breaker, BreakerSettings};
use crate::ops::metrics::{Metrics, StreamGuard};

impl RetryPolicy {
    /// Exponential backoff with equal jitter: half the step is fixed, half random, so a
    /// burst of clients that failed together does not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self.factor.powi(retry.saturating_sub(1) as i32);
        let step = self.base.mul_f64(exp).min(self.max);
        let half = step / 2;
        let jitter = rand::rng().random_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }
}

/// One step of a model's provider chain.
#[derive(Clone)]
pub struct Target {
    pub provider: Arc<dyn Provider>,
    /// The model name to send upstream; `None` sends the name the client asked for.
    pub model: Option<String>,
}

/// Which models a provider serves when no alias names them.
#[derive(Debug, Clone)]
pub enum ModelMatch {
    Any,
    Listed(Vec<String>),
}

/// Targets that send "the requested name" are pinned to `model`, so a fallback model is
/// sent as itself rather than as the primary's name.
fn pin_model(chain: Vec<Target>, model: &str) -> Vec<Target> {
    chain
        .into_iter()
        .map(|t| Target {
            model: Some(t.model.unwrap_or_else(|| model.to_owned())),
            provider: t.provider,
        })
        .collect()
}

/// `pattern` is a model name, or a prefix ending in `*`.
fn matches_model(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// A model as listed by `GET /v1/models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub id: String,
    pub owned_by: String,
}

/// How long an upstream's own model list is reused, and how soon a failed fetch is retried.
const CATALOG_TTL: Duration = Duration::from_secs(300);
const CATALOG_RETRY: Duration = Duration::from_secs(30);

/// The model list a provider serving any name publishes (`GET /models`), fetched when
/// first asked for and kept for [`CATALOG_TTL`]; one fetch at a time.
struct Catalog {
    provider: Arc<dyn Provider>,
    cached: tokio::sync::Mutex<Option<(Instant, Vec<String>)>>,
}

impl Catalog {
    /// The upstream's models; after a failure, the last list it gave (or none).
    async fn names(&self) -> Vec<String> {
        let mut cached = self.cached.lock().await;
        if let Some((expires, names)) = cached.as_ref() {
            if Instant::now() < *expires {
                return names.clone();
            }
        }
        let (ttl, names) = match self.provider.list_models().await {
            Some(Ok(names)) => (CATALOG_TTL, names),
            Some(Err(e)) => {
                tracing::warn!(provider = self.provider.name(), error = %e, "cannot list the upstream's models");
                (
                    CATALOG_RETRY,
                    cached.take().map(|(_, n)| n).unwrap_or_default(),
                )
            }
            None => (CATALOG_TTL, Vec::new()),
        };
        *cached = Some((Instant::now() + ttl, names.clone()));
        names
    }
}

/// Where the model of sessions and tasks comes from when `SLUICE_DEFAULT_MODEL` is unset.
#[derive(Debug, Clone)]
pub enum DefaultModel {
    Named(String),
    /// The first model this provider's own model list names.
    FirstListedBy(String),
}

/// Health and capacity of one provider.
struct ProviderLimits {
    breaker: Breaker,
    /// Upstream calls at once; `None` for the built-in demo and when unlimited.
    slots: Option<super::slots::Slots>,
}

pub struct Upstreams {
    /// Tokens, time to first token, errors and open streams of every upstream.
    metrics: Arc<Metrics>,
    limits: HashMap<String, Arc<ProviderLimits>>,
    concurrency: usize,
    queue_wait: Duration,
    breaker: BreakerSettings,
    providers: Vec<(Arc<dyn Provider>, ModelMatch)>,
    aliases: HashMap<String, Vec<Target>>,
    listed: Vec<ModelInfo>,
    catalogs: Vec<Catalog>,
    default_rule: DefaultModel,
    default_model: String,
    timeouts: Timeouts,
    retry: RetryPolicy,
    /// Renews the leases of cluster-wide provider slots; `None` without them.
    renewal: parking_lot::Mutex<Option<super::slots::Renewal>>,
}

/// A generation that an upstream accepted, wrapped in the configured timeouts.
pub struct Relay {
    /// The provider that accepted the request (after any fallback; from
    /// [`Upstreams::open`], the first that accepted it).
    pub provider: String,
    /// The model name that provider was asked for.
    pub model: String,
    pub events: EventStream,
}

impl Relay {
    /// The same generation with its events passed through `wrap` (recorded, metered…).
    pub fn map_events(self, wrap: impl FnOnce(EventStream) -> EventStream) -> Self {
        Self {
            events: wrap(self.events),
            ..self
        }
    }

    /// Reads the generation to its end: the whole reply, for clients that asked for no
    /// stream.
    pub async fn collect(mut self) -> Result<crate::domain::chunk::Accumulator, UpstreamError> {
        let mut reply = crate::domain::chunk::Accumulator::default();
        while let Some(chunk) = self.events.next().await {
            reply.add(&chunk?);
        }
        Ok(reply)
    }
}

impl Upstreams {
    pub fn new(timeouts: Timeouts, retry: RetryPolicy, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            limits: HashMap::new(),
            concurrency: 0,
            queue_wait: Duration::from_secs(5),
            breaker: BreakerSettings {
                failures_to_open: 5,
                open_for: Duration::from_secs(30),
                successes_to_close: 3,
            },
            providers: Vec::new(),
            aliases: HashMap::new(),
            listed: Vec::new(),
            catalogs: Vec::new(),
            default_rule: DefaultModel::Named(super::demo::Demo::NAME.to_owned()),
            default_model: super::demo::Demo::NAME.to_owned(),
            timeouts,
            retry,
            renewal: parking_lot::Mutex::new(None),
        }
    }

    /// Makes every provider limit cluster-wide through `shared` (Redis); a no-op without
    /// limits. Called once, before the upstreams are shared.
    pub fn share_limits(
        &mut self,
        shared: Arc<super::slots::Shared>,
        renewal: super::slots::Renewal,
    ) {
        let mut any = false;
        for limits in self.limits.values_mut() {
            if let Some(l) = Arc::get_mut(limits)
                && let Some(slots) = &mut l.slots
            {
                slots.share(shared.clone());
                any = true;
            }
        }
        if any {
            *self.renewal.lock() = Some(renewal);
        }
    }

    /// Whether any provider has a concurrency limit to share.
    pub fn has_limits(&self) -> bool {
        self.limits.values().any(|l| l.slots.is_some())
    }

    /// Stops renewing slot leases (and gives back what is still held).
    pub async fn shutdown(&self) {
        let renewal = self.renewal.lock().take();
        if let Some(r) = renewal {
            r.shutdown().await;
        }
    }

    /// Per-provider concurrency, queue wait and breaker; set before adding providers.
    pub fn set_limits(
        &mut self,
        concurrency: usize,
        queue_wait: Duration,
        breaker: BreakerSettings,
    ) {
        self.concurrency = concurrency;
        self.queue_wait = queue_wait;
        self.breaker = breaker;
    }

    /// Each provider's circuit: `closed`, `half_open` or `open`.
    pub fn circuit_states(&self) -> Vec<(String, &'static str)> {
        self.providers
            .iter()
            .map(|(p, _)| {
                let state = self
                    .limits
                    .get(p.name())
                    .map(|l| l.breaker.state())
                    .unwrap_or("closed");
                (p.name().to_owned(), state)
            })
            .collect()
    }

    pub fn add_provider(&mut self, provider: Arc<dyn Provider>, models: ModelMatch, label: &str) {
        let slots =
            (provider.name() != super::demo::Demo::NAME && self.concurrency > 0).then(|| {
                let mode = self.metrics.gauge(
                    "sluice_provider_slots_shared",
                    &[("provider", provider.name())],
                );
                super::slots::Slots::local(provider.name(), self.concurrency, mode)
            });
        self.limits.insert(
            provider.name().to_owned(),
            Arc::new(ProviderLimits {
                breaker: Breaker::new(self.breaker),
                slots,
            }),
        );
        match &models {
            ModelMatch::Listed(names) => {
                for name in names.iter().filter(|n| !n.ends_with('*')) {
                    self.list_model(name, label);
                }
            }
            ModelMatch::Any => self.catalogs.push(Catalog {
                provider: provider.clone(),
                cached: tokio::sync::Mutex::new(None),
            }),
        }
        self.providers.push((provider, models));
    }

    /// How the default model is chosen when none is configured.
    pub fn set_default_rule(&mut self, rule: DefaultModel) {
        self.default_rule = rule;
    }

    /// Settles the model of sessions and tasks: `explicit` when not empty, else the rule
    /// [`Upstreams::set_default_rule`] set. An upstream whose list cannot be read leaves
    /// `demo`, with a warning.
    pub async fn choose_default_model(&mut self, explicit: &str) -> &str {
        let chosen = match (explicit.trim(), &self.default_rule) {
            (e, _) if !e.is_empty() => e.to_owned(),
            (_, DefaultModel::Named(m)) => m.clone(),
            (_, DefaultModel::FirstListedBy(p)) => {
                let first = match self.catalogs.iter().find(|c| c.provider.name() == p) {
                    Some(c) => c.names().await.into_iter().next(),
                    None => None,
                };
                first.unwrap_or_else(|| {
                    tracing::warn!(
                        provider = p.as_str(),
                        "the provider listed no model to use by default: sessions use `demo` \
                         until SLUICE_DEFAULT_MODEL names one"
                    );
                    super::demo::Demo::NAME.to_owned()
                })
            }
        };
        self.default_model = chosen;
        &self.default_model
    }

    /// The model of sessions and tasks whose agent names none of its own.
    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    pub fn add_alias(&mut self, name: String, chain: Vec<Target>) {
        self.list_model(&name, "sluice");
        self.aliases.insert(name, chain);
    }

    /// Adds a model to `GET /v1/models`.
    pub fn list_model(&mut self, id: &str, owner: &str) {
        if !self.listed.iter().any(|m| m.id == id) {
            self.listed.push(ModelInfo {
                id: id.to_owned(),
                owned_by: owner.to_owned(),
            });
        }
    }

    pub fn provider(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.providers
            .iter()
            .find(|(p, _)| p.name() == name)
            .map(|(p, _)| p.clone())
    }

    /// Every model `GET /v1/models` lists: the default, configured ones, `demo`, aliases,
    /// and what each provider serving any name lists itself.
    pub async fn models(&self) -> Vec<ModelInfo> {
        let mut out = self.listed.clone();
        for c in &self.catalogs {
            for id in c.names().await {
                if !out.iter().any(|m| m.id == id) {
                    out.push(ModelInfo {
                        id,
                        owned_by: c.provider.name().to_owned(),
                    });
                }
            }
        }
        if !out.iter().any(|m| m.id == self.default_model) {
            let owner = self
                .resolve(&self.default_model)
                .ok()
                .and_then(|chain| chain.first().map(|t| t.provider.name().to_owned()))
                .unwrap_or_else(|| "sluice".into());
            out.insert(
                0,
                ModelInfo {
                    id: self.default_model.clone(),
                    owned_by: owner,
                },
            );
        }
        out
    }

    pub fn provider_names(&self) -> Vec<String> {
        self.providers
            .iter()
            .map(|(p, _)| p.name().to_owned())
            .collect()
    }

    /// The provider chain for `model`: an alias's chain, else the first provider that lists
    /// the model or accepts any.
    pub fn resolve(&self, model: &str) -> Result<Vec<Target>, UpstreamError> {
        if let Some(chain) = self.aliases.get(model) {
            return Ok(chain.clone());
        }
        // `demo` stays the built-in demo even beside a provider that takes any name.
        if model == super::demo::Demo::NAME {
            if let Some(demo) = self.provider(super::demo::Demo::NAME) {
                return Ok(vec![Target {
                    provider: demo,
                    model: None,
                }]);
            }
        }
        self.providers
            .iter()
            .find(|(_, m)| match m {
                ModelMatch::Any => true,
                ModelMatch::Listed(names) => names.iter().any(|n| matches_model(n, model)),
            })
            .map(|(p, _)| {
                vec![Target {
                    provider: p.clone(),
                    model: None,
                }]
            })
            .ok_or_else(|| UpstreamError::UnknownModel(model.to_owned()))
    }

    /// Starts a generation: walks the model's chain, retrying each provider on connect
    /// errors, 429 and 5xx with backoff, and returns as soon as an upstream accepts the
    /// request, so the caller can start its response (and keep it alive) while the first
    /// token is awaited. Until that token, any failure — a first-token timeout included —
    /// moves on to the chain's next target inside the returned stream; from it on, nothing
    /// is retried: the caller may already have sent tokens. `provider` and `model` name the
    /// target that accepted first.
    pub async fn open(self: &Arc<Self>, req: &ChatRequest) -> Result<Relay, UpstreamError> {
        let chain = self.resolve(&req.model)?;
        let deadline = Instant::now() + self.timeouts.total;
        let first = self.accept(req, &chain, 0, None, deadline).await?;
        // With no target left to fall back to, the stream goes out as it comes.
        if first.index + 1 >= chain.len() {
            return Ok(first.into_relay());
        }
        let (provider, model) = (first.provider.clone(), first.model.clone());
        let (this, req) = (self.clone(), req.clone());
        let starting = async move {
            let (served, head) = this.to_first_token(&req, &chain, first, deadline).await?;
            Ok((head, served.events))
        };
        Ok(Relay {
            provider,
            model,
            events: Box::pin(FirstToken {
                starting: Some(Box::pin(starting)),
                head: Vec::new().into_iter(),
                rest: None,
            }),
        })
    }

    /// The chain of an agent: its model (on its provider, when it names one), then each of
    /// its fallback models, each resolved as usual.
    pub fn chain_for(
        &self,
        model: &str,
        provider: Option<&str>,
        fallbacks: &[String],
    ) -> Result<Vec<Target>, UpstreamError> {
        let mut chain = match provider.and_then(|p| self.provider(p)) {
            Some(p) => vec![Target {
                provider: p,
                model: Some(model.to_owned()),
            }],
            None => pin_model(self.resolve(model)?, model),
        };
        for m in fallbacks {
            if let Ok(more) = self.resolve(m) {
                chain.extend(pin_model(more, m));
            }
        }
        Ok(chain)
    }

    /// Starts a generation over an explicit chain and waits for its first token: every
    /// failure before it (a first-token timeout included) moves on to the chain's next
    /// target, so the relay returned names the target that is answering.
    pub async fn open_chain(
        &self,
        req: &ChatRequest,
        chain: &[Target],
    ) -> Result<Relay, UpstreamError> {
        let deadline = Instant::now() + self.timeouts.total;
        let first = self.accept(req, chain, 0, None, deadline).await?;
        if first.index + 1 >= chain.len() {
            return Ok(first.into_relay());
        }
        let (served, head) = self.to_first_token(req, chain, first, deadline).await?;
        let events = if head.is_empty() {
            served.events
        } else {
            Box::pin(FirstToken {
                starting: None,
                head: head.into_iter(),
                rest: Some(served.events),
            })
        };
        Ok(Relay {
            provider: served.provider,
            model: served.model,
            events,
        })
    }

    /// Reads an accepted target's stream up to its first token (or its end), falling back
    /// along the chain while targets fail before it. Returns the target that got there and
    /// what it sent before the token (a role chunk, say) with the token itself.
    async fn to_first_token(
        &self,
        req: &ChatRequest,
        chain: &[Target],
        mut current: Accepted,
        total_deadline: Instant,
    ) -> Result<(Accepted, Vec<Chunk>), UpstreamError> {
        loop {
            match first_token(&mut current.events).await {
                Ok(head) => return Ok((current, head)),
                Err(err) if err.may_fall_back() => {
                    tracing::warn!(provider = %current.provider, model = %current.model, error = %err, "upstream failed before the first token; falling back");
                    current = self
                        .accept(req, chain, current.index + 1, Some(err), total_deadline)
                        .await?;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The first target of `chain[from..]` that accepts the request (response head
    /// received), wrapped in the timeouts; the total one counts from the generation's
    /// start, fallbacks included. `last_err` is what is reported when none accepts.
    async fn accept(
        &self,
        req: &ChatRequest,
        chain: &[Target],
        from: usize,
        mut last_err: Option<UpstreamError>,
        total_deadline: Instant,
    ) -> Result<Accepted, UpstreamError> {
        for (index, target) in chain.iter().enumerate().skip(from) {
            let model = target.model.as_deref().unwrap_or(&req.model);
            let name = target.provider.name();
            let Some(limits) = self.limits.get(name).cloned() else {
                continue;
            };
            if !limits.breaker.allow() {
                tracing::debug!(provider = name, "circuit open: skipping provider");
                last_err = Some(UpstreamError::CircuitOpen {
                    provider: name.to_owned(),
                    retry_after: limits.breaker.retry_after(),
                });
                continue;
            }
            let permit = match &limits.slots {
                None => None,
                Some(slots) => match slots.acquire(self.queue_wait).await {
                    Some(p) => Some(p),
                    None => {
                        self.metrics.upstream_error(name, "upstream_busy");
                        last_err = Some(UpstreamError::Busy {
                            provider: name.to_owned(),
                        });
                        continue;
                    }
                },
            };
            match self
                .open_one(target.provider.as_ref(), req, model, &limits)
                .await
            {
                Ok((events, attempt_start)) => {
                    limits.breaker.success();
                    let first_deadline = attempt_start + self.timeouts.first_token;
                    return Ok(Accepted {
                        provider: target.provider.name().to_owned(),
                        model: model.to_owned(),
                        index,
                        events: Box::pin(
                            Guarded::new(
                                events,
                                target.provider.name(),
                                first_deadline,
                                self.timeouts.idle,
                                total_deadline,
                            )
                            .observed(&self.metrics, model, attempt_start)
                            .limited(limits, permit),
                        ),
                    });
                }
                Err(err) => {
                    let fall_back = err.may_fall_back();
                    tracing::warn!(provider = target.provider.name(), model, error = %err, fall_back, "upstream failed before the first token");
                    last_err = Some(err);
                    if !fall_back {
                        break;
                    }
                }
            }
        }
        let err = last_err.unwrap_or_else(|| UpstreamError::UnknownModel(req.model.clone()));
        // A call no provider took ends here, with no stream to write its line at its end.
        tracing::warn!(
            provider = err.provider().unwrap_or_default(),
            model = %req.model,
            outcome = "failed",
            code = err.code(),
            error = %err,
            "upstream call"
        );
        Err(err)
    }

    async fn open_one(
        &self,
        provider: &dyn Provider,
        req: &ChatRequest,
        model: &str,
        limits: &ProviderLimits,
    ) -> Result<(EventStream, Instant), UpstreamError> {
        let mut attempt = 1;
        loop {
            let attempt_start = Instant::now();
            let result =
                match tokio::time::timeout(self.timeouts.first_token, provider.open(req, model))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(UpstreamError::Timeout {
                        provider: provider.name().to_owned(),
                        kind: TimeoutKind::FirstToken,
                    }),
                };
            let err = match result {
                Ok(events) => return Ok((events, attempt_start)),
                Err(err) => err,
            };
            // Every failed attempt counts, retried or not.
            self.metrics.upstream_error(provider.name(), err.code());
            if err.is_provider_failure() && limits.breaker.failure() {
                tracing::warn!(
                    provider = provider.name(),
                    "circuit opened after repeated failures"
                );
                return Err(err);
            }
            if !err.is_retryable() || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let delay = match &err {
                UpstreamError::Status {
                    retry_after: Some(after),
                    ..
                } => {
                    if *after > self.retry.max {
                        // Waiting longer than the cap would hold the client hostage; let the
                        // caller fall back or pass the 429 and its Retry-After on.
                        return Err(err);
                    }
                    *after
                }
                _ => self.retry.backoff(attempt),
            };
            tracing::info!(provider = provider.name(), attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying upstream");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A target that accepted a request, its stream not yet past the first token.
struct Accepted {
    provider: String,
    model: String,
    /// Its place in the chain: a fallback goes on from the next one.
    index: usize,
    events: EventStream,
}

impl Accepted {
    fn into_relay(self) -> Relay {
        Relay {
            provider: self.provider,
            model: self.model,
            events: self.events,
        }
    }
}

/// Reads `events` up to and including the first token (or a finish), or to its end.
async fn first_token(events: &mut EventStream) -> Result<Vec<Chunk>, UpstreamError> {
    let mut head = Vec::new();
    while let Some(event) = events.next().await {
        let chunk = event?;
        let started = chunk.is_token() || chunk.finish().is_some();
        head.push(chunk);
        if started {
            break;
        }
    }
    Ok(head)
}

type Starting =
    Pin<Box<dyn Future<Output = Result<(Vec<Chunk>, EventStream), UpstreamError>> + Send>>;

/// A generation's stream around its first token: `starting` reaches it (falling back
/// along the chain), then what came up to it is handed out, then the rest is passed
/// through untouched, one check per event.
struct FirstToken {
    starting: Option<Starting>,
    head: std::vec::IntoIter<Chunk>,
    rest: Option<EventStream>,
}

impl Stream for FirstToken {
    type Item = Result<Chunk, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(starting) = &mut self.starting {
            match starting.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((head, rest))) => {
                    self.starting = None;
                    self.head = head.into_iter();
                    self.rest = Some(rest);
                }
                Poll::Ready(Err(err)) => {
                    self.starting = None;
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
        if let Some(chunk) = self.head.next() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        match &mut self.rest {
            Some(rest) => rest.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

/// Applies the first-token, idle and total timeouts to an upstream stream. A hand-written
/// stream rather than a `timeout()` per item so each token only resets one timer.
struct Guarded {
    inner: EventStream,
    provider: Arc<str>,
    idle: Duration,
    /// Fires at the first-token deadline, then at most `idle` after the last event. It is
    /// not moved on every event: an event only notes its time, and the timer is pushed
    /// back when it fires early. Re-arming a timer per token was a measurable share of a
    /// token's cost.
    silence: Pin<Box<Sleep>>,
    /// When the last event came, once one has.
    last_event: Option<Instant>,
    total: Pin<Box<Sleep>>,
    total_deadline: Instant,
    seen_token: bool,
    done: bool,
    observer: Option<Observer>,
    /// The provider's breaker hears of failures mid-stream too.
    limits: Option<Arc<ProviderLimits>>,
    /// The provider slot this stream holds until it ends.
    _permit: Option<super::slots::Permit>,
}

/// What a stream reports to metrics and logs as it goes, and once at its end.
struct Observer {
    metrics: Arc<Metrics>,
    model: String,
    started: Instant,
    ttft: Option<Duration>,
    tokens: u64,
    outcome: &'static str,
    /// The error code of a failed stream.
    code: Option<String>,
    /// The request's span: a stream dropped by hyper when its client goes away is dropped
    /// outside it, and its line must still name the request.
    span: tracing::Span,
    _open: StreamGuard,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(o) = &self.observer {
            let outcome = if self.done { o.outcome } else { "cancelled" };
            o.span.in_scope(|| {
                tracing::info!(
                    provider = %self.provider,
                    model = %o.model,
                    ttft_ms = o.ttft.map(|t| t.as_millis() as u64),
                    tokens = o.tokens,
                    duration_ms = o.started.elapsed().as_millis() as u64,
                    outcome,
                    code = o.code.as_deref(),
                    "upstream call"
                )
            });
        }
    }
}

impl Guarded {
    fn observed(mut self, metrics: &Arc<Metrics>, model: &str, started: Instant) -> Self {
        self.observer = Some(Observer {
            metrics: metrics.clone(),
            model: model.to_owned(),
            started,
            ttft: None,
            tokens: 0,
            outcome: "complete",
            code: None,
            span: tracing::Span::current(),
            _open: metrics.upstream_stream(),
        });
        self
    }

    fn new(
        inner: EventStream,
        provider: &str,
        first_deadline: Instant,
        idle: Duration,
        total_deadline: Instant,
    ) -> Self {
        Self {
            inner,
            provider: provider.into(),
            idle,
            silence: Box::pin(tokio::time::sleep_until(first_deadline.min(total_deadline))),
            last_event: None,
            total: Box::pin(tokio::time::sleep_until(total_deadline)),
            total_deadline,
            seen_token: false,
            done: false,
            observer: None,
            limits: None,
            _permit: None,
        }
    }

    fn limited(
        mut self,
        limits: Arc<ProviderLimits>,
        permit: Option<super::slots::Permit>,
    ) -> Self {
        self.limits = Some(limits);
        self._permit = permit;
        self
    }

    fn fail(&mut self, kind: TimeoutKind) -> Poll<Option<Result<Chunk, UpstreamError>>> {
        self.done = true;
        let err = UpstreamError::Timeout {
            provider: self.provider.to_string(),
            kind,
        };
        self.observe_error(&err);
        Poll::Ready(Some(Err(err)))
    }

    fn observe_error(&mut self, err: &UpstreamError) {
        if let Some(l) = &self.limits {
            if err.is_provider_failure() && l.breaker.failure() {
                tracing::warn!(provider = %self.provider, "circuit opened after repeated failures");
            }
        }
        let provider = self.provider.clone();
        if let Some(o) = &mut self.observer {
            o.outcome = "failed";
            o.code = Some(err.code().to_owned());
            o.metrics.upstream_error(&provider, err.code());
        }
    }
}

impl Stream for Guarded {
    type Item = Result<Chunk, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(event))) => {
                let token = event.is_token();
                if token || event.finish().is_some() {
                    self.seen_token = true;
                }
                let this = &mut *self;
                if let (true, Some(o)) = (token, &mut this.observer) {
                    o.tokens += 1;
                    o.metrics.token();
                    if o.ttft.is_none() {
                        let ttft = o.started.elapsed();
                        o.ttft = Some(ttft);
                        o.metrics.upstream_ttft(&this.provider, ttft);
                    }
                }
                let now = Instant::now();
                if self.last_event.replace(now).is_none() {
                    // From the first event on the idle limit applies, which may come
                    // sooner than the first-token deadline the timer was set to.
                    let due = (now + self.idle).min(self.total_deadline);
                    self.silence.as_mut().reset(due);
                }
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.done = true;
                self.observe_error(&err);
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.total.as_mut().poll(cx).is_ready() {
                    return self.fail(TimeoutKind::Total);
                }
                while self.silence.as_mut().poll(cx).is_ready() {
                    // Events came since the timer was set: it is due later than it fired.
                    let due = self
                        .last_event
                        .map(|t| (t + self.idle).min(self.total_deadline));
                    if let Some(due) = due.filter(|&d| d > self.silence.deadline()) {
                        self.silence.as_mut().reset(due);
                        continue;
                    }
                    let kind = if self.seen_token {
                        TimeoutKind::Idle
                    } else {
                        TimeoutKind::FirstToken
                    };
                    return self.fail(kind);
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists `["m1", "m2"]` on its first call, fails on every later one.
    struct Listing(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl Provider for Listing {
        fn name(&self) -> &str {
            "listing"
        }
        async fn open(&self, _: &ChatRequest, _: &str) -> Result<EventStream, UpstreamError> {
            Err(UpstreamError::UnknownModel("none".into()))
        }
        async fn list_models(&self) -> Option<Result<Vec<String>, UpstreamError>> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(if n == 0 {
                Ok(vec!["m1".into(), "m2".into()])
            } else {
                Err(UpstreamError::Connect {
                    provider: "listing".into(),
                    message: "down".into(),
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_model_list_is_cached_and_survives_failures() {
        let p = Arc::new(Listing(Default::default()));
        let c = Catalog {
            provider: p.clone(),
            cached: tokio::sync::Mutex::new(None),
        };
        let calls = || p.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(calls(), 0, "nothing is fetched before it is asked for");
        assert_eq!(c.names().await, ["m1", "m2"]);
        assert_eq!(c.names().await, ["m1", "m2"]);
        assert_eq!(calls(), 1);
        tokio::time::advance(CATALOG_TTL).await;
        assert_eq!(
            c.names().await,
            ["m1", "m2"],
            "a failed refresh keeps the list"
        );
        assert_eq!(calls(), 2);
        assert_eq!(c.names().await, ["m1", "m2"]);
        assert_eq!(calls(), 2, "a failure is not retried at once");
        tokio::time::advance(CATALOG_RETRY).await;
        c.names().await;
        assert_eq!(calls(), 3);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(10),
        };
        for _ in 0..100 {
            let d1 = p.backoff(1);
            assert!(d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1));
            let d2 = p.backoff(2);
            assert!(d2 >= Duration::from_secs(1) && d2 <= Duration::from_secs(2));
            let d9 = p.backoff(9);
            assert!(d9 >= Duration::from_secs(5) && d9 <= Duration::from_secs(10));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_before_first_token_is_a_first_token_timeout() {
        let inner: EventStream = Box::pin(futures::stream::pending());
        let now = Instant::now();
        let mut g = Guarded::new(
            inner,
            "p",
            now + Duration::from_millis(100),
            Duration::from_secs(5),
            now + Duration::from_secs(60),
        );
        match g.next().await {
            Some(Err(UpstreamError::Timeout { kind, .. })) => {
                assert_eq!(kind, TimeoutKind::FirstToken)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(g.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_a_token_is_an_idle_timeout() {
        let inner: EventStream = Box::pin(
            futures::stream::iter(vec![Ok(
                crate::domain::ChunkEncoder::new("c", 0, "m").content("a")
            )])
            .chain(futures::stream::pending()),
        );
        let now = Instant::now();
        let mut g = Guarded::new(
            inner,
            "p",
            now + Duration::from_millis(100),
            Duration::from_secs(1),
            now + Duration::from_secs(60),
        );
        assert!(matches!(g.next().await, Some(Ok(c)) if c.is_token()));
        match g.next().await {
            Some(Err(UpstreamError::Timeout { kind, .. })) => assert_eq!(kind, TimeoutKind::Idle),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Tokens closer together than the idle limit keep the stream alive however long it
    /// runs; the limit counts from the last one.
    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_counts_from_the_last_event() {
        let inner: EventStream = Box::pin(
            async_stream::stream! {
                for i in 0..10 {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    yield Ok(crate::domain::ChunkEncoder::new("c", 0, "m").content(&format!("t{i}")));
                }
            }
            .chain(futures::stream::pending()),
        );
        let start = Instant::now();
        let mut g = Guarded::new(
            inner,
            "p",
            start + Duration::from_secs(5),
            Duration::from_secs(1),
            start + Duration::from_secs(60),
        );
        for _ in 0..10 {
            assert!(matches!(g.next().await, Some(Ok(c)) if c.is_token()));
        }
        let last = Instant::now();
        assert_eq!(last - start, Duration::from_millis(6000));
        match g.next().await {
            Some(Err(UpstreamError::Timeout { kind, .. })) => assert_eq!(kind, TimeoutKind::Idle),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(Instant::now() - last, Duration::from_secs(1));
    }
}
