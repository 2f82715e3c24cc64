//! Region tracker: which regions of the primary changed without being journaled.
//!
//! The device is cut into regions of the manifest's `region_size`; a write, trim or
//! write-zeroes that could not be journaled (pool full, store down, writer fenced) sets the
//! bit of every region it touches. The resync ([`super::resync`]) reads exactly those regions
//! back from the primary, clearing each bit under the region's range lock just before it
//! reads. The bitmap lives in memory; what survives a crash is the activity log
//! ([`super::activity_log`]).
//!
//! Must never: forget a region (only the resync clears a bit, and only while it holds the
//! region's range lock and is about to journal its content); cost more than a few bits per
//! region.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// See the module documentation.
///
/// # Invariants
/// `count` equals the number of set bits in `bits`; no bit at or past `regions` is set.
#[derive(Debug)]
pub struct DirtyRegions {
    region_size: u64,
    device_size: u64,
    regions: u64,
    bits: Mutex<Vec<u64>>,
    count: AtomicU64,
}

impl DirtyRegions {
    /// A clean tracker for a device of `device_size` bytes. `region_size` must be a power of
    /// two (the manifest guarantees it).
    pub fn new(device_size: u64, region_size: u64) -> Self {
        let region_size = region_size.max(1);
        let regions = device_size.div_ceil(region_size);
        DirtyRegions {
            region_size,
            device_size,
            regions,
            bits: Mutex::new(vec![0; regions.div_ceil(64) as usize]),
            count: AtomicU64::new(0),
        }
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Marks every region `range` touches (clamped to the device). Empty ranges mark nothing.
    pub fn mark(&self, range: Range<u64>) {
        let end = range.end.min(self.device_size);
        if range.start >= end {
            return;
        }
        let first = range.start / self.region_size;
        let last = (end - 1) / self.region_size;
        let mut bits = crate::sync::lock(&self.bits);
        let mut added = 0;
        for region in first..=last.min(self.regions - 1) {
            let (word, bit) = ((region / 64) as usize, region % 64);
            if bits[word] & (1 << bit) == 0 {
                bits[word] |= 1 << bit;
                added += 1;
            }
        }
        self.count.fetch_add(added, Ordering::AcqRel);
    }

    /// Clears region `region`; true if it was marked. Only the resync calls this, holding
    /// the region's range lock.
    pub fn clear(&self, region: u64) -> bool {
        if region >= self.regions {
            return false;
        }
        let mut bits = crate::sync::lock(&self.bits);
        let (word, bit) = ((region / 64) as usize, region % 64);
        let was = bits[word] & (1 << bit) != 0;
        if was {
            bits[word] &= !(1 << bit);
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    /// The first marked region at or after `from`, without listing them all.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let bits = crate::sync::lock(&self.bits);
        let mut w = (from / 64) as usize;
        let mut word = bits[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return Some(w as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            w += 1;
            word = *bits.get(w)?;
        }
    }

    /// How many regions the device has.
    pub fn total(&self) -> u64 {
        self.regions
    }

    /// Marks the whole device.
    pub fn mark_all(&self) {
        self.mark(0..self.device_size);
    }

    /// Regions marked.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Bytes the marked regions cover (the last region may be short).
    pub fn bytes(&self) -> u64 {
        self.regions()
            .iter()
            .map(|r| self.region_range(*r))
            .map(|r| r.end - r.start)
            .sum()
    }

    /// Whether region `region` is marked.
    pub fn is_dirty(&self, region: u64) -> bool {
        if region >= self.regions {
            return false;
        }
        let bits = crate::sync::lock(&self.bits);
        bits[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// The marked regions, ascending.
    pub fn regions(&self) -> Vec<u64> {
        let bits = crate::sync::lock(&self.bits);
        let mut out = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                out.push(w as u64 * 64 + bit);
                word &= word - 1;
            }
        }
        out
    }

    /// The device bytes of region `region`.
    pub fn region_range(&self, region: u64) -> Range<u64> {
        let start = region * self.region_size;
        start.min(self.device_size)..(start + self.region_size).min(self.device_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_region_a_range_touches_once() {
        let d = DirtyRegions::new(10 << 20, 4 << 20);
        d.mark(0..1);
        d.mark(4 << 20..(4 << 20) + 1);
        d.mark(0..1);
        assert_eq!(d.count(), 2);
        d.mark((4 << 20) - 1..(8 << 20) + 1);
        assert_eq!(d.regions(), vec![0, 1, 2]);
        // The last region is 2 MiB long.
        assert_eq!(d.bytes(), 10 << 20);
        d.mark(5..5);
        assert_eq!(d.count(), 3);
    }

    #[test]
    fn ranges_past_the_end_are_clamped() {
        let d = DirtyRegions::new(1 << 20, 4 << 20);
        d.mark(u64::MAX - 10..u64::MAX);
        assert_eq!(d.count(), 0);
        d.mark(0..u64::MAX);
        assert_eq!(d.regions(), vec![0]);
        assert!(d.is_dirty(0) && !d.is_dirty(1));
    }

    #[test]
    fn clearing_and_walking_the_marked_regions() {
        let d = DirtyRegions::new(1 << 30, 1 << 20);
        for r in [3u64, 64, 65, 1000, 1023] {
            d.mark(r << 20..(r << 20) + 1);
        }
        let mut seen = Vec::new();
        let mut at = 0;
        while let Some(r) = d.next_dirty(at) {
            seen.push(r);
            at = r + 1;
        }
        assert_eq!(seen, vec![3, 64, 65, 1000, 1023]);
        assert!(d.clear(64) && !d.clear(64));
        assert_eq!(d.next_dirty(4), Some(65));
        assert_eq!(d.count(), 4);
        assert_eq!(d.next_dirty(1024), None);
    }

    #[test]
    fn many_regions_use_many_words() {
        let d = DirtyRegions::new(1 << 30, 1 << 20);
        d.mark_all();
        assert_eq!(d.count(), 1024);
        assert_eq!(d.regions().len(), 1024);
        assert_eq!(d.bytes(), 1 << 30);
    }
}
