//! The timed SSE body shared by both API dialects.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::knobs::Plan;
use super::{Fault, Shared};

/// How one API spells the events of a streamed reply. Every method returns
/// complete SSE events; each `Bytes` becomes its own body frame.
pub(crate) trait Dialect: Send + 'static {
    /// Events before the first token (role chunk / message_start...).
    fn prelude(&self) -> Vec<Bytes>;
    /// A token event whose text is the JSON string literal `text`.
    fn token_json(&self, text: &str) -> Bytes;
    fn token(&self, i: usize) -> Bytes {
        self.token_json(super::tokens::token_json(i))
    }
    /// Events after the last token of a reply that ends normally.
    fn epilogue(&self, sent: usize) -> Vec<Bytes>;
    /// A token event cut off mid-JSON.
    fn malformed(&self) -> Bytes;
    /// An in-band error event.
    fn error_event(&self) -> Bytes;
}

/// Endless mode must never spin a core or flood a client, whatever the knobs.
const ENDLESS_MIN_GAP: Duration = Duration::from_millis(1);

/// Long enough for hyper to write out what it has buffered.
const FLUSH_BEFORE_RESET: Duration = Duration::from_millis(10);

/// Counts a response body as an active stream for as long as it lives.
pub(crate) struct StreamGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl StreamGuard {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        shared.stats.send_modify(|s| {
            s.active_streams += 1;
            s.max_active_streams = s.max_active_streams.max(s.active_streams);
        });
        Self {
            shared,
            done: false,
        }
    }

    fn complete(&mut self) {
        if !self.done {
            self.done = true;
            self.shared.stats.send_modify(|s| {
                s.active_streams = s.active_streams.saturating_sub(1);
                s.completed_streams += 1;
            });
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.stats.send_modify(|s| {
                s.active_streams = s.active_streams.saturating_sub(1);
                s.aborted_streams += 1;
            });
        }
    }
}

/// Waits until `deadline` unless the server shuts down first (→ `false`).
/// The timer and the shutdown wait live as long as the body and are re-armed
/// for every token: a fresh `sleep` and `cancelled()` per token would cost a
/// timer-wheel insertion and a lock on the process-wide shutdown token's
/// waiter list, thousands of times per millisecond in a load test.
async fn sleep_until(
    deadline: Instant,
    cancel: &CancellationToken,
    timer: &mut Pin<Box<Sleep>>,
    stopped: &mut Pin<Box<WaitForCancellationFutureOwned>>,
) -> bool {
    if deadline <= Instant::now() {
        return !cancel.is_cancelled();
    }
    timer.as_mut().reset(deadline);
    tokio::select! {
        // The timer first: polling the shutdown wait takes a lock, and the timer is what
        // fires.
        biased;
        () = timer.as_mut() => true,
        () = stopped.as_mut() => false,
    }
}

fn shutting_down() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "mock server shutting down",
    )
}

/// The streamed reply for `plan`. Only stream-mode faults are acted on here;
/// status faults are answered before a body exists.
pub(crate) fn body(shared: Arc<Shared>, plan: Plan, dialect: impl Dialect) -> Body {
    Body::from_stream(events(shared, plan, dialect))
}

