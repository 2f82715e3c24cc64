//! Pre-images: for each record of a batch, what its range held just before that record, so
//! that undoing records in reverse LSN order walks the replica back one record at a time.
//!
//! A batch's pre-images are all read before any of its records is applied (they must be
//! durable first), so a record overwriting bytes an earlier record of the same batch wrote
//! would see the bytes from before the batch. The [`Overlay`] fixes that: it holds what the
//! batch has written so far, and each pre-image is the replica's bytes patched with it.
//!
//! Must never: return a pre-image that differs from the replica's content at that LSN
//! (holes and all-zero ranges may come back as [`Op::WriteZeroes`], which restores the same
//! bytes).

use std::io;

use bytes::Bytes;

use crate::journal::record::{Op, Record};

use super::apply::extent;
use super::overlay::Overlay;
use super::replica::ReplicaTarget;

/// The undo record for `record`: the pre-image of its range as a `Write` (or a
/// `WriteZeroes` when the range reads as zeroes), or the record itself when it changes no
/// bytes (undoing it does nothing, and keeping MARKs lets time travel find them). Records
/// the effect of `record` in `overlay` afterwards. The one-record reference the tests hold
/// [`capture_batch`] to.
#[cfg(test)]
pub(crate) fn capture(
    target: &dyn ReplicaTarget,
    overlay: &mut Overlay,
    record: &Record,
) -> io::Result<Record> {
    let op = match extent(&record.op) {
        None => record.op.clone(),
        Some((offset, len)) => read_preimage(target, overlay, offset, len)?,
    };
    overlay.record(record.lsn, &record.op);
    Ok(Record {
        lsn: record.lsn,
        timestamp_ns: record.timestamp_ns,
        // Pre-images are kept in the group's address space (see `apply`).
        dev: 0,
        op,
    })
}

/// The undo records of a batch (one per record, in order, as [`capture`] would give them one
/// by one), reading the replica once per run of adjacent or
/// overlapping ranges ([`ReplicaTarget::read_many`], all runs at once) and asking where its
/// data is once per data extent rather than once per record (a fully written replica: once).
///
/// Memory: the runs hold at most the batch's ranges once each, which the batch limits bound;
/// a pre-image that no earlier record of the batch touched shares the run's buffer.
///
/// `overlay` holds what the records before these (of the same batch) wrote, and gets these
/// records' effect added: a batch may be captured in consecutive parts. `base`, when given,
/// is the previous batch's net effect, which may still be being written to the replica: the
/// bytes it covers are taken from it, never from the replica (which may hold them torn).
pub(crate) fn capture_batch(
    target: &dyn ReplicaTarget,
    records: &[Record],
    base: Option<&Overlay>,
    overlay: &mut Overlay,
) -> io::Result<Vec<Record>> {
    let runs = read_runs(target, records)?;
    let mut undo = Vec::with_capacity(records.len());
    for record in records {
        let op = match extent(&record.op) {
            None => record.op.clone(),
            Some((offset, len)) => from_runs(&runs, base, overlay, offset, len),
        };
        overlay.record(record.lsn, &record.op);
        undo.push(Record {
            lsn: record.lsn,
            timestamp_ns: record.timestamp_ns,
            // Pre-images are kept in the group's address space (see `apply`).
            dev: 0,
            op,
        });
    }
    Ok(undo)
}

/// A run of the batch's ranges: `start..start + len`, with the replica's bytes, or `None`
/// when it lies in a hole.
struct Run {
    start: u64,
    len: u64,
    data: Option<Bytes>,
}

/// The union of the records' ranges as sorted, disjoint runs, read from the replica.
fn read_runs(target: &dyn ReplicaTarget, records: &[Record]) -> io::Result<Vec<Run>> {
    let mut ranges: Vec<(u64, u64)> = records
        .iter()
        .filter_map(|r| extent(&r.op))
        .filter(|&(_, len)| len > 0)
        .map(|(offset, len)| (offset, offset + len))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    // Which runs touch data: walk the data extents forward with the runs (sorted).
    let mut data_extent: Option<std::ops::Range<u64>> = None;
    let mut past_last_data = false;
    let mut runs = Vec::with_capacity(merged.len());
    let mut reads: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut read_run: Vec<usize> = Vec::new();
    for (start, end) in merged {
        if !past_last_data && data_extent.as_ref().is_none_or(|d| d.end <= start) {
            data_extent = target.next_data(start)?;
            past_last_data = data_extent.is_none();
        }
        let has_data = data_extent.as_ref().is_some_and(|d| d.start < end);
        if has_data {
            read_run.push(runs.len());
            reads.push((start, vec![0u8; (end - start) as usize]));
        }
        runs.push(Run {
            start,
            len: end - start,
            data: None,
        });
    }
    target.read_many(&mut reads)?;
    for (i, (_, buf)) in read_run.into_iter().zip(reads) {
        runs[i].data = Some(Bytes::from(buf));
    }
    Ok(runs)
}

/// The pre-image of `offset..offset + len` from the batch's runs patched with `base` (the
/// previous batch), then `overlay` (this batch so far).
fn from_runs(runs: &[Run], base: Option<&Overlay>, overlay: &Overlay, offset: u64, len: u64) -> Op {
    let end = offset + len;
    if len == 0 {
        return Op::WriteZeroes { offset, len };
    }
    // The run holding the range: the last one starting at or before it.
    let i = runs.partition_point(|r| r.start <= offset) - 1;
    let run = &runs[i];
    debug_assert!(
        end <= run.start + run.len,
        "a record's range lies in one run"
    );
    let touched = overlay.touches(offset, end) || base.is_some_and(|b| b.touches(offset, end));
    let data = match (&run.data, touched) {
        (None, false) => return Op::WriteZeroes { offset, len },
        (Some(data), false) => {
            let at = (offset - run.start) as usize;
            data.slice(at..at + len as usize)
        }
        (data, true) => {
            let mut buf = match data {
                Some(data) => {
                    let at = (offset - run.start) as usize;
                    data[at..at + len as usize].to_vec()
                }
                None => vec![0u8; len as usize],
            };
            if let Some(base) = base {
                base.patch(offset, &mut buf);
            }
            overlay.patch(offset, &mut buf);
            Bytes::from(buf)
        }
    };
    if is_zero(&data) {
        return Op::WriteZeroes { offset, len };
    }
    Op::Write { offset, data }
}

