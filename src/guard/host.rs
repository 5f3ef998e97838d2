//! The `Host` check of servers that need no key. Without keys every request acts as the
//! local admin user, so a web page whose own name resolves to 127.0.0.1 (DNS rebinding)
//! could read and change everything; such a page always sends its own name as `Host`.
//! So only loopback names and addresses, and the names in `SLUICE_ALLOWED_HOSTS`, are
//! served. With keys required the key keeps other pages out and no name is checked.

use std::net::IpAddr;

/// The host part of a `Host` value or URI authority: without port, brackets or a trailing
/// dot, lower-cased.
pub fn host_name(authority: &str) -> String {
    let h = authority.trim();
    let h = match h.strip_prefix('[') {
        // `[::1]:8080`: the address is inside the brackets.
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => h.rsplit_once(':').map_or(h, |(name, _port)| name),
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a request naming `authority` is served when keys are not required.
pub fn allowed(authority: &str, allowed_hosts: &[String]) -> bool {
    let name = host_name(authority);
    is_loopback(&name) || allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_listed_ones_only() {
        let listed = vec!["sluice.lan".to_owned()];
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.9.9.9:80",
            "[::1]",
            "[::1]:8080",
            "sluice.lan",
            "Sluice.LAN:8080",
        ] {
            assert!(allowed(ok, &listed), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:8080",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "[::2]:80",
            "sluice.lan.attacker.example",
            "",
        ] {
            assert!(!allowed(bad, &listed), "{bad}");
        }
    }
}
