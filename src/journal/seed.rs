//! Who vouches for a replica's image: the state a consumer's replica started from, kept in
//! its commit position (`consumers/<name>`) so every later reader (status, `journal info`,
//! a failover that wants to reuse an old primary's image) sees how it was seeded.
//!
//! A replay agent applies the journal from its start LSN onto the image, so the image must
//! already hold the primary's state at that LSN. Only four things vouch for that: the agent
//! created the image blank at LSN 0 ([`Seed::Blank`]); `restore --output` wrote it at a known
//! LSN and left a seed stamp ([`Seed::Restore`], see `crate::replayer::seed`); the agent has
//! been proving it region by region against the primary ([`Seed::Checking`], then
//! [`Seed::Checked`]); or the operator said so ([`Seed::Assumed`], shown loudly).
//!
//! Must never: count a region as proven that no matching `VERIFY` or rewrite covered whole;
//! hold more than a few words per region of the device.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a consumer's replica came to hold the journal's state at its start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum Seed {
    /// Registered before tinylag recorded this.
    #[default]
    Unrecorded,
    /// The agent created the replica file blank at the journal's start (LSN 0).
    Blank,
    /// `restore --output` wrote the image as of `lsn`, written by writer `epoch`; its seed
    /// stamp matched the file.
    Restore { lsn: u64, epoch: u64 },
    /// The operator said the image already held the state at `lsn`
    /// (`replay --assume-seeded`); nothing was checked.
    Assumed { lsn: u64 },
    /// Being proven against the primary (`replay --check-seed`): a region leaves `unproven`
    /// when a matching `VERIFY` of it is applied, or when a record rewrites it whole
    /// (`RESYNC_DATA`, `WRITE`, `WRITE_ZEROES`). `mismatched` lists the unproven regions
    /// whose last `VERIFY` failed: a resync of them (`tinylag resync --regions`) proves them.
    Checking {
        /// The journal LSN the check started at.
        lsn: u64,
        unproven: RegionRanges,
        mismatched: RegionRanges,
        /// `[region, end]`: unproven regions rewritten from their start up to byte `end`
        /// (one entry per region at most).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        covering: Vec<[u64; 2]>,
    },
    /// Every region was proven equal to the primary by `proven_lsn` (the check started at `lsn`).
    Checked { lsn: u64, proven_lsn: u64 },
}

impl Seed {
    /// A check of all `regions` regions, starting at `lsn`.
    pub fn checking(lsn: u64, regions: u64) -> Seed {
        Seed::Checking {
            lsn,
            unproven: RegionRanges::all(regions),
            mismatched: RegionRanges::default(),
            covering: Vec::new(),
        }
    }

    /// Whether the image may be trusted to follow the primary (everything but an unfinished
    /// check; an operator's word counts, and is shown as such).
    pub fn vouched(&self) -> bool {
        !matches!(self, Seed::Checking { .. })
    }

    /// Bytes `offset..offset + len` now equal the primary's at `lsn` (a record rewrote them,
    /// or a `VERIFY` of them matched). A region is proven once it is covered whole: by one
    /// record, or by records that together rewrite it from its start onwards (a resync sends
    /// a region as consecutive chunks). `region_size` is the journal's; `device_size` is the
    /// end of the device the range lies on (in a group's address space, its base plus its
    /// size: a region is whole once its device's bytes are, the padding after it is never
    /// written).
    pub fn proven(&mut self, range: (u64, u64), lsn: u64, region_size: u64, device_size: u64) {
        let Seed::Checking {
            lsn: start,
            unproven,
            mismatched,
            covering,
        } = self
        else {
            return;
        };
        let region_size = region_size.max(1);
        let (offset, end) = (range.0, range.0.saturating_add(range.1).min(device_size));
        if offset >= end {
            return;
        }
        for region in offset / region_size..end.div_ceil(region_size) {
            if !unproven.contains(region) {
                continue;
            }
            let first = region * region_size;
            let last = (first + region_size).min(device_size);
            let (lo, hi) = (offset.max(first), end.min(last));
            let at = covering.iter().position(|[r, _]| *r == region);
            let prefix = at.map_or(first, |i| covering[i][1]);
            let reached = if lo <= prefix { prefix.max(hi) } else { prefix };
            if reached >= last {
                unproven.remove(region, region + 1);
                mismatched.remove(region, region + 1);
                if let Some(i) = at {
                    covering.swap_remove(i);
                }
            } else if reached > first {
                match at {
                    Some(i) => covering[i][1] = reached,
                    None => covering.push([region, reached]),
                }
            }
        }
        if unproven.is_empty() {
            *self = Seed::Checked {
                lsn: *start,
                proven_lsn: lsn,
            };
        }
    }

