//! The one reading of a request path that security decisions rest on: the admin gate and
//! the rate-limit classes both use it, so no spelling can be admin to one and not the other.
//!
//! The router matches the raw path literally and case-sensitively, so only the exact
//! spelling `/api/admin/...` reaches an admin handler. This form is wider on purpose, so a
//! spelling that a proxy in front might turn into an admin path is gated too: percent-decoded
//! once, ASCII lower-cased, `\` read as `/`, empty and `.` segments dropped. `..` is kept as
//! a segment, never resolved: a route capture (`/api/admin/keys/{id}`) can hold an encoded
//! `..%2f..`, and resolving it would make a request routed to an admin handler look like
//! some other path.

use std::borrow::Cow;

/// The normal form of `path`: `/` and its segments joined by `/`. A `%` in a segment is
/// written `%25`, so the form reads back as itself (normalising twice changes nothing).
pub fn normalize(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(rewrite(path))
    }
}

/// Whether `path` is already in normal form, so the usual request costs no allocation: `/`
/// then non-empty segments other than `.`, of printable ASCII with no upper case, `%`
/// or `\`.
fn is_normal(path: &str) -> bool {
    path.starts_with('/')
        && path.split('/').skip(1).all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg.bytes().all(|b| {
                    b.is_ascii_graphic() && !b.is_ascii_uppercase() && b != b'%' && b != b'\\'
                })
        })
}

/// [`normalize`] the long way, for any path.
fn rewrite(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
                decoded.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let path = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    let mut norm = String::with_capacity(path.len() + 1);
    for seg in path
        .split(['/', '\\'])
        .filter(|s| !s.is_empty() && *s != ".")
    {
        norm.push('/');
        norm.push_str(&seg.replace('%', "%25"));
    }
    if norm.is_empty() {
        norm.push('/');
    }
    norm
}

/// Whether `path` is under `/api/admin` in its normal form: every request that could reach
/// an admin handler is.
pub fn is_admin(path: &str) -> bool {
    is_admin_normal(&normalize(path))
}

