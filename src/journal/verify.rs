//! `journal verify`: reads every live segment in full, in the journal's order, and checks
//! everything a reader checks (header, index and body CRCs, every payload CRC, UUID, seq,
//! LSN continuity, plugs) plus the epoch order: no segment of an older writer epoch after
//! one of a newer epoch. A missing segment is the end only at or above the journal's known
//! end (`head::known_end`); below it, it is a hole and verification fails naming it.
//!
//! An encrypted segment whose key is not installed is checked as far as no key is needed
//! (header, trailer, the sealed index's CRC; DESIGN.md "Encryption at rest") and counted in
//! `sealed_unopened`; with the key it is opened and checked like any other.
//!
//! Must never: hold more than one segment in memory, or write anything; pass a journal with
//! a hole.

use serde::Serialize;

use super::consumer::load_trim_pointer;
use super::error::JournalResult;
use super::head;
use super::manifest::Manifest;
use super::segment::{
    check_sealed_without_key, decode_segment, Expected, SegmentError, SegmentHeader,
};
use crate::store::ObjectStore;

/// What a verification walked over (JSON in `journal verify --json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub journal: String,
    /// The first seq read.
    pub from_seq: u64,
    /// The seq after the last segment (where the writer continues).
    pub next_seq: u64,
    /// Segments read and verified, plugs included.
    pub segments: u64,
    pub plugs: u64,
    pub records: u64,
    /// Uncompressed payload bytes checked.
    pub payload_bytes: u64,
    /// First and last LSN seen (0 when the range holds no record).
    pub first_lsn: u64,
    pub last_lsn: u64,
    /// Highest writer epoch seen.
    pub last_epoch: u64,
    /// Encrypted segments checked without their key (header, trailer and index CRCs only:
    /// no tag, no body); absent when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub sealed_unopened: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Verifies the chain of segments from `from_seq` (default: the trim pointer) to the end.
/// The first error names the object; `progress` is called after each segment.
pub async fn verify_journal(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    from_seq: Option<u64>,
    mut progress: impl FnMut(&VerifyReport),
) -> JournalResult<VerifyReport> {
    let trim = load_trim_pointer(store).await?;
    let start = from_seq.unwrap_or(trim.first_seq).max(trim.first_seq);
    // The LSN the next segment must start at; unknown when starting past the trim pointer.
    let mut next_lsn = (start == trim.first_seq).then_some(trim.first_lsn);
    let mut report = VerifyReport {
        journal: store.describe(),
        from_seq: start,
        next_seq: start,
        ..VerifyReport::default()
    };
    let mut seq = start;
    loop {
        let key = manifest.segment_key(seq);
        let expected = Expected {
            uuid: manifest.uuid,
            seq,
            first_lsn: next_lsn,
        };
        let data = match store.get(&key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => {
                head::check_end(store, manifest, seq).await?;
                break;
            }
            Err(e) => return Err(SegmentError::from(e).into()),
        };
        if let Some(header) = check_sealed_without_key(&key, &data, &expected)? {
            if let Some(end) = report.count(key, &header)? {
                next_lsn = Some(end);
            }
            report.sealed_unopened += 1;
            seq = header.next_seq;
            report.next_seq = seq;
            progress(&report);
            continue;
        }
        let segment = decode_segment(&key, &data, &expected)?;
        let header = &segment.header;
        // The decode checked that the header's count and first LSN are the records'.
        if let Some(end) = report.count(key, header)? {
            next_lsn = Some(end);
        }
        report.payload_bytes += payload_bytes(&segment);
        seq = header.next_seq;
        report.next_seq = seq;
        progress(&report);
    }
    Ok(report)
}

impl VerifyReport {
    /// Counts one verified segment from its header, opened or checked sealed alike, refusing
    /// one of an older epoch than the segment before; returns the LSN the next segment must
    /// start at (`None` for a plug, which changes nothing).
    fn count(&mut self, key: String, header: &SegmentHeader) -> JournalResult<Option<u64>> {
        if header.epoch < self.last_epoch {
            return Err(SegmentError::StaleEpoch {
                key,
                epoch: header.epoch,
                newer: self.last_epoch,
            }
            .into());
        }
        self.last_epoch = header.epoch;
        self.segments += 1;
        if header.plug {
            self.plugs += 1;
            return Ok(None);
        }
        if self.first_lsn == 0 && header.record_count > 0 {
            self.first_lsn = header.first_lsn;
        }
        self.records += u64::from(header.record_count);
        if let Some(last) = header.last_lsn() {
            self.last_lsn = last;
        }
        Ok(Some(header.end_lsn()))
    }
}

/// Uncompressed payload bytes of a decoded segment.
fn payload_bytes(segment: &super::segment::DecodedSegment) -> u64 {
    segment
        .records
        .iter()
        .map(|r| r.op.payload_len() as u64)
        .sum()
}
