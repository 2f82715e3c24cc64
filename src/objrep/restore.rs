//! Reading a point from an object replica: the newest checkpoint at or below it (what
//! [`ReplicaManifest::sources`] names for it — the newest image at or below it, then the
//! delta layers after that — applied oldest first onto a sparse file), then the journal's
//! lineage records up to the point; and the replica's timeline (its checkpoints, images and
//! the journal's marks).
//!
//! Must never: write anywhere but the new output file (removed again when the restore
//! fails); use a layer whose checks fail; restore a point inside a resync span.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::error::{ObjrepError, ObjrepResult};
use super::image::{check_part, layer_error, named_error};
use super::layer;
use super::manifest::{self, Checkpoint, ImageRef, ReplicaIdentity, ReplicaManifest};
use crate::journal::chain;
use crate::journal::consumer;
use crate::journal::head;
use crate::journal::mark;
use crate::journal::reader::{Cursor, JournalReader, Step};
use crate::journal::record::Op;
use crate::journal::Manifest;
use crate::replayer::apply::{apply_op, apply_overlay, check_journal_record, sync};
use crate::replayer::replica::ReplicaFile;
use crate::store::ObjectStore;

/// The point to restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjPoint {
    /// The last lineage record at or before this time (ns since the epoch).
    Time(u64),
    /// A mark of the journal.
    Mark(String),
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct ObjRestoreReport {
    /// The LSN the image is as of.
    pub lsn: u64,
    pub timestamp_ns: u64,
    /// The checkpoint it started from (0: the blank image at the journal's start).
    pub checkpoint_lsn: u64,
    /// Delta layers read.
    pub layers: usize,
    /// The image layer it started from, if any (its LSN).
    pub image_lsn: Option<u64>,
    pub layer_bytes: u64,
    /// Journal records applied after the checkpoint.
    pub journal_records: u64,
}

/// The object replica, opened for reading.
#[derive(Debug)]
pub struct ObjSources {
    pub journal: Arc<dyn ObjectStore>,
    pub replica: Arc<dyn ObjectStore>,
    pub jm: Manifest,
    pub identity: ReplicaIdentity,
    pub manifest: ReplicaManifest,
}

impl ObjSources {
    /// Opens the journal's manifest and the replica's identity and newest manifest.
    pub async fn open(
        journal: Arc<dyn ObjectStore>,
        replica: Arc<dyn ObjectStore>,
    ) -> ObjrepResult<ObjSources> {
        let jm = Manifest::load(journal.as_ref()).await?;
        jm.check_key_for_reading(&journal.describe())?;
        let store = replica.describe();
        let Some(identity) = manifest::load_identity(replica.as_ref()).await? else {
            return Err(ObjrepError::NoCheckpoint { store });
        };
        if identity.journal_uuid != jm.uuid {
            return Err(ObjrepError::Foreign {
                store,
                reason: format!(
                    "belongs to journal {}, not to {} ({})",
                    identity.journal_uuid,
                    jm.uuid,
                    journal.describe()
                ),
            });
        }
        let Some(manifest) = manifest::load_latest(replica.as_ref()).await? else {
            return Err(ObjrepError::NoCheckpoint { store });
        };
        Ok(ObjSources {
            journal,
            replica,
            jm,
            identity,
            manifest,
        })
    }

    fn checkpoints_hint(&self) -> String {
        format!(
            "`tinylag timeline --journal {} --replica {}` lists its checkpoints",
            self.journal.describe(),
            self.replica.describe()
        )
    }

    /// Writes the image as of `point` to `output` (a new file).
    pub async fn restore(&self, point: &ObjPoint, output: &Path) -> ObjrepResult<ObjRestoreReport> {
        if output.exists() {
            return Err(ObjrepError::Refused(format!(
                "--output {}: the file exists; restore writes a new image",
                output.display()
            )));
        }
        // Resolve the point before the file is created: a refused point writes nothing.
        let (target_lsn, until_ns) = match point {
            ObjPoint::Mark(name) => (mark::load(self.journal.as_ref(), name).await?.lsn, u64::MAX),
            ObjPoint::Time(t) => (u64::MAX, *t),
        };
        let base = match point {
            ObjPoint::Mark(_) => self.manifest.at_or_below(target_lsn),
            ObjPoint::Time(t) => self.manifest.at_or_before_time(*t),
        }
        .cloned();
        // The checkpoint is the point itself: a mark on it, or a time before the record
        // that follows it. No journal is read then (it may be trimmed past it).
        let exact = base.as_ref().is_some_and(|b| {
            b.lsn == target_lsn || b.next_timestamp_ns.is_some_and(|next| next > until_ns)
        });
        if !exact {
            let from_seq = base.as_ref().map_or(0, |b| b.next_seq);
            let trim = consumer::load_trim_pointer(self.journal.as_ref()).await?;
            if trim.first_seq > from_seq {
                return Err(ObjrepError::Refused(format!(
                    "the point lies after checkpoint LSN {} of object replica {}, and journal {} \
                     no longer holds the records after it (trimmed to LSN {}); only its \
                     checkpoints are restorable there: {}",
                    base.as_ref().map_or(0, |b| b.lsn),
                    self.replica.describe(),
                    self.journal.describe(),
                    trim.first_lsn,
                    self.checkpoints_hint()
                )));
            }
        }
        let (file, _) = ReplicaFile::open_or_create(output, self.identity.size)?;
        let result = self
            .write(&file, base.as_ref(), exact, target_lsn, until_ns)
            .await;
        if result.is_err() {
            drop(file);
            let _ = std::fs::remove_file(output);
        }
        result
    }