/// [`is_admin`] of a path already in normal form.
pub fn is_admin_normal(norm: &str) -> bool {
    norm == "/api/admin" || norm.starts_with("/api/admin/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        for (raw, norm) in [
            ("", "/"),
            ("/", "/"),
            ("/api/admin/streams", "/api/admin/streams"),
            ("/api/./admin/streams", "/api/admin/streams"),
            ("/api\\admin\\streams", "/api/admin/streams"),
            ("//api/admin", "/api/admin"),
            ("/api/%2e/admin/", "/api/admin"),
            ("/api%2Fadmin%2fstreams", "/api/admin/streams"),
            ("/API/%41dmin/Streams/", "/api/admin/streams"),
            ("/api/x/../admin", "/api/x/../admin"),
            ("/api/admin/keys/%2e%2e%2f%2e%2e", "/api/admin/keys/../.."),
            ("/a/%25", "/a/%25"),
            ("/a/%252e", "/a/%252e"),
            ("/a/%", "/a/%25"),
            ("/a/%4", "/a/%254"),
            ("/a/%zz", "/a/%25zz"),
            ("/a/%ff", "/a/\u{fffd}"),
        ] {
            assert_eq!(normalize(raw), norm, "{raw}");
            assert_eq!(rewrite(raw), norm, "{raw}");
        }
        // The usual path is its own normal form, read without a copy.
        assert!(matches!(
            normalize("/v1/chat/completions"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(normalize("/v1/Chat"), Cow::Owned(_)));
        assert!(is_admin("/api/admin"));
        assert!(is_admin("/api/admin/keys/..%2f..%2fsessions"));
        assert!(!is_admin("/api/administrator"));
        assert!(!is_admin("/api/sessions/admin"));
    }
}

#[cfg(test)]
mod props {
    use axum::Router;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use axum::routing::any as any_method;
    use proptest::prelude::*;
    use tower::ServiceExt;

    use super::*;
    use crate::guard::rate::RouteClass;
    use crate::http::guards::classify;

    /// The admin routes' templates as the server declares them (src/http/ops.rs and
    /// src/http/auth.rs), beside non-admin routes with captures a spelling could land in.
    const ADMIN: [&str; 6] = [
        "/api/admin/streams",
        "/api/admin/drain",
        "/api/admin/usage",
        "/api/admin/cache/clear",
        "/api/admin/keys",
        "/api/admin/keys/{id}",
    ];
    const OTHER: [&str; 5] = [
        "/api/sessions/{id}",
        "/api/sessions/{id}/messages",
        "/api/tasks/{id}",
        "/api/agents/{name}",
        "/ui/{*rest}",
    ];

    fn router() -> Router {
        let mut r = Router::new();
        for t in ADMIN {
            r = r.route(t, any_method(|| async { "admin" }));
        }
        for t in OTHER {
            r = r.route(t, any_method(|| async { "other" }));
        }
        r.fallback(|| async { "none" })
    }

    /// What axum's router does with `path`: which kind of handler it reaches.
    fn routed(rt: &tokio::runtime::Runtime, r: &Router, path: &str) -> Option<String> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .body(Body::empty())
            .ok()?;
        rt.block_on(async {
            let resp = r.clone().oneshot(req).await.ok()?;
            let body = axum::body::to_bytes(resp.into_body(), 1024).await.ok()?;
            Some(String::from_utf8_lossy(&body).into_owned())
        })
    }

    /// One segment spelled any way a client or proxy might: case changed, characters
    /// percent-encoded, with `.` segments, repeated or backslashed separators around it.
    /// Mostly as the route has it, so that many cases reach an admin handler.
    fn spelled(seg: &'static str) -> impl Strategy<Value = String> {
        let other = (
            proptest::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), seg.len()),
            prop_oneof![
                Just("/"),
                Just("//"),
                Just("\\"),
                Just("/./"),
                Just("/%2e/"),
                Just("%2f"),
                Just("%5c")
            ],
        )
            .prop_map(move |(how, sep)| {
                let mut out = sep.to_owned();
                for (c, (upper, encode, upper_hex)) in seg.chars().zip(how) {
                    let c = if upper { c.to_ascii_uppercase() } else { c };
                    if encode {
                        let hex = format!("%{:02x}", c as u32);
                        out.push_str(&if upper_hex { hex.to_uppercase() } else { hex });
                    } else {
                        out.push(c);
                    }
                }
                out
            });
        prop_oneof![3 => Just(format!("/{seg}")), 1 => other]
    }

    /// Spellings of admin paths, and of other paths with an admin-looking tail.
    fn admin_spelling() -> impl Strategy<Value = String> {
        let tail = prop_oneof![
            Just(vec!["streams"]),
            Just(vec!["drain"]),
            Just(vec!["usage"]),
            Just(vec!["cache", "clear"]),
            Just(vec!["keys"]),
            Just(vec!["keys", ".."]),
            Just(vec!["keys", "..%2f..%2f..%2fsessions"]),
            Just(vec!["keys", "x"]),
            Just(vec![]),
        ];
        (
            spelled("api"),
            spelled("admin"),
            tail,
            prop_oneof![4 => Just(""), 1 => Just("/"), 1 => Just("//"), 1 => Just("/."), 1 => Just("\\")],
        )
            .prop_flat_map(|(api, admin, tail, end)| {
                let rest: Vec<_> = tail.into_iter().map(spelled).collect();
                (Just(api), Just(admin), rest, Just(end))
            })
            .prop_map(|(api, admin, rest, end)| format!("{api}{admin}{}{end}", rest.concat()))
    }

    /// Any path-ish text: separators, dots, escapes and letters of the admin path.
    fn any_path() -> impl Strategy<Value = String> {
        "[/\\\\.%2eEfF5cCaAdDmMiInNpP0-9a-z?#;]{0,40}"
    }

    /// The mirror routes as the server does: the generator above reaches admin handlers.
    #[test]
    fn the_mirror_router_reaches_admin_handlers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (path, want) in [
            ("/api/admin/streams", "admin"),
            ("/api/admin/keys/..%2f..%2fsessions", "admin"),
            ("/api/./admin/streams", "none"),
            ("/API/admin/streams", "none"),
            ("/api/sessions/%2e%2e%2fadmin%2fstreams", "other"),
        ] {
            assert_eq!(
                routed(&rt, &router(), path).as_deref(),
                Some(want),
                "{path}"
            );
        }
    }

    proptest! {
        /// Every spelling the router sends to an admin handler is admin to the gate and to
        /// the rate limits.
        #[test]
        fn what_routes_to_an_admin_handler_is_admin_to_both(path in admin_spelling()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let reached = routed(&rt, &router(), &path);
            if reached.as_deref() == Some("admin") {
                prop_assert!(is_admin(&path), "{}", path);
                for m in [Method::GET, Method::POST, Method::DELETE] {
                    prop_assert_eq!(classify(&m, &path), Some(RouteClass::Admin), "{}", path);
                }
            }
        }

        /// The gate and the rate limits agree on every path; normalising twice changes
        /// nothing; nothing panics.
        #[test]
        fn the_gate_and_the_rate_limits_agree(
            path in prop_oneof![any_path(), admin_spelling(), any::<String>()],
        ) {
            let norm = normalize(&path);
            prop_assert_eq!(&norm, &rewrite(&path));
            prop_assert_eq!(&normalize(&norm), &norm);
            prop_assert!(norm.starts_with('/'));
            let admin = is_admin(&path);
            for m in [Method::GET, Method::POST] {
                prop_assert_eq!(classify(&m, &path) == Some(RouteClass::Admin), admin, "{}", path);
            }
        }
    }
}
