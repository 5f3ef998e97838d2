//! The in-process tier: the server's router driven with `tower::ServiceExt::oneshot`, no
//! socket, for tests of one request and its whole answer. Its client mirrors the parts of
//! `reqwest` the socket tests use, so a test reads the same in either tier.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::Body;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice::config::Config;
use sluice_mock::{MockConfig, MockServer};
use tower::ServiceExt;

/// Where requests appear to come from unless a test says otherwise: loopback, as a local
/// client's would.
pub const PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40_000);

/// The server's state and router; `url` only names the host its requests carry.
pub struct App {
    pub url: String,
    pub state: sluice::state::AppState,
    router: axum::Router,
}

impl App {
    pub async fn start(config: Config) -> Self {
        let state = sluice::state::AppState::new(config)
            .await
            .expect("valid config");
        Self::from_state(state)
    }

    /// An app over a state a test has put together itself.
    pub fn from_state(state: sluice::state::AppState) -> Self {
        let router = sluice::server::router(state.clone());
        Self {
            url: "http://localhost".to_owned(),
            state,
            router,
        }
    }

    pub fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.url)
    }

    /// The JSON body of a GET.
    pub async fn get_json(&self, url: &str) -> serde_json::Value {
        self.client()
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `POST url` with a JSON body.
    pub async fn post(&self, url: &str, body: &serde_json::Value) -> Response {
        self.client().post(url).json(body).send().await.unwrap()
    }

    /// `POST url` with a JSON body, its answer read as a chat stream.
    pub async fn post_stream(&self, url: &str, body: &serde_json::Value) -> super::StreamResult {
        self.post(url, body).await.stream()
    }

    pub fn client(&self) -> Client {
        Client {
            router: self.router.clone(),
        }
    }

    /// What the socket tier's `shutdown` does once its connections are gone: background
    /// work stops, the bus and the upstream clients close.
    pub async fn shutdown(self) {
        self.state.lifecycle.start_drain();
        self.state.lifecycle.stop();
        self.state.bus.shutdown().await;
        self.state.upstreams.shutdown().await;
    }
}

/// The mock upstream and an app in front of it.
pub async fn mock_and_app() -> (MockServer, App) {
    let m = super::mock(MockConfig::default()).await;
    let a = App::start(super::config_for(&m)).await;
    (m, a)
}

/// A key of `user` in the app's store, as [`super::api_key`] makes one.
pub async fn api_key(app: &App, user: &str, admin: bool) -> String {
    super::store_key(&app.state, user, admin).await
}

#[derive(Clone)]
pub struct Client {
    router: axum::Router,
}

impl Client {
    pub fn request(&self, method: Method, url: impl AsRef<str>) -> RequestBuilder {
        let url = url.as_ref();
        // `http://host[:port]/path?query`: the authority becomes Host, the rest the URI.
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let (host, path) = rest
            .find('/')
            .map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_str(host).expect("a valid host"));
        RequestBuilder {
            router: self.router.clone(),
            method,
            path: path.to_owned(),
            headers,
            body: Bytes::new(),
            peer: PEER,
        }
    }
    pub fn get(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::GET, url)
    }
    pub fn post(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::POST, url)
    }
    pub fn put(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::PUT, url)
    }
    pub fn patch(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::PATCH, url)
    }
    pub fn delete(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::DELETE, url)
    }
}

pub struct RequestBuilder {
    router: axum::Router,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    peer: SocketAddr,
}

impl RequestBuilder {
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        HeaderValue: TryFrom<V>,
    {
        let (Ok(k), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) else {
            panic!("a valid header");
        };
        // Like reqwest: a header set twice is sent twice; Host replaces the URL's.
        if k == HOST {
            self.headers.insert(k, v);
        } else {
            self.headers.append(k, v);
        }
        self
    }
    pub fn bearer_auth(self, token: impl std::fmt::Display) -> Self {
        self.header(AUTHORIZATION, format!("Bearer {token}"))
    }
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.body = serde_json::to_vec(body).expect("serialisable").into();
        if !self.headers.contains_key(CONTENT_TYPE) {
            self.headers
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        self
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
    /// The TCP peer the request seems to come from.
    pub fn peer(mut self, peer: SocketAddr) -> Self {
        self.peer = peer;
        self
    }
    /// The whole answer; never an error (the `Result` keeps reqwest's shape).
    pub async fn send(self) -> Result<Response, Infallible> {
        let mut req = Request::builder()
            .method(self.method)
            .uri(&self.path)
            .body(Body::from(self.body))
            .expect("a valid request");
        *req.headers_mut() = self.headers;
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo::<SocketAddr>(self.peer));
        let resp = self.router.oneshot(req).await?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(super::WAIT, body.collect())
            .await
            .expect("the whole body within the wait")
            .expect("a body without errors")
            .to_bytes();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }
    pub async fn json<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }
    pub async fn text(self) -> Result<String, std::string::FromUtf8Error> {
        String::from_utf8(self.body.to_vec())
    }
    pub async fn bytes(self) -> Result<Bytes, Infallible> {
        Ok(self.body)
    }
    /// The body as an SSE chat stream, read as [`super::read_stream`] reads one.
    pub fn stream(&self) -> super::StreamResult {
        let mut out = super::StreamResult::default();
        let text = std::str::from_utf8(&self.body).expect("UTF-8 events");
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data == "[DONE]" {
                assert!(!out.done, "[DONE] twice");
                out.done = true;
                continue;
            }
            assert!(!out.done, "data after [DONE]");
            super::absorb(&mut out, serde_json::from_str(data).expect("JSON events"));
        }
        out
    }
}