    /// A `VERIFY` of bytes `offset..offset + len` failed: its regions need a resync.
    pub fn mismatched(&mut self, range: (u64, u64), region_size: u64, device_size: u64) {
        let Seed::Checking { mismatched, .. } = self else {
            return;
        };
        if let Some((first, end)) = whole_regions(range, region_size, device_size) {
            mismatched.insert(first, end);
        }
    }
}

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seed::Unrecorded => write!(f, "not recorded (registered before tinylag kept it)"),
            Seed::Blank => write!(f, "created blank by the agent at the journal's start"),
            Seed::Restore { lsn, epoch } => {
                write!(f, "restored as of LSN {lsn} (writer epoch {epoch}), stamp checked")
            }
            Seed::Assumed { lsn } => write!(
                f,
                "ASSUMED: the operator said it held the primary's state at LSN {lsn} (--assume-seeded); nothing was checked"
            ),
            Seed::Checking {
                lsn,
                unproven,
                mismatched,
                ..
            } => {
                write!(
                    f,
                    "NOT VOUCHED YET: being checked against the primary since LSN {lsn}; {} regions unproven ({unproven})",
                    unproven.count()
                )?;
                if mismatched.is_empty() {
                    write!(
                        f,
                        "; run `tinylag verify` on the primary to check them (after `rejoin`, the resync span it asked the new primary for proves them)"
                    )
                } else {
                    write!(
                        f,
                        "; {} differ: run `tinylag resync --regions {mismatched}` on the primary",
                        mismatched.count()
                    )
                }
            }
            Seed::Checked { lsn, proven_lsn } => write!(
                f,
                "checked against the primary: every region proven by LSN {proven_lsn} (check started at LSN {lsn})"
            ),
        }
    }
}

/// The regions `range` covers whole, as `first..end` region indexes (the device's last
/// region may be short), or `None` when it covers none.
fn whole_regions(
    (offset, len): (u64, u64),
    region_size: u64,
    device_size: u64,
) -> Option<(u64, u64)> {
    let region_size = region_size.max(1);
    let end_byte = offset.saturating_add(len).min(device_size);
    let first = offset.div_ceil(region_size);
    let end = if end_byte == device_size {
        device_size.div_ceil(region_size)
    } else {
        end_byte / region_size
    };
    (first < end).then_some((first, end))
}

/// A set of region indexes as sorted, disjoint, non-adjacent half-open ranges `[start, end)`.
///
/// # Invariants
/// - `ranges` is sorted, each `start < end`, and each `end` < the next `start`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegionRanges {
    ranges: Vec<[u64; 2]>,
}

impl RegionRanges {
    /// Regions `0..count`.
    pub fn all(count: u64) -> Self {
        RegionRanges {
            ranges: if count > 0 { vec![[0, count]] } else { vec![] },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether region `region` is in the set.
    pub fn contains(&self, region: u64) -> bool {
        self.ranges.iter().any(|[s, e]| *s <= region && region < *e)
    }

    /// How many regions.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|[s, e]| e - s).sum()
    }

    /// Removes regions `first..end`.
    pub fn remove(&mut self, first: u64, end: u64) {
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &[s, e] in &self.ranges {
            if e <= first || s >= end {
                out.push([s, e]);
                continue;
            }
            if s < first {
                out.push([s, first]);
            }
            if e > end {
                out.push([end, e]);
            }
        }
        self.ranges = out;
    }

    /// The region indexes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|[s, e]| *s..*e)
    }

    /// The last region index plus one (0 when empty).
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, |[_, e]| *e)
    }

    /// Adds regions `first..end`.
    pub fn insert(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let (mut lo, mut hi) = (first, end);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &[s, e] in &self.ranges {
            if e < lo || s > hi {
                out.push([s, e]);
            } else {
                lo = lo.min(s);
                hi = hi.max(e);
            }
        }
        out.push([lo, hi]);
        out.sort_unstable();
        self.ranges = out;
    }
}

