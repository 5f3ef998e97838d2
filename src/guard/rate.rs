//! Request rate limits per client and route class, checked before anything touches the
//! store: a flood is refused with 429 on the cheapest path.
//!
//! A client is its API key when it sends one (the SHA-256 of the bearer token, computed
//! without a store lookup, so forged keys cost nothing either), else its IP address. The IP
//! comes from `X-Forwarded-For` / `X-Real-IP` only when the TCP peer is a trusted proxy:
//! anyone else could write any address there and get a fresh bucket per request.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota as Rate, RateLimiter};

use crate::app::AppState;
use crate::config::GuardConfig;
use crate::error::ApiError;

/// Routes limited together, each with its own per-minute rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// SHA-256 of the bearer token.
    Key([u8; 32]),
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

    /// The client a request counts against: its key, else its address (see the module doc).
    pub fn client(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Client {
        if let Some(token) = bearer(headers) {
            return Client::Key(crate::store::cli::hash_key(token));
        }
        let ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip().to_canonical());
        Client::Ip(coarse(self.client_ip(headers, ip)))
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The class of a request, or `None` for what is never limited: health, metrics, the
/// WebSocket upgrade (its messages have their own limits) and the UI.
pub fn classify(method: &Method, path: &str) -> Option<RouteClass> {
    // The same spelling rules as the admin guard, so `/API//admin/` is still admin.
    let path = normalize(path);
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

/// Percent-decoded and lower-cased.
fn normalize(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

fn secs(wait: Duration) -> u64 {
    // Rounded up: a client retrying after the header must pass.
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The middleware: the local rate limit of the request's class, then, for chat requests
/// with a key, the cluster-wide quota.
pub async fn limit(State(st): State<AppState>, req: Request, next: Next) -> Response {
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
    let client = guards.rate.client(req.headers(), peer);
    if let Err(e) = admit(&st, class, &client, None).await {
        return e.into_response();
    }
    next.run(req).await
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
        return Err(ApiError::TooManyRequests {
            message: "rate limit exceeded; retry after the time in the Retry-After header".into(),
            code: "rate_limited",
            retry_after: secs(wait),
        });
    }
    let quota = guards.quota.as_ref().filter(|_| class == RouteClass::Chat);
    if let Some(quota) = quota {
        let key_id = match (key_id, client) {
            (Some(k), _) => Some(k.to_owned()),
            (None, Client::Key(hash)) => quota.key_id(hash, st.store.as_ref()).await,
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
        assert_eq!(l.client(&xff, Some(peer)), ip("198.51.100.7"));
        assert_eq!(l.client(&xff, Some(stranger)), ip("203.0.113.9"));
        let split = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7:443"),
        ]);
        assert_eq!(l.client(&split, Some(peer)), ip("198.51.100.7"));
        let real = headers(&[("x-real-ip", "198.51.100.8")]);
        assert_eq!(l.client(&real, Some(peer)), ip("198.51.100.8"));
        let all_trusted = headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(l.client(&all_trusted, Some(peer)), ip("10.1.1.1"));
        let garbage = headers(&[("x-forwarded-for", "198.51.100.7, nonsense")]);
        assert_eq!(l.client(&garbage, Some(peer)), ip("10.0.0.1"));
        let v6: SocketAddr = "[2001:db8:1:2:3:4:5:6]:1".parse().unwrap();
        assert_eq!(l.client(&HeaderMap::new(), Some(v6)), ip("2001:db8:1:2::"));
        let keyed = headers(&[("authorization", "Bearer sk-1"), ("x-real-ip", "1.1.1.1")]);
        assert!(matches!(l.client(&keyed, Some(peer)), Client::Key(_)));
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