/// The pre-image of `offset..offset + len` as an operation that restores it.
pub(crate) fn read_preimage(
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

    /// A replica holding `before` (LSNs from 0), and `batch` as records numbered from
    /// `first_lsn`.
    fn replica_and_records(
        before: &[Op],
        batch: &[Op],
        first_lsn: u64,
    ) -> (MemoryReplica, Vec<Record>) {
        let replica = MemoryReplica::new(SIZE);
        for (i, op) in before.iter().enumerate() {
            apply_op(&replica, i as u64, op).unwrap();
        }
        let records = batch
            .iter()
            .enumerate()
            .map(|(i, op)| Record {
                lsn: first_lsn + i as u64,
                timestamp_ns: 0,
                dev: 0,
                op: op.clone(),
            })
            .collect();
        (replica, records)
    }

    proptest! {
        /// Applying a batch, then its undo records in reverse, gives back every intermediate
        /// state: the pre-image of record i is exactly the replica after records 0..i.
        #[test]
        fn undo_in_reverse_walks_back_through_every_state(
            before in proptest::collection::vec(op_strategy(), 0..6),
            batch in proptest::collection::vec(op_strategy(), 1..24),
        ) {
            let (replica, records) = replica_and_records(&before, &batch, 1);
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

    proptest! {
        /// A batch's pre-images read in runs are the ones read record by record, over a
        /// replica with holes (the memory replica answers `next_data` from its holes).
        #[test]
        fn a_batch_captured_in_runs_equals_record_by_record(
            before in proptest::collection::vec(op_strategy(), 0..8),
            batch in proptest::collection::vec(op_strategy(), 1..24),
            split in 0..24usize,
        ) {
            let (replica, records) = replica_and_records(&before, &batch, 1);
            let mut overlay = Overlay::new();
            let one_by_one: Vec<Record> = records
                .iter()
                .map(|r| capture(&replica, &mut overlay, r).unwrap())
                .collect();
            // In two parts, the second seeing the first's writes through the overlay.
            let cut = split % records.len();
            let mut batch_overlay = Overlay::new();
            let mut in_runs =
                capture_batch(&replica, &records[..cut], None, &mut batch_overlay).unwrap();
            in_runs.extend(
                capture_batch(&replica, &records[cut..], None, &mut batch_overlay).unwrap(),
            );
            prop_assert_eq!(in_runs, one_by_one);
            prop_assert_eq!(
                batch_overlay.extents().collect::<Vec<_>>(),
                overlay.extents().collect::<Vec<_>>()
            );
        }
    }

    proptest! {
        /// What crash recovery relies on when a batch's undo segments were cut short before
        /// any of its records was applied: writing back the leading part's pre-images
        /// (newest first) leaves the replica as it was, whatever the batch and the cut.
        #[test]
        fn the_leading_part_of_an_unapplied_batch_undoes_to_the_same_bytes(
            before in proptest::collection::vec(op_strategy(), 0..8),
            batch in proptest::collection::vec(op_strategy(), 1..24),
            split in 0..24usize,
        ) {
            let (replica, records) = replica_and_records(&before, &batch, 1);
            let cut = split % records.len() + 1;
            let mut overlay = Overlay::new();
            let leading = capture_batch(&replica, &records[..cut], None, &mut overlay).unwrap();
            let untouched = replica.contents();
            for u in leading.iter().rev() {
                apply_op(&replica, u.lsn, &u.op).unwrap();
            }
            prop_assert_eq!(replica.contents(), untouched);
        }
    }

    proptest! {
        /// With the previous batch given as `base` and not yet written (or half written) to
        /// the replica, the pre-images are those of the replica with that batch applied.
        #[test]
        fn a_batch_captured_over_an_unapplied_previous_batch_sees_it(
            before in proptest::collection::vec(op_strategy(), 0..6),
            previous in proptest::collection::vec(op_strategy(), 1..12),
            batch in proptest::collection::vec(op_strategy(), 1..12),
            written in 0..12usize,
        ) {
            let applied = MemoryReplica::new(SIZE);
            let pending = MemoryReplica::new(SIZE);
            for (i, op) in before.iter().enumerate() {
                apply_op(&applied, i as u64, op).unwrap();
                apply_op(&pending, i as u64, op).unwrap();
            }
            let mut base = Overlay::new();
            for (i, op) in previous.iter().enumerate() {
                apply_op(&applied, 100 + i as u64, op).unwrap();
                base.record(100 + i as u64, op);
                // The replica being written has only some of the previous batch.
                if i < written {
                    apply_op(&pending, 100 + i as u64, op).unwrap();
                }
            }
            let records: Vec<Record> = batch
                .iter()
                .enumerate()
                .map(|(i, op)| Record { lsn: 200 + i as u64, timestamp_ns: 0, dev: 0, op: op.clone() })
                .collect();
            let mut overlay = Overlay::new();
            let want = capture_batch(&applied, &records, None, &mut overlay).unwrap();
            let mut overlay = Overlay::new();
            let got = capture_batch(&pending, &records, Some(&base), &mut overlay).unwrap();
            prop_assert_eq!(got, want);
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