fn events(
    shared: Arc<Shared>,
    plan: Plan,
    dialect: impl Dialect,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    let cancel = shared.cancel.clone();
    let mut guard = StreamGuard::new(shared);
    async_stream::stream! {
        let fault = plan.fault;
        let mut stopped = Box::pin(cancel.clone().cancelled_owned());
        // Headers are already on their way; nothing of the body is sent
        // until the first token is due, so `stall_first` and a long
        // first-token delay look the same to a client until one ends.
        if fault == Some(Fault::StallFirst) {
            stopped.as_mut().await;
            yield Err(shutting_down());
            return;
        }
        let mut deadline = Instant::now() + plan.first_token_delay;
        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        if !plan.first_token_delay.is_zero()
            && !sleep_until(deadline, &cancel, &mut timer, &mut stopped).await
        {
            yield Err(shutting_down());
            return;
        }
        for event in dialect.prelude() {
            yield Ok(event);
        }
        let (limit, gap) = match fault {
            Some(Fault::Endless) => (usize::MAX, plan.token_delay.max(ENDLESS_MIN_GAP)),
            Some(Fault::StallMid | Fault::ResetMid | Fault::Malformed | Fault::ErrorChunk) => {
                (plan.tokens / 2, plan.token_delay)
            }
            _ => (plan.tokens, plan.token_delay),
        };
        let mut sent = 0usize;
        while sent < limit {
            if sent > 0 && !gap.is_zero() {
                // Deadline-based so per-token overhead does not stretch the
                // configured rate; clamped to now so a client that fell
                // behind (backpressure) gets no burst afterwards.
                deadline = (deadline + gap).max(Instant::now());
                if !sleep_until(deadline, &cancel, &mut timer, &mut stopped).await {
                    yield Err(shutting_down());
                    return;
                }
            }
            yield Ok(match plan.stamp {
                None => dialect.token(sent),
                Some(arrived) => {
                    let word = super::tokens::token_text(sent);
                    let text = format!("{}@{arrived}@{} ", word.trim_end(), super::knobs::unix_ns());
                    dialect.token_json(&super::tokens::json_string(&text))
                }
            });
            sent += 1;
        }
        match fault {
            Some(Fault::StallMid) => {
                stopped.as_mut().await;
                yield Err(shutting_down());
            }
            Some(Fault::ResetMid) => {
                // hyper discards still-buffered frames when a body fails, so
                // give it a pending poll to flush the tokens first; without
                // this a zero-delay reply is lost along with its headers.
                let flushed = Instant::now() + FLUSH_BEFORE_RESET;
                if !sleep_until(flushed, &cancel, &mut timer, &mut stopped).await {
                    yield Err(shutting_down());
                    return;
                }
                // The reset is the scripted end of this body, not the
                // client going away, so it counts as completed.
                guard.complete();
                yield Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "mock reset_mid fault",
                ));
            }
            Some(Fault::Malformed) => {
                yield Ok(dialect.malformed());
                guard.complete();
            }
            Some(Fault::ErrorChunk) => {
                yield Ok(dialect.error_event());
                guard.complete();
            }
            _ => {
                for event in dialect.epilogue(sent) {
                    yield Ok(event);
                }
                guard.complete();
            }
        }
    }
}

/// A recorded reply played event by event: nothing before `first_token_delay`, each token
/// event after the first `token_delay` after the one before, other events at once.
pub(crate) fn replay(shared: Arc<Shared>, plan: &Plan, events: Vec<(Bytes, bool)>) -> Body {
    let (first, gap) = (plan.first_token_delay, plan.token_delay);
    let cancel = shared.cancel.clone();
    let mut guard = StreamGuard::new(shared);
    Body::from_stream(async_stream::stream! {
        let mut stopped = Box::pin(cancel.clone().cancelled_owned());
        let mut deadline = Instant::now() + first;
        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        if !first.is_zero() && !sleep_until(deadline, &cancel, &mut timer, &mut stopped).await {
            yield Err(shutting_down());
            return;
        }
        let mut tokens = 0usize;
        for (frame, token) in events {
            if token {
                if tokens > 0 && !gap.is_zero() {
                    deadline = (deadline + gap).max(Instant::now());
                    if !sleep_until(deadline, &cancel, &mut timer, &mut stopped).await {
                        yield Err(shutting_down());
                        return;
                    }
                }
                tokens += 1;
            }
            yield Ok::<_, io::Error>(frame);
        }
        guard.complete();
    })
}

/// A body that aborts the response at once, for `reset_mid` without
/// streaming.
pub(crate) fn reset_body() -> Body {
    Body::from_stream(futures::stream::once(async {
        Err::<Bytes, _>(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "mock reset_mid fault",
        ))
    }))
}
