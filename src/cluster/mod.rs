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

    /// Takes the session's one slot for a running generation across instances (the rule
    /// one instance enforces in memory); `Err` names the generation running elsewhere.
    /// Without Redis reachable it allows: local streams must not depend on the bus.
    async fn claim(&self, session_id: &str, generation_id: &str) -> Result<(), String>;

    /// Gives the slot back, if this generation still holds it.
    async fn release(&self, session_id: &str, generation_id: &str);

    /// Follows the session's generations that run on other instances: when this returns,
    /// the one running now (if any) is in the hub, and later ones appear as they start,
    /// until the returned guard is dropped.
    async fn follow(&self, session_id: &str) -> Follow;

    /// A generation the local hub does not hold, from the shared replay log (a resume
    /// on another instance than the one running it).
    async fn fetch(&self, generation_id: &str) -> Option<Arc<Channel>>;

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

    async fn claim(&self, _session_id: &str, _generation_id: &str) -> Result<(), String> {
        Ok(())
    }

    async fn release(&self, _session_id: &str, _generation_id: &str) {}

    async fn follow(&self, _session_id: &str) -> Follow {
        Box::new(())
    }

    async fn fetch(&self, _generation_id: &str) -> Option<Arc<Channel>> {
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
