//! What a replay agent reports on its control socket (`{"cmd":"status"}`) and how
//! `tinylag status` prints it: positions, lag behind the journal head, delay, undo-log size
//! and what the agent is doing.
//!
//! The agent writes into a [`StatusBoard`] as it goes (cheap, in memory); the control
//! handler reads it. The journal head is known from the segments the agent has fetched;
//! only while the agent is behind does a status request probe for newer segments (O(log n)
//! HEADs, cached for a few seconds: `status/head_probe.rs`), so an idle agent costs nothing
//! extra. The text form is in `status/render.rs`.
//!
//! Must never: block the agent on a status request, or put credentials into the status.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::clock::{format_ns, Clock};
use crate::control::{Handler, Request, Response};
use crate::journal::consumer::{ConsumerState, Seed, VerifyTally};
use crate::journal::reader::JournalReader;
use crate::units::format_duration;

use super::recovery::RecoveryReport;

mod head_probe;
mod render;

use head_probe::HeadCache;
pub use render::render_text;

/// What the agent is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    Starting,
    /// Undoing what was applied after the last commit (or an unfinished resync span).
    Recovering,
    /// Applying records that are due.
    CatchingUp,
    /// The next record is not due yet (`timestamp + delay` is in the future).
    WaitingForDelay,
    /// Everything in the journal is applied; polling for the next segment.
    Idle,
    /// Stopped cleanly (`--once`, `--until`, a signal).
    Stopped,
    /// Stopped by an error (see `error`).
    Failed,
}

impl AgentState {
    /// Every state, for the one-gauge-per-state metric.
    pub const ALL: [AgentState; 7] = [
        AgentState::Starting,
        AgentState::Recovering,
        AgentState::CatchingUp,
        AgentState::WaitingForDelay,
        AgentState::Idle,
        AgentState::Stopped,
        AgentState::Failed,
    ];

    /// The name `status` shows (`catching-up`).
    pub fn name(self) -> &'static str {
        match self {
            AgentState::Starting => "starting",
            AgentState::Recovering => "recovering",
            AgentState::CatchingUp => "catching-up",
            AgentState::WaitingForDelay => "waiting-for-delay",
            AgentState::Idle => "idle",
            AgentState::Stopped => "stopped",
            AgentState::Failed => "failed",
        }
    }
}

/// The journal head as far as the agent knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct KnownHead {
    /// The seq after the newest segment seen.
    pub next_seq: u64,
    /// Last LSN seen (0 when none).
    pub lsn: u64,
    pub timestamp_ns: u64,
}

/// Where the agent's time went since it started (wall time per phase of a batch), so an
/// operator can tell a slow store from a slow replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Reading pre-images from the replica.
    pub preimage_ms: u64,
    /// Encoding and storing undo segments (durable).
    pub undo_ms: u64,
    /// Writing, punching and zeroing the replica.
    pub apply_ms: u64,
    /// fdatasync of the replica.
    pub sync_ms: u64,
    /// Committing positions to the journal store.
    pub commit_ms: u64,
}

/// A phase of applying a batch, for [`StatusBoard::spent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Preimage,
    Undo,
    Apply,
    Sync,
    Commit,
}

/// Fixed facts about the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub name: String,
    /// Journal address (no credentials: store descriptions never carry them).
    pub journal: String,
    pub replica: String,
    /// Undo-log address, or `None` with `--no-undo`.
    pub undo: Option<String>,
    pub delay_ns: u64,
}

#[derive(Debug)]
struct Board {
    state: AgentState,
    error: Option<String>,
    position: Option<ConsumerState>,
    head: KnownHead,
    next_due_ns: Option<u64>,
    records_applied: u64,
    bytes_applied: u64,
    batches_applied: u64,
    recovery: Option<RecoveryReport>,
    head_cache: Option<HeadCache>,
    /// (applied LSN, timestamp of the record after it) once looked up.
    oldest_unapplied: Option<(u64, u64)>,
    /// Nanoseconds per phase.
    spent_ns: [u64; 5],
    /// A journal hole stops the agent at this seq (see `journal::head`).
    journal_hole: Option<u64>,
}

