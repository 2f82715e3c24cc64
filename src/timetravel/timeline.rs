//! `timeline`: the restorable window, its holes (resync spans), the marks and where the
//! replica stands.
//!
//! The window's ends come from pointers and probes (the undo log's `trim` pointer, the
//! consumer position, O(log n) HEAD probes for the journal's end). Holes cannot be found
//! that way: they are found by reading the index (one tail read) of every undo segment in
//! the window and every journal segment after the consumer's consistent point, in order,
//! keeping only the spans, never payloads.
//!
//! It also shows the epoch chain: each epoch (who, why, where it began, what it continues),
//! the forks (`promote --at`) with the LSNs they left off the chain, and the branches kept
//! of them (restorable with `--branch NAME`). Holes are looked for on the lineage only.
//!
//! Must never: write anything; read a segment's payloads.

use serde::Serialize;

use crate::clock::format_ns;
use crate::journal::chain::{self, ChainReport};
use crate::journal::mark;

use super::error::TimeTravelResult;
use super::sources::{Hole, Point, Sources, Spans, Window};

/// A point for people and scripts: LSN, RFC 3339 time and nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct At {
    pub lsn: u64,
    pub time: String,
    pub timestamp_ns: u64,
}

impl From<Point> for At {
    fn from(p: Point) -> At {
        At {
            lsn: p.lsn,
            time: format_ns(p.timestamp_ns),
            timestamp_ns: p.timestamp_ns,
        }
    }
}

/// A hole: points `begin_lsn ..= end_lsn - 1` are not restorable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HoleAt {
    pub begin_lsn: u64,
    /// The `RESYNC_END` (the first valid point after the hole); absent while unfinished.
    pub end: Option<At>,
    /// The last valid point before the hole, when inside the window.
    pub valid_before: Option<At>,
}

/// A mark and whether its point can be restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MarkAt {
    pub name: String,
    pub at: At,
    pub in_window: bool,
    /// Whether the mark's record is on the current chain (else it is on a branch).
    pub on_chain: bool,
}

/// Everything `timeline` shows (its `--json` form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Timeline {
    pub journal: String,
    pub replica: String,
    pub consumer: String,
    pub undo: String,
    /// The oldest restorable point (LSN) and the earliest time accepted.
    pub window_start: At,
    pub window_start_time: String,
    /// The newest point: the journal's head.
    pub window_end: At,
    pub holes: Vec<HoleAt>,
    pub marks: Vec<MarkAt>,
    /// The replica's committed position.
    pub applied: At,
    pub consistent: At,
    pub delay_ns: u64,
    /// Undo segments in the log (first live seq and past the last).
    pub undo_segments: [u64; 2],
    /// A segment missing below the journal's known end stops the window at `window_end`
    /// (the message names the seqs); `timeline` then exits non-zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_hole: Option<String>,
    /// The epoch chain, its forks and branches.
    pub chain: ChainReport,
}

/// Every hole inside the window: reads the index of every undo segment and every journal
/// segment after the consistent point.
pub(crate) async fn holes(sources: &Sources, window: &Window) -> TimeTravelResult<Vec<Hole>> {
    let mut spans = Spans::default();
    if let Some(log) = &sources.undo {
        for seq in sources.undo_first..sources.undo_end {
            if let Some(index) = log.index(seq).await? {
                for e in &index.entries {
                    spans.feed(e.lsn, e.timestamp_ns, e.kind);
                }
            }
        }
    }
    let mut seq = sources.consumer.consistent_seq;
    while seq < window.journal_end {
        let Some(index) = sources.reader.index(seq).await? else {
            break;
        };
        for e in index
            .entries
            .iter()
            .filter(|e| sources.lineage.contains(e.lsn))
        {
            spans.feed(e.lsn, e.timestamp_ns, e.kind);
        }
        seq = index.header.next_seq;
    }
    Ok(spans.all())
}

/// Gathers the timeline of `sources`.
pub async fn gather(sources: &Sources) -> TimeTravelResult<Timeline> {
    let window = sources.window().await?;
    let holes = holes(sources, &window)
        .await?
        .into_iter()
        .map(|h| HoleAt {
            begin_lsn: h.begin_lsn,
            end: h.end.map(At::from),
            valid_before: h.before.map(At::from),
        })
        .collect();
    let marks = mark::list(sources.journal().as_ref())
        .await?
        .into_iter()
        .map(|m| MarkAt {
            in_window: m.lsn >= window.start.lsn && m.lsn <= window.head.lsn,
            on_chain: sources.lineage.contains(m.lsn),
            name: m.name,
            at: At::from(Point {
                lsn: m.lsn,
                timestamp_ns: m.timestamp_ns,
            }),
        })
        .collect();
    let c = &sources.consumer;
    Ok(Timeline {
        journal: sources.journal().describe(),
        replica: sources.replica.display().to_string(),
        consumer: c.name.clone(),
        undo: sources.undo_location.clone(),
        window_start: window.start.into(),
        window_start_time: format_ns(window.start_time_ns),
        window_end: window.head.into(),
        holes,
        marks,
        applied: Point {
            lsn: c.applied_lsn,
            timestamp_ns: c.applied_timestamp_ns,
        }
        .into(),
        consistent: sources.consistent().into(),
        delay_ns: c.delay_ns,
        undo_segments: [sources.undo_first, sources.undo_end],
        journal_hole: window.hole.clone(),
        chain: ChainReport::new(
            &sources.chain,
            chain::list_branches(sources.journal().as_ref()).await?,
            window.head.lsn,
        ),
    })
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "journal   {}", self.journal)?;
        writeln!(f, "replica   {} (consumer {})", self.replica, self.consumer)?;
        writeln!(
            f,
            "undo log  {} (segments {}..{})",
            self.undo, self.undo_segments[0], self.undo_segments[1]
        )?;
        writeln!(
            f,
            "window    {} (LSN {}) .. {} (LSN {})",
            self.window_start_time,
            self.window_start.lsn,
            self.window_end.time,
            self.window_end.lsn
        )?;
        if let Some(hole) = &self.journal_hole {
            writeln!(f, "MISSING   {hole}")?;
        }
        if self.holes.is_empty() {
            writeln!(f, "holes     none")?;
        }
        for h in &self.holes {
            let before = h
                .valid_before
                .as_ref()
                .map_or("-".to_string(), |b| format!("{} (LSN {})", b.time, b.lsn));
            let after = h.end.as_ref().map_or("unfinished".to_string(), |e| {
                format!("{} (LSN {})", e.time, e.lsn)
            });
            writeln!(
                f,
                "hole      LSN {}.. : valid before {before}, again at {after}",
                h.begin_lsn
            )?;
        }
        for m in &self.marks {
            writeln!(
                f,
                "mark      {:<20} {} (LSN {}){}",
                m.name,
                m.at.time,
                m.at.lsn,
                match (m.on_chain, m.in_window) {
                    (false, _) => "  on a branch",
                    (true, true) => "",
                    (true, false) => "  outside the window",
                }
            )?;
        }
        for line in self.chain.lines() {
            let (kind, rest) = line.split_once(' ').unwrap_or(("chain", &line));
            writeln!(f, "{kind:<9} {rest}")?;
        }
        writeln!(
            f,
            "replica   applied {} (LSN {}), consistent {} (LSN {})",
            self.applied.time, self.applied.lsn, self.consistent.time, self.consistent.lsn
        )
    }
}
