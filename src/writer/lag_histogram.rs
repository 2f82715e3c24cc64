//! Ack→durable lag histogram: how long each journaled record waited between its
//! acknowledgement timestamp and the moment its segment joined the durable prefix. This is
//! the real RPO a replica sees; `status` reports its p50, p99 and maximum.
//!
//! Buckets are log-linear: four per doubling from 1 µs, so a quantile is known to within
//! 19% (the reported value is the bucket's upper bound, never an underestimate).
//!
//! Must never: take a lock on the writer's path (every update is a relaxed atomic add).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets per doubling.
const STEPS: u32 = 4;
/// 1 µs · 2^(111/4) ≈ 2.3 × 10^5 s: past that everything lands in the last bucket.
const BUCKETS: usize = 112;
const FIRST_NS: f64 = 1_000.0;

/// See the module documentation.
#[derive(Debug)]
pub struct LagHistogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for LagHistogram {
    fn default() -> Self {
        LagHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

/// Quantiles of the histogram, for `status`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LagSummary {
    /// Records measured.
    pub records: u64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
}

fn bucket_of(ns: u64) -> usize {
    if (ns as f64) < FIRST_NS {
        return 0;
    }
    let i = ((ns as f64 / FIRST_NS).log2() * f64::from(STEPS)).floor() as usize + 1;
    i.min(BUCKETS - 1)
}

/// The largest lag bucket `i` holds.
fn upper_bound(i: usize) -> Duration {
    Duration::from_nanos((FIRST_NS * 2f64.powf(i as f64 / f64::from(STEPS))) as u64)
}

impl LagHistogram {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one record that waited `lag_ns`.
    pub fn record(&self, lag_ns: u64) {
        self.buckets[bucket_of(lag_ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(lag_ns, Ordering::Relaxed);
    }

    /// The lag at or under which a fraction `q` of the records stayed (an upper bound).
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let max = Duration::from_nanos(self.max_ns.load(Ordering::Relaxed));
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(upper_bound(i).min(max));
            }
        }
        Some(max)
    }

    pub fn summary(&self) -> LagSummary {
        let secs = |q| self.quantile(q).map_or(0.0, |d| d.as_secs_f64());
        LagSummary {
            records: self.count.load(Ordering::Relaxed),
            p50_seconds: secs(0.5),
            p99_seconds: secs(0.99),
            max_seconds: Duration::from_nanos(self.max_ns.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_upper_bounds_within_a_fifth() {
        let h = LagHistogram::new();
        assert_eq!(h.quantile(0.5), None);
        // 1..=1000 ms.
        for ms in 1..=1000u64 {
            h.record(ms * 1_000_000);
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64();
        assert!((0.5..=0.5 * 1.19).contains(&p50), "p50 {p50}");
        let p99 = h.quantile(0.99).unwrap().as_secs_f64();
        assert!((0.99..=1.0).contains(&p99), "p99 {p99} (capped by the max)");
        let s = h.summary();
        assert_eq!(s.records, 1000);
        assert_eq!(s.max_seconds, 1.0);
    }

    #[test]
    fn tiny_and_huge_lags_land_in_the_end_buckets() {
        let h = LagHistogram::new();
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(h.summary().records, 2);
    }
}
