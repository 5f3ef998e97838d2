//! One builder for a test's world: the mock upstream, a store, the server and its keys.
//!
//! `TestEnv::builder().mock(MockConfig { .. }).backend(Backend::Postgres).keys_required()
//! .config(|c| ..).admin_key().start().await`

use sluice::config::{AuthMode, Config};
use sluice_mock::{MockConfig, MockServer};

use super::db::{Backend, TestDb};
use super::{TestServer, api_key, config_for, mock};

pub struct TestEnv {
    pub mock: MockServer,
    pub server: TestServer,
    /// The store, when a backend was asked for; dropped with the env.
    pub db: Option<TestDb>,
    /// The admin's key (user `root`), if asked for.
    pub admin: Option<String>,
    /// The key of user `alice`, if asked for.
    pub user: Option<String>,
}

impl TestEnv {
    pub fn builder<'a>() -> TestEnvBuilder<'a> {
        TestEnvBuilder::default()
    }
}

type Tweak<'a> = Box<dyn FnOnce(&mut Config) + Send + 'a>;

#[derive(Default)]
pub struct TestEnvBuilder<'a> {
    mock: MockConfig,
    backend: Option<Backend>,
    keys_required: bool,
    tweaks: Vec<Tweak<'a>>,
    admin: bool,
    user: bool,
}

impl<'a> TestEnvBuilder<'a> {
    pub fn mock(mut self, mock: MockConfig) -> Self {
        self.mock = mock;
        self
    }
    /// A fresh store of this backend instead of the default SQLite in a temp dir.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }
    /// Keys required, and the mock's model the default, as a server people sign in to runs.
    pub fn keys_required(mut self) -> Self {
        self.keys_required = true;
        self
    }
    /// Changes to the config, applied last, in order.
    pub fn config(mut self, tweak: impl FnOnce(&mut Config) + Send + 'a) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }
    pub fn admin_key(mut self) -> Self {
        self.admin = true;
        self
    }
    pub fn user_key(mut self) -> Self {
        self.user = true;
        self
    }

    /// The mock, the store and the config the builder describes, for a test that serves
    /// them itself (the in-process tier); [`start`](Self::start) serves them on a socket.
    pub async fn prepare(self) -> Prepared {
        let mock = mock(self.mock).await;
        let mut config = config_for(&mock);
        let db = match self.backend {
            Some(b) => Some(super::db::fresh(b).await),
            None => None,
        };
        if let Some(db) = &db {
            config.store = db.config.clone();
        }
        if self.keys_required {
            config.chat.auth = AuthMode::Required;
            config.chat.default_model = "mock-model".into();
        }
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        Prepared {
            mock,
            db,
            config,
            admin: self.admin,
            user: self.user,
        }
    }

    pub async fn start(self) -> TestEnv {
        let p = self.prepare().await;
        let server = TestServer::start(p.config).await;
        let admin = match p.admin {
            true => Some(api_key(&server, "root", true).await),
            false => None,
        };
        let user = match p.user {
            true => Some(api_key(&server, "alice", false).await),
            false => None,
        };
        TestEnv {
            mock: p.mock,
            server,
            db: p.db,
            admin,
            user,
        }
    }
}

/// What [`TestEnvBuilder::prepare`] sets up; `admin` and `user` say which keys were asked for.
pub struct Prepared {
    pub mock: MockServer,
    pub db: Option<TestDb>,
    pub config: Config,
    pub admin: bool,
    pub user: bool,
}
