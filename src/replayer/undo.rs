//! The undo log: the pre-images a replay agent saves before it changes the replica, so that
//! crash recovery can walk back an unfinished batch (or resync span) and time travel can
//! scrub the replica backwards.
//!
//! An undo log is a store root of its own (default: a local directory `<replica>.undo/`):
//!
//! ```text
//! undo.json          UndoManifest (JSON), written once by conditional create (rewritten when
//!                    the group grows, and once from format version 1 to 2)
//! undo/<seq:020>     undo segments, numbered from 0 by the agent, one to four per applied batch
//! generation         a local log only, not an object: the writer's announcement of each
//!                    durable segment, rewritten in place ([`super::generation`])
//! ```
//!
//! An undo segment uses the journal's segment codec unchanged (header, body, rkyv index,
//! trailer, every byte checked; see [`crate::journal::segment`]), with:
//! - `uuid` = the journal's device-group UUID, `epoch` = 0, `seq` = the undo seq;
//! - `first_lsn` = the journal LSN of the first record of its part of the batch, and one undo
//!   record per journal record of that part, with that record's LSN, timestamp and device;
//! - each undo record's operation restores what the journal record overwrote: `WRITE(offset,
//!   bytes before)`, or `WRITE_ZEROES(offset, len)` when the range read as zeroes; records
//!   that change no bytes (FLUSH, MARK, EPOCH, RESYNC_BEGIN/END) are copied as they are, and
//!   undoing them does nothing.
//!
//! - each pre-image is stored raw or as a zstd frame, as the codec's index entry says per
//!   payload (`compressed`); the agent offers a pre-image to zstd only when a sample (or, for
//!   small ones, the run before it) compresses ([`CompressProbe`]), so pre-images of data
//!   that does not compress cost no compression attempt. This changed no byte of the format:
//!   segments written before, with every payload offered, read the same way.
//!
//! A journal record too large for one pre-image (a DISCARD of gigabytes) is applied in
//! pieces, each with its own undo segment holding one record: that LSN, the piece's range.
//!
//! Must never: overwrite an undo segment (conditional create only); accept an undo log of
//! another journal, consumer or device size; return a record from a segment whose UUID, seq
//! or checksums are wrong.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::journal::paths;
use crate::journal::record::{Op, Record};
use crate::journal::segment::{
    decode_payload, decode_segment, read_index, DecodedSegment, Expected, IndexEntry,
    SegmentBuilder, SegmentError, SegmentIndex,
};
use crate::store::{ObjectStore, StoreError};

use crate::journal::segment::CompressProbe;

use super::generation::Publisher;

/// The undo-log format version this build writes: 2 says every agent that opens the log to
/// write publishes its generation (see [`super::generation`]); the segments are those of
/// version 1, which this build reads too. Older tinylag refuse version 2, so none of their
/// agents can write a log a mount trusts the generation of.
pub(crate) const UNDO_FORMAT_VERSION: u32 = 2;
/// The first undo-log format version whose writers all publish a generation.
pub(crate) const GENERATION_SINCE: u32 = 2;

/// What an undo log belongs to (`undo.json`, pretty JSON):
///
/// ```json
/// { "format_version": 2, "journal_uuid": "…", "consumer": "dr1",
///   "replica": "/var/lib/tinylag/replica.img", "device_size": 1073741824,
///   "created_ns": 1795000000000000000 }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoManifest {
    pub format_version: u32,
    /// The journal whose records the pre-images undo.
    pub journal_uuid: Uuid,
    /// The consumer (replay agent) that writes the log.
    pub consumer: String,
    /// The replica the pre-images were read from (for operators).
    pub replica: String,
    pub device_size: u64,
    pub created_ns: u64,
}