/// Shared between the agent (writer) and the control handler (reader).
#[derive(Debug)]
pub struct StatusBoard {
    identity: AgentIdentity,
    reader: JournalReader,
    clock: Arc<dyn Clock>,
    started_ns: u64,
    board: Mutex<Board>,
}

/// The status of one replay agent (the `result` of `{"cmd":"status"}`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Always `"replica"`: tells a generic client what kind of daemon answered.
    pub role: String,
    #[serde(flatten)]
    pub identity: AgentIdentity,
    pub state: AgentState,
    pub error: Option<String>,
    pub applied_lsn: u64,
    pub applied_timestamp_ns: u64,
    pub applied_time: Option<String>,
    pub consistent_lsn: u64,
    pub consistent_time: Option<String>,
    /// Inside a resync span: the replica is not consistent until its `RESYNC_END`.
    pub in_resync_span: bool,
    /// A journal hole at this seq stops the agent (`error` says `journal hole at seq N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_hole_seq: Option<u64>,
    /// The journal head this status compares with (probed when the agent is behind).
    pub head_lsn: u64,
    pub head_time: Option<String>,
    /// Records between the applied LSN and the head; never 0 while `applied_lsn < head_lsn`.
    pub lag_records: u64,
    /// Stored bytes of the segments not applied yet.
    pub lag_bytes: u64,
    /// True when `lag_bytes` extrapolates from a sample of segment sizes.
    pub lag_bytes_estimated: bool,
    /// Seconds since the oldest unapplied record was written (0 when nothing is behind).
    /// Includes the configured delay: see `lag_beyond_delay_seconds`.
    pub lag_seconds: f64,
    /// When the oldest unapplied record was written.
    #[serde(default)]
    pub oldest_unapplied_time: Option<String>,
    /// The part of `lag_seconds` past the configured delay: how late the replica is compared
    /// with what it was asked to be (0 while every record behind is still within the delay).
    #[serde(default)]
    pub lag_beyond_delay_seconds: f64,
    pub delay: String,
    /// When the next record becomes due (while waiting for the delay).
    pub next_due_time: Option<String>,
    pub undo_bytes: u64,
    pub undo_segments: u64,
    /// What the `VERIFY` records applied so far found.
    #[serde(default)]
    pub verify: VerifyTally,
    /// Who vouches for the replica's starting image (see `crate::journal::seed`).
    #[serde(default)]
    pub seed: Seed,
    /// False while nothing vouches for the image yet (a `--check-seed` not finished).
    #[serde(default = "vouched_by_default")]
    pub seed_vouched: bool,
    /// The epoch chain the replica follows (see `ConsumerState::chain_epoch`).
    #[serde(default)]
    pub chain_epoch: u64,
    /// Since the agent started.
    pub records_applied: u64,
    pub bytes_applied: u64,
    pub batches_applied: u64,
    pub recovery: Option<RecoveryReport>,
    /// Wall time per phase since the agent started.
    pub time_spent: PhaseTimes,
    pub started_time: String,
}

