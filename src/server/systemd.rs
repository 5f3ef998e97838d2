//! systemd integration (`Type=notify` in `systemd/sluice@.service`): `READY=1` once the
//! listener is bound and the app built, `WATCHDOG=1` keep-alives, `STOPPING=1` when SIGTERM
//! starts the drain, and `STATUS=` lines for `systemctl status`.
//!
//! Everything is a no-op when `NOTIFY_SOCKET` is unset (a shell, a container, the tests), so
//! the serve path calls it unconditionally.
//!
//! The messages are `sd_notify::NotifyState`s, but they are sent to a socket held by
//! [`Notifier`] instead of through `sd_notify::notify`, which reads `NOTIFY_SOCKET` on every
//! call: the socket is read once, and tests can aim a notifier at a socket of their own
//! without touching the process-global environment.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::ops::Lifecycle;
use crate::state::AppState;

/// Where notifications go: systemd's notification socket, if this process has one.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    /// `None` when not run by a service manager: every notification is then dropped.
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    /// As systemd passed it: a path, or `@name` for an abstract socket.
    address: OsString,
    /// One unbound socket for every message, non-blocking so a service manager that does
    /// not read can never stall a runtime thread.
    socket: UnixDatagram,
}

impl Notifier {
    /// The service manager's socket from `NOTIFY_SOCKET`, or a no-op notifier without one.
    pub fn from_env() -> Self {
        Self::to_address(std::env::var_os("NOTIFY_SOCKET"))
    }

    /// A notifier sending to `address` (a socket path, or `@name` for an abstract socket);
    /// `None` or an empty address gives a no-op notifier.
    pub fn to_address(address: Option<OsString>) -> Self {
        let Some(address) = address.filter(|a| !a.is_empty()) else {
            return Self::default();
        };
        let socket = UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match socket {
            Ok(socket) => Self {
                target: Some(Arc::new(Target { address, socket })),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a socket for systemd notifications");
                Self::default()
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram with every state, one per line, as `sd_notify(3)` does.
    pub fn notify(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sent = target.send(msg.as_bytes())?;
        if sent == msg.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification cut short",
            ))
        }
    }

    /// [`Notifier::notify`] for callers that can only log a failure: systemd being unable to
    /// hear us is no reason to stop serving.
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = self.notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

impl Target {
    fn send(&self, msg: &[u8]) -> io::Result<usize> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = self.address.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                return self.socket.send_to_addr(msg, &addr);
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract NOTIFY_SOCKET addresses exist on Linux only",
                ));
            }
        }
        self.socket.send_to(msg, PathBuf::from(&self.address))
    }
}

/// The server's side of the supervision: sent `READY=1` when created, keeps the watchdog
/// fed, reports draining, and stops the watchdog in [`Supervision::finish`] (or on drop).
#[derive(Debug)]
pub struct Supervision {
    notifier: Notifier,
    /// Cancels the watchdog task; fired by `finish` and on drop.
    cancel: CancellationToken,
    /// The watchdog task, owned here so `finish` can wait for its last message.
    task: Option<tokio::task::JoinHandle<()>>,
}

/// `READY=1` for a server bound to `addr`, with the watchdog interval from the environment
/// (`WATCHDOG_USEC`, for this process only). The serve path of `main` calls this.
pub fn serving(state: &AppState, addr: SocketAddr) -> Supervision {
    let status = format!(
        "serving on http://{addr} as {}",
        state.config.server.server_id
    );
    Supervision::start(
        Notifier::from_env(),
        sd_notify::watchdog_enabled(),
        state.lifecycle.clone(),
        status,
    )
}

impl Supervision {
    /// Sends `READY=1` with `status`, and with a `watchdog` timeout starts pinging at half of
    /// it, as `sd_watchdog_enabled(3)` recommends. Needs a Tokio runtime when a watchdog or
    /// a socket is configured.
    pub fn start(
        notifier: Notifier,
        watchdog: Option<Duration>,
        lifecycle: Arc<Lifecycle>,
        status: String,
    ) -> Self {
        let cancel = CancellationToken::new();
        if !notifier.is_enabled() {
            return Self {
                notifier,
                cancel,
                task: None,
            };
        }
        notifier.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        let task = tokio::spawn(watch(
            notifier.clone(),
            watchdog.filter(|w| !w.is_zero()).map(|w| w / 2),
            lifecycle,
            cancel.clone(),
        ));
        Self {
            notifier,
            cancel,
            task: Some(task),
        }
    }

    /// Wraps the shutdown signal of `server::serve`: once it fires, systemd hears `STOPPING=1`
    /// just before the drain starts, so `systemctl status` shows the instance going away
    /// while its streams finish.
    pub fn stopping_on(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let notifier = self.notifier.clone();
        async move {
            shutdown.await;
            notifier.send(&[
                NotifyState::Stopping,
                NotifyState::Status("draining: running streams may finish"),
            ]);
        }
    }

    /// Stops the watchdog once the server has returned, then reports the last status. The
    /// watchdog keeps running during the drain on purpose: a drain is slow, not stuck.
    pub async fn finish(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
            self.notifier.send(&[NotifyState::Status("stopped")]);
        }
    }
}