/// Every way the undo log fails; each names the store and the object.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// `undo.json` says the log belongs to another journal, consumer or device size.
    #[error(
        "undo log {store} belongs to {field} {found}, not {expected}; use another --undo location"
    )]
    Foreign {
        store: String,
        field: &'static str,
        found: String,
        expected: String,
    },
    /// `undo.json` is not valid JSON of the expected shape.
    #[error("undo log {store}: {key} is not a valid undo manifest: {reason}")]
    Malformed {
        store: String,
        key: String,
        reason: String,
    },
    /// `undo.json` was written by a newer tinylag.
    #[error("undo log {store} has format version {found}; this tinylag reads version {supported}")]
    UnsupportedVersion {
        store: String,
        found: u64,
        supported: u32,
    },
    /// An undo segment the agent is about to write exists already: recovery did not run, or
    /// two agents write one log.
    #[error("undo segment {key} already exists in {store}; is another agent using this undo log?")]
    SegmentExists { store: String, key: String },
    /// An undo segment could not be encoded or decoded (the message names the object).
    #[error("undo log {store}: {source}")]
    Segment {
        store: String,
        #[source]
        source: SegmentError,
    },
    /// An encoding or upload task panicked or was cancelled.
    #[error("undo log {store}: task failed: {message}")]
    Task { store: String, message: String },
    /// The store failed.
    #[error("undo log {store}: {source}")]
    Store {
        store: String,
        #[source]
        source: StoreError,
    },
    /// The generation file beside a local undo log could not be written: nothing may change
    /// the replica unannounced, so the agent stops.
    #[error("cannot write the undo log's generation {}: {source}", path.display())]
    Generation {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open undo log.
#[derive(Clone, Debug)]
pub struct UndoLog {
    store: Arc<dyn ObjectStore>,
    manifest: UndoManifest,
    /// Where a writer of a local log announces each durable segment (`None`: read-only, or
    /// not a local directory).
    publisher: Option<Arc<Publisher>>,
}

impl UndoLog {
    /// Opens the undo log in `store`, creating `undo.json` from `expected` if absent. An
    /// existing log must belong to the same journal, consumer and device size; a smaller
    /// device size is a group that `journal add-device` grew (devices are only appended, bases
    /// never move), and `undo.json` is rewritten with the larger one.
    pub async fn open_or_create(
        store: Arc<dyn ObjectStore>,
        expected: &UndoManifest,
    ) -> Result<UndoLog, UndoError> {
        let describe = store.describe();
        let store_err = |source| UndoError::Store {
            store: describe.clone(),
            source,
        };
        let mut created = expected.clone();
        created.format_version = UNDO_FORMAT_VERSION;
        let body = serde_json::to_vec_pretty(&created).expect("an undo manifest serializes");
        match store
            .put_if_absent(paths::UNDO_MANIFEST, Bytes::from(body))
            .await
        {
            Ok(()) => return UndoLog::writable(store, created),
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(store_err(e)),
        }
        let data = store.get(paths::UNDO_MANIFEST).await.map_err(store_err)?;
        let mut found = parse_manifest(&describe, &data)?;
        if found.journal_uuid == expected.journal_uuid
            && found.consumer == expected.consumer
            && found.device_size < expected.device_size
        {
            // `journal add-device` appended a device to the group: the address space grew at
            // its end and every existing device keeps its base, so every pre-image in the
            // log is still where it was. The log now covers the larger space.
            found.device_size = expected.device_size;
            let body = serde_json::to_vec_pretty(&found).expect("an undo manifest serializes");
            store
                .put(paths::UNDO_MANIFEST, Bytes::from(body))
                .await
                .map_err(store_err)?;
            tracing::info!(
                undo = %describe,
                device_size = found.device_size,
                "the undo log covers the group's added device(s) from here"
            );
        }
        let checks = [
            (
                "journal",
                found.journal_uuid.to_string(),
                expected.journal_uuid.to_string(),
            ),
            (
                "consumer",
                found.consumer.clone(),
                expected.consumer.clone(),
            ),
            (
                "device size",
                found.device_size.to_string(),
                expected.device_size.to_string(),
            ),
        ];
        for (field, found, expected) in checks {
            if found != expected {
                return Err(UndoError::Foreign {
                    store: describe,
                    field,
                    found,
                    expected,
                });
            }
        }
        if found.format_version < UNDO_FORMAT_VERSION {
            // From here on this log is written only by agents that publish a generation:
            // older tinylag refuse version 2, so a mount may trust the file (DESIGN.md "A
            // mount beside a running agent"). Before the first stamp, so no stamp exists
            // that an older agent could leave behind unchanged.
            found.format_version = UNDO_FORMAT_VERSION;
            let body = serde_json::to_vec_pretty(&found).expect("an undo manifest serializes");
            store
                .put(paths::UNDO_MANIFEST, Bytes::from(body))
                .await
                .map_err(store_err)?;
        }
        UndoLog::writable(store, found)
    }

    /// The log opened to write: a local one publishes a new incarnation of its generation
    /// before anything else is changed.
    fn writable(store: Arc<dyn ObjectStore>, manifest: UndoManifest) -> Result<UndoLog, UndoError> {
        let publisher = match store.local_root() {
            None => None,
            Some(dir) => Some(Arc::new(Publisher::start(dir, &manifest).map_err(
                |source| UndoError::Generation {
                    path: dir.join(super::generation::FILE_NAME),
                    source,
                },
            )?)),
        };
        Ok(UndoLog {
            store,
            manifest,
            publisher,
        })
    }

    /// Opens an existing undo log for reading only (time travel): nothing is created.
    /// `undo.json` must exist and belong to `journal_uuid`.
    pub async fn open_existing(
        store: Arc<dyn ObjectStore>,
        journal_uuid: Uuid,
    ) -> Result<UndoLog, UndoError> {
        let describe = store.describe();
        let data = store
            .get(paths::UNDO_MANIFEST)
            .await
            .map_err(|source| UndoError::Store {
                store: describe.clone(),
                source,
            })?;
        let manifest = parse_manifest(&describe, &data)?;
        if manifest.journal_uuid != journal_uuid {
            return Err(UndoError::Foreign {
                store: describe,
                field: "journal",
                found: manifest.journal_uuid.to_string(),
                expected: journal_uuid.to_string(),
            });
        }
        Ok(UndoLog {
            store,
            manifest,
            publisher: None,
        })
    }

    pub fn manifest(&self) -> &UndoManifest {
        &self.manifest
    }

    /// The directory of a local undo log (`None` on S3).
    pub(crate) fn local_dir(&self) -> Option<&std::path::Path> {
        self.store.local_root()
    }

    /// Reads one record's payload from an open undo segment file `seq` (of a local log, see
    /// [`local_dir`](Self::local_dir)) with one `pread`; its CRC is checked as by
    /// [`payload`](Self::payload).
    pub(crate) fn payload_from(
        &self,
        file: &std::fs::File,
        seq: u64,
        entry: &IndexEntry,
    ) -> Result<Bytes, UndoError> {
        use std::os::unix::fs::FileExt;
        let key = paths::undo_segment_key(seq);
        let range = entry.stored_range();
        let mut stored = vec![0u8; (range.end - range.start) as usize];
        file.read_exact_at(&mut stored, range.start)
            .map_err(|source| UndoError::Store {
                store: self.describe(),
                source: StoreError::Io {
                    path: format!("{}/{key}", self.describe()),
                    source,
                },
            })?;
        decode_payload(&key, entry, &stored).map_err(|e| self.segment_err(e))
    }

    /// The store the log lives in.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn expected(&self, seq: u64) -> Expected {
        Expected {
            uuid: self.manifest.journal_uuid,
            seq,
            first_lsn: None,
        }
    }

    /// Reads only the index of undo segment `seq` (one ranged read of its tail); `None` when
    /// absent.
    pub async fn index(&self, seq: u64) -> Result<Option<SegmentIndex>, UndoError> {
        let key = paths::undo_segment_key(seq);
        match read_index(self.store.as_ref(), &key, &self.expected(seq)).await {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(self.segment_err(e)),
        }
    }

    /// Reads one record's payload from undo segment `seq` with a ranged read; its CRC is
    /// checked.
    pub async fn payload(&self, seq: u64, entry: &IndexEntry) -> Result<Bytes, UndoError> {
        let key = paths::undo_segment_key(seq);
        let stored = self
            .store
            .get_range(&key, entry.stored_range())
            .await
            .map_err(|e| self.store_err(e))?;
        decode_payload(&key, entry, &stored).map_err(|e| self.segment_err(e))
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    fn store_err(&self, source: StoreError) -> UndoError {
        UndoError::Store {
            store: self.describe(),
            source,
        }
    }

    fn segment_err(&self, source: SegmentError) -> UndoError {
        match source {
            SegmentError::Store(source) => self.store_err(source),
            source => UndoError::Segment {
                store: self.describe(),
                source,
            },
        }
    }

    /// Writes undo segment `seq` holding `records` (contiguous LSNs from the first) and
    /// returns its size. When this returns, the segment is durable and, for a local log, its
    /// generation announced (so the caller may change the replica).
    pub async fn write(&self, seq: u64, records: Vec<Record>) -> Result<u64, UndoError> {
        let first_lsn = records.first().map_or(0, |r| r.lsn);
        let uuid = self.manifest.journal_uuid;
        // Compressing and checksumming tens of megabytes is CPU work: off the runtime.
        let body = tokio::task::spawn_blocking(move || encode_undo(uuid, seq, first_lsn, &records))
            .await
            .map_err(|e| UndoError::Task {
                store: self.describe(),
                message: e.to_string(),
            })?
            .map_err(|e| self.segment_err(e))?;
        let len = body.len() as u64;
        let key = paths::undo_segment_key(seq);
        match self.store.put_if_absent(&key, body).await {
            Ok(()) => {
                if let Some(publisher) = &self.publisher {
                    // Durable first, announced second, the replica changed third: a mount
                    // that sees the old generation after a read has nothing to look for.
                    publisher.bump().map_err(|source| UndoError::Generation {
                        path: publisher.path().to_owned(),
                        source,
                    })?;
                }
                Ok(len)
            }
            Err(e) if e.is_already_exists() => Err(UndoError::SegmentExists {
                store: self.describe(),
                key,
            }),
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// Reads and verifies undo segment `seq`, with its stored size; `None` when absent.
    pub async fn read(&self, seq: u64) -> Result<Option<(DecodedSegment, u64)>, UndoError> {
        let key = paths::undo_segment_key(seq);
        let data = match self.store.get(&key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        let expected = self.expected(seq);
        let size = data.len() as u64;
        let segment = decode_segment(&key, &data, &expected).map_err(|e| self.segment_err(e))?;
        Ok(Some((segment, size)))
    }

    async fn exists(&self, seq: u64) -> Result<bool, UndoError> {
        match self.store.head(&paths::undo_segment_key(seq)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// The end of the run of undo segments from `from`: the first seq at or after `from`
    /// that does not exist. O(log n) HEAD requests.
    ///
    /// Segments past that first gap can exist: a crash while a batch's segments were being
    /// written at once (see [`STRAYS`]) leaves the later ones without an earlier one. They
    /// are never part of the run: that batch never reached the replica, and their
    /// pre-images assume its earlier parts were applied (see [`strays`](Self::strays)).
    pub async fn end_from(&self, from: u64) -> Result<u64, UndoError> {
        let hi = crate::journal::head::gallop_end(from, |seq| self.exists(seq)).await?;
        if hi == from {
            return Ok(from);
        }
        // The search may have landed on a stray past the first gap. Strays and the gap belong
        // to one batch of at most `STRAYS + 1` segments, so the gap lies among the last
        // `STRAYS + 1` seqs before `hi` (everything before those is the run).
        let mut end = hi.saturating_sub(STRAYS + 1).max(from);
        while end < hi && self.exists(end).await? {
            end += 1;
        }
        Ok(end)
    }

    /// The strays past the run that ends at `run_end` (from [`end_from`](Self::end_from)),
    /// ascending: what a crash in the middle of a batch's undo writes left. That batch was
    /// never applied (its writes wait for all of its segments), so strays are to be deleted,
    /// never written back: a part's pre-images include what the batch's earlier parts write,
    /// which the replica never received.
    pub async fn strays(&self, run_end: u64) -> Result<Vec<u64>, UndoError> {
        let mut found = Vec::new();
        for seq in run_end + 1..=run_end + STRAYS {
            if self.exists(seq).await? {
                found.push(seq);
            }
        }
        Ok(found)
    }

    /// Deletes undo segment `seq` (missing is fine).
    pub async fn delete(&self, seq: u64) -> Result<(), UndoError> {
        self.store
            .delete_many(&[paths::undo_segment_key(seq)])
            .await
            .map_err(|e| self.store_err(e))
    }
}

/// Encodes undo segment `seq` in the journal's codec, offering each pre-image to zstd only
/// when [`CompressProbe`] expects it to shrink (the rest is stored raw, as the codec stores
/// any payload that does not compress; readers cannot tell the difference).
fn encode_undo(
    uuid: Uuid,
    seq: u64,
    first_lsn: u64,
    records: &[Record],
) -> Result<Bytes, SegmentError> {
    let mut builder = SegmentBuilder::new(uuid, 0, seq, first_lsn);
    builder.set_object_kind(crate::crypto::ObjectKind::UndoSegment);
    let payload: usize = records.iter().map(|r| r.op.payload_len()).sum();
    // Raw pre-images: the body is the payloads; one allocation for them and the index.
    builder.reserve(payload + records.len() * 64 + 4096);
    let mut probe = CompressProbe::new();
    for record in records {
        let data = match &record.op {
            Op::Write { data, .. } | Op::ResyncData { data, .. } => Some(data),
            _ => None,
        };
        let offered = data.is_some_and(|d| probe.offer(d));
        builder.set_compression(offered);
        builder.push(record)?;
        if let (Some(d), true) = (data, offered) {
            probe.observe(d.len(), builder.last_stored_len().unwrap_or(d.len()));
        }
    }
    Ok(builder.finish())
}

/// Reads the manifest of an existing undo log without creating one (for tools that must not
/// turn a wrong location into a new log); `None` when `store` holds no `undo.json`.
pub(crate) async fn read_manifest(
    store: &dyn ObjectStore,
) -> Result<Option<UndoManifest>, UndoError> {
    match store.get(paths::UNDO_MANIFEST).await {
        Ok(data) => parse_manifest(&store.describe(), &data).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(source) => Err(UndoError::Store {
            store: store.describe(),
            source,
        }),
    }
}

/// Most undo segments one batch is written as, minus one: the agent writes a batch's
/// segments at once, so a crash can leave up to this many of them past a missing one.
pub(crate) const STRAYS: u64 = 3;

/// Splits `items` into at most `parts` non-empty runs of about equal `weight`, in order
/// (one empty run for no items).
pub(crate) fn split_by<T>(items: Vec<T>, parts: usize, weight: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let total: u64 = items.iter().map(&weight).sum();
    let target = total.div_ceil(parts.max(1) as u64).max(1);
    let mut groups = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let last = groups.last_mut().expect("never empty");
        if bytes >= target && !last.is_empty() && groups.len() < parts {
            groups.push(Vec::new());
            bytes = 0;
        }
        bytes += weight(&item);
        groups.last_mut().expect("never empty").push(item);
    }
    groups
}

/// A parsed and version-checked undo manifest.
fn parse_manifest(store: &str, data: &[u8]) -> Result<UndoManifest, UndoError> {
    let malformed = |reason: String| UndoError::Malformed {
        store: store.to_string(),
        key: paths::UNDO_MANIFEST.to_string(),
        reason,
    };
    let probe: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| malformed(e.to_string()))?;
    let version = probe
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| malformed("no format_version".into()))?;
    // Version 1 logs read the same (only their writers did not publish a generation).
    if !(1..=u64::from(UNDO_FORMAT_VERSION)).contains(&version) {
        return Err(UndoError::UnsupportedVersion {
            store: store.to_string(),
            found: version,
            supported: UNDO_FORMAT_VERSION,
        });
    }
    serde_json::from_value(probe).map_err(|e| malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::Op;
    use crate::store::memory::MemoryStore;

    fn manifest(consumer: &str) -> UndoManifest {
        UndoManifest {
            format_version: UNDO_FORMAT_VERSION,
            journal_uuid: Uuid::from_u128(7),
            consumer: consumer.into(),
            replica: "/r.img".into(),
            device_size: 1 << 20,
            created_ns: 1,
        }
    }

    #[tokio::test]
    async fn segments_round_trip_and_are_never_overwritten() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let log = UndoLog::open_or_create(store.clone(), &manifest("a"))
            .await
            .unwrap();
        let records = vec![
            Record {
                lsn: 5,
                timestamp_ns: 10,
                dev: 0,
                op: Op::Write {
                    offset: 0,
                    data: Bytes::from_static(b"before"),
                },
            },
            Record {
                lsn: 6,
                timestamp_ns: 11,
                dev: 0,
                op: Op::Flush,
            },
        ];
        let size = log.write(3, records.clone()).await.unwrap();
        let (segment, read_size) = log.read(3).await.unwrap().unwrap();
        assert_eq!(segment.records, records);
        assert_eq!(size, read_size);
        assert!(matches!(
            log.write(3, records.clone()).await,
            Err(UndoError::SegmentExists { .. })
        ));
        assert!(log.read(4).await.unwrap().is_none());
        log.write(4, records[1..].to_vec()).await.unwrap();
        assert_eq!(log.end_from(3).await.unwrap(), 5);
        assert_eq!(log.end_from(5).await.unwrap(), 5);
        log.delete(4).await.unwrap();
        assert_eq!(log.end_from(3).await.unwrap(), 4);
    }

    /// Every shape a crash can leave: complete batches `0..gap`, then the last batch (which
    /// may have begun up to `STRAYS` seqs before the gap) with any of its later segments
    /// written. The run always ends at the gap, wherever the search probes land, and the
    /// strays are all found.
    #[tokio::test]
    async fn the_run_ends_at_the_first_gap_and_strays_past_it_are_found() {
        for gap in 0..40u64 {
            for begun in 0..=STRAYS.min(gap) {
                let batch_start = gap - begun;
                let later = batch_start + STRAYS + 1 - (gap + 1);
                for mask in 0..1u64 << later {
                    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
                    let log = UndoLog::open_or_create(store.clone(), &manifest("a"))
                        .await
                        .unwrap();
                    let strays: Vec<u64> = (0..later)
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| gap + 1 + i)
                        .collect();
                    // Only existence matters to the search (HEAD requests).
                    for seq in (0..gap).chain(strays.iter().copied()) {
                        store
                            .put(&paths::undo_segment_key(seq), Bytes::from_static(b"x"))
                            .await
                            .unwrap();
                    }
                    let what = format!("gap {gap}, strays {strays:?}");
                    assert_eq!(log.end_from(0).await.unwrap(), gap, "{what}");
                    assert_eq!(log.strays(gap).await.unwrap(), strays, "{what}");
                    if gap > 0 {
                        assert_eq!(log.end_from(gap - 1).await.unwrap(), gap, "{what}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn foreign_logs_are_refused() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        UndoLog::open_or_create(store.clone(), &manifest("a"))
            .await
            .unwrap();
        UndoLog::open_or_create(store.clone(), &manifest("a"))
            .await
            .unwrap();
        let e = UndoLog::open_or_create(store.clone(), &manifest("b"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                UndoError::Foreign {
                    field: "consumer",
                    ..
                }
            ),
            "{e}"
        );
        let mut other = manifest("a");
        other.journal_uuid = Uuid::from_u128(8);
        let e = UndoLog::open_or_create(store.clone(), &other)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("journal"), "{e}");
    }

    #[tokio::test]
    async fn a_corrupt_segment_names_its_key() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let log = UndoLog::open_or_create(store.clone(), &manifest("a"))
            .await
            .unwrap();
        let rec = Record {
            lsn: 1,
            timestamp_ns: 1,
            dev: 0,
            op: Op::WriteZeroes { offset: 0, len: 8 },
        };
        log.write(0, vec![rec]).await.unwrap();
        let key = paths::undo_segment_key(0);
        let mut bytes = store.get(&key).await.unwrap().to_vec();
        bytes[80] ^= 1;
        store.put(&key, Bytes::from(bytes)).await.unwrap();
        let e = log.read(0).await.unwrap_err();
        assert!(e.to_string().contains(&key), "{e}");
    }
}
