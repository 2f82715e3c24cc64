//! Applying records to a replica: WRITE and RESYNC_DATA as positional writes, DISCARD as a
//! punched hole, WRITE_ZEROES as a zeroed range; FLUSH, MARK, EPOCH and the resync markers
//! change no bytes (the agent fsyncs once per batch instead of at each FLUSH).
//!
//! Offsets here are in the group's address space (`journal::layout`): a journal record is
//! moved there by [`check_journal_record`]; undo records are stored there already (device 0).
//!
//! Must never: apply a record that was not checked by [`check_journal_record`] or
//! [`check_record`] first (a record outside the replica or its device is refused before any
//! byte of its batch is written), or write before the caller made the batch's pre-images durable: this module
//! writes, the agent decides when.

use crate::journal::layout::DeviceLayout;
use crate::journal::record::{Op, Record};

use super::overlay::{Fill, Overlay};
use super::replica::ReplicaTarget;

/// Every way applying fails; each names the replica and the LSN.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The record reaches outside the replica (a journal of another device size, or a bug
    /// upstream).
    #[error(
        "record LSN {lsn} in {object} covers {offset}+{len}, outside the replica of {size} bytes"
    )]
    OutOfRange {
        object: String,
        lsn: u64,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// An undo record names a device: undo records are kept in the group's address space,
    /// as device 0 (a foreign or corrupt undo log).
    #[error(
        "undo record LSN {lsn} in {object} names device {dev}; undo records are kept in the \
         group's address space as device 0"
    )]
    OtherDevice { object: String, lsn: u64, dev: u32 },
    /// A journal record names a device the journal does not have, or bytes outside it.
    #[error("record LSN {lsn} in {object}: {reason}")]
    NotOnDevice {
        object: String,
        lsn: u64,
        reason: String,
    },
    /// The replica failed.
    #[error("{what} on replica {replica} failed (record LSN {lsn}): {source}")]
    Io {
        replica: String,
        what: &'static str,
        lsn: u64,
        #[source]
        source: std::io::Error,
    },
    /// Making the replica durable failed.
    #[error("fdatasync of replica {replica} failed: {source}")]
    Sync {
        replica: String,
        #[source]
        source: std::io::Error,
    },
}

/// A journal record (from `object`, for messages) moved into the group's address space of
/// `layout`, checked to lie on its device and inside a replica of `size` bytes.
pub(crate) fn check_journal_record(
    object: &str,
    record: Record,
    layout: &DeviceLayout,
    size: u64,
) -> Result<Record, ApplyError> {
    let lsn = record.lsn;
    let record = if layout.is_single() && record.dev == 0 {
        record
    } else {
        layout
            .globalize(record)
            .map_err(|e| ApplyError::NotOnDevice {
                object: object.to_string(),
                lsn,
                reason: e.to_string(),
            })?
    };
    check_op(object, lsn, &record.op, size)?;
    Ok(record)
}

/// Checks that an undo `record` (from `object`, for messages) can be applied to a replica of
/// `size` bytes.
pub(crate) fn check_record(object: &str, record: &Record, size: u64) -> Result<(), ApplyError> {
    if record.dev != 0 {
        return Err(ApplyError::OtherDevice {
            object: object.to_string(),
            lsn: record.lsn,
            dev: record.dev,
        });
    }
    check_op(object, record.lsn, &record.op, size)
}

/// Checks that `op` lies inside a replica of `size` bytes.
pub(crate) fn check_op(object: &str, lsn: u64, op: &Op, size: u64) -> Result<(), ApplyError> {
    let range = match op {
        // A VERIFY changes nothing but must name bytes the replica has.
        Op::Verify { offset, len, .. } => Some((*offset, *len)),
        _ => extent(op),
    };
    match range {
        Some((offset, len)) if offset.checked_add(len).is_none_or(|end| end > size) => {
            Err(ApplyError::OutOfRange {
                object: object.to_string(),
                lsn,
                offset,
                len,
                size,
            })
        }
        _ => Ok(()),
    }
}

/// `(offset, len)` of the bytes `op` changes, without the addition [`Op::range`] does (which
/// would overflow on a hostile record before it is checked).
pub(crate) fn extent(op: &Op) -> Option<(u64, u64)> {
    match op {
        Op::Write { offset, data } | Op::ResyncData { offset, data } => {
            Some((*offset, data.len() as u64))
        }
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => Some((*offset, *len)),
        Op::Flush
        | Op::Mark { .. }
        | Op::Epoch { .. }
        | Op::Demote { .. }
        | Op::ResyncBegin
        | Op::ResyncEnd
        | Op::Verify { .. } => None,
    }
}