    async fn write(
        &self,
        file: &ReplicaFile,
        base: Option<&Checkpoint>,
        exact: bool,
        target_lsn: u64,
        until_ns: u64,
    ) -> ObjrepResult<ObjRestoreReport> {
        let mut report = ObjRestoreReport {
            lsn: base.map_or(0, |b| b.lsn),
            timestamp_ns: base.map_or(0, |b| b.timestamp_ns),
            checkpoint_lsn: base.map_or(0, |b| b.lsn),
            layers: 0,
            image_lsn: None,
            layer_bytes: 0,
            journal_records: 0,
        };
        if let Some(cp) = base {
            let sources = self.manifest.sources(cp);
            report.layers = sources.deltas.len();
            if let Some(image) = sources.image {
                report.image_lsn = Some(image.lsn);
                for part in &image.parts {
                    let decoded = self.get_layer(&part.key, 0, image.lsn).await?;
                    check_part(self.replica.as_ref(), part, &decoded.extents)?;
                    report.layer_bytes += part.size;
                    apply_overlay(file, &decoded.overlay())?;
                }
            }
            for l in sources.deltas {
                let decoded = self.get_layer(&l.key, l.first_lsn, l.last_lsn).await?;
                report.layer_bytes += l.size;
                apply_overlay(file, &decoded.overlay())?;
            }
        }
        if !exact {
            self.forward(file, base, target_lsn, until_ns, &mut report)
                .await?;
        }
        sync(file)?;
        Ok(report)
    }

    /// Reads and checks a layer or image part the manifest names.
    async fn get_layer(&self, key: &str, first: u64, last: u64) -> ObjrepResult<layer::DeltaLayer> {
        let store = self.replica.as_ref();
        let data = store
            .get(key)
            .await
            .map_err(|e| named_error(store, key, self.manifest.gen, e))?;
        layer::decode(data, self.identity.journal_uuid, first, last)
            .map_err(|e| layer_error(store, key, e))
    }

    /// Applies the journal's lineage records after `base` up to the point.
    async fn forward(
        &self,
        file: &ReplicaFile,
        base: Option<&Checkpoint>,
        target_lsn: u64,
        until_ns: u64,
        report: &mut ObjRestoreReport,
    ) -> ObjrepResult<()> {
        let reader = JournalReader::new(self.journal.clone(), self.jm.clone());
        let lineage = chain::load(self.journal.as_ref()).await?.lineage();
        let layout = self.jm.layout();
        let mut cursor = Cursor {
            seq: base.map_or(0, |b| b.next_seq),
            next_lsn: base.map_or(1, |b| b.lsn + 1),
        };
        let mut resuming = base.is_some();
        let mut span_begin: Option<u64> = None;
        'segments: loop {
            let step = if resuming {
                reader.step_resuming(&mut cursor).await?
            } else {
                reader.step(&mut cursor).await?
            };
            resuming = false;
            if matches!(step, Step::NotYet) {
                // Missing below the journal's known end is a hole, never the end: a point
                // after it is refused, naming it, not restored as an earlier one.
                let known = head::known_end(self.journal.as_ref()).await?;
                head::check_missing(self.journal.as_ref(), &self.jm, cursor.seq, &known).await?;
            }
            let segment = match step {
                Step::Segment(s) => s,
                Step::NotYet if target_lsn == u64::MAX => break,
                Step::NotYet => {
                    return Err(ObjrepError::Refused(format!(
                        "journal {} ends at LSN {} (seq {} is missing), before the point at \
                         LSN {target_lsn}",
                        self.journal.describe(),
                        cursor.next_lsn - 1,
                        cursor.seq
                    )))
                }
            };
            let key = self.jm.segment_key(segment.header.seq);
            for record in segment.records {
                if record.lsn > target_lsn || record.timestamp_ns > until_ns {
                    break 'segments;
                }
                let (lsn, ts) = (record.lsn, record.timestamp_ns);
                if lineage.contains(lsn) {
                    let record = check_journal_record(&key, record, &layout, self.identity.size)?;
                    match &record.op {
                        Op::ResyncBegin => span_begin = Some(lsn),
                        Op::ResyncEnd => span_begin = None,
                        op => apply_op(file, lsn, op)?,
                    }
                    report.journal_records += 1;
                }
                report.lsn = lsn;
                report.timestamp_ns = ts;
                if lsn == target_lsn {
                    break 'segments;
                }
            }
        }
        if let Some(begin) = span_begin {
            return Err(ObjrepError::Refused(format!(
                "LSN {} is inside a resync span (begun at LSN {begin}): no consistent image \
                 exists there; choose a point before LSN {begin} or after the span ends",
                report.lsn
            )));
        }
        Ok(())
    }
}

/// One line of a timeline.
#[derive(Clone, Debug, Serialize)]
pub struct ObjTimeline {
    pub replica: String,
    pub checkpoints: Vec<Checkpoint>,
    /// Image layers (compaction's).
    pub images: Vec<ImageRef>,
    /// The journal's marks: `(name, lsn, timestamp_ns)`.
    pub marks: Vec<(String, u64, u64)>,
    /// The first LSN the journal still holds: every LSN from the first checkpoint at or
    /// below it up to the journal's end is restorable, and every checkpoint.
    pub journal_first_lsn: u64,
}

impl ObjSources {
    /// The checkpoints and marks.
    pub async fn timeline(&self) -> ObjrepResult<ObjTimeline> {
        let marks = mark::list(self.journal.as_ref())
            .await?
            .into_iter()
            .map(|m| (m.name, m.lsn, m.timestamp_ns))
            .collect();
        let trim = consumer::load_trim_pointer(self.journal.as_ref()).await?;
        Ok(ObjTimeline {
            replica: self.replica.describe(),
            checkpoints: self.manifest.checkpoints.clone(),
            images: self.manifest.images.clone(),
            marks,
            journal_first_lsn: trim.first_lsn,
        })
    }
}
