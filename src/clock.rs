//! Time, behind a trait so tests of delays and timestamps need not sleep.
//!
//! Must never: hand out a record timestamp smaller than one it handed out before, even when
//! the wall clock steps back ([`MonotonicTimestamps`] enforces that).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in nanoseconds since the UNIX epoch (UTC).
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ns(&self) -> u64;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as u64
    }
}

/// A clock that tests move by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        ManualClock(AtomicU64::new(start_ns))
    }
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst);
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Hands out record timestamps that never decrease.
#[derive(Debug)]
pub struct MonotonicTimestamps {
    clock: Arc<dyn Clock>,
    last: AtomicU64,
}

impl MonotonicTimestamps {
    /// `floor` is the last timestamp already in the journal (a restarted writer continues
    /// from it even if the clock is behind).
    pub fn new(clock: Arc<dyn Clock>, floor: u64) -> Self {
        MonotonicTimestamps {
            clock,
            last: AtomicU64::new(floor),
        }
    }

    pub fn next(&self) -> u64 {
        let now = self.clock.now_ns();
        let prev = self.last.fetch_max(now, Ordering::AcqRel);
        prev.max(now)
    }
}

/// Formats nanoseconds since the epoch as RFC 3339 UTC with millisecond precision.
pub fn format_ns(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nsub = (ns % 1_000_000_000) as u32;
    match chrono::DateTime::from_timestamp(secs, nsub) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => format!("{ns}ns"),
    }
}

/// Parses a point in time for `--until`, `--from-time`, `--at`: RFC 3339
/// (`2026-11-23T05:00:00Z`), `@<unix seconds>`, or `<duration> ago` (`10m ago`).
pub fn parse_time(s: &str, clock: &dyn Clock) -> Result<u64, String> {
    const FORMS: &str =
        "RFC 3339 (2026-11-23T05:00:00Z), @<unix seconds>, or <duration> ago (10m ago)";
    let t = s.trim();
    if let Some(ago) = t.strip_suffix("ago") {
        let d = crate::units::parse_duration(ago.trim())
            .map_err(|e| format!("invalid time {s:?}: {e}"))?;
        return Ok(clock.now_ns().saturating_sub(d.as_nanos() as u64));
    }
    if let Some(secs) = t.strip_prefix('@') {
        let v: f64 = secs
            .parse()
            .map_err(|_| format!("invalid time {s:?}: expected {FORMS}"))?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("invalid time {s:?}: expected {FORMS}"));
        }
        return Ok((v * 1e9) as u64);
    }
    let dt = chrono::DateTime::parse_from_rfc3339(t)
        .map_err(|_| format!("invalid time {s:?}: expected {FORMS}"))?;
    let ns = dt
        .timestamp_nanos_opt()
        .filter(|n| *n >= 0)
        .ok_or_else(|| format!("invalid time {s:?}: out of range"))?;
    Ok(ns as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_never_go_back() {
        let clock = Arc::new(ManualClock::new(1_000));
        let ts = MonotonicTimestamps::new(clock.clone(), 0);
        assert_eq!(ts.next(), 1_000);
        clock.set(500);
        assert_eq!(ts.next(), 1_000);
        clock.set(2_000);
        assert_eq!(ts.next(), 2_000);
    }

    #[test]
    fn times_parse() {
        let clock = ManualClock::new(10_000_000_000_000);
        assert_eq!(parse_time("@1.5", &clock), Ok(1_500_000_000));
        assert_eq!(
            parse_time("2s ago", &clock),
            Ok(10_000_000_000_000 - 2_000_000_000)
        );
        assert_eq!(
            parse_time("1970-01-01T00:00:01Z", &clock),
            Ok(1_000_000_000)
        );
        assert!(parse_time("yesterday", &clock)
            .unwrap_err()
            .contains("RFC 3339"));
        assert_eq!(format_ns(1_500_000_000), "1970-01-01T00:00:01.500Z");
    }
}
