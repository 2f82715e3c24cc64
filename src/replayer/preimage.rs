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
    overlay.record(record.lsn, &record.op);
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
