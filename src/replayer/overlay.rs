//! The net effect of a batch: what each byte range holds once the batch's records are
//! applied in LSN order, as disjoint extents sorted by offset.
//!
//! Two uses: pre-images of a batch are the replica patched with the overlay of the records
//! before (see [`super::preimage`]), and a batch is applied as its net effect in offset order
//! ([`super::apply::apply_overlay`]): bytes written twice are written once, and a file's
//! page-cache folios are visited in order, which is several times cheaper for scattered small
//! writes than LSN order. A batch is undone or redone as a whole after a crash, so the order
//! of writes inside it does not matter, only the final bytes.
//!
//! Must never: hold overlapping extents, or an extent whose data length differs from its
//! range; disagree with applying the records one by one.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::journal::record::Op;

/// What a byte range holds once the batch is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// These bytes (exactly the extent's length).
    Data(Bytes),
    /// Zeroes; `punch` when the last record there was a DISCARD (a hole), not a WRITE_ZEROES.
    Zero { punch: bool },
}

/// One extent: `start..end` (the start is the map key) holds `fill`, last written by `lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub end: u64,
    pub fill: Fill,
    pub lsn: u64,
}

/// Disjoint extents keyed by start offset.
///
/// # Invariants
/// Extents do not overlap and are never empty; a `Data` extent's bytes are exactly its length.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    extents: BTreeMap<u64, Extent>,
}

impl Overlay {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Extents in ascending offset order, as `(start, extent)`.
    pub(crate) fn extents(&self) -> impl Iterator<Item = (u64, &Extent)> {
        self.extents.iter().map(|(&s, e)| (s, e))
    }

    /// Starts of the extents overlapping `start..end`, ascending.
    fn overlapping(&self, start: u64, end: u64) -> Vec<u64> {
        let mut found: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            // Disjoint extents sorted by start are sorted by end too: stop at the first one
            // ending at or before `start`.
            .take_while(|(_, e)| e.end > start)
            .map(|(&s, _)| s)
            .collect();
        found.reverse();
        found
    }

    /// True when part of `start..end` holds data (not zeroes).
    pub(crate) fn has_data(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end)
            .iter()
            .any(|s| matches!(self.extents.get(s), Some(e) if matches!(e.fill, Fill::Data(_))))
    }

    /// True when part of `start..end` was changed by the batch (data or zeroes).
    pub(crate) fn touches(&self, start: u64, end: u64) -> bool {
        self.extents
            .range(..end)
            .next_back()
            .is_some_and(|(_, e)| e.end > start)
    }

    /// Replaces the bytes of `buf` (which holds `offset..offset + buf.len()`) that the
    /// overlay covers with what it holds.
    pub(crate) fn patch(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for s in self.overlapping(offset, end) {
            let Some(extent) = self.extents.get(&s) else {
                continue;
            };
            let (lo, hi) = (s.max(offset), extent.end.min(end));
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match &extent.fill {
                Fill::Data(data) => {
                    dst.copy_from_slice(&data[(lo - s) as usize..(hi - s) as usize])
                }
                Fill::Zero { .. } => dst.fill(0),
            }
        }
    }

    /// Records that `offset..offset + len` now holds `fill`, written by `lsn`.
    fn insert(&mut self, offset: u64, len: u64, fill: Fill, lsn: u64) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        for s in self.overlapping(offset, end) {
            let Some(old) = self.extents.remove(&s) else {
                continue;
            };
            if s < offset {
                self.extents.insert(s, part(&old, s, s, offset));
            }
            if old.end > end {
                self.extents.insert(end, part(&old, s, end, old.end));
            }
        }
        self.extents.insert(offset, Extent { end, fill, lsn });
    }

    /// Records the effect of applying `op` (of record `lsn`).
    pub(crate) fn record(&mut self, lsn: u64, op: &Op) {
        match op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                self.insert(*offset, data.len() as u64, Fill::Data(data.clone()), lsn)
            }
            Op::Discard { offset, len } => {
                self.insert(*offset, *len, Fill::Zero { punch: true }, lsn)
            }
            Op::WriteZeroes { offset, len } => {
                self.insert(*offset, *len, Fill::Zero { punch: false }, lsn)
            }
            Op::Flush
            | Op::Mark { .. }
            | Op::Epoch { .. }
            | Op::Demote { .. }
            | Op::ResyncBegin
            | Op::ResyncEnd
            | Op::Verify { .. } => {}
        }
    }
}

/// The part `lo..hi` of an extent that starts at `start`.
fn part(extent: &Extent, start: u64, lo: u64, hi: u64) -> Extent {
    let fill = match &extent.fill {
        Fill::Data(d) => Fill::Data(d.slice((lo - start) as usize..(hi - start) as usize)),
        zero => zero.clone(),
    };
    Extent {
        end: hi,
        fill,
        lsn: extent.lsn,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::replayer::apply::{apply_op, apply_overlay};
    use crate::replayer::replica::MemoryReplica;

    const SIZE: u64 = 512;

    fn op_strategy() -> impl Strategy<Value = Op> {
        (0..SIZE, 1..96u64, 0..5u8, any::<u8>()).prop_map(|(offset, len, kind, byte)| {
            let len = len.min(SIZE - offset).max(1);
            let offset = offset.min(SIZE - len);
            match kind {
                0..=2 => Op::Write {
                    offset,
                    data: Bytes::from(vec![byte | 1; len as usize]),
                },
                3 => Op::Discard { offset, len },
                _ => Op::WriteZeroes { offset, len },
            }
        })
    }

    proptest! {
        /// The net effect applied in offset order gives the same bytes as the records in
        /// LSN order, whatever the replica held before.
        #[test]
        fn the_net_effect_equals_applying_in_order(
            before in proptest::collection::vec(op_strategy(), 0..6),
            batch in proptest::collection::vec(op_strategy(), 1..32),
        ) {
            let in_order = MemoryReplica::new(SIZE);
            let net = MemoryReplica::new(SIZE);
            for (i, op) in before.iter().enumerate() {
                apply_op(&in_order, i as u64, op).unwrap();
                apply_op(&net, i as u64, op).unwrap();
            }
            let mut overlay = Overlay::new();
            for (i, op) in batch.iter().enumerate() {
                apply_op(&in_order, 100 + i as u64, op).unwrap();
                overlay.record(100 + i as u64, op);
            }
            apply_overlay(&net, &overlay).unwrap();
            prop_assert_eq!(net.contents(), in_order.contents());
            // And the extents are disjoint, sorted and sized like their data.
            let mut last_end = 0;
            for (start, e) in overlay.extents() {
                prop_assert!(start >= last_end && e.end > start);
                if let Fill::Data(d) = &e.fill {
                    prop_assert_eq!(d.len() as u64, e.end - start);
                }
                last_end = e.end;
            }
        }
    }

    #[test]
    fn later_records_win_and_remember_their_lsn() {
        let mut o = Overlay::new();
        o.record(
            1,
            &Op::Write {
                offset: 0,
                data: Bytes::from_static(&[1; 8]),
            },
        );
        o.record(2, &Op::Discard { offset: 2, len: 4 });
        let got: Vec<_> = o.extents().map(|(s, e)| (s, e.end, e.lsn)).collect();
        assert_eq!(got, [(0, 2, 1), (2, 6, 2), (6, 8, 1)]);
        assert!(o.has_data(0, 3));
        assert!(!o.has_data(2, 6));
        let mut buf = [9u8; 8];
        o.patch(0, &mut buf);
        assert_eq!(buf, [1, 1, 0, 0, 0, 0, 1, 1]);
    }
}
