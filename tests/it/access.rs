#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

//! Who gets in: revoked keys on open WebSockets and ws-tokens (alone and across instances),
//! Host names on servers without keys (DNS rebinding), forged keys against the rate
//! limits, and requests with more than one `Authorization` header.

use crate::common;
use crate::common::need::redis_url;

use common::db::{self, Backend};
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice::config::{AuthMode, Config, RedisConfig, Secret};
use sluice_mock::MockConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use common::ws::{Ws, next_json, send};

async fn keyed_server() -> (sluice_mock::MockServer, TestServer) {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    let server = TestServer::start(cfg).await;
    (mock, server)
}

fn ws_url(server: &TestServer) -> String {
    format!("{}/ws", server.url.replacen("http", "ws", 1))
}

async fn open_ws(server: &TestServer, key: &str) -> Ws {
    let mut req = ws_url(server).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// Reads frames until the close frame; a revoked key's connection ends with 1008 and a
/// reason that says so.
async fn closed_as_revoked(ws: &mut Ws) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("not closed")
        {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Policy, "{f:?}");
                assert!(f.reason.contains("revoked"), "{f:?}");
                return;
            }
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["event"], "token", "the revoked key started a reply: {v}");
            }
            Some(Ok(_)) => continue,
            other => panic!("ended without a close frame: {other:?}"),
        }
    }
}

/// Reads a chat op's events until its final one.
async fn until_final(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        assert_ne!(v["op"], "error", "{v}");
        if matches!(v["event"].as_str(), Some("done" | "error" | "interrupted")) {
            return v;
        }
    }
}

