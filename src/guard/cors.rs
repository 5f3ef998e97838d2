//! CORS for browsers on other origins: only the origins listed in `SLUICE_CORS_ORIGINS`
//! (`*` for any) may call the API from a page; with none listed the server sends no CORS
//! headers at all, so browsers keep it same-origin.

/// How long a browser may reuse a preflight answer.
pub const PREFLIGHT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// The origins a browser page may call the API from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    /// Lower-cased, without a trailing slash: as browsers send `Origin`.
    Listed(Vec<String>),
}

/// `None` when no origin is configured: no CORS at all.
pub fn origins(configured: &[String]) -> Option<Origins> {
    if configured.is_empty() {
        return None;
    }
    if configured.iter().any(|o| o == "*") {
        return Some(Origins::Any);
    }
    // Browsers send `Origin` without a trailing slash, the config may have one.
    Some(Origins::Listed(
        configured
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_any_or_normalised_list() {
        assert_eq!(origins(&[]), None);
        let any = ["https://a.example".to_owned(), "*".to_owned()];
        assert_eq!(origins(&any), Some(Origins::Any));
        let listed = ["https://A.example/".to_owned()];
        assert_eq!(
            origins(&listed),
            Some(Origins::Listed(vec!["https://a.example".to_owned()]))
        );
    }
}
