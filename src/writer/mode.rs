//! Replication modes and acknowledgement policies.
//!
//! The mode says how far the journal can be trusted to reproduce the primary:
//!
//! | mode | meaning |
//! |---|---|
//! | `logging` | every acknowledged change is in the journal, in order |
//! | `forward-part` | some changes were not journaled (pool full, store down); their regions are dirty and a `RESYNC_BEGIN` is open |
//! | `forward-full` | the whole primary must be resynced (a restart after a crash or unclean stop, a primary with data the journal never saw) |
//! | `reverse-full` | replica → primary after a failback (not entered by this daemon yet) |
//! | `fenced` | a newer writer owns the journal; nothing is journaled any more (split brain if clients still write) |
//! | `demoted` | `tinylag demote` ended this writer's epoch with a `DEMOTE` record: writes are refused, reads go on |
//! | `no-journal` | `--no-journal`: serving without a journal (for measurements only) |
//!
//! Conditions are set by whoever finds trouble (the I/O path, the journal writer) and cleared
//! only by the resync ([`super::resync`]) once it has journaled every dirty region: a dirty
//! episode ends with its `RESYNC_END`, a resyncable `forward-full` with the end of its span.
//! Every change of the resulting mode is kept, with its time and cause, for `status`.
//!
//! Must never: report a better mode than the truth; the worst condition wins.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Logging,
    ForwardPart,
    ForwardFull,
    ReverseFull,
    Fenced,
    Demoted,
    NoJournal,
}

impl Mode {
    /// Every mode, for the one-gauge-per-mode metric.
    pub const ALL: [Mode; 7] = [
        Mode::Logging,
        Mode::ForwardPart,
        Mode::ForwardFull,
        Mode::ReverseFull,
        Mode::Fenced,
        Mode::Demoted,
        Mode::NoJournal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Logging => "logging",
            Mode::ForwardPart => "forward-part",
            Mode::ForwardFull => "forward-full",
            Mode::ReverseFull => "reverse-full",
            Mode::Fenced => "fenced",
            Mode::Demoted => "demoted",
            Mode::NoJournal => "no-journal",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The lag bound of `--ack adaptive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaxLag {
    /// Bytes acknowledged but not yet durable (pool bytes in use).
    Bytes(u64),
    /// Age of the oldest record not yet durable.
    Time(Duration),
}

impl MaxLag {
    /// Parses `--max-lag`: a duration (`5s`, `500ms`, `2m` = two minutes) or a size (`64M`,
    /// `1G`, `65536`). Durations are tried first, so a lower-case `m` means minutes; write
    /// sizes in mebibytes as `M` or `MiB`.
    pub fn parse(s: &str) -> Result<MaxLag, String> {
        if let Ok(d) = crate::units::parse_duration(s) {
            if d.is_zero() {
                return Err(format!("invalid --max-lag {s:?}: must be more than zero"));
            }
            return Ok(MaxLag::Time(d));
        }
        match crate::units::parse_size(s) {
            Ok(0) => Err(format!("invalid --max-lag {s:?}: must be more than zero")),
            Ok(n) => Ok(MaxLag::Bytes(n)),
            Err(_) => Err(format!(
                "invalid --max-lag {s:?}: expected a size (64M, 1G) or a duration (5s, 500ms)"
            )),
        }
    }
}

impl std::fmt::Display for MaxLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxLag::Bytes(b) => f.write_str(&crate::units::format_size(*b)),
            MaxLag::Time(d) => f.write_str(&crate::units::format_duration(*d)),
        }
    }
}

/// When a client gets the reply to a write (`--ack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckMode {
    /// Reply once the primary has the write.
    Async,
    /// Reply once the segment holding the record is durable.
    Journal,
    /// Async while the lag is under the bound, journal above it.
    Adaptive(MaxLag),
}

impl AckMode {
    /// Parses `--ack` (and `--max-lag`, which only `adaptive` takes).
    pub fn parse(ack: &str, max_lag: Option<&str>) -> Result<AckMode, String> {
        let mode = match ack {
            "async" => AckMode::Async,
            "journal" => AckMode::Journal,
            "adaptive" => {
                let lag = max_lag.ok_or_else(|| {
                    "--ack adaptive needs --max-lag SIZE|DURATION (e.g. 64M or 5s)".to_string()
                })?;
                return Ok(AckMode::Adaptive(MaxLag::parse(lag)?));
            }
            other => {
                return Err(format!(
                    "invalid --ack {other:?}: use async, journal or adaptive"
                ))
            }
        };
        if max_lag.is_some() {
            return Err("--max-lag only applies to --ack adaptive".into());
        }
        Ok(mode)
    }

    pub fn name(self) -> &'static str {
        match self {
            AckMode::Async => "async",
            AckMode::Journal => "journal",
            AckMode::Adaptive(_) => "adaptive",
        }
    }
}

/// How many mode transitions `status` keeps (the oldest are dropped).
pub(super) const TRANSITIONS_KEPT: usize = 32;

/// One change of the mode, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When, in ns since the UNIX epoch (wall clock).
    pub at_ns: u64,
    pub from: Mode,
    pub to: Mode,
    /// Why, in words.
    pub cause: String,
}

