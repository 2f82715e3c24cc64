//! When the replay agent and its fetcher wake up: the [`Timer`] they sleep on (the real one,
//! or a manual clock in tests of delays) and the [`PollPolicy`] that says how often to ask
//! the journal for more.
//!
//! Must never: say what time it is: that is [`crate::clock`]'s job; a timer only waits.

use std::time::Duration;

use async_trait::async_trait;

/// Sleeping, behind a trait so tests of delays move a manual clock instead of waiting.
#[async_trait]
pub trait Timer: Send + Sync + std::fmt::Debug {
    async fn sleep(&self, d: Duration);
}

/// The real timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioTimer;

#[async_trait]
impl Timer for TokioTimer {
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}

/// How often to ask for the next segment.
#[derive(Clone, Copy, Debug)]
pub struct PollPolicy {
    /// Right after data arrived.
    pub min: Duration,
    /// When idle (the backoff doubles up to this).
    pub max: Duration,
    /// An agent with nothing to apply (idle, or waiting out its delay) commits its unchanged
    /// position at least this often, so `journal trim --drop-consumer-after` can tell a live
    /// idle agent (recent `updated_at_ns`) from a dead one.
    pub idle_commit: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            min: Duration::from_millis(10),
            max: Duration::from_secs(1),
            idle_commit: Duration::from_secs(60),
        }
    }
}