impl StatusBoard {
    pub fn new(identity: AgentIdentity, reader: JournalReader, clock: Arc<dyn Clock>) -> Self {
        let started_ns = clock.now_ns();
        StatusBoard {
            identity,
            reader,
            clock,
            started_ns,
            board: Mutex::new(Board {
                state: AgentState::Starting,
                error: None,
                position: None,
                head: KnownHead::default(),
                next_due_ns: None,
                records_applied: 0,
                bytes_applied: 0,
                batches_applied: 0,
                recovery: None,
                head_cache: None,
                oldest_unapplied: None,
                spent_ns: [0; 5],
                journal_hole: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        // Every update is a few plain assignments: a panic elsewhere cannot leave it torn.
        crate::sync::lock(&self.board)
    }

    pub fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    pub fn state(&self) -> AgentState {
        self.lock().state
    }

    pub fn set_state(&self, state: AgentState) {
        let mut b = self.lock();
        b.state = state;
        if state != AgentState::WaitingForDelay {
            b.next_due_ns = None;
        }
    }

    /// The agent waits until `due_ns` for the next record.
    pub fn waiting_until(&self, due_ns: u64) {
        let mut b = self.lock();
        b.state = AgentState::WaitingForDelay;
        b.next_due_ns = Some(due_ns);
    }

    /// The agent stopped on `error`.
    pub fn failed(&self, error: &str) {
        let mut b = self.lock();
        b.state = AgentState::Failed;
        b.error = Some(error.to_string());
    }

    /// A transient problem (the store is unreachable); cleared by the next success.
    pub fn warn(&self, message: Option<String>) {
        self.lock().error = message;
    }

    /// The agent applied `records` records of `bytes` bytes up to `position`, and committed
    /// it (or will, within [`PollPolicy::commit_every`](super::PollPolicy::commit_every)):
    /// status shows what the replica holds, not only what the store has.
    pub fn committed(&self, position: &ConsumerState, records: u64, bytes: u64) {
        let mut b = self.lock();
        b.records_applied += records;
        b.bytes_applied += bytes;
        if records > 0 {
            b.batches_applied += 1;
        }
        raise(
            &mut b.head,
            position.applied_lsn,
            position.applied_timestamp_ns,
            0,
        );
        b.position = Some(position.clone());
    }

    /// The agent fetched a segment ending before `next_seq` whose last record is `lsn`.
    pub fn saw_segment(&self, next_seq: u64, lsn: Option<u64>, timestamp_ns: Option<u64>) {
        let mut b = self.lock();
        b.head.next_seq = b.head.next_seq.max(next_seq);
        if let (Some(lsn), Some(ts)) = (lsn, timestamp_ns) {
            raise(&mut b.head, lsn, ts, next_seq);
        }
        b.error = None;
        b.journal_hole = None;
    }

    /// A journal hole at `seq` stops the agent until the segment appears (`message` names
    /// it and the choices); cleared by the next segment seen.
    pub fn journal_hole(&self, seq: u64, message: String) {
        let mut b = self.lock();
        b.journal_hole = Some(seq);
        b.error = Some(message);
    }

    /// Adds `elapsed` to the time spent in `phase`.
    pub fn spent(&self, phase: Phase, elapsed: Duration) {
        let i = phase as usize;
        let mut b = self.lock();
        b.spent_ns[i] = b.spent_ns[i].saturating_add(elapsed.as_nanos() as u64);
    }

    pub fn recovered(&self, report: RecoveryReport) {
        self.lock().recovery = Some(report);
    }

    /// The full status, probing the head if the agent is behind.
    pub async fn snapshot(&self) -> ReplicaStatus {
        let (position, state, error, due, applied, bytes, batches, recovery, spent, hole) = {
            let b = self.lock();
            (
                b.position.clone(),
                b.state,
                b.error.clone(),
                b.next_due_ns,
                b.records_applied,
                b.bytes_applied,
                b.batches_applied,
                b.recovery.clone(),
                b.spent_ns,
                b.journal_hole,
            )
        };
        let ms = |p: Phase| spent[p as usize] / 1_000_000;
        let times = PhaseTimes {
            preimage_ms: ms(Phase::Preimage),
            undo_ms: ms(Phase::Undo),
            apply_ms: ms(Phase::Apply),
            sync_ms: ms(Phase::Sync),
            commit_ms: ms(Phase::Commit),
        };
        let position = position.unwrap_or_else(|| ConsumerState {
            name: self.identity.name.clone(),
            next_seq: 0,
            applied_lsn: 0,
            applied_timestamp_ns: 0,
            consistent_lsn: 0,
            consistent_seq: 0,
            consistent_timestamp_ns: 0,
            delay_ns: self.identity.delay_ns,
            replica: self.identity.replica.clone(),
            registered_at_ns: 0,
            updated_at_ns: 0,
            undo: Default::default(),
            verify: Default::default(),
            seed: Default::default(),
            chain_epoch: 0,
        });
        let (head, lag_bytes) = self.head(&position).await;
        let head_lsn = head.lsn.max(position.applied_lsn);
        let lag_records = head_lsn - position.applied_lsn;
        let oldest = if lag_records == 0 {
            None
        } else {
            self.oldest_unapplied(&position).await
        };
        let now = self.clock.now_ns();
        let lag_seconds = oldest.map_or(0.0, |ts| now.saturating_sub(ts) as f64 / 1e9);
        let delay_seconds = self.identity.delay_ns as f64 / 1e9;
        let time = |ns: u64| (ns > 0).then(|| format_ns(ns));
        ReplicaStatus {
            role: "replica".into(),
            identity: self.identity.clone(),
            state,
            error,
            applied_lsn: position.applied_lsn,
            applied_timestamp_ns: position.applied_timestamp_ns,
            applied_time: time(position.applied_timestamp_ns),
            consistent_lsn: position.consistent_lsn,
            consistent_time: time(position.consistent_timestamp_ns),
            in_resync_span: position.consistent_lsn < position.applied_lsn,
            journal_hole_seq: hole,
            head_lsn,
            head_time: time(head.timestamp_ns),
            lag_records,
            lag_bytes: lag_bytes.map_or(0, |l| l.bytes),
            lag_bytes_estimated: lag_bytes.is_none_or(|l| l.estimated),
            lag_seconds,
            oldest_unapplied_time: oldest.map(format_ns),
            lag_beyond_delay_seconds: (lag_seconds - delay_seconds).max(0.0),
            delay: format_duration(Duration::from_nanos(self.identity.delay_ns)),
            next_due_time: due.map(format_ns),
            undo_bytes: position.undo.bytes,
            undo_segments: position.undo.segments,
            verify: position.verify.clone(),
            seed: position.seed.clone(),
            seed_vouched: position.seed.vouched(),
            chain_epoch: position.chain_epoch,
            records_applied: applied,
            bytes_applied: bytes,
            batches_applied: batches,
            recovery,
            time_spent: times,
            started_time: format_ns(self.started_ns),
        }
    }
}

fn vouched_by_default() -> bool {
    true
}

fn raise(head: &mut KnownHead, lsn: u64, timestamp_ns: u64, next_seq: u64) {
    if lsn >= head.lsn {
        head.lsn = lsn;
        head.timestamp_ns = head.timestamp_ns.max(timestamp_ns);
    }
    head.next_seq = head.next_seq.max(next_seq);
}

/// The control-socket handler of a replay agent.
pub struct StatusHandler(pub Arc<StatusBoard>);

#[async_trait]
impl Handler for StatusHandler {
    async fn handle(&self, request: Request) -> Response {
        match request.cmd.as_str() {
            "status" => {
                let status = self.0.snapshot().await;
                let text = request
                    .args
                    .get("format")
                    .and_then(|f| f.as_str())
                    .is_some_and(|f| f == "text");
                if text {
                    Response::ok(serde_json::json!({ "text": render_text(&status) }))
                } else {
                    match serde_json::to_value(&status) {
                        Ok(v) => Response::ok(v),
                        Err(e) => Response::error(format!("cannot encode status: {e}")),
                    }
                }
            }
            other => Response::error(format!(
                "unknown command {other:?}; a replay agent answers \"status\""
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_json_names() {
        for state in AgentState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }

    #[test]
    fn durations_format_in_their_largest_unit() {
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