/// Applies one checked operation (of record `lsn`) to the replica.
pub(crate) fn apply_op(target: &dyn ReplicaTarget, lsn: u64, op: &Op) -> Result<(), ApplyError> {
    let io = |what| {
        move |source| ApplyError::Io {
            replica: target.describe(),
            what,
            lsn,
            source,
        }
    };
    match op {
        Op::Write { offset, data } | Op::ResyncData { offset, data } => {
            target.write_at(*offset, data).map_err(io("write"))
        }
        Op::Discard { offset, len } => target.punch_hole(*offset, *len).map_err(io("punch hole")),
        Op::WriteZeroes { offset, len } => {
            target.zero_range(*offset, *len).map_err(io("zero range"))
        }
        Op::Flush
        | Op::Mark { .. }
        | Op::Epoch { .. }
        | Op::Demote { .. }
        | Op::ResyncBegin
        | Op::ResyncEnd
        | Op::Verify { .. } => Ok(()),
    }
}

/// Applies a batch as its net effect, in offset order (see [`super::overlay`]): writes,
/// then holes and zeroed ranges, each extent once. Adjacent zero extents of one kind are
/// merged into one call.
pub(crate) fn apply_overlay(
    target: &dyn ReplicaTarget,
    overlay: &Overlay,
) -> Result<(), ApplyError> {
    let io = |what, lsn| {
        move |source| ApplyError::Io {
            replica: target.describe(),
            what,
            lsn,
            source,
        }
    };
    // A run of zero extents of one kind: (start, end, punch, lsn).
    let mut zeroes: Option<(u64, u64, bool, u64)> = None;
    let flush = |run: Option<(u64, u64, bool, u64)>| match run {
        Some((start, end, true, lsn)) => target
            .punch_hole(start, end - start)
            .map_err(io("punch hole", lsn)),
        Some((start, end, false, lsn)) => target
            .zero_range(start, end - start)
            .map_err(io("zero range", lsn)),
        None => Ok(()),
    };
    for (start, extent) in overlay.extents() {
        match &extent.fill {
            Fill::Data(data) => target
                .write_at(start, data)
                .map_err(io("write", extent.lsn))?,
            &Fill::Zero { punch } => {
                zeroes = match zeroes {
                    Some((s, e, p, lsn)) if e == start && p == punch => {
                        Some((s, extent.end, p, lsn.max(extent.lsn)))
                    }
                    run => {
                        flush(run)?;
                        Some((start, extent.end, punch, extent.lsn))
                    }
                };
            }
        }
    }
    flush(zeroes)
}

/// Makes everything applied so far durable.
pub(crate) fn sync(target: &dyn ReplicaTarget) -> Result<(), ApplyError> {
    target.sync().map_err(|source| ApplyError::Sync {
        replica: target.describe(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::replayer::replica::MemoryReplica;

    fn rec(lsn: u64, dev: u32, op: Op) -> Record {
        Record {
            lsn,
            timestamp_ns: lsn,
            dev,
            op,
        }
    }

    #[test]
    fn every_kind_applies_as_documented() {
        let r = MemoryReplica::new(64);
        let ops = [
            Op::Write {
                offset: 0,
                data: Bytes::from(vec![9u8; 32]),
            },
            Op::Discard { offset: 0, len: 8 },
            Op::WriteZeroes { offset: 24, len: 4 },
            Op::ResyncData {
                offset: 40,
                data: Bytes::from_static(&[5, 5]),
            },
            Op::Flush,
            Op::Mark { name: "m".into() },
            Op::Epoch { epoch: 3 },
            Op::ResyncBegin,
            Op::ResyncEnd,
        ];
        for (i, op) in ops.iter().enumerate() {
            check_record("seg", &rec(i as u64 + 1, 0, op.clone()), 64).unwrap();
            apply_op(&r, i as u64 + 1, op).unwrap();
        }
        let mut want = vec![0u8; 64];
        want[8..24].fill(9);
        want[28..32].fill(9);
        want[40..42].fill(5);
        assert_eq!(r.contents(), want);
    }

    #[test]
    fn records_outside_the_replica_or_for_other_devices_are_refused() {
        let write = |offset| Op::Write {
            offset,
            data: Bytes::from_static(&[1; 8]),
        };
        let e = check_record("journal/0/7", &rec(5, 0, write(60)), 64).unwrap_err();
        assert!(matches!(e, ApplyError::OutOfRange { lsn: 5, .. }), "{e}");
        assert!(e.to_string().contains("journal/0/7"), "{e}");
        let e = check_record("k", &rec(6, 1, write(0)), 64).unwrap_err();
        assert!(matches!(e, ApplyError::OtherDevice { dev: 1, .. }), "{e}");
        let huge = Op::Discard {
            offset: u64::MAX - 1,
            len: 8,
        };
        assert!(check_op("k", 7, &huge, 64).is_err());
    }
}