/// The conditions the mode is computed from, shared by the I/O path and the journal writer.
///
/// # Invariants
/// `transitions` holds, oldest first, every change of [`ModeState::mode`] since start (at
/// most [`TRANSITIONS_KEPT`]); consecutive entries chain (`to` of one is `from` of the next).
#[derive(Debug, Default)]
pub(crate) struct ModeState {
    /// Changes were left out of the journal and a `RESYNC_BEGIN` is (being) queued.
    dirty_episode: AtomicBool,
    /// The whole primary needs a resync; why, as a [`FullReason`].
    full: AtomicU8,
    fenced: AtomicBool,
    /// The epoch ended with a `DEMOTE` record (`tinylag demote`).
    demoted: AtomicBool,
    no_journal: bool,
    transitions: Mutex<VecDeque<Transition>>,
}

/// Why the mode is `forward-full`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub(crate) enum FullReason {
    /// The journal holds data but the previous writer did not stop cleanly (or left holes):
    /// writes it acknowledged may be missing from the journal.
    UncleanRestart = 1,
    /// The journal is new but the primary already holds data.
    PrimaryHasData = 2,
    /// The journal writer stopped on an internal error.
    WriterFailed = 3,
    /// The previous writer stopped uncleanly and its activity log is missing, stale (another
    /// journal or writer) or corrupt, so the regions it was writing are unknown.
    NoActivityLog = 4,
    /// `serve --abandon-after-hole` abandoned the journal after a missing segment: every
    /// consumer must converge again from a full resync.
    AbandonedHole = 5,
}

impl FullReason {
    fn from_u8(v: u8) -> Option<FullReason> {
        match v {
            1 => Some(FullReason::UncleanRestart),
            2 => Some(FullReason::PrimaryHasData),
            3 => Some(FullReason::WriterFailed),
            4 => Some(FullReason::NoActivityLog),
            5 => Some(FullReason::AbandonedHole),
            _ => None,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            FullReason::UncleanRestart => {
                "the previous writer did not stop cleanly; writes it acknowledged may be missing \
                 from the journal"
            }
            FullReason::PrimaryHasData => "the journal is new but the primary already held data",
            FullReason::AbandonedHole => {
                "--abandon-after-hole abandoned the journal after a missing segment (a resync \
                 hole for every consumer)"
            }
            FullReason::WriterFailed => "the journal writer stopped on an internal error",
            FullReason::NoActivityLog => {
                "the previous writer did not stop cleanly and left no usable activity log; the \
                 regions it was writing are unknown"
            }
        }
    }

    /// Whether a resync of the whole device ends this condition (a failed writer journals
    /// nothing more, so no resync can).
    pub(crate) fn resyncable(self) -> bool {
        self != FullReason::WriterFailed
    }
}

