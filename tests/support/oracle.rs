//! The test oracle: rebuilds a device image from nothing but its journal, applying records in
//! LSN order to a blank sparse file, so a test can compare it with the primary.
//!
//! `WRITE` and `RESYNC_DATA` write their data; `DISCARD` and `WRITE_ZEROES` write zeroes
//! (a discarded range reads as zeroes on the file primaries the tests use); every other
//! record changes no data. The LSNs must run gap-free from 1.
//!
//! Must never: skip an LSN silently, or read anything but the journal.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tinylag::journal::{Cursor, JournalReader, Step};
use tinylag::journal::{Manifest, Op};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;

/// Largest zero buffer written at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Rebuilds device 0 of the journal in `store` into `out` (created or truncated), applying
/// every record up to `up_to_lsn` (all when `None`). Returns the last LSN applied (0 when
/// the journal is empty). Panics, naming the LSN or object, on a gap or a bad segment.
pub async fn rebuild_image(
    store: Arc<dyn ObjectStore>,
    manifest: &Manifest,
    out: &Path,
    up_to_lsn: Option<u64>,
) -> u64 {
    let size = manifest
        .device_size(0)
        .expect("the manifest has a device 0");
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(out)
        .unwrap_or_else(|e| panic!("create {}: {e}", out.display()));
    file.set_len(size).expect("size the image");
    let reader = JournalReader::new(store, manifest.clone());
    let mut cursor = Cursor {
        seq: 0,
        next_lsn: 1,
    };
    let mut last = 0;
    let limit = up_to_lsn.unwrap_or(u64::MAX);
    'segments: loop {
        let step = reader
            .step(&mut cursor)
            .await
            .unwrap_or_else(|e| panic!("reading the journal after LSN {last}: {e}"));
        let Step::Segment(segment) = step else {
            break;
        };
        for record in segment.records {
            if record.lsn > limit {
                break 'segments;
            }
            assert_eq!(record.lsn, last + 1, "the journal skips from LSN {last}");
            assert_eq!(
                record.dev, 0,
                "LSN {} is for device {}",
                record.lsn, record.dev
            );
            apply(&file, size, &record.op, record.lsn);
            last = record.lsn;
        }
    }
    file.sync_all().expect("sync the image");
    last
}

/// [`rebuild_image`] of a local-directory journal, from blocking test code.
pub fn rebuild_local(journal: &Path, out: &Path, up_to_lsn: Option<u64>) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(journal.to_path_buf()));
        let manifest = Manifest::load(store.as_ref())
            .await
            .unwrap_or_else(|e| panic!("load the manifest of {}: {e}", journal.display()));
        rebuild_image(store, &manifest, out, up_to_lsn).await
    })
}

fn apply(file: &File, size: u64, op: &Op, lsn: u64) {
    let Some(range) = op.range() else {
        return;
    };
    assert!(
        range.end <= size,
        "LSN {lsn} reaches {} past the device end {size}",
        range.end
    );
    match op {
        Op::Write { offset, data } | Op::ResyncData { offset, data } => file
            .write_all_at(data, *offset)
            .unwrap_or_else(|e| panic!("apply LSN {lsn}: {e}")),
        Op::Discard { .. } | Op::WriteZeroes { .. } => {
            let zeroes = vec![0u8; ZERO_CHUNK.min(range.end - range.start) as usize];
            let mut at = range.start;
            while at < range.end {
                let n = (range.end - at).min(ZERO_CHUNK) as usize;
                file.write_all_at(&zeroes[..n], at)
                    .unwrap_or_else(|e| panic!("apply LSN {lsn}: {e}"));
                at += n as u64;
            }
        }
        _ => {}
    }
}

/// Fails the test at the first byte where the two images differ (or if their sizes do).
pub fn assert_same_image(a: &Path, b: &Path) {
    let (fa, fb) = (
        File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display())),
        File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display())),
    );
    let (la, lb) = (
        fa.metadata().expect("stat").len(),
        fb.metadata().expect("stat").len(),
    );
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut ba = vec![0u8; ZERO_CHUNK as usize];
    let mut bb = vec![0u8; ZERO_CHUNK as usize];
    let mut at = 0;
    while at < la {
        let n = (la - at).min(ZERO_CHUNK) as usize;
        fa.read_exact_at(&mut ba[..n], at).expect("read");
        fb.read_exact_at(&mut bb[..n], at).expect("read");
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            panic!(
                "{} and {} differ first at byte {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                at + i as u64,
                ba[i],
                bb[i]
            );
        }
        at += n as u64;
    }
}

/// An image in memory advanced record by record through a journal, for tests that compare
/// against many LSNs in increasing order (the crash test) without rebuilding each time.
pub struct OracleImage {
    reader: JournalReader,
    cursor: Cursor,
    /// Records of the last fetched segment not applied yet.
    pending: std::collections::VecDeque<tinylag::journal::Record>,
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
            pending: Default::default(),
            image: vec![0; size],
            lsn: 0,
        }
    }

    /// At a missing seq: `false` when nothing exists past it either (the end, for now).
    /// When later seqs exist it may be an upload in flight, so the seq gets a few seconds to
    /// appear (`true`: read on); a seq still missing then, with later ones present, is a hole
    /// in the journal, and the test fails naming it, instead of taking the hole for the end.
    async fn missing_in_the_middle(&self) -> bool {
        const LOOK_PAST: u64 = 256;
        let seq = self.cursor.seq;
        let mut later = Vec::new();
        for s in seq + 1..=seq + LOOK_PAST {
            if let Some(index) = self.reader.index(s).await.expect("journal reads") {
                later.push((s, index.header.plug, index.header.first_lsn));
            }
        }
        if later.is_empty() {
            return false;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self
                .reader
                .index(seq)
                .await
                .expect("journal reads")
                .is_some()
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "the journal has a hole: seq {seq} (LSN {} next) is missing for 5 s while later \
             seqs exist (seq, plug, first LSN): {later:?}",
            self.cursor.next_lsn
        );
    }

    /// The LSN the image is at.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Applies records up to `up_to_lsn` (all of the journal when `None`); returns the LSN
    /// reached. Panics if asked to go backwards or on a gap.
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
                    Step::NotYet if self.missing_in_the_middle().await => continue,
                    Step::NotYet => break,
                }
                continue;
            };
            assert_eq!(record.lsn, self.lsn + 1, "the journal skips an LSN");
            match &record.op {
                Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                    let o = *offset as usize;
                    self.image[o..o + data.len()].copy_from_slice(data);
                }
                Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                    self.image[*offset as usize..(*offset + *len) as usize].fill(0);
                }
                _ => {}
            }
            self.lsn = record.lsn;
        }
        self.lsn
    }
}
