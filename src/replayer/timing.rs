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

/// How often to ask for the next segment, and how often to commit the position: what the
/// agent costs in requests.
///
/// The latency budget, with the defaults: a segment uploaded while writes flow (one seen in
/// the last [`idle_after`](Self::idle_after)) is asked for within 1 s (the backoff starts
/// at 50 ms after each segment and doubles up to `max`); after 30 s without one, within
/// 5 s (`idle_max`). No cheaper signal of a new segment exists on S3 than asking for it
/// (the writer's lease is one request too), so the idle agent costs one GET per 5 s plus a
/// sign-of-life commit a minute: 13 requests a minute.
#[derive(Clone, Copy, Debug)]
pub struct PollPolicy {
    /// Right after data arrived.
    pub min: Duration,
    /// While writes flow (the backoff doubles up to this).
    pub max: Duration,
    /// After this long without a new segment, the backoff goes on doubling up to
    /// [`idle_max`](Self::idle_max).
    pub idle_after: Duration,
    /// When idle for longer than [`idle_after`](Self::idle_after).
    pub idle_max: Duration,
    /// An agent with nothing to apply (idle, or waiting out its delay) commits its unchanged
    /// position at least this often, so `journal trim --drop-consumer-after` can tell a live
    /// idle agent (recent `updated_at_ns`) from a dead one.
    pub idle_commit: Duration,
    /// A moved position is committed at most this often (one PUT each): while catching up,
    /// several batches share one commit. The committed position then lags the replica by
    /// up to this much, which recovery handles as it handles any crash between a batch and
    /// its commit (the undo segments past the commit are undone, newest first); `status`
    /// shows each batch as soon as it is on the replica.
    pub commit_every: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            min: Duration::from_millis(50),
            max: Duration::from_secs(1),
            idle_after: Duration::from_secs(30),
            idle_max: Duration::from_secs(5),
            idle_commit: Duration::from_secs(60),
            commit_every: Duration::from_secs(3),
        }
    }
}

impl PollPolicy {
    /// The longest pause between two asks after `idle_for` without a new segment.
    pub fn cap(&self, idle_for: Duration) -> Duration {
        if idle_for >= self.idle_after {
            self.idle_max.max(self.max)
        } else {
            self.max
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_cap_grows_only_after_a_quiet_spell() {
        let p = PollPolicy::default();
        assert_eq!(p.cap(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(p.cap(Duration::from_secs(29)), Duration::from_secs(1));
        assert_eq!(p.cap(Duration::from_secs(30)), Duration::from_secs(5));
    }
}
