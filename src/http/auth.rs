//! `Authorization: Bearer <key>` → the caller. Keys are looked up by their SHA-256, so the
//! secret itself is never stored nor compared byte by byte.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::json;

use crate::chat::service::Caller;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::cli::{KEY_PREFIX, hash_key};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub key_id: Option<String>,
    pub is_admin: bool,
}

impl Principal {
    pub fn caller(&self) -> Caller {
        Caller {
            user_id: self.user_id.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

/// The bearer token of a request: `None` without an `Authorization` header. More than one
/// header is refused (400): which one counts would differ between sluice and the proxies
/// in front of it, so an admin key could ride along with a user's. The one parser of the
/// header, for the rate limits and the key check alike. Without `Authorization`, an
/// `x-api-key` header (how the Anthropic SDKs send their key) is the token.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return api_key(headers);
    };
    if values.next().is_some() {
        return Err(ApiError::BadHeader(
            "more than one Authorization header: send exactly one `Authorization: Bearer <key>`"
                .into(),
        ));
    }
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .map(Some)
        .ok_or_else(|| {
            ApiError::Unauthorized("malformed Authorization header: expected `Bearer <key>`".into())
        })
}

/// The `x-api-key` header's key, held to the same one-header rule as `Authorization`.
fn api_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all("x-api-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadHeader(
            "more than one x-api-key header: send exactly one".into(),
        ));
    }
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.contains(' '))
        .map(Some)
        .ok_or_else(|| {
            ApiError::Unauthorized("malformed x-api-key header: expected the key".into())
        })
}

/// Whether `token` has the shape of a key `sluice keys create` makes.
fn is_sluice_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

/// Whether the request would act as the local user without any key being looked up: keys
/// not required, and no token or a placeholder that is not a sluice key.
pub fn is_local(st: &AppState, token: Option<&str>) -> bool {
    st.local_user.is_some() && token.is_none_or(|t| !is_sluice_key(t))
}

/// A request's bearer token, read once, with the SHA-256 its key lookup needs computed once
/// for the failure budget, the lookup and the known-keys set alike.
pub struct Bearer<'a> {
    pub token: Option<&'a str>,
    /// `None` when no key is looked up: the local user, or no token.
    pub hash: Option<[u8; 32]>,
    /// Acts as the local user (see [`is_local`]).
    pub local: bool,
}

impl<'a> Bearer<'a> {
    pub fn read(st: &AppState, headers: &'a HeaderMap) -> Result<Self, ApiError> {
        let token = bearer(headers)?;
        let local = is_local(st, token);
        let hash = token.filter(|_| !local).map(hash_key);
        Ok(Self { token, hash, local })
    }
}

fn local(user_id: &str) -> Principal {
    Principal {
        user_id: user_id.to_owned(),
        key_id: None,
        is_admin: true,
    }
}

fn store_unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable {
        message: format!("cannot check the API key: {e}"),
        code: "store_unavailable",
        retry_after: 1,
    }
}

/// The caller a request's headers name, its key looked up in the store.
pub async fn authenticate(st: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    resolve(st, &Bearer::read(st, headers)?).await
}

