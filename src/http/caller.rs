//! Who is calling: one middleware reads a request's path and bearer token once, resolves
//! the caller at most once (one SHA-256, one key lookup) and hands it on, in the request's
//! extensions, to the rate limits, the quotas, the admin gate and the `Principal` extractor.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{auth, guards, path};
use crate::error::ApiError;
use crate::guard::rate::{Client, RouteClass};
use crate::state::AppState;

/// The middleware. A request that no limit and no gate concerns passes untouched (its
/// handler's `Principal` extractor looks the key up, if it needs one). Otherwise, in order:
/// authentication, with failures counted per address; the rate limit of the route class;
/// for chat requests with a key, the cluster-wide quota; for every spelling of an admin
/// path — whatever its case, slashes, encoding or method, before routing decides anything —
/// an admin key.
pub async fn resolve(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(class) = guards::classify_normal(req.method(), &path::normalize(req.uri().path()))
    else {
        return next.run(req).await;
    };
    let admin = class == RouteClass::Admin;
    let quota = class == RouteClass::Chat && st.guards.quota.is_some();
    let limited = quota || st.guards.rate.is_limited(class);
    if !limited && !admin {
        return next.run(req).await;
    }
    let who = if limited {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let address = st.guards.rate.address(req.headers(), peer);
        let who = match guards::authenticate(&st, class, req.headers(), &address).await {
            Ok(who) => who,
            Err(e) => return e.into_response(),
        };
        let client = who.key_id.clone().map_or(address, Client::Key);
        if let Err(e) = guards::admit(&st, class, &client, who.key_id.as_deref()).await {
            return e.into_response();
        }
        who
    } else {
        match auth::authenticate(&st, req.headers()).await {
            Ok(who) => who,
            Err(e) => return e.into_response(),
        }
    };
    if admin && !who.is_admin {
        return ApiError::Forbidden("this needs an admin key".into()).into_response();
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use axum::routing::any;
    use tower::ServiceExt;

    use super::*;
    use crate::config::{AuthMode, Config};
    use crate::http::auth::Principal;
    use crate::store::{ApiKey, KeyStore, Millis, Store, StoreError, User};

    /// The store's keys, counting lookups by hash.
    struct Counting {
        inner: Arc<dyn Store>,
        finds: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl KeyStore for Counting {
        async fn ensure_user(&self, user: &User) -> Result<User, StoreError> {
            self.inner.ensure_user(user).await
        }
        async fn create_api_key(&self, key: &ApiKey, hash: &[u8; 32]) -> Result<(), StoreError> {
            self.inner.create_api_key(key, hash).await
        }
        async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
            self.inner.list_api_keys().await
        }
        async fn revoke_api_key(&self, id_or_name: &str, now: Millis) -> Result<u64, StoreError> {
            self.inner.revoke_api_key(id_or_name, now).await
        }
        async fn find_api_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKey>, StoreError> {
            self.finds.fetch_add(1, Ordering::SeqCst);
            self.inner.find_api_key(hash).await
        }
        async fn find_api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
            self.inner.find_api_key_by_id(id).await
        }
    }

    /// A keyed server's state (rate limits on or off), its counted keys, and a user's and an
    /// admin's key.
    async fn keyed(rate_limits: bool) -> (AppState, Arc<Counting>, String, String) {
        let mut cfg = Config::default();
        cfg.store.data_dir = tempfile::tempdir().unwrap().keep();
        cfg.chat.auth = AuthMode::Required;
        if !rate_limits {
            cfg.guards.rate_chat_per_min = 0;
            cfg.guards.rate_api_per_min = 0;
            cfg.guards.rate_admin_per_min = 0;
        }
        let mut st = AppState::new(cfg).await.unwrap();
        let store = st.store.clone();
        let user = crate::store::cli::create_key(store.as_ref(), "alice", false)
            .await
            .unwrap();
        let admin = crate::store::cli::create_key(store.as_ref(), "ops", true)
            .await
            .unwrap();
        let counting = Arc::new(Counting {
            inner: store,
            finds: AtomicUsize::new(0),
        });
        st.keys = counting.clone();
        (st, counting, user.secret, admin.secret)
    }

    /// Every route answers with its caller, behind the middleware.
    fn app(st: &AppState) -> Router {
        let who = |p: Principal| async move { p.user_id };
        Router::new()
            .route("/v1/models", any(who))
            .route("/v1/chat/completions", any(who))
            .route("/v1/messages", any(who))
            .route("/api/admin/keys", any(who))
            .layer(axum::middleware::from_fn_with_state(st.clone(), resolve))
            .with_state(st.clone())
    }

    async fn call(app: &Router, method: Method, path: &str, key: &str) -> StatusCode {
        call_with(app, method, path, "authorization", &format!("Bearer {key}")).await
    }

    async fn call_with(
        app: &Router,
        method: Method,
        path: &str,
        header: &str,
        value: &str,
    ) -> StatusCode {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header(header, value)
            .body(Body::empty())
            .unwrap();
        app.clone().oneshot(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn each_request_looks_its_key_up_once() {
        for rate_limits in [true, false] {
            let (st, keys, user, admin) = keyed(rate_limits).await;
            let app = app(&st);
            let cases = [
                (Method::GET, "/v1/models", &user, StatusCode::OK),
                (Method::POST, "/v1/chat/completions", &user, StatusCode::OK),
                (Method::GET, "/api/admin/keys", &admin, StatusCode::OK),
                // Gated like an admin path, then reaches no route.
                (
                    Method::GET,
                    "/API//admin/keys",
                    &admin,
                    StatusCode::NOT_FOUND,
                ),
                (Method::GET, "/api/admin/keys", &user, StatusCode::FORBIDDEN),
                (
                    Method::GET,
                    "/v1/models",
                    &"sk-sluice-nope".to_owned(),
                    StatusCode::UNAUTHORIZED,
                ),
            ];
            for (method, path, key, status) in cases {
                let before = keys.finds.load(Ordering::SeqCst);
                let got = call(&app, method.clone(), path, key).await;
                let after = keys.finds.load(Ordering::SeqCst);
                let case = format!("{method} {path} (rate limits {rate_limits})");
                assert_eq!(got, status, "{case}");
                assert_eq!(after - before, 1, "{case}: key lookups");
            }
            // The Anthropic SDKs' `x-api-key` is the same key, looked up once too.
            for (key, status) in [
                (&user, StatusCode::OK),
                (&"sk-sluice-nope".to_owned(), StatusCode::UNAUTHORIZED),
            ] {
                let before = keys.finds.load(Ordering::SeqCst);
                let got = call_with(&app, Method::POST, "/v1/messages", "x-api-key", key).await;
                assert_eq!(got, status, "x-api-key (rate limits {rate_limits})");
                assert_eq!(keys.finds.load(Ordering::SeqCst) - before, 1);
            }
        }
    }
}