async fn ws_token(base: &str, key: &str) -> String {
    let t: Value = client()
        .post(format!("{base}/api/ws-token"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    t["token"].as_str().unwrap().to_owned()
}

async fn ws_status_with_token(server: &TestServer, token: &str) -> u16 {
    let req = format!("{}?token={token}", ws_url(server))
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

async fn revoke_via_api(base: &str, admin: &str, name: &str) {
    let r = client()
        .delete(format!("{base}/api/admin/keys/{name}"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn a_key_revoked_by_the_admin_api_is_refused_on_its_open_websocket() {
    let (_mock, server) = keyed_server().await;
    let alice = api_key(&server, "alice", false).await;
    let admin = api_key(&server, "ops", true).await;
    let session = create_session(&server.url, Some(&alice)).await;
    let mut ws = open_ws(&server, &alice).await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": session, "content": "hi"}),
    )
    .await;
    assert_eq!(until_final(&mut ws).await["event"], "done");

    revoke_via_api(&server.url, &admin, "alice").await;
    let keys: Value = get_json_as(&format!("{}/api/admin/keys", server.url), &admin).await;
    let listed = keys["data"].as_array().unwrap();
    let alices = listed.iter().find(|k| k["name"] == "alice").unwrap();
    assert!(alices["revoked_at"].is_i64(), "{keys}");
    assert!(
        !keys.to_string().contains(&alice),
        "the list never holds a key"
    );
    // Not twice: nothing active is left under that name.
    let again = client()
        .delete(format!("{}/api/admin/keys/alice", server.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    send(
        &mut ws,
        json!({"op": "chat", "session_id": session, "content": "again"}),
    )
    .await;
    closed_as_revoked(&mut ws).await;
    // The revoked key started nothing: the session has the first exchange only.
    let messages: Value = get_json_as(
        &format!("{}/api/sessions/{session}/messages", server.url),
        &admin,
    )
    .await;
    assert!(
        messages["data"].as_array().is_none_or(|m| m.len() <= 2),
        "{messages}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_revoked_in_the_store_is_refused_on_subscribe_and_its_ws_tokens_with_it() {
    let (_mock, server) = keyed_server().await;
    let alice = api_key(&server, "alice", false).await;
    let session = create_session(&server.url, Some(&alice)).await;
    let token = ws_token(&server.url, &alice).await;
    assert_eq!(ws_status_with_token(&server, &token).await, 101);
    let mut ws = open_ws(&server, &alice).await;
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");

    // What `sluice keys revoke` does: straight to the store, no server told.
    assert_eq!(
        server
            .state
            .store
            .revoke_api_key("alice", sluice::store::now_millis())
            .await
            .unwrap(),
        1
    );
    assert_eq!(ws_status_with_token(&server, &token).await, 401);
    send(
        &mut ws,
        json!({"op": "subscribe", "topic": format!("session:{session}")}),
    )
    .await;
    closed_as_revoked(&mut ws).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_revoked_on_one_instance_is_refused_on_the_other() {
    crate::require!(Postgres, Redis);
    let dbase = db::fresh(Backend::Postgres).await;
    let prefix = format!("sluice-access-{}", uuid::Uuid::new_v4().simple());
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.store = dbase.config.clone();
    cfg.server.ws_token_secret = Some(Secret::new("a-secret-both-instances-share"));
    cfg.redis = Some(RedisConfig {
        url: Secret::new(redis_url()),
        prefix,
    });
    let a = TestServer::start(cfg.clone()).await;
    let b = TestServer::start(cfg).await;
    let alice = api_key(&a, "alice", false).await;
    let admin = api_key(&a, "ops", true).await;
    let session = create_session(&b.url, Some(&alice)).await;
    let mut ws = open_ws(&b, &alice).await;
    send(
        &mut ws,
        json!({"op": "chat", "session_id": session, "content": "hi"}),
    )
    .await;
    assert_eq!(until_final(&mut ws).await["event"], "done");
    let token = ws_token(&a.url, &alice).await;
    assert_eq!(ws_status_with_token(&b, &token).await, 101);

    revoke_via_api(&a.url, &admin, "alice").await;
    assert_eq!(ws_status_with_token(&b, &token).await, 401);
    send(
        &mut ws,
        json!({"op": "chat", "session_id": session, "content": "again"}),
    )
    .await;
    closed_as_revoked(&mut ws).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[test]
fn allowed_hosts_are_validated() {
    let mut cfg = Config::default();
    cfg.server.allowed_hosts = vec!["https://chat.example.com".into()];
    assert!(cfg.validate().is_err());
    cfg.server.allowed_hosts = vec!["chat.example.com:8080".into()];
    assert!(cfg.validate().is_err());
    cfg.server.allowed_hosts = vec!["chat.example.com".into(), "192.168.1.5".into()];
    assert!(cfg.validate().is_ok());
}

async fn rate_limited_server() -> (sluice_mock::MockServer, TestServer) {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.guards.rate_api_per_min = 1;
    cfg.guards.rate_burst = 5;
    let server = TestServer::start(cfg).await;
    (mock, server)
}

#[tokio::test]
async fn a_flood_of_forged_keys_is_limited_by_address_and_spares_real_keys() {
    let (_mock, server) = rate_limited_server().await;
    let alice = api_key(&server, "alice", false).await;
    let url = format!("{}/api/sessions", server.url);
    // Alice's key is in use from the address the flood comes from.
    let r = client().get(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut statuses = Vec::new();
    for i in 0..12 {
        let forged = if i % 2 == 0 {
            format!(
                "{}{}",
                sluice::store::cli::KEY_PREFIX,
                uuid::Uuid::new_v4().simple()
            )
        } else {
            format!("forged-{}", uuid::Uuid::new_v4().simple())
        };
        let r = client().get(&url).bearer_auth(forged).send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    // The address's burst of 5 failures, then refused before any lookup.
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    // The WebSocket upgrade counts the same failures.
    let mut req = ws_url(&server).into_client_request().unwrap();
    let forged = format!("Bearer {}forged", sluice::store::cli::KEY_PREFIX);
    req.headers_mut()
        .insert("authorization", forged.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429, got {other:?}"),
    }
    // Her key has a budget of its own, untouched by the failures.
    for _ in 0..4 {
        let r = client().get(&url).bearer_auth(&alice).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap()
            .status(),
        429,
        "the key's own budget is spent after its burst"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn two_authorization_headers_are_refused_over_http_and_websocket() {
    for limited in [false, true] {
        let (_mock, server) = if limited {
            rate_limited_server().await
        } else {
            keyed_server().await
        };
        let admin = api_key(&server, "ops", true).await;
        let alice = api_key(&server, "alice", false).await;
        for path in ["/api/admin/streams", "/api/sessions"] {
            for (first, second) in [(&admin, &alice), (&alice, &admin)] {
                let r = client()
                    .get(format!("{}{path}", server.url))
                    .header("authorization", format!("Bearer {first}"))
                    .header("authorization", format!("Bearer {second}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 400, "{path} limited={limited}");
                let body: Value = r.json().await.unwrap();
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("Authorization"),
                    "{body}"
                );
            }
        }
        let mut req = ws_url(&server).into_client_request().unwrap();
        req.headers_mut()
            .append("authorization", format!("Bearer {admin}").parse().unwrap());
        req.headers_mut()
            .append("authorization", format!("Bearer {alice}").parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400)
            }
            other => panic!("expected 400, got {other:?}"),
        }
        server.shutdown().await;
    }
}

/// Spellings of admin paths that the admin gate and the rate limits both read as admin:
/// dot segments, backslashes, repeated or trailing slashes, case, percent-encoding
/// (including an encoded `/` and `..%2f` inside the `{id}` of `/api/admin/keys/{id}`).
const ADMIN_SPELLINGS: &[&str] = &[
    "/api/admin/streams",
    "/api/./admin/streams",
    "/api/%2e/admin/streams",
    "/api\\admin\\streams",
    "/api%5cadmin%5cstreams",
    "//api/admin/streams",
    "/api//admin//streams",
    "/api/admin/streams/",
    "/api/admin/streams/.",
    "/API/Admin/Streams",
    "/api/%61dmin/streams",
    "/api/%41DMIN/streams",
    "/api%2Fadmin%2Fstreams",
    "/api%2fadmin/usage",
    "/api/admin/cache%2fclear",
    "/api/admin/./drain",
    "/api/admin/keys/..",
    "/api/admin/keys/%2e%2e",
    "/api/admin/keys/..%2f..%2fsessions",
    "/api/admin/keys/%2e%2e%2f%2e%2e%2f%2e%2e",
    "/api/admin",
    "/api/admin/",
];

/// Spellings whose `..` would climb out of `/api/admin` if resolved: the router matches
/// the raw path, where none of them is an admin route, so they are no admin path either.
const CLIMBING_SPELLINGS: &[&str] = &[
    "/api/x/../admin/streams",
    "/api/admin/../admin/streams",
    "/api/sessions/%2e%2e%2fadmin%2fstreams",
    "/api/sessions/..%2f..%2fapi%2fadmin%2fstreams",
];

/// Status code of a request sent byte for byte as given: an HTTP client would resolve the
/// dot segments and backslashes before sending.
async fn raw_status(server: &TestServer, method: &str, path: &str, key: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = server.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut resp))
        .await
        .expect("no answer")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer to {method} {path}: {resp}"))
}

/// No spelling of an admin path reaches an admin handler with a non-admin key: the gate
/// refuses it (403) or the router matches nothing (404), whatever the method.
#[tokio::test]
async fn no_spelling_of_an_admin_path_reaches_an_admin_handler_without_an_admin_key() {
    let (_mock, server) = keyed_server().await;
    let admin = api_key(&server, "ops", true).await;
    let alice = api_key(&server, "alice", false).await;
    // The harness reaches the handler with an admin key.
    assert_eq!(
        raw_status(&server, "GET", "/api/admin/streams", &admin).await,
        200
    );
    for path in ADMIN_SPELLINGS {
        for method in ["GET", "POST", "DELETE"] {
            let status = raw_status(&server, method, path, &alice).await;
            assert_eq!(status, 403, "{method} {path}");
        }
    }
    for path in CLIMBING_SPELLINGS {
        for method in ["GET", "POST", "DELETE"] {
            let status = raw_status(&server, method, path, &alice).await;
            // 405: a session route that takes other methods, never an admin one.
            assert!(
                [403, 404, 405].contains(&status),
                "{method} {path}: {status}"
            );
        }
    }
    server.shutdown().await;
}

/// The rate limits read every admin spelling as admin, as the gate does: once a key has
/// spent its admin budget, each of them is refused with 429.
#[tokio::test]
async fn every_spelling_of_an_admin_path_counts_against_the_admin_rate_limit() {
    let mock = mock(MockConfig::default()).await;
    let mut cfg = config_for(&mock);
    cfg.chat.auth = AuthMode::Required;
    cfg.guards.rate_admin_per_min = 1;
    cfg.guards.rate_burst = 1;
    let server = TestServer::start(cfg).await;
    let alice = api_key(&server, "alice", false).await;
    assert_eq!(
        raw_status(&server, "GET", "/api/admin/streams", &alice).await,
        403
    );
    for path in ADMIN_SPELLINGS {
        let status = raw_status(&server, "GET", path, &alice).await;
        assert_eq!(status, 429, "{path} is not limited as admin");
    }
    // Other routes are not in the admin budget.
    assert_eq!(
        raw_status(&server, "GET", "/api/sessions", &alice).await,
        200
    );
    server.shutdown().await;
}