impl Drop for Supervision {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The supervision of a start that waits for its dependencies: the watchdog is fed and
/// `STATUS=` says what is awaited, but `READY=1` is left to [`Supervision::start`].
#[derive(Debug)]
pub struct Waiting {
    notifier: Notifier,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Waiting {
    /// Pings at half of `watchdog`, as [`Supervision::start`] does; a no-op without a socket.
    pub fn start(notifier: Notifier, watchdog: Option<Duration>) -> Self {
        let cancel = CancellationToken::new();
        let every = watchdog.filter(|w| !w.is_zero()).map(|w| w / 2);
        let task = match every {
            Some(every) if notifier.is_enabled() => {
                let (n, c) = (notifier.clone(), cancel.clone());
                Some(tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(every);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = c.cancelled() => return,
                            _ = ticks.tick() => n.send(&[NotifyState::Watchdog]),
                        }
                    }
                }))
            }
            _ => None,
        };
        Self {
            notifier,
            cancel,
            task,
        }
    }

    /// A `STATUS=` line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.notifier.send(&[NotifyState::Status(status)]);
    }

    /// Stops the watchdog task, so the serving supervision takes over alone.
    pub async fn finish(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The watchdog and status task. Pinging from a task of the same runtime proves the
/// runtime still schedules work, which is what a hung process stops doing.
async fn watch(
    notifier: Notifier,
    every: Option<Duration>,
    lifecycle: Arc<Lifecycle>,
    cancel: CancellationToken,
) {
    let ping = async {
        let Some(every) = every else {
            return std::future::pending().await;
        };
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            notifier.send(&[NotifyState::Watchdog]);
        }
    };
    // An admin drain (`POST /api/admin/drain`) keeps the process running, so it is only a
    // status: `STOPPING=1` would make systemd start its stop timeout and kill the instance.
    let draining = async {
        lifecycle.drained().await;
        notifier.send(&[NotifyState::Status(
            "draining: new work is refused, running streams may finish",
        )]);
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = ping => {}
        _ = draining => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A socket standing in for systemd's, and a notifier aimed at it.
    fn manager() -> (tempfile::TempDir, tokio::net::UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to_address(Some(path.into_os_string()));
        (dir, socket, notifier)
    }

    async fn next(socket: &tokio::net::UnixDatagram) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
            .await
            .expect("a notification within 10 s")
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// The next message that is not a watchdog ping.
    async fn next_status(socket: &tokio::net::UnixDatagram) -> String {
        loop {
            let m = next(socket).await;
            if m != "WATCHDOG=1\n" {
                return m;
            }
        }
    }

    #[tokio::test]
    async fn ready_watchdog_draining_stopping_stopped() {
        let (_dir, socket, notifier) = manager();
        let lifecycle = Arc::new(Lifecycle::new());
        let sup = Supervision::start(
            notifier,
            Some(Duration::from_millis(100)),
            lifecycle.clone(),
            "serving on http://127.0.0.1:8001".into(),
        );
        assert_eq!(
            next(&socket).await,
            "READY=1\nSTATUS=serving on http://127.0.0.1:8001\n"
        );
        // Several pings, not just the interval's immediate first tick.
        for _ in 0..3 {
            assert_eq!(next(&socket).await, "WATCHDOG=1\n");
        }

        lifecycle.start_drain();
        assert!(next_status(&socket).await.starts_with("STATUS=draining"));

        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let shutdown = tokio::spawn(sup.stopping_on(async move {
            let _ = fired.await;
        }));
        fire.send(()).unwrap();
        shutdown.await.unwrap();
        assert!(
            next_status(&socket)
                .await
                .starts_with("STOPPING=1\nSTATUS=draining")
        );

        // After `finish` the watchdog task is gone: "stopped" is the very last message.
        sup.finish().await;
        let mut last = String::new();
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.try_recv(&mut buf) {
            last = String::from_utf8(buf[..n].to_vec()).unwrap();
        }
        assert_eq!(last, "STATUS=stopped\n");
    }

    #[tokio::test]
    async fn no_socket_is_a_no_op() {
        let notifier = Notifier::to_address(None);
        assert!(!notifier.is_enabled());
        notifier.notify(&[NotifyState::Ready]).unwrap();
        let sup = Supervision::start(
            Notifier::to_address(Some(OsString::new())),
            Some(Duration::from_millis(10)),
            Arc::new(Lifecycle::new()),
            "serving".into(),
        );
        assert!(sup.task.is_none(), "no watchdog task without a socket");
        sup.finish().await;
    }

    #[tokio::test]
    async fn watchdog_off_still_reports_ready() {
        let (_dir, socket, notifier) = manager();
        let sup = Supervision::start(
            notifier.clone(),
            None,
            Arc::new(Lifecycle::new()),
            "serving".into(),
        );
        assert_eq!(next(&socket).await, "READY=1\nSTATUS=serving\n");
        sup.finish().await;
        assert_eq!(next(&socket).await, "STATUS=stopped\n");
        notifier.notify(&[NotifyState::Status("after")]).unwrap();
        assert_eq!(
            next(&socket).await,
            "STATUS=after\n",
            "no ping came in between"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn abstract_socket_addresses() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sluice-test-{}", rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::to_address(Some(format!("@{name}").into()));
        notifier.notify(&[NotifyState::Ready]).unwrap();
        let mut buf = [0u8; 64];
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
