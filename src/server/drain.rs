//! Serving, and the drain at shutdown: the listener closes, running streams get the drain
//! window, then what still runs is stopped and WebSockets are closed.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

use super::accept::accept_until;
use crate::state::AppState;

/// How long streams get to write their final event after the drain window, and
/// WebSockets to close, before the process exits regardless.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The part of [`STOP_GRACE`] kept for WebSockets to send their Close and hear the answer.
const WS_CLOSE_GRACE: Duration = Duration::from_millis(1_500);

/// Serves until `shutdown` resolves, then drains: the listener closes, running streams get
/// the drain window to finish, and whatever still runs after it ends with an error event;
/// last, open WebSockets are closed with 1001.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let bus = state.bus.clone();
    let upstreams = state.upstreams.clone();
    let served = serve_until_drained(state, listener, shutdown).await;
    bus.shutdown().await;
    upstreams.shutdown().await;
    served
}

async fn serve_until_drained(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let lifecycle = state.lifecycle.clone();
    let drain = state.config.server.drain;
    let generations = state.chat.tasks().clone();
    let workers = state.tasks.workers().clone();
    // Quota counts of replies that ended last, sent in the background.
    let flushes = state
        .guards
        .quota
        .as_ref()
        .map(|q| q.tasks().clone())
        .unwrap_or_default();
    let signal = {
        let lifecycle = lifecycle.clone();
        async move {
            shutdown.await;
            lifecycle.start_drain();
        }
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    accept_until(state, listener, signal, &graceful).await;
    let connections = graceful.shutdown();
    tokio::pin!(connections);
    let mut connections_done = false;

    // Connections and generations whose clients left both get the drain window.
    generations.close();
    workers.close();
    flushes.close();
    let running = async {
        (&mut connections).await;
        connections_done = true;
        generations.wait().await;
        workers.wait().await;
        flushes.wait().await;
    };
    if tokio::time::timeout(drain, running).await.is_ok() {
        tracing::info!("drained: every stream and generation finished");
    } else {
        tracing::warn!(
            drain_secs = drain.as_secs(),
            "drain window over: ending streams still running"
        );
        lifecycle.stop();
    }
    // Streams ended by `stop` write their last events first; then WebSockets relay what
    // they hold and get their Close frame, whether or not every stream managed to end.
    let streams_end = async {
        if !connections_done {
            (&mut connections).await;
        }
        generations.wait().await;
        workers.wait().await;
        flushes.wait().await;
    };
    if tokio::time::timeout(STOP_GRACE - WS_CLOSE_GRACE, streams_end)
        .await
        .is_err()
    {
        tracing::warn!("streams still running after stop; closing connections anyway");
    }
    lifecycle.close_connections();
    if tokio::time::timeout(WS_CLOSE_GRACE, lifecycle.websockets_closed())
        .await
        .is_err()
    {
        tracing::warn!("WebSockets still open after their Close; exiting anyway");
    }
    Ok(())
}
