//! The process lifecycle: serving → draining → stopping.
//!
//! On SIGTERM the instance drains: readiness fails at once and new generations are refused,
//! while running streams may finish until the drain window ends. Then `stop` fires and
//! every stream still running ends with an error event, so the process can exit.

use std::time::Instant;

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Lifecycle {
    /// Fired when draining starts; checked before accepting new work.
    drain: CancellationToken,
    /// Fired when the drain window is over; running streams end when it fires.
    stop: CancellationToken,
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

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
