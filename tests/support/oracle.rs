//! The oracle: the image a device had at an LSN, rebuilt from nothing but the journal by
//! applying its records in LSN order to a blank image (WRITE / RESYNC_DATA write their
//! bytes, DISCARD and WRITE_ZEROES write zeroes). Tests compare replicas and primaries with
//! it.
//!
//! Must never: skip an LSN (a gap panics: the journal would be broken), or read past the LSN
//! it was asked for.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use tinylag::journal::reader::{Cursor, JournalReader, Step};
use tinylag::journal::{Manifest, Op, Record};
use tinylag::store::ObjectStore;

/// An image in memory advanced record by record through a journal.
pub struct OracleImage {
    reader: JournalReader,
    cursor: Cursor,
    /// Records of the last fetched segment not applied yet.
    pending: VecDeque<Record>,
    image: Vec<u8>,
    lsn: u64,
}

impl OracleImage {
    /// A blank image of device 0's size at LSN 0, reading the journal from its first segment.
    pub fn new(store: Arc<dyn ObjectStore>, manifest: &Manifest) -> OracleImage {
        let size = manifest.device_size(0).expect("device 0") as usize;
        OracleImage {
            reader: JournalReader::new(store, manifest.clone()),
            cursor: Cursor {
                seq: 0,
                next_lsn: 1,
            },
            pending: VecDeque::new(),
            image: vec![0; size],
            lsn: 0,
        }
    }

    /// The LSN the image is at.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Applies records up to `up_to_lsn` (all of the journal when `None`); returns the LSN
    /// reached. Panics if asked to go backwards.
    pub async fn advance(&mut self, up_to_lsn: Option<u64>) -> u64 {
        let limit = up_to_lsn.unwrap_or(u64::MAX);
        assert!(limit >= self.lsn, "the oracle only moves forward");
        while self.lsn < limit {
            let Some(record) = self.pending.pop_front() else {
                match self
                    .reader
                    .step(&mut self.cursor)
                    .await
                    .expect("journal reads")
                {
                    Step::Segment(s) => self.pending.extend(s.records),
                    Step::NotYet => break,
                }
                continue;
            };
            assert_eq!(record.lsn, self.lsn + 1, "the journal skips an LSN");
            apply(&mut self.image, &record.op);
            self.lsn = record.lsn;
        }
        self.lsn
    }
}

fn apply(image: &mut [u8], op: &Op) {
    match op {
        Op::Write { offset, data } | Op::ResyncData { offset, data } => {
            let o = *offset as usize;
            image[o..o + data.len()].copy_from_slice(data);
        }
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
            image[*offset as usize..(*offset + *len) as usize].fill(0);
        }
        Op::Flush | Op::Mark { .. } | Op::Epoch { .. } | Op::ResyncBegin | Op::ResyncEnd => {}
    }
}

/// Writes the image as of `up_to_lsn` (the whole journal when `None`) to `out_path` and
/// returns the last LSN applied.
pub async fn rebuild_image(
    store: Arc<dyn ObjectStore>,
    manifest: &Manifest,
    out_path: &Path,
    up_to_lsn: Option<u64>,
) -> u64 {
    let mut oracle = OracleImage::new(store, manifest);
    let lsn = oracle.advance(up_to_lsn).await;
    std::fs::write(out_path, oracle.image())
        .unwrap_or_else(|e| panic!("writing {}: {e}", out_path.display()));
    lsn
}
