//! What the start-up log tells a newcomer: where to point a browser and an SDK, whether
//! they need a key, and which providers and default model answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{AuthMode, Config};

/// The lines logged once the server is ready, in order; `default_model` is the one sessions,
/// tasks and the UI use (chosen from the providers when not configured).
pub fn next_steps(config: &Config, default_model: &str, local: SocketAddr) -> [String; 3] {
    let base = browsable(local);
    [
        format!("chat UI at {base}/ · OpenAI-compatible API at {base}/v1"),
        keys_line(config),
        providers_line(config, default_model),
    ]
}

/// The URL a browser on this machine can open: an unspecified address is not one.
fn browsable(local: SocketAddr) -> String {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, local.port()))
}

fn keys_line(config: &Config) -> String {
    let why = match config.chat.auth {
        AuthMode::Auto if config.auth_required() => "not a loopback address",
        AuthMode::Auto => "loopback address",
        AuthMode::Required => "SLUICE_AUTH=required",
        AuthMode::Off => "SLUICE_AUTH=off",
    };
    if config.auth_required() {
        format!(
            "API keys required ({why}): create one with `sluice keys create --name NAME` \
             and send it as `Authorization: Bearer KEY`"
        )
    } else {
        format!(
            "API keys not required ({why}): requests without a key, or with an SDK's \
             placeholder key, act as the local user; `sluice keys create --name NAME` makes one"
        )
    }
}

fn providers_line(config: &Config, model: &str) -> String {
    let providers = &config.upstream.providers;
    if providers.is_empty() {
        return format!(
            "providers: demo (built-in, canned replies; set OPENAI_API_KEY, OPENAI_BASE_URL, \
             ANTHROPIC_API_KEY or sluice.toml for a real model) · default model: {model}"
        );
    }
    let list = providers
        .iter()
        .map(|p| match p.urls().first().and_then(|u| shown_url(u)) {
            Some(url) => format!("{} ({url})", p.name),
            None => p.name.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("providers: {list} · default model: {model}")
}

/// A base URL without any user or password it may carry.
fn shown_url(url: &str) -> Option<String> {
    let mut u = reqwest::Url::parse(url).ok()?;
    u.set_username("").ok()?;
    u.set_password(None).ok()?;
    Some(u.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderConfig;

    #[test]
    fn defaults_point_at_the_ui_need_no_key_and_name_the_demo() {
        let c = Config::default();
        let [ui, keys, providers] = next_steps(&c, "demo", "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            ui,
            "chat UI at http://127.0.0.1:8080/ · OpenAI-compatible API at http://127.0.0.1:8080/v1"
        );
        assert!(
            keys.starts_with("API keys not required (loopback address)"),
            "{keys}"
        );
        assert!(keys.contains("act as the local user"), "{keys}");
        assert!(providers.starts_with("providers: demo"), "{providers}");
        assert!(providers.ends_with("default model: demo"), "{providers}");
    }

    #[test]
    fn public_addresses_require_keys_and_urls_hide_credentials() {
        let mut c = Config::default();
        c.server.addr = SocketAddr::from(([0, 0, 0, 0], 8080));
        c.upstream.providers = vec![ProviderConfig::openai(
            "openai",
            "http://user:pw@10.0.0.5:8000/v1/",
            None,
        )];
        let [ui, keys, providers] = next_steps(&c, "gpt-4o-mini", c.server.addr);
        assert!(ui.starts_with("chat UI at http://127.0.0.1:8080/"), "{ui}");
        assert!(keys.contains("`sluice keys create --name NAME`"), "{keys}");
        assert!(
            keys.starts_with("API keys required (not a loopback address)"),
            "{keys}"
        );
        assert_eq!(
            providers,
            "providers: openai (http://10.0.0.5:8000/v1) · default model: gpt-4o-mini"
        );
    }
}
