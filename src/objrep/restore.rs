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
    /// The newest point the journal extends: the newest checkpoint and every record the
    /// journal holds after it (promote's point, as a file replica's agent would reach it).
    End,
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

/// An image written by [`ObjSources::restore_onto`]: what it holds, and where its journal
/// read stopped, so [`ObjSources::extend`] can apply what the journal gained since.
#[derive(Clone, Debug)]
pub(crate) struct Restored {
    pub(crate) report: ObjRestoreReport,
    /// The journal segment that holds `report.lsn + 1` (a `promote --at`'s branch starts
    /// there).
    pub(crate) next_seq: u64,
    /// Where the journal read stopped; `None` when it stopped inside a segment (a point
    /// before the journal's end), which [`ObjSources::extend`] cannot continue.
    pub(crate) cursor: Option<Cursor>,
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
        // Resolved before the file is created: a refused point writes nothing.
        let plan = self.plan(point).await?;
        let (file, _) = ReplicaFile::open_or_create(output, self.identity.size)?;
        let result = self.write(&file, &plan).await;
        if result.is_err() {
            drop(file);
            let _ = std::fs::remove_file(output);
        }
        result.map(|r| r.report)
    }

    /// Writes the image as of `point` onto `file`, which must read as zeroes (a new sparse
    /// file, or a device zeroed whole): promote's materialise. The caller cleans up after an
    /// error.
    pub(crate) async fn restore_onto(
        &self,
        point: &ObjPoint,
        file: &ReplicaFile,
    ) -> ObjrepResult<Restored> {
        let plan = self.plan(point).await?;
        self.write(file, &plan).await
    }

    /// Applies the journal's lineage records after what `restored` holds onto `file`,
    /// through LSN `through` (promote's catch-up once the new writer planned). Only an image
    /// restored to [`ObjPoint::End`] can be extended.
    pub(crate) async fn extend(
        &self,
        file: &ReplicaFile,
        restored: &mut Restored,
        through: u64,
    ) -> ObjrepResult<()> {
        if restored.report.lsn >= through {
            return Ok(());
        }
        let Some(mut cursor) = restored.cursor else {
            return Err(ObjrepError::Refused(format!(
                "the image stops inside the journal at LSN {}; it cannot be extended to LSN \
                 {through}",
                restored.report.lsn
            )));
        };
        let next_seq = self
            .forward(
                file,
                &mut cursor,
                false,
                through,
                u64::MAX,
                &mut restored.report,
            )
            .await?;
        restored.next_seq = next_seq;
        restored.cursor = (restored.report.lsn < through).then_some(cursor);
        if restored.report.lsn < through {
            return Err(ObjrepError::Refused(format!(
                "journal {} ends at LSN {}, before LSN {through}",
                self.journal.describe(),
                restored.report.lsn
            )));
        }
        sync(file)?;
        Ok(())
    }

    /// Resolves `point` to the checkpoint it starts from and the journal it needs, and
    /// refuses it when the journal no longer holds those records. Reads nothing but the
    /// mark and the trim pointer.
    async fn plan(&self, point: &ObjPoint) -> ObjrepResult<Plan> {
        let (target_lsn, until_ns) = match point {
            ObjPoint::Mark(name) => (mark::load(self.journal.as_ref(), name).await?.lsn, u64::MAX),
            ObjPoint::Time(t) => (u64::MAX, *t),
            ObjPoint::End => (u64::MAX, u64::MAX),
        };
        let base = match point {
            ObjPoint::Mark(_) => self.manifest.at_or_below(target_lsn),
            ObjPoint::Time(t) => self.manifest.at_or_before_time(*t),
            ObjPoint::End => self.manifest.last(),
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
        Ok(Plan {
            base,
            exact,
            target_lsn,
            until_ns,
        })
    }

    async fn write(&self, file: &ReplicaFile, plan: &Plan) -> ObjrepResult<Restored> {
        let base = plan.base.as_ref();
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
        let mut cursor = Cursor {
            seq: base.map_or(0, |b| b.next_seq),
            next_lsn: base.map_or(1, |b| b.lsn + 1),
        };
        let mut next_seq = cursor.seq;
        if !plan.exact {
            next_seq = self
                .forward(
                    file,
                    &mut cursor,
                    base.is_some(),
                    plan.target_lsn,
                    plan.until_ns,
                    &mut report,
                )
                .await?;
        }
        sync(file)?;
        // The read stopped at the journal's end (not inside a segment) only when nothing
        // bounded it.
        let at_end = !plan.exact && plan.target_lsn == u64::MAX && plan.until_ns == u64::MAX;
        Ok(Restored {
            report,
            next_seq,
            cursor: at_end.then_some(cursor),
        })
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

    /// Applies the journal's lineage records from `cursor` (inside its segment when
    /// `resuming`: just after a checkpoint) up to the point; returns the seq of the segment
    /// that holds the record after the last one read.
    async fn forward(
        &self,
        file: &ReplicaFile,
        cursor: &mut Cursor,
        resuming: bool,
        target_lsn: u64,
        until_ns: u64,
        report: &mut ObjRestoreReport,
    ) -> ObjrepResult<u64> {
        let reader = JournalReader::new(self.journal.clone(), self.jm.clone());
        let lineage = chain::load(self.journal.as_ref()).await?.lineage();
        let layout = self.jm.layout();
        let mut resuming = resuming;
        let mut span_begin: Option<u64> = None;
        let next_seq = 'segments: loop {
            let step = if resuming {
                reader.step_resuming(cursor).await?
            } else {
                reader.step(cursor).await?
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
                Step::NotYet if target_lsn == u64::MAX => break cursor.seq,
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
            let seq = segment.header.seq;
            let end_lsn = segment.header.end_lsn();
            let key = self.jm.segment_key(seq);
            for record in segment.records {
                if record.lsn > target_lsn || record.timestamp_ns > until_ns {
                    break 'segments seq;
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
                    break 'segments if lsn + 1 < end_lsn { seq } else { cursor.seq };
                }
            }
        };
        if let Some(begin) = span_begin {
            return Err(ObjrepError::Refused(format!(
                "LSN {} is inside a resync span (begun at LSN {begin}): no consistent image \
                 exists there; choose a point before LSN {begin} or after the span ends",
                report.lsn
            )));
        }
        Ok(next_seq)
    }
}

/// Where a restore starts and what it reads.
struct Plan {
    /// The checkpoint it starts from (`None`: the blank image at the journal's start).
    base: Option<Checkpoint>,
    /// The checkpoint is the point: no journal is read.
    exact: bool,
    target_lsn: u64,
    until_ns: u64,
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