impl ModeState {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The state of a daemon serving without a journal.
    pub(crate) fn without_journal() -> Self {
        ModeState {
            no_journal: true,
            ..Self::default()
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        if self.no_journal {
            Mode::NoJournal
        } else if self.demoted.load(Ordering::Acquire) {
            Mode::Demoted
        } else if self.fenced.load(Ordering::Acquire) {
            Mode::Fenced
        } else if self.full.load(Ordering::Acquire) != 0 {
            Mode::ForwardFull
        } else if self.dirty_episode.load(Ordering::Acquire) {
            Mode::ForwardPart
        } else {
            Mode::Logging
        }
    }

    /// Opens a dirty episode; true for the caller that opened it (who queues `RESYNC_BEGIN`).
    pub(crate) fn open_dirty_episode(&self, cause: &str) -> bool {
        self.changing(cause, || !self.dirty_episode.swap(true, Ordering::AcqRel))
    }

    pub(crate) fn dirty_episode_open(&self) -> bool {
        self.dirty_episode.load(Ordering::Acquire)
    }

    /// Ends the dirty episode (its `RESYNC_END` is queued) and, when its reason allows, a
    /// `forward-full`: the journal reproduces the primary again.
    pub(crate) fn resync_done(&self, cause: &str) {
        self.changing(cause, || {
            if self.full_reason().is_some_and(FullReason::resyncable) {
                self.full.store(0, Ordering::Release);
            }
            self.dirty_episode.store(false, Ordering::Release);
        });
    }

    /// Runs `change` and records a transition if the mode moved.
    fn changing<T>(&self, cause: &str, change: impl FnOnce() -> T) -> T {
        let mut log = crate::sync::lock(&self.transitions);
        let from = self.mode();
        let out = change();
        let to = self.mode();
        if from != to {
            if log.len() == TRANSITIONS_KEPT {
                log.pop_front();
            }
            log.push_back(Transition {
                at_ns: crate::clock::SystemClock.now_ns(),
                from,
                to,
                cause: cause.to_string(),
            });
        }
        out
    }

    /// The mode changes since start, oldest first (at most [`TRANSITIONS_KEPT`]).
    pub(crate) fn transitions(&self) -> Vec<Transition> {
        crate::sync::lock(&self.transitions)
            .iter()
            .cloned()
            .collect()
    }

    /// Why the mode last became `to`, if it did since start (and the change is still kept).
    pub(crate) fn last_cause_of(&self, to: Mode) -> Option<String> {
        crate::sync::lock(&self.transitions)
            .iter()
            .rev()
            .find(|t| t.to == to)
            .map(|t| t.cause.clone())
    }

    /// Enters `forward-full` (the first reason is kept).
    pub(crate) fn need_full(&self, reason: FullReason) {
        self.changing(reason.describe(), || {
            let _ =
                self.full
                    .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        });
    }

    pub(crate) fn full_reason(&self) -> Option<FullReason> {
        FullReason::from_u8(self.full.load(Ordering::Acquire))
    }

    pub(crate) fn fence(&self, cause: &str) {
        self.changing(cause, || self.fenced.store(true, Ordering::Release));
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// The epoch ended with its `DEMOTE`: nothing more is journaled, writes are refused.
    pub(crate) fn demote(&self, cause: &str) {
        self.changing(cause, || self.demoted.store(true, Ordering::Release));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_cause_of_a_mode_is_its_newest_entry() {
        let m = ModeState::new();
        assert_eq!(m.last_cause_of(Mode::ForwardPart), None);
        m.open_dirty_episode("the pool is full");
        m.resync_done("resync complete");
        m.open_dirty_episode("a store outage");
        assert_eq!(
            m.last_cause_of(Mode::ForwardPart).as_deref(),
            Some("a store outage")
        );
        assert_eq!(
            m.last_cause_of(Mode::Logging).as_deref(),
            Some("resync complete")
        );
        assert_eq!(m.last_cause_of(Mode::Fenced), None);
    }

    #[test]
    fn a_resync_ends_a_dirty_episode_and_a_resyncable_full() {
        let m = ModeState::new();
        m.need_full(FullReason::NoActivityLog);
        m.open_dirty_episode("start");
        assert_eq!(m.mode(), Mode::ForwardFull);
        m.resync_done("resync done");
        assert_eq!(m.mode(), Mode::Logging);
        let last = m.transitions().pop().unwrap();
        assert_eq!((last.from, last.to), (Mode::ForwardFull, Mode::Logging));
        m.need_full(FullReason::WriterFailed);
        m.open_dirty_episode("x");
        m.resync_done("resync done");
        assert_eq!(m.mode(), Mode::ForwardFull, "a failed writer stays full");
    }

    #[test]
    fn ack_modes_parse_and_name_their_flags() {
        assert_eq!(AckMode::parse("async", None), Ok(AckMode::Async));
        assert_eq!(AckMode::parse("journal", None), Ok(AckMode::Journal));
        assert_eq!(
            AckMode::parse("adaptive", Some("64M")),
            Ok(AckMode::Adaptive(MaxLag::Bytes(64 << 20)))
        );
        assert_eq!(
            AckMode::parse("adaptive", Some("5s")),
            Ok(AckMode::Adaptive(MaxLag::Time(Duration::from_secs(5))))
        );
        assert!(AckMode::parse("adaptive", None)
            .unwrap_err()
            .contains("--max-lag"));
        assert!(AckMode::parse("sync", None).unwrap_err().contains("--ack"));
        assert!(AckMode::parse("async", Some("5s")).is_err());
        assert!(MaxLag::parse("0").is_err());
        assert!(MaxLag::parse("fast").unwrap_err().contains("64M"));
    }

    #[test]
    fn the_worst_condition_wins() {
        let m = ModeState::new();
        assert_eq!(m.mode(), Mode::Logging);
        assert!(m.open_dirty_episode("pool full"));
        assert!(
            !m.open_dirty_episode("pool full"),
            "only the first opener queues RESYNC_BEGIN"
        );
        assert_eq!(m.mode(), Mode::ForwardPart);
        m.need_full(FullReason::UncleanRestart);
        m.need_full(FullReason::WriterFailed);
        assert_eq!(m.mode(), Mode::ForwardFull);
        assert_eq!(m.full_reason(), Some(FullReason::UncleanRestart));
        m.fence("epoch 4");
        assert_eq!(m.mode(), Mode::Fenced);
        let t = m.transitions();
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!((t[0].from, t[0].to), (Mode::Logging, Mode::ForwardPart));
        assert_eq!(t[0].cause, "pool full");
        assert_eq!((t[2].from, t[2].to), (Mode::ForwardFull, Mode::Fenced));
        assert_eq!(ModeState::without_journal().mode(), Mode::NoJournal);
        assert_eq!(
            serde_json::to_string(&Mode::ForwardPart).unwrap(),
            "\"forward-part\""
        );
    }
}
