//! How `tinylag status` prints a replay agent's status for a terminal (the JSON form is the
//! serde form of [`ReplicaStatus`]).
//!
//! Must never: print credentials, or a number the status does not hold.

use std::time::Duration;

use super::ReplicaStatus;
use crate::journal::consumer::Seed;
use crate::units::{format_elapsed, format_size};

/// The status as lines for a terminal.
pub fn render_text(s: &ReplicaStatus) -> String {
    let or_never = |t: &Option<String>| t.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    line("role", format!("replica (consumer {})", s.identity.name));
    line(
        "state",
        serde_json::to_value(s.state).map_or(String::new(), |v| {
            v.as_str().unwrap_or_default().to_string()
        }),
    );
    if let Some(e) = &s.error {
        line("error", e.clone());
    }
    line("journal", s.identity.journal.clone());
    line("replica", s.identity.replica.clone());
    if !matches!(s.seed, Seed::Blank | Seed::Unrecorded) {
        line("seeded", s.seed.to_string());
    }
    line(
        "applied",
        format!("LSN {} at {}", s.applied_lsn, or_never(&s.applied_time)),
    );
    line(
        "consistent",
        format!(
            "LSN {} at {}{}",
            s.consistent_lsn,
            or_never(&s.consistent_time),
            if s.in_resync_span {
                "  (inside a resync span: the replica is not consistent until it ends)"
            } else {
                ""
            }
        ),
    );
    line(
        "head",
        format!(
            "LSN {} at {}  (the journal head compared with)",
            s.head_lsn,
            or_never(&s.head_time)
        ),
    );
    line("behind", behind_text(s));
    let due = s
        .next_due_time
        .as_ref()
        .map(|t| format!("; next record due at {t}"))
        .unwrap_or_default();
    let delay_part = if s.lag_records == 0 {
        String::new()
    } else if s.lag_beyond_delay_seconds > 0.0 {
        format!(
            " (the oldest record behind is {} past it)",
            format_elapsed(Duration::from_secs_f64(s.lag_beyond_delay_seconds))
        )
    } else if s.delay != "0s" {
        " (every record behind is still within it)".to_string()
    } else {
        String::new()
    };
    line("delay", format!("{}{delay_part}{due}", s.delay));
    line(
        "undo log",
        match &s.identity.undo {
            Some(u) => format!(
                "{u}: {} in {} segments",
                format_size(s.undo_bytes),
                s.undo_segments
            ),
            None => "none (--no-undo: no time travel, a crash may leave the replica torn until it catches up)".into(),
        },
    );
    line(
        "applied since",
        format!(
            "{}: {} records, {} in {} batches",
            s.started_time,
            s.records_applied,
            format_size(s.bytes_applied),
            s.batches_applied
        ),
    );
    let v = &s.verify;
    if v.checked + v.skipped > 0 {
        let listed: Vec<String> = v
            .mismatched
            .iter()
            .map(|m| format!("{}+{} (LSN {})", m.offset, format_size(m.len), m.lsn))
            .collect();
        line(
            "verify",
            format!(
                "{} regions checked, {} mismatches ever, {} skipped inside resync spans{}",
                v.checked,
                v.mismatches,
                v.skipped,
                if listed.is_empty() {
                    String::new()
                } else {
                    format!("; MISMATCHING NOW: {}", listed.join(", "))
                }
            ),
        );
    }
    if let Some(r) = &s.recovery {
        if r.undone_segments > 0 || r.discarded_segments > 0 || r.from_lsn != r.to_lsn {
            let discarded = if r.discarded_segments > 0 {
                format!(
                    "; deleted {} undo segments of a batch that never reached the replica",
                    r.discarded_segments
                )
            } else {
                String::new()
            };
            line(
                "last recovery",
                format!(
                    "undid {} records in {} undo segments: LSN {} -> {}{discarded}",
                    r.undone_records, r.undone_segments, r.from_lsn, r.to_lsn
                ),
            );
        }
    }
    out
}

/// `2 records, 292 B, oldest written 1.204 s ago` or `nothing (applied through the head)`.
fn behind_text(s: &ReplicaStatus) -> String {
    if s.lag_records == 0 {
        return "nothing (applied through the head)".into();
    }
    let age = match &s.oldest_unapplied_time {
        Some(t) => format!(
            ", oldest written {} ago ({t})",
            format_elapsed(Duration::from_secs_f64(s.lag_seconds))
        ),
        None => String::new(),
    };
    format!(
        "{} records, {}{}{age}",
        s.lag_records,
        if s.lag_bytes_estimated { "~" } else { "" },
        format_size(s.lag_bytes),
    )
}
