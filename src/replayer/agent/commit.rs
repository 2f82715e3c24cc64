//! Commits: when the moved position is committed (at most every `commit_every`, and an
//! unchanged one every `idle_commit` as a sign of life), after the fsync it needs.
//!
//! Must never: commit a position before the replica holding it is fsync'd.

use std::time::{Duration, Instant};

use crate::journal::consumer::{self, ConsumerState};
use crate::journal::{JournalError, JournalResult};
use crate::store::retrying::RetryPolicy;
use crate::store::ObjectStore;

use super::Agent;
use crate::replayer::apply::sync;
use crate::replayer::error::ReplayError;
use crate::replayer::recovery::blocking;
use crate::replayer::status::Phase;

impl Agent {
    /// How long until [`commit_if_silent`](Self::commit_if_silent) has to commit.
    pub(super) fn until_idle_commit(&self) -> Duration {
        let silent = self.clock.now_ns().saturating_sub(self.pos.updated_at_ns);
        self.config
            .poll
            .idle_commit
            .saturating_sub(Duration::from_nanos(silent))
    }

    /// Commits the position, unchanged, when the last commit is older than
    /// [`PollPolicy::idle_commit`]: the sign of life `journal trim --drop-consumer-after`
    /// reads.
    pub(super) async fn commit_if_silent(&mut self) -> Result<(), ReplayError> {
        let silent = self.clock.now_ns().saturating_sub(self.pos.updated_at_ns);
        if silent >= self.config.poll.idle_commit.as_nanos() as u64 {
            self.commit(0, 0).await?;
        }
        Ok(())
    }

    /// Whether a moved position may be committed now: the last commit is at least
    /// [`PollPolicy::commit_every`] old.
    pub(super) fn commit_due(&self) -> bool {
        self.until_commit_due().is_zero()
    }

    /// How long until a moved position may be committed.
    pub(super) fn until_commit_due(&self) -> Duration {
        let since = self.clock.now_ns().saturating_sub(self.pos.updated_at_ns);
        self.config
            .poll
            .commit_every
            .saturating_sub(Duration::from_nanos(since))
    }

    /// Commits the in-memory position, after an fsync of the replica when batches applied
    /// since the last commit were not fsync'd.
    pub(super) async fn commit(&mut self, records: u64, bytes: u64) -> Result<(), ReplayError> {
        self.drain().await?;
        if self.unsynced {
            let replica = self.replica.clone();
            let started = Instant::now();
            blocking("fsync", move || sync(replica.as_ref())).await?;
            self.board.spent(Phase::Sync, started.elapsed());
            self.unsynced = false;
        }
        self.pos.updated_at_ns = self.clock.now_ns();
        let started = Instant::now();
        commit_retrying(self.reader.store().as_ref(), &self.pos).await?;
        self.board.spent(Phase::Commit, started.elapsed());
        self.dirty = false;
        self.board.committed(&self.pos, records, bytes);
        Ok(())
    }
}

/// Commits a position, retrying transient store errors until the store answers (a store
/// outage must not stop the agent: the position it commits is the same on every retry).
pub(super) async fn commit_retrying(
    store: &dyn ObjectStore,
    state: &ConsumerState,
) -> JournalResult<()> {
    // The store's backoff without its attempt limit: 100 ms doubling to 5 s, jittered.
    let backoff = RetryPolicy {
        max_attempts: u32::MAX,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(5),
    };
    let mut attempt = 0u32;
    loop {
        match consumer::commit(store, state).await {
            Err(JournalError::Store(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "committing the position failed; will retry");
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(backoff.delay(attempt)).await;
            }
            other => return other,
        }
    }
}
