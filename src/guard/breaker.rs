//! A circuit breaker per provider (and one for the database): after a run of failures the
//! provider is skipped (the model's next provider is used, or the request fails fast) until
//! a trial request after the open period shows it healthy again.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failures_to_open: u32,
    pub open_for: Duration,
    pub successes_to_close: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { successes: u32 },
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    settings: BreakerSettings,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            settings,
        }
    }

    /// Whether a request may go to the provider now. An open circuit whose period is over
    /// turns half-open and lets requests through as trials.
    pub fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match *s {
            State::Closed { .. } | State::HalfOpen { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *s = State::HalfOpen { successes: 0 };
                true
            }
            State::Open { .. } => false,
        }
    }

    /// Seconds until an open circuit lets a trial through (for `Retry-After`).
    pub fn retry_after(&self) -> u64 {
        match *self.state.lock() {
            State::Open { until } => until
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1),
            _ => 1,
        }
    }

    pub fn success(&self) {
        let mut s = self.state.lock();
        *s = match *s {
            State::HalfOpen { successes } if successes + 1 < self.settings.successes_to_close => {
                State::HalfOpen {
                    successes: successes + 1,
                }
            }
            State::Open { until } => State::Open { until },
            _ => State::Closed { failures: 0 },
        };
    }

    /// Returns true when this failure opened the circuit.
    pub fn failure(&self) -> bool {
        let mut s = self.state.lock();
        let open = State::Open {
            until: Instant::now() + self.settings.open_for,
        };
        let (next, opened) = match *s {
            State::Closed { failures } if failures + 1 >= self.settings.failures_to_open => {
                (open, true)
            }
            State::Closed { failures } => (
                State::Closed {
                    failures: failures + 1,
                },
                false,
            ),
            State::HalfOpen { .. } => (open, true),
            State::Open { until } => (State::Open { until }, false),
        };
        *s = next;
        opened
    }

    /// `closed`, `half_open` or `open`.
    pub fn state(&self) -> &'static str {
        match *self.state.lock() {
            State::Closed { .. } => "closed",
            State::HalfOpen { .. } => "half_open",
            State::Open { until } if Instant::now() >= until => "half_open",
            State::Open { .. } => "open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_then_closes_after_trials() {
        let b = Breaker::new(BreakerSettings {
            failures_to_open: 5,
            open_for: Duration::from_secs(30),
            successes_to_close: 3,
        });
        for i in 0..4 {
            assert!(!b.failure(), "opened after {i}");
        }
        b.success();
        for _ in 0..4 {
            b.failure();
        }
        assert_eq!(b.state(), "closed", "failures must be consecutive");
        assert!(b.failure());
        assert_eq!(b.state(), "open");
        assert!(!b.allow());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(b.allow());
        assert_eq!(b.state(), "half_open");
        b.success();
        b.success();
        assert_eq!(b.state(), "half_open");
        b.success();
        assert_eq!(b.state(), "closed");
        for _ in 0..5 {
            b.failure();
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(b.allow());
        assert!(b.failure(), "a failed trial opens again");
        assert!(!b.allow());
    }
}
