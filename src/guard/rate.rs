//! Request rate limits per client and route class, checked before the request reaches its
//! handler: a flood is refused with 429 on the cheapest path.
//!
//! A client is its API key once the store knows the key, else its IP address. A bearer
//! token that fails authentication counts against the address, and an address that has
//! spent its budget on failures is refused before the store is asked again: random forged
//! keys cannot each get a fresh bucket. The IP comes from `X-Forwarded-For` / `X-Real-IP`
//! only when the TCP peer is a trusted proxy: anyone else could write any address there
//! and get a fresh bucket per request.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota as Rate, RateLimiter};

use crate::app::AppState;
use crate::config::GuardConfig;
use crate::error::ApiError;
use crate::http::auth::{self, Principal};
use crate::store::cli::hash_key;

/// Routes limited together, each with its own per-minute rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// Requests that start a generation: the expensive ones.
    Chat,
    /// Every other `/api` and `/v1` route.
    Api,
    /// `/api/admin/...`.
    Admin,
}

/// Who a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// The id of a key the store knows.
    Key(String),
    /// The client address; IPv6 addresses are cut to their /64, the smallest block one
    /// subscriber is usually given, so rotating through it gains nothing.
    Ip(IpAddr),
}

type Limiter = DefaultKeyedRateLimiter<Client>;

/// How many checks pass between two sweeps of idle clients out of the limiters; a sweep
/// walks every tracked client, so it is amortised over many requests instead of running
/// on a timer task that would need an owner.
const SWEEP_EVERY: u64 = 4_096;

pub struct RateLimits {
    chat: Option<Limiter>,
    api: Option<Limiter>,
    admin: Option<Limiter>,
    trusted: Vec<ipnet::IpNet>,
    checks: AtomicU64,
    /// Addresses whose budget of a class is spent on failed authentications, until when:
    /// their next bearer token is refused without a store lookup.
    failing: moka::future::Cache<(RouteClass, IpAddr), Instant>,
    /// SHA-256 of bearer tokens the store knew lately. Only lets them past a failing
    /// address to be looked up again; the lookup still decides.
    known: moka::future::Cache<[u8; 32], ()>,
}

