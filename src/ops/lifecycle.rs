//! The process lifecycle: serving → draining → stopping.
//!
//! On SIGTERM the instance drains: readiness fails at once and new generations are refused,
//! while running streams may finish until the drain window ends. Then `stop` fires and
//! every stream still running ends with an error event, so the process can exit. Last,
//! `close` fires: WebSockets get their Close frame and the last connections close.

use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

#[derive(Debug)]
pub struct Lifecycle {
    /// Fired when draining starts; checked before accepting new work.
    drain: CancellationToken,
    /// Fired when the drain window is over; running streams end when it fires.
    stop: CancellationToken,
    /// Fired when the drain is over, however it ended: open WebSockets are closed.
    close: CancellationToken,
    /// Open WebSocket connections: the process waits for their closing handshake.
    websockets: TaskTracker,
    /// For `uptime_s` in health output.
    started: Instant,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self {
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
            close: CancellationToken::new(),
            websockets: TaskTracker::new(),
            started: Instant::now(),
        }
    }

    pub fn start_drain(&self) {
        if !self.drain.is_cancelled() {
            tracing::info!("draining: new work is refused, running streams may finish");
        }
        self.drain.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// A token fired when draining starts: background workers stop taking new work.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    pub async fn drained(&self) {
        self.drain.cancelled().await
    }

    pub fn stop(&self) {
        self.drain.cancel();
        self.stop.cancel();
    }

    /// A token running streams select on, to end cleanly when the drain window is over.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Ends the drain for connections: open WebSockets are closed with 1001.
    pub fn close_connections(&self) {
        self.close.cancel();
    }

    /// A token fired when the drain is over (see [`Self::close_connections`]).
    pub fn close_token(&self) -> CancellationToken {
        self.close.clone()
    }

    /// Held by a WebSocket connection until it has closed.
    pub fn websocket(&self) -> TaskTrackerToken {
        self.websockets.token()
    }

    /// Resolves once every WebSocket connection has closed.
    pub async fn websockets_closed(&self) {
        self.websockets.close();
        self.websockets.wait().await
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
