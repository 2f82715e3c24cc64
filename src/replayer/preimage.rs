//! Pre-images: for each record of a batch, what its range held just before that record, so
//! that undoing records in reverse LSN order walks the replica back one record at a time.
//!
//! A batch's pre-images are all read before any of its records is applied (they must be
//! durable first), so a record overwriting bytes an earlier record of the same batch wrote
//! would see the bytes from before the batch. The [`Overlay`] fixes that: it remembers what
//! the batch has written so far, and each pre-image is the replica's bytes patched with it.
//!
//! Must never: return a pre-image that differs from the replica's content at that LSN
//! (holes and all-zero ranges may come back as [`Op::WriteZeroes`], which restores the same
//! bytes).

use std::collections::BTreeMap;
use std::io;

use bytes::Bytes;

use crate::journal::record::{Op, Record};

use super::apply::extent;
use super::replica::ReplicaTarget;

/// What a byte range of the batch holds once the batch is applied.
#[derive(Clone, Debug)]
enum Fill {
    /// These bytes (exactly the extent's length).
    Data(Bytes),
    Zero,
}

/// The bytes a batch has written so far, as disjoint extents keyed by start offset.
///
/// # Invariants
/// Extents do not overlap and are never empty; a `Data` extent's bytes are exactly its length.
#[derive(Debug, Default)]
pub struct Overlay {
    extents: BTreeMap<u64, (u64, Fill)>,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Extents overlapping `start..end`, as `(extent start, extent end)` in ascending order.
    fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut found: Vec<(u64, u64)> = self
            .extents
            .range(..end)
            .rev()
            // Disjoint extents sorted by start are sorted by end too: stop at the first one
            // ending at or before `start`.
            .take_while(|(_, (e, _))| *e > start)
            .map(|(&s, (e, _))| (s, *e))
            .collect();
        found.reverse();
        found
    }

    /// True when part of `start..end` was written with data (not zeroes) by the batch.
    fn has_data(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end)
            .iter()
            .any(|(s, _)| matches!(self.extents.get(s), Some((_, Fill::Data(_)))))
    }

    /// Replaces the bytes of `buf` (which holds `offset..offset + buf.len()`) that the batch
    /// wrote with what it wrote.
    fn patch(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (s, e) in self.overlapping(offset, end) {
            let (lo, hi) = (s.max(offset), e.min(end));
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match self.extents.get(&s) {
                Some((_, Fill::Data(data))) => {
                    dst.copy_from_slice(&data[(lo - s) as usize..(hi - s) as usize])
                }
                Some((_, Fill::Zero)) => dst.fill(0),
                None => {}
            }
        }
    }

    /// Records that `offset..offset + len` now holds `fill`.
    fn insert(&mut self, offset: u64, len: u64, fill: Fill) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        for (s, e) in self.overlapping(offset, end) {
            let Some((_, old)) = self.extents.remove(&s) else {
                continue;
            };
            if s < offset {
                self.extents.insert(s, (offset, slice(&old, s, s, offset)));
            }
            if e > end {
                self.extents.insert(end, (e, slice(&old, s, end, e)));
            }
        }
        self.extents.insert(offset, (end, fill));
    }

    /// Records the effect of applying `op`.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                self.insert(*offset, data.len() as u64, Fill::Data(data.clone()))
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                self.insert(*offset, *len, Fill::Zero)
            }
            _ => {}
        }
    }
}

/// The part `lo..hi` of a fill that starts at `start`.
fn slice(fill: &Fill, start: u64, lo: u64, hi: u64) -> Fill {
    match fill {
        Fill::Data(d) => Fill::Data(d.slice((lo - start) as usize..(hi - start) as usize)),
        Fill::Zero => Fill::Zero,
    }
}

/// The undo record for `record`: the pre-image of its range as a `Write` (or a
/// `WriteZeroes` when the range reads as zeroes), or the record itself when it changes no
/// bytes (undoing it does nothing, and keeping MARKs lets time travel find them). Records
/// the effect of `record` in `overlay` afterwards.
pub fn capture(
    target: &dyn ReplicaTarget,
    overlay: &mut Overlay,
    record: &Record,
) -> io::Result<Record> {
    let op = match extent(&record.op) {
        None => record.op.clone(),
        Some((offset, len)) => read_preimage(target, overlay, offset, len)?,
    };
    overlay.record(&record.op);
    Ok(Record {
        lsn: record.lsn,
        timestamp_ns: record.timestamp_ns,
        dev: record.dev,
        op,
    })
}

