//! A TCP proxy a test can switch off and on: from sluice's side, the database or Redis
//! behind it goes away and comes back, without touching the shared servers.
//!
//! Besides refusing (`stop`), it can blackhole: connections are accepted and kept open,
//! but nothing is forwarded either way, as a hung server or a lost network path looks.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// True while blackholed.
    hole: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hole, _) = watch::channel(false);
        let mut p = Self {
            addr,
            target,
            task: None,
            hole,
        };
        p.task = Some(tokio::spawn(serve(listener, target, p.hole.subscribe())));
        p
    }

    /// Refuses new connections and cuts every open one.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Accepts connections but forwards nothing, in either direction, on new connections
    /// and on those already open. Those stay dead after `resume`, as connections to a
    /// server that hung and was replaced do.
    pub fn blackhole(&self) {
        self.hole.send_replace(true);
    }

    /// Forwards new connections again (after `stop` or `blackhole`).
    pub async fn resume(&mut self) {
        self.hole.send_replace(false);
        if self.task.is_none() {
            let listener = TcpListener::bind(self.addr).await.unwrap();
            self.task = Some(tokio::spawn(serve(
                listener,
                self.target,
                self.hole.subscribe(),
            )));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: TcpListener, target: SocketAddr, hole: watch::Receiver<bool>) {
    // Connection tasks live in this set, so aborting the accept task cuts them all.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((inbound, _)) = accepted else { continue };
                conns.spawn(pipe(inbound, target, hole.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn pipe(inbound: TcpStream, target: SocketAddr, mut hole: watch::Receiver<bool>) {
    if *hole.borrow_and_update() {
        return sink(inbound).await;
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let (mut ri, mut wi) = inbound.into_split();
    let (mut ro, mut wo) = outbound.into_split();
    let forward = async {
        tokio::select! {
            _ = pump(&mut ri, &mut wo) => {}
            _ = pump(&mut ro, &mut wi) => {}
        }
    };
    let blackholed = tokio::select! {
        _ = forward => false,
        _ = hole.wait_for(|h| *h) => true,
    };
    if blackholed {
        // From now on this connection is a sink: nothing reaches either side.
        let _ = tokio::join!(drain(ri), drain(ro));
    }
}

async fn pump(r: &mut (impl AsyncReadExt + Unpin), w: &mut (impl AsyncWriteExt + Unpin)) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads and drops everything until the peer closes; never answers.
async fn sink(mut s: TcpStream) {
    let _ = drain(&mut s).await;
}

async fn drain(mut r: impl AsyncReadExt + Unpin) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
