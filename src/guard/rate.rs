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

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota as Rate, RateLimiter};
use http::HeaderMap;

use crate::config::GuardConfig;

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

    /// Whether `class` has a rate at all; a class without one is never counted.
    pub fn is_limited(&self, class: RouteClass) -> bool {
        self.limiter(class).is_some()
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
    pub async fn failing(&self, class: RouteClass, address: &Client) -> Option<Duration> {
        let Client::Ip(ip) = address else { return None };
        let until = self.failing.get(&(class, *ip)).await?;
        until.checked_duration_since(Instant::now())
    }

    /// Counts a failed authentication against `address`; `Err` once its budget is spent.
    pub async fn failed(&self, class: RouteClass, address: &Client) -> Result<(), Duration> {
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

    /// Whether a bearer token with this SHA-256 was known to the store lately.
    pub fn knows(&self, token_hash: &[u8; 32]) -> bool {
        self.known.contains_key(token_hash)
    }

    /// Remembers a bearer token the store knew, by its SHA-256.
    pub async fn remember(&self, token_hash: [u8; 32]) {
        if !self.known.contains_key(&token_hash) {
            self.known.insert(token_hash, ()).await;
        }
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

/// Whole seconds to put in `Retry-After` for a wait.
pub fn secs(wait: Duration) -> u64 {
    // Rounded up: a client retrying after the header must pass.
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
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