impl RateLimits {
    pub fn new(cfg: &GuardConfig) -> Self {
        // A burst of 0 would refuse everything; one request at a time is the least.
        let burst = NonZeroU32::new(cfg.rate_burst).unwrap_or(NonZeroU32::MIN);
        let limiter = |per_min: u32| {
            NonZeroU32::new(per_min)
                .map(|n| RateLimiter::keyed(Rate::per_minute(n).allow_burst(burst)))
        };
        Self {
            chat: limiter(cfg.rate_chat_per_min),
            api: limiter(cfg.rate_api_per_min),
            admin: limiter(cfg.rate_admin_per_min),
            trusted: cfg.trusted_proxies.clone(),
            checks: AtomicU64::new(0),
            // A per-minute rate never makes anyone wait longer than a minute.
            failing: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(61))
                .build(),
            known: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    fn limiter(&self, class: RouteClass) -> Option<&Limiter> {
        match class {
            RouteClass::Chat => self.chat.as_ref(),
            RouteClass::Api => self.api.as_ref(),
            RouteClass::Admin => self.admin.as_ref(),
        }
    }

    /// Counts one request of `client` on `class`; `Err` holds how long until the next one
    /// would pass.
    pub fn check(&self, class: RouteClass, client: &Client) -> Result<(), Duration> {
        let Some(limiter) = self.limiter(class) else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            for l in [&self.chat, &self.api, &self.admin].into_iter().flatten() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
        limiter
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// The client address of a request (see the module doc).
    pub fn address(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Client {
        let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip().to_canonical());
        Client::Ip(coarse(self.client_ip(headers, ip)))
    }

    /// How long `address` still has to wait after spending its budget of `class` on failed
    /// authentications.
    async fn failing(&self, class: RouteClass, address: &Client) -> Option<Duration> {
        let Client::Ip(ip) = address else { return None };
        let until = self.failing.get(&(class, *ip)).await?;
        until.checked_duration_since(Instant::now())
    }

    /// Counts a failed authentication against `address`; `Err` once its budget is spent.
    async fn failed(&self, class: RouteClass, address: &Client) -> Result<(), Duration> {
        let Err(wait) = self.check(class, address) else {
            return Ok(());
        };
        if let Client::Ip(ip) = address {
            self.failing
                .insert((class, *ip), Instant::now() + wait)
                .await;
        }
        Err(wait)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The address a trusted proxy says it got the request from: the right-most
    /// `X-Forwarded-For` entry that is not itself a trusted proxy (entries left of it were
    /// written by the client and prove nothing), else `X-Real-IP`.
    fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        if !hops.is_empty() {
            // Walking leftwards from the proxy that connected to us: every trusted hop
            // vouches for the one before it.
            let mut client = peer;
            for hop in hops.iter().rev() {
                let Some(ip) = parse_ip(hop) else {
                    // Garbage: believe nothing further left.
                    return client;
                };
                client = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
            return client;
        }
        headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_ip(v.trim()))
            .unwrap_or(peer)
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .or_else(|_| s.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

fn coarse(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// The class of a request, or `None` for what is never limited: health, metrics, the
/// WebSocket upgrade (its messages have their own limits) and the UI.
pub fn classify(method: &Method, path: &str) -> Option<RouteClass> {
    // The admin gate's normal form, so the two never disagree on what is admin.
    let path = crate::http::path::normalize(path);
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["api", "admin", ..] => Some(RouteClass::Admin),
        ["v1", "chat", "completions"] | ["api", "tasks"] if method == Method::POST => {
            Some(RouteClass::Chat)
        }
        ["api", "sessions", _, "messages"] | ["api", "scenes", _, "run"]
            if method == Method::POST =>
        {
            Some(RouteClass::Chat)
        }
        ["api", ..] | ["v1", ..] => Some(RouteClass::Api),
        _ => None,
    }
}

fn secs(wait: Duration) -> u64 {
    // Rounded up: a client retrying after the header must pass.
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The middleware: authentication (see the module doc), the local rate limit of the
/// request's class, then, for chat requests with a key, the cluster-wide quota. The caller
/// it found is handed to the handler, so the key is looked up once.
pub async fn limit(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(class) = classify(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let guards = &st.guards;
    let quota = guards.quota.as_ref().filter(|_| class == RouteClass::Chat);
    if guards.rate.limiter(class).is_none() && quota.is_none() {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let address = guards.rate.address(req.headers(), peer);
    let who = match authenticate(&st, class, req.headers(), &address).await {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let client = who.key_id.clone().map_or(address, Client::Key);
    if let Err(e) = admit(&st, class, &client, who.key_id.as_deref()).await {
        return e.into_response();
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

fn too_many(wait: Duration) -> ApiError {
    ApiError::TooManyRequests {
        message: "rate limit exceeded; retry after the time in the Retry-After header".into(),
        code: "rate_limited",
        retry_after: secs(wait),
    }
}

/// The caller of a request, with failed authentications counted against `address`: once
/// its budget of `class` is spent, its bearer tokens get 429 without a store lookup.
pub async fn authenticate(
    st: &AppState,
    class: RouteClass,
    headers: &HeaderMap,
    address: &Client,
) -> Result<Principal, ApiError> {
    let rate = &st.guards.rate;
    let token = auth::bearer(headers)?;
    if !auth::is_local(st, token) {
        if let Some(wait) = rate.failing(class, address).await {
            // Keys in use from the same address (an office's NAT) keep working.
            let known = token.is_some_and(|t| rate.known.contains_key(&hash_key(t)));
            if !known {
                st.metrics.rate_limited();
                return Err(too_many(wait));
            }
        }
    }
    match auth::authenticate(st, headers).await {
        Ok(who) => {
            if let Some(t) = token.filter(|_| who.key_id.is_some()) {
                let hash = hash_key(t);
                if !rate.known.contains_key(&hash) {
                    rate.known.insert(hash, ()).await;
                }
            }
            Ok(who)
        }
        Err(e @ ApiError::Unauthorized(_)) => match rate.failed(class, address).await {
            Ok(()) => Err(e),
            Err(wait) => {
                st.metrics.rate_limited();
                Err(too_many(wait))
            }
        },
        other => other,
    }
}

/// The checks one request of `class` from `client` passes: its rate limit, then for chat
/// the key's quota (`key_id` when the caller is known already, as on a WebSocket opened
/// with a token). Also applied to each `chat` op of a WebSocket.
pub async fn admit(
    st: &AppState,
    class: RouteClass,
    client: &Client,
    key_id: Option<&str>,
) -> Result<(), ApiError> {
    let guards = &st.guards;
    if let Err(wait) = guards.rate.check(class, client) {
        st.metrics.rate_limited();
        return Err(too_many(wait));
    }
    let quota = guards.quota.as_ref().filter(|_| class == RouteClass::Chat);
    if let Some(quota) = quota {
        let key_id = match (key_id, client) {
            (Some(k), _) => Some(k.to_owned()),
            (None, Client::Key(id)) => Some(id.clone()),
            (None, Client::Ip(_)) => None,
        };
        if let Some(key_id) = key_id {
            if let Err(refusal) = quota.check_request(&key_id).await {
                if refusal.is_over_quota() {
                    st.metrics.rate_limited();
                }
                return Err(ApiError::from(refusal));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(trusted: &[&str]) -> RateLimits {
        RateLimits::new(&GuardConfig {
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            rate_chat_per_min: 6,
            rate_api_per_min: 0,
            rate_burst: 2,
            ..GuardConfig::default()
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> Client {
        Client::Ip(s.parse().unwrap())
    }

    #[test]
    fn classes() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            classify(&post, "/v1/chat/completions"),
            Some(RouteClass::Chat)
        );
        assert_eq!(
            classify(&post, "/api/sessions/abc/messages"),
            Some(RouteClass::Chat)
        );
        assert_eq!(classify(&post, "/api/tasks"), Some(RouteClass::Chat));
        assert_eq!(classify(&post, "/api/scenes/x/run"), Some(RouteClass::Chat));
        assert_eq!(classify(&get, "/api/tasks"), Some(RouteClass::Api));
        assert_eq!(classify(&get, "/v1/models"), Some(RouteClass::Api));
        assert_eq!(
            classify(&get, "/API//%61dmin/keys"),
            Some(RouteClass::Admin)
        );
        for free in [
            "/health",
            "/health/ready",
            "/metrics",
            "/ws",
            "/",
            "/ui/app.js",
        ] {
            assert_eq!(classify(&get, free), None, "{free}");
        }
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_peers() {
        let l = limits(&["10.0.0.0/8"]);
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.2")]);
        assert_eq!(l.address(&xff, Some(peer)), ip("198.51.100.7"));
        assert_eq!(l.address(&xff, Some(stranger)), ip("203.0.113.9"));
        let split = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7:443"),
        ]);
        assert_eq!(l.address(&split, Some(peer)), ip("198.51.100.7"));
        let real = headers(&[("x-real-ip", "198.51.100.8")]);
        assert_eq!(l.address(&real, Some(peer)), ip("198.51.100.8"));
        let all_trusted = headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(l.address(&all_trusted, Some(peer)), ip("10.1.1.1"));
        let garbage = headers(&[("x-forwarded-for", "198.51.100.7, nonsense")]);
        assert_eq!(l.address(&garbage, Some(peer)), ip("10.0.0.1"));
        let v6: SocketAddr = "[2001:db8:1:2:3:4:5:6]:1".parse().unwrap();
        assert_eq!(l.address(&HeaderMap::new(), Some(v6)), ip("2001:db8:1:2::"));
        // A bearer token proves nothing before the store knows it: still the address.
        let keyed = headers(&[("authorization", "Bearer sk-1")]);
        assert_eq!(l.address(&keyed, Some(peer)), ip("10.0.0.1"));
    }

    #[test]
    fn burst_then_refusal_with_a_wait() {
        let l = limits(&[]);
        let c = ip("192.0.2.1");
        assert!(l.check(RouteClass::Chat, &c).is_ok());
        assert!(l.check(RouteClass::Chat, &c).is_ok());
        let wait = l.check(RouteClass::Chat, &c).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(10));
        assert_eq!(secs(wait), wait.as_secs_f64().ceil() as u64);
        assert!(l.check(RouteClass::Chat, &ip("192.0.2.2")).is_ok());
        // Class with rate 0: unlimited.
        for _ in 0..100 {
            assert!(l.check(RouteClass::Api, &c).is_ok());
        }
        assert_eq!(secs(Duration::from_millis(1)), 1);
    }
}