/// The pre-image of `offset..offset + len` as an operation that restores it.
pub fn read_preimage(
    target: &dyn ReplicaTarget,
    overlay: &Overlay,
    offset: u64,
    len: u64,
) -> io::Result<Op> {
    let end = offset + len;
    if len == 0 || (!overlay.has_data(offset, end) && target.is_hole(offset, len)?) {
        return Ok(Op::WriteZeroes { offset, len });
    }
    let mut buf = vec![0u8; len as usize];
    target.read_at(offset, &mut buf)?;
    overlay.patch(offset, &mut buf);
    if is_zero(&buf) {
        return Ok(Op::WriteZeroes { offset, len });
    }
    Ok(Op::Write {
        offset,
        data: Bytes::from(buf),
    })
}

fn is_zero(buf: &[u8]) -> bool {
    // An OR-fold without early exit vectorizes; checking per 4 KiB still stops early on data.
    buf.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::replayer::apply::apply_op;
    use crate::replayer::replica::MemoryReplica;

    const SIZE: u64 = 256;

    fn op_strategy() -> impl Strategy<Value = Op> {
        (0..SIZE, 1..64u64, 0..4u8, any::<u8>()).prop_map(|(offset, len, kind, byte)| {
            let len = len.min(SIZE - offset).max(1);
            let offset = offset.min(SIZE - len);
            match kind {
                0 | 1 => Op::Write {
                    offset,
                    data: Bytes::from(vec![byte | 1; len as usize]),
                },
                2 => Op::Discard { offset, len },
                _ => Op::WriteZeroes { offset, len },
            }
        })
    }

    proptest! {
        /// Applying a batch, then its undo records in reverse, gives back every intermediate
        /// state: the pre-image of record i is exactly the replica after records 0..i.
        #[test]
        fn undo_in_reverse_walks_back_through_every_state(
            before in proptest::collection::vec(op_strategy(), 0..6),
            batch in proptest::collection::vec(op_strategy(), 1..24),
        ) {
            let replica = MemoryReplica::new(SIZE);
            for (i, op) in before.iter().enumerate() {
                apply_op(&replica, i as u64, op).unwrap();
            }
            let records: Vec<Record> = batch
                .iter()
                .enumerate()
                .map(|(i, op)| Record { lsn: i as u64 + 1, timestamp_ns: 0, dev: 0, op: op.clone() })
                .collect();
            let mut overlay = Overlay::new();
            let undo: Vec<Record> = records
                .iter()
                .map(|r| capture(&replica, &mut overlay, r).unwrap())
                .collect();
            let mut states = vec![replica.contents()];
            for r in &records {
                apply_op(&replica, r.lsn, &r.op).unwrap();
                states.push(replica.contents());
            }
            for (i, u) in undo.iter().enumerate().rev() {
                apply_op(&replica, u.lsn, &u.op).unwrap();
                prop_assert_eq!(&replica.contents(), &states[i], "after undoing LSN {}", u.lsn);
            }
        }
    }

    #[test]
    fn holes_become_write_zeroes_and_data_is_copied() {
        let replica = MemoryReplica::new(SIZE);
        let mut overlay = Overlay::new();
        let rec = |lsn, op| Record {
            lsn,
            timestamp_ns: 0,
            dev: 0,
            op,
        };
        let write = Op::Write {
            offset: 0,
            data: Bytes::from(vec![3u8; 16]),
        };
        let u = capture(&replica, &mut overlay, &rec(1, write.clone())).unwrap();
        assert_eq!(u.op, Op::WriteZeroes { offset: 0, len: 16 });
        // The second write of the same range sees the first one through the overlay.
        let u = capture(&replica, &mut overlay, &rec(2, write)).unwrap();
        assert_eq!(
            u.op,
            Op::Write {
                offset: 0,
                data: Bytes::from(vec![3u8; 16])
            }
        );
        let mark = Op::Mark { name: "x".into() };
        assert_eq!(
            capture(&replica, &mut overlay, &rec(3, mark.clone()))
                .unwrap()
                .op,
            mark
        );
    }
}