/// The caller `bearer` names: the local user, or its key's owner after one lookup.
pub async fn resolve(st: &AppState, bearer: &Bearer<'_>) -> Result<Principal, ApiError> {
    // SDKs must send some key: where keys are not required, a placeholder that is not a
    // sluice key stands for the local user. A sluice key is always checked, so a typo in
    // a real key is still noticed.
    if let Some(user_id) = st.local_user.as_ref().filter(|_| bearer.local) {
        return Ok(local(user_id));
    }
    let Some(hash) = &bearer.hash else {
        return Err(ApiError::Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`".into(),
        ));
    };
    match st.keys.find_api_key(hash).await {
        Ok(Some(key)) => {
            // The key's id (never the key) tags the request's log lines.
            tracing::Span::current().record("key_id", key.id.as_str());
            Ok(Principal {
                user_id: key.user_id,
                key_id: Some(key.id),
                is_admin: key.is_admin,
            })
        }
        Ok(None) => Err(revoked()),
        Err(e) => Err(store_unavailable(e)),
    }
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::from(crate::chat::service::ChatError::Store(e))
}

fn revoked() -> ApiError {
    ApiError::Unauthorized("invalid or revoked API key".into())
}

/// Whether the key a connection was opened with is still active; asked of the store each
/// time, so a revocation by any instance or by `sluice keys revoke` counts at once.
pub async fn check_still_active(st: &AppState, key_id: Option<&str>) -> Result<(), ApiError> {
    let Some(id) = key_id else {
        return Ok(());
    };
    match st.keys.find_api_key_by_id(id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::Unauthorized(
            "this connection's API key has been revoked".into(),
        )),
        Err(e) => Err(store_unavailable(e)),
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        // Resolved by `caller::resolve` when a limit or the admin gate needed it; taken,
        // not cloned: a handler extracts its caller once.
        if let Some(p) = parts.extensions.remove::<Principal>() {
            return Ok(p);
        }
        authenticate(st, &parts.headers).await
    }
}

/// Keys, for admins: listed (never the keys themselves) and revoked. A revocation counts at
/// once on every instance: each request, ws-token and WebSocket op looks its key up.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/keys", get(list_keys))
        .route("/api/admin/keys/{id_or_name}", delete(revoke_key))
}

async fn list_keys(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = st.store.list_api_keys().await.map_err(store_error)?;
    Ok(Json(json!({ "data": keys })))
}

async fn revoke_key(
    State(st): State<AppState>,
    Path(id_or_name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match st
        .store
        .revoke_api_key(&id_or_name, crate::store::now_millis())
        .await
        .map_err(store_error)?
    {
        0 => Err(ApiError::NotFound(format!(
            "no active key with the id or name '{id_or_name}'"
        ))),
        n => Ok(Json(json!({ "revoked": n }))),
    }
}

/// How long a WebSocket token stays valid: long enough to open a socket, short enough that
/// a revoked key cannot keep opening them.
pub const WS_TOKEN_TTL_MS: i64 = 60_000;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

// HMAC accepts keys of any length (longer ones are hashed), so the error cannot occur.
#[allow(clippy::unreachable)]
fn mac(secret: &[u8]) -> HmacSha256 {
    use hmac::Mac;
    <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// A signed, short-lived token standing for `p`, for clients (browsers) that cannot set
/// an `Authorization` header on a WebSocket. Signed, not stored, so any instance sharing
/// the secret accepts it.
pub fn issue_ws_token(p: &Principal, secret: &[u8], now_ms: i64) -> String {
    use hmac::Mac;
    let payload = format!(
        "{}|{}|{}|{}",
        now_ms + WS_TOKEN_TTL_MS,
        p.user_id,
        p.key_id.as_deref().unwrap_or(""),
        u8::from(p.is_admin)
    );
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    format!(
        "{}.{}",
        hex::encode(payload),
        hex::encode(m.finalize().into_bytes())
    )
}

pub fn verify_ws_token(token: &str, secret: &[u8], now_ms: i64) -> Option<Principal> {
    use hmac::Mac;
    let (payload, sig) = token.split_once('.')?;
    let payload = hex::decode(payload).ok()?;
    let mut m = mac(secret);
    m.update(&payload);
    m.verify_slice(&hex::decode(sig).ok()?).ok()?;
    let payload = String::from_utf8(payload).ok()?;
    let mut parts = payload.split('|');
    let exp: i64 = parts.next()?.parse().ok()?;
    if now_ms > exp {
        return None;
    }
    let user_id = parts.next()?.to_owned();
    let key_id = parts.next().filter(|k| !k.is_empty()).map(str::to_owned);
    let is_admin = parts.next()? == "1";
    Some(Principal {
        user_id,
        key_id,
        is_admin,
    })
}

/// The caller a WebSocket token stands for, if its key still exists: a token outlives
/// neither its key nor, for the local user's, a server where keys became required.
pub async fn ws_token_principal(st: &AppState, token: &str) -> Result<Principal, ApiError> {
    let p = verify_ws_token(token, &st.ws_secret, crate::store::now_millis())
        .ok_or_else(|| ApiError::Unauthorized("invalid or expired WebSocket token".into()))?;
    let Some(id) = p.key_id.as_deref() else {
        return match &st.local_user {
            Some(user_id) => Ok(local(user_id)),
            None => Err(ApiError::Unauthorized(
                "this WebSocket token has no key and keys are required".into(),
            )),
        };
    };
    match st.keys.find_api_key_by_id(id).await {
        Ok(Some(key)) => Ok(Principal {
            user_id: key.user_id,
            key_id: Some(key.id),
            is_admin: key.is_admin,
        }),
        Ok(None) => Err(ApiError::Unauthorized(
            "the API key this WebSocket token was issued for has been revoked".into(),
        )),
        Err(e) => Err(store_unavailable(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_tokens_verify_expire_and_resist_tampering() {
        let p = Principal {
            user_id: "u1".into(),
            key_id: Some("k1".into()),
            is_admin: false,
        };
        let t = issue_ws_token(&p, b"secret-secret-secret", 1_000);
        let back = verify_ws_token(&t, b"secret-secret-secret", 2_000).unwrap();
        assert_eq!(back.user_id, "u1");
        assert_eq!(back.key_id.as_deref(), Some("k1"));
        assert!(!back.is_admin);
        assert!(verify_ws_token(&t, b"another-secret-xxxx", 2_000).is_none());
        assert!(
            verify_ws_token(&t, b"secret-secret-secret", 1_000 + WS_TOKEN_TTL_MS + 1).is_none()
        );
        let (payload, sig) = t.split_once('.').unwrap();
        let forged = hex::encode(
            String::from_utf8(hex::decode(payload).unwrap())
                .unwrap()
                .replace("|0", "|1"),
        );
        assert!(
            verify_ws_token(&format!("{forged}.{sig}"), b"secret-secret-secret", 2_000).is_none()
        );
        assert!(verify_ws_token("garbage", b"secret-secret-secret", 2_000).is_none());
    }
}
