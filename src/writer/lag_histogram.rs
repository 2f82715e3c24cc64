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
pub(crate) struct LagHistogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    max_ns: AtomicU64,
    /// Sum of every lag, for the Prometheus histogram's `_sum` (wraps after 584 years).
    sum_ns: AtomicU64,
}

impl Default for LagHistogram {
    fn default() -> Self {
        LagHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// The histogram in Prometheus' terms, for `/metrics`: the count in each bucket (not
/// cumulative) with its upper bound in seconds, one bucket per doubling from 1 µs, the last
/// one unbounded (`f64::INFINITY`).
#[derive(Clone, Debug, PartialEq)]
pub struct LagBuckets {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
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
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Counts one record that waited `lag_ns`.
    pub(crate) fn record(&self, lag_ns: u64) {
        self.buckets[bucket_of(lag_ns)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(lag_ns, Ordering::Relaxed);
        self.sum_ns.fetch_add(lag_ns, Ordering::Relaxed);
    }

    /// Every bucket, merged to one per doubling (Prometheus needs no finer ones: its quantile
    /// estimate interpolates inside a bucket). Bucket `STEPS·k` holds lags under 1 µs·2^k.
    pub(crate) fn buckets(&self) -> LagBuckets {
        let step = STEPS as usize;
        let mut buckets = Vec::with_capacity(BUCKETS / step + 1);
        let mut pending = 0u64;
        let mut total = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            pending += n;
            total += n;
            if i % step == 0 && i + 1 < BUCKETS {
                buckets.push((upper_bound(i).as_secs_f64(), pending));
                pending = 0;
            }
        }
        buckets.push((f64::INFINITY, pending));
        LagBuckets {
            buckets,
            // From the buckets, so `_count` equals the `+Inf` bucket even while records are
            // being counted concurrently.
            count: total,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// The lag at or under which a fraction `q` of the records stayed (an upper bound).
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
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

    pub(crate) fn summary(&self) -> LagSummary {
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
    fn buckets_double_and_add_up() {
        let h = LagHistogram::new();
        for ns in [500, 1_500, 3_000_000, 3_000_000, 2_000_000_000] {
            h.record(ns);
        }
        let b = h.buckets();
        assert_eq!(b.count, 5);
        assert_eq!(b.buckets.iter().map(|(_, n)| n).sum::<u64>(), 5);
        assert_eq!(b.buckets[0], (1e-6, 1), "under 1 µs");
        assert_eq!(b.buckets[1], (2e-6, 1), "1.5 µs");
        assert!(b.buckets.windows(2).all(|w| w[1].0 > w[0].0));
        assert_eq!(b.buckets.last().unwrap().0, f64::INFINITY);
        // 3 ms lies under 2^12 µs = 4.096 ms, and over 2^11 µs.
        let at = |le: f64| {
            b.buckets
                .iter()
                .find(|(u, _)| (*u - le).abs() < 1e-12)
                .unwrap()
                .1
        };
        assert_eq!(at(4.096e-3), 2);
        assert!(
            (b.sum_seconds - 2.006_002).abs() < 1e-9,
            "{}",
            b.sum_seconds
        );
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
