//! Single-flight: identical deterministic requests that arrive while one is being answered
//! join it as extra subscribers of its hub channel instead of calling the upstream again.

use std::future::Future;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::Chunk;
use crate::domain::chunk::Payload;
use crate::hub::{Channel, End, EventKind, Hub};
use crate::upstream::{Relay, UpstreamError};

struct Flight {
    channel: Arc<Channel>,
    /// `None` while the upstream is being opened; then whether it accepted.
    opened: watch::Receiver<Option<Result<(), UpstreamError>>>,
    provider: String,
    model: String,
}

pub struct Flights {
    hub: Arc<Hub>,
    inflight: Arc<DashMap<String, Arc<Flight>>>,
    /// The pumps from upstream into the channels.
    tasks: TaskTracker,
    stop: CancellationToken,
}

#[derive(Deserialize)]
struct ErrorData {
    code: String,
    message: String,
}

impl Flights {
    pub fn new(hub: Arc<Hub>, stop: CancellationToken) -> Self {
        Self {
            hub,
            inflight: Arc::new(DashMap::new()),
            tasks: TaskTracker::new(),
            stop,
        }
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The reply for `key`: joins the one in flight, or opens it with `open` and shares it.
    pub async fn join<F>(&self, key: &str, model: &str, open: F) -> Result<Relay, UpstreamError>
    where
        F: Future<Output = Result<Relay, UpstreamError>>,
    {
        let flight = match self.inflight.entry(key.to_owned()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => {
                let (tx, rx) = watch::channel(None);
                let id = format!("flight-{}", crate::store::new_id());
                let channel = self.hub.create(&id, "flight", "");
                let flight = Arc::new(Flight {
                    channel,
                    opened: rx,
                    provider: String::new(),
                    model: model.to_owned(),
                });
                e.insert(flight.clone());
                drop(flight);
                return self.lead(key, tx, open).await;
            }
        };
        let mut opened = flight.opened.clone();
        let result = opened
            .wait_for(|o| o.is_some())
            .await
            .map(|o| o.clone())
            .ok()
            .flatten()
            .unwrap_or(Ok(()));
        result?;
        Ok(follow(&flight))
    }

    async fn lead<F>(
        &self,
        key: &str,
        opened: watch::Sender<Option<Result<(), UpstreamError>>>,
        open: F,
    ) -> Result<Relay, UpstreamError>
    where
        F: Future<Output = Result<Relay, UpstreamError>>,
    {
        let Some(flight) = self.inflight.get(key).map(|f| f.clone()) else {
            return open.await;
        };
        let relay = match open.await {
            Ok(r) => r,
            Err(e) => {
                opened.send_replace(Some(Err(e.clone())));
                self.inflight.remove(key);
                return Err(e);
            }
        };
        let flight = Arc::new(Flight {
            channel: flight.channel.clone(),
            opened: flight.opened.clone(),
            provider: relay.provider.clone(),
            model: flight.model.clone(),
        });
        // The leader subscribes before the pump starts, so the pump never sees zero
        // subscribers before anyone had a chance to join.
        let mine = follow(&flight);
        opened.send_replace(Some(Ok(())));
        let (inflight, key, stop) = (self.inflight.clone(), key.to_owned(), self.stop.clone());
        self.tasks.spawn(async move {
            pump(relay, &flight.channel, stop).await;
            inflight.remove(&key);
        });
        Ok(mine)
    }
}

/// Relays the upstream into the channel; stops early when every subscriber has left, so a
/// shared request is cancelled like a single one.
async fn pump(relay: Relay, ch: &Channel, stop: CancellationToken) {
    let mut events = relay.events;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => {
                ch.publish_json(EventKind::Error, &serde_json::json!({"code": "server_shutting_down", "message": "the server is shutting down"}));
                return;
            }
            ev = events.next() => ev,
        };
        match ev {
            // Each chunk as it came, so every follower replays exactly what the leader got.
            Some(Ok(chunk)) => {
                ch.publish(EventKind::Token, chunk.payload());
            }
            Some(Err(e)) => {
                ch.publish_json(
                    EventKind::Error,
                    &serde_json::json!({"code": e.code(), "message": e.to_string()}),
                );
                return;
            }
            None => {
                ch.publish_json(EventKind::Done, &serde_json::json!({}));
                return;
            }
        }
        if ch.subscriber_count() == 0 {
            return;
        }
    }
}

/// A subscriber's view of the shared reply, as the upstream events it carries.
fn follow(flight: &Flight) -> Relay {
    let mut sub = flight.channel.subscribe(None);
    let events = async_stream::stream! {
        let mut batch = Vec::new();
        loop {
            match sub.next_batch(&mut batch).await {
                Ok(()) => {
                    for e in batch.drain(..) {
                        let data = e.data();
                        match e.kind {
                            EventKind::Token => {
                                if let Ok(Payload::Chunk(c)) = Chunk::parse(&data) {
                                    yield Ok(c);
                                }
                            }
                            EventKind::Error => {
                                let d = serde_json::from_slice::<ErrorData>(&data).ok();
                                yield Err(UpstreamError::InBand {
                                    provider: "shared".into(),
                                    message: d.as_ref().map(|d| d.message.clone()).unwrap_or_default(),
                                    code: d.map(|d| d.code),
                                });
                                return;
                            }
                            _ => {}
                        }
                    }
                }
                Err(End::Finished) => return,
                Err(End::Lagged) => {
                    yield Err(UpstreamError::InBand {
                        provider: "shared".into(),
                        message: "this client fell behind the shared reply".into(),
                        code: Some("lagged".into()),
                    });
                    return;
                }
            }
        }
    };
    Relay {
        provider: flight.provider.clone(),
        model: flight.model.clone(),
        events: Box::pin(events),
    }
}