/// As `tinylag resync --regions` takes them: `0,3,8-11` (inclusive).
impl fmt::Display for RegionRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return write!(f, "none");
        }
        for (i, [s, e]) in self.ranges.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            if e - s == 1 {
                write!(f, "{s}")?;
            } else {
                write!(f, "{s}-{}", e - 1)?;
            }
        }
        Ok(())
    }
}

/// Parses the text form [`Display`](fmt::Display) writes: `none`, or indexes and inclusive
/// ranges `0,3,8-11` (any order, overlaps merged).
impl std::str::FromStr for RegionRanges {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut out = RegionRanges::default();
        if s == "none" || s.is_empty() {
            return Ok(out);
        }
        for part in s.split(',') {
            let part = part.trim();
            let bad = || format!("{part:?} is not a region: use indexes and ranges like 0,3,8-11");
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let a: u64 = a.trim().parse().map_err(|_| bad())?;
            let b: u64 = b.trim().parse().map_err(|_| bad())?;
            if b < a || b == u64::MAX {
                return Err(bad());
            }
            out.insert(a, b + 1);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB4: u64 = 4 << 20;

    #[test]
    fn region_ranges_remove_insert_and_print_as_resync_takes_them() {
        let mut r = RegionRanges::all(12);
        r.remove(3, 4);
        r.remove(8, 12);
        assert_eq!(r.to_string(), "0-2,4-7");
        assert_eq!(r.count(), 7);
        r.insert(3, 4);
        assert_eq!(r.to_string(), "0-7");
        r.insert(10, 11);
        assert_eq!(r.to_string(), "0-7,10");
        r.remove(0, 100);
        assert!(r.is_empty());
        assert_eq!(r.to_string(), "none");
        let parsed: RegionRanges = "8-11, 0,3,9".parse().unwrap();
        assert_eq!(parsed.to_string(), "0,3,8-11");
        assert_eq!(parsed.iter().collect::<Vec<_>>(), vec![0, 3, 8, 9, 10, 11]);
        assert_eq!(parsed.end(), 12);
        assert_eq!(
            "none".parse::<RegionRanges>().unwrap(),
            RegionRanges::default()
        );
        assert!("3-1".parse::<RegionRanges>().is_err());
        assert!("x".parse::<RegionRanges>().is_err());
    }

    #[test]
    fn only_whole_regions_are_proven_and_the_last_short_one_counts() {
        // 10 MiB device, 4 MiB regions: 0, 1, and a short 2 (8..10 MiB).
        let size = 10 << 20;
        let mut seed = Seed::checking(5, 3);
        seed.proven((4096, MB4), 6, MB4, size);
        let Seed::Checking { unproven, .. } = &seed else {
            panic!("{seed:?}")
        };
        assert_eq!(unproven.count(), 3, "a partial region proves nothing");
        seed.mismatched((0, MB4), MB4, size);
        seed.proven((MB4, MB4), 7, MB4, size);
        seed.proven((2 * MB4, 2 << 20), 8, MB4, size);
        assert!(!seed.vouched());
        assert!(seed.to_string().contains("resync --regions 0`"), "{seed}");
        seed.proven((0, MB4), 9, MB4, size);
        assert_eq!(
            seed,
            Seed::Checked {
                lsn: 5,
                proven_lsn: 9
            }
        );
        assert!(seed.vouched());
        // Nothing changes a finished check.
        let mut chunked = Seed::checking(1, 3);
        for (at, n) in [(0, MB4 / 2), (MB4 / 2, MB4 / 4), (3 * MB4 / 4, MB4 / 4)] {
            assert!(!matches!(chunked, Seed::Checked { .. }));
            chunked.proven((at, n), 2, MB4, size);
        }
        // Out of order: a piece past the covered prefix does not count...
        chunked.proven((MB4 + 8192, 4096), 3, MB4, size);
        chunked.proven((MB4, 4096), 3, MB4, size);
        // ...the rest, from the prefix on, does (and runs into region 2).
        chunked.proven((MB4 + 4096, MB4), 3, MB4, size);
        chunked.proven((2 * MB4, 1 << 20), 4, MB4, size);
        chunked.proven((2 * MB4 + (1 << 20), 1 << 20), 5, MB4, size);
        assert_eq!(
            chunked,
            Seed::Checked {
                lsn: 1,
                proven_lsn: 5
            },
            "chunks from each region's start prove it"
        );
        seed.mismatched((0, MB4), MB4, size);
        assert!(seed.vouched());
    }
}
