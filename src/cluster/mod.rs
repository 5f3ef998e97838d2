//! The bus between instances: a generation started on one instance is
//! watched, live and from any `Last-Event-ID`, on every other.
//!
//! The hub stays the only thing subscribers read. The bus moves events between hubs: the
//! instance running a generation *exports* its channel, every instance with watchers of the
//! session keeps a *remote copy* of it (a hub channel fed by the bus, same sequence numbers,
//! same encoded bytes), and a generation whose instance died is ended as `interrupted` by
//! whichever instance notices first.
//!
//! Embedded (no Redis) the bus is [`LocalBus`]: one instance, nothing to carry.

pub mod redis;

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::hub::Channel;

/// The bus's connection state, for readiness.
#[derive(Debug, Clone, Serialize)]
pub struct BusStatus {
    pub backend: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A generation running somewhere in the cluster, as the bus knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    pub generation_id: String,
    pub session_id: String,
    pub owner: String,
    /// The instance running it.
    pub instance: String,
    /// When it started (unix ms), when known.
    pub started_at: Option<u64>,
}

/// Keeps this instance following a session's remote generations while it lives.
pub type Follow = Box<dyn Any + Send + Sync>;

#[async_trait]
pub trait Bus: Send + Sync {
    fn backend(&self) -> &'static str;

    /// Whether other instances exist to share streams with: clients of a draining
    /// instance are then told to reconnect, to land on another one.
    fn is_shared(&self) -> bool;

    /// The work of carrying a channel started here to other instances until its final
    /// event has left. The caller runs it, in the tracker it waits for at shutdown.
    fn export(&self, channel: Arc<Channel>) -> BoxFuture<'static, ()>;

    /// Follows the session's generations that run on other instances: when this returns,
    /// the one running now (if any) is in the hub, and later ones appear as they start,
    /// until the returned guard is dropped.
    async fn follow(&self, session_id: &str) -> Follow;

    /// A generation the local hub does not hold, from the shared replay log (a resume
    /// on another instance than the one running it).
    async fn fetch(&self, generation_id: &str) -> Option<Arc<Channel>>;

    /// The kind of the last event in a generation's shared replay log, without copying the
    /// generation here; `None` when there is no such log (or no bus).
    async fn last_kind(&self, generation_id: &str) -> Option<crate::hub::EventKind>;

    /// The generations running on every instance; `None` when only this instance's are
    /// known (no bus, or Redis unreachable).
    async fn running(&self) -> Option<Vec<Running>>;

    fn status(&self) -> BusStatus;

    /// Stops the background work (subscription, leases). Exports end on their own.
    async fn shutdown(&self);
}

/// One instance, nothing to share.
#[derive(Debug, Default)]
pub struct LocalBus;

#[async_trait]
impl Bus for LocalBus {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn export(&self, _channel: Arc<Channel>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    async fn follow(&self, _session_id: &str) -> Follow {
        Box::new(())
    }

    async fn fetch(&self, _generation_id: &str) -> Option<Arc<Channel>> {
        None
    }

    async fn last_kind(&self, _generation_id: &str) -> Option<crate::hub::EventKind> {
        None
    }

    async fn running(&self) -> Option<Vec<Running>> {
        None
    }

    fn status(&self) -> BusStatus {
        BusStatus {
            backend: "local",
            ok: true,
            error: None,
        }
    }

    async fn shutdown(&self) {}
}
