//! `Authorization: Bearer <key>` → the caller. Keys are looked up by their SHA-256, so the
//! secret itself is never stored nor compared byte by byte.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use crate::app::AppState;
use crate::chat::service::Caller;
use crate::error::ApiError;
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

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `token` has the shape of a key `sluice keys create` makes.
fn is_sluice_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

fn local(user_id: &str) -> Principal {
    Principal {
        user_id: user_id.to_owned(),
        key_id: None,
        is_admin: true,
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        // SDKs must send some key: where keys are not required, a placeholder that is not a
        // sluice key stands for the local user. A sluice key is always checked, so a typo in
        // a real key is still noticed.
        if let Some(token) = bearer(parts) {
            if let Some(user_id) = st.local_user.as_ref().filter(|_| !is_sluice_key(token)) {
                return Ok(local(user_id));
            }
            return match st.store.find_api_key(&hash_key(token)).await {
                Ok(Some(key)) => {
                    // The key's id (never the key) tags the request's log lines.
                    tracing::Span::current().record("key_id", key.id.as_str());
                    Ok(Principal {
                        user_id: key.user_id,
                        key_id: Some(key.id),
                        is_admin: key.is_admin,
                    })
                }
                Ok(None) => Err(ApiError::Unauthorized("invalid or revoked API key".into())),
                Err(e) => Err(ApiError::Unavailable {
                    message: format!("cannot check the API key: {e}"),
                    code: "store_unavailable",
                    retry_after: 1,
                }),
            };
        }
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Err(ApiError::Unauthorized(
                "malformed Authorization header: expected `Bearer <key>`".into(),
            ));
        }
        match &st.local_user {
            Some(user_id) => Ok(local(user_id)),
            None => Err(ApiError::Unauthorized(
                "missing API key: send `Authorization: Bearer <key>`".into(),
            )),
        }
    }
}

/// How long a WebSocket token stays valid: long enough to open a socket, short enough that
/// a revoked key cannot keep opening them.
pub const WS_TOKEN_TTL_MS: i64 = 60_000;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    use hmac::Mac;
    // HMAC accepts keys of any length.
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
