//! The activity log (DRBD's idea): a small bitmap beside the primary, fsync'd, naming every
//! region that may hold a change the journal does not have durably yet. After a crash of
//! `serve`, the next start resyncs exactly those regions instead of the whole device.
//!
//! - Before a change to a region not yet *active* is applied to the primary, the region is
//!   marked and the log written and fsync'd ([`ActivityLog::activate`]); a change to an
//!   active region costs one atomic load.
//! - Each journaled change notes its LSN against its regions ([`ActivityLog::touch`]). A
//!   region leaves the log ([`ActivityLog::retire`]) once it is not dirty and every record
//!   touching it is durable, and it has been quiet for one cleaning round (half a second; so a hot region
//!   is not written out and back every round). The caller holds the region's range lock
//!   while it checks and retires, so no change to it is in flight.
//!
//! If the log cannot be written, the primary is still served: the file is removed (so the
//! next start cannot trust a stale copy and goes `forward-full`), the failure is logged
//! loudly, and activation stops costing anything.
//!
//! Must never: let a change reach the primary before its region is durably in the log
//! (while the log works); drop a region whose records are not all durable; be trusted after
//! another writer, another journal, or a torn or corrupt write.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::sys::sync_parent;

/// First bytes of each slot.
pub(crate) const MAGIC: [u8; 8] = *b"TLAGACT1";
/// The format version this code writes and reads.
pub(crate) const VERSION: u32 = 1;
/// Bytes of a slot header before the bitmap.
const HEADER_LEN: usize = 72;

/// One on-disk copy of the log. The file holds two slots, slot 0 at offset 0 and slot 1 at
/// offset [`slot_len`]; each write goes to slot `generation % 2`, so a torn write can only
/// spoil the older copy, and a reader takes the valid slot with the higher generation.
///
/// Slot layout (little-endian; `slot_len` = 72 + 8 × ⌈regions / 64⌉ rounded up to 4096):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `TLAGACT1` |
/// | 8 | 4 | format version (1) |
/// | 12 | 4 | reserved, 0 |
/// | 16 | 16 | journal (device-group) UUID |
/// | 32 | 8 | writer epoch that wrote it |
/// | 40 | 8 | generation (1, 2, …; one per write) |
/// | 48 | 8 | region size in bytes |
/// | 56 | 8 | region count |
/// | 64 | 4 | CRC32C of bytes 0..64 followed by the bitmap |
/// | 68 | 4 | reserved, 0 |
/// | 72 | 8 × ⌈regions / 64⌉ | bitmap: bit `r % 64` of word `r / 64` set = region `r` active |
///
/// A log is *usable* by a starting writer only if a slot is valid (magic, version, CRC),
/// names the journal's UUID, the journal's region size and count, and the epoch just before
/// the starting writer's (any other epoch means another writer ran in between: stale).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub uuid: Uuid,
    pub epoch: u64,
    pub generation: u64,
    pub region_size: u64,
    pub regions: u64,
    pub bits: Vec<u64>,
}

/// Bytes of one slot for `regions` regions.
pub(crate) fn slot_len(regions: u64) -> u64 {
    (HEADER_LEN as u64 + 8 * regions.div_ceil(64)).next_multiple_of(4096)
}

impl Slot {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; slot_len(self.regions) as usize];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..32].copy_from_slice(self.uuid.as_bytes());
        out[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        out[40..48].copy_from_slice(&self.generation.to_le_bytes());
        out[48..56].copy_from_slice(&self.region_size.to_le_bytes());
        out[56..64].copy_from_slice(&self.regions.to_le_bytes());
        for (i, w) in self.bits.iter().enumerate() {
            let at = HEADER_LEN + 8 * i;
            out[at..at + 8].copy_from_slice(&w.to_le_bytes());
        }
        let bitmap_end = HEADER_LEN + 8 * self.bits.len();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..64]), &out[HEADER_LEN..bitmap_end]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes one slot; `None` when it is not a valid slot (torn, zeroed, corrupt).
    fn decode(buf: &[u8]) -> Option<Slot> {
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        if buf.len() < HEADER_LEN || buf[0..8] != MAGIC {
            return None;
        }
        if u32::from_le_bytes(buf[8..12].try_into().unwrap()) != VERSION {
            return None;
        }
        let regions = u64_at(56);
        let words = usize::try_from(regions.div_ceil(64)).ok()?;
        let bitmap_end = HEADER_LEN.checked_add(words.checked_mul(8)?)?;
        if bitmap_end > buf.len() {
            return None;
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[0..64]), &buf[HEADER_LEN..bitmap_end]);
        if crc != u32::from_le_bytes(buf[64..68].try_into().unwrap()) {
            return None;
        }
        Some(Slot {
            uuid: Uuid::from_bytes(buf[16..32].try_into().unwrap()),
            epoch: u64_at(32),
            generation: u64_at(40),
            region_size: u64_at(48),
            regions,
            bits: (0..words).map(|i| u64_at(HEADER_LEN + 8 * i)).collect(),
        })
    }
}

/// What a starting writer found at the log's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Previous {
    /// A usable log: these regions may hold changes the journal lacks.
    Usable { bits: Vec<u64> },
    /// No usable log; why, in words (missing, stale, corrupt).
    Unusable(String),
}

impl Previous {
    /// Regions the usable log names (0 when unusable).
    pub(crate) fn count(&self) -> u64 {
        match self {
            Previous::Usable { bits } => bits.iter().map(|w| u64::from(w.count_ones())).sum(),
            Previous::Unusable(_) => 0,
        }
    }
}

/// Every way the activity log fails to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivityLogError {
    /// The log file could not be read, created or written at start.
    #[error(
        "activity log {path}: {source} (put it elsewhere with --activity-log PATH, or run \
         without one with --no-activity-log)"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `<primary>.tinylag-al`, the default place of the log.
pub fn default_path(primary: &Path) -> PathBuf {
    let mut name = primary.as_os_str().to_owned();
    name.push(".tinylag-al");
    PathBuf::from(name)
}

/// Reads what a previous writer left at `path`, judged for a writer of `epoch` on the journal
/// `uuid` with the given geometry.
pub(crate) fn read_previous(
    path: &Path,
    uuid: Uuid,
    epoch: u64,
    region_size: u64,
    regions: u64,
) -> Result<Previous, ActivityLogError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Previous::Unusable(format!(
                "activity log {} is missing",
                path.display()
            )))
        }
        Err(source) => {
            return Err(ActivityLogError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let Some(slot) = newest_slot(&data, regions) else {
        return Ok(Previous::Unusable(format!(
            "activity log {} is corrupt (no slot with a valid magic, version and CRC)",
            path.display()
        )));
    };
    let stale = if slot.uuid != uuid {
        Some(format!("it belongs to journal {}", slot.uuid))
    } else if slot.region_size != region_size || slot.regions != regions {
        Some(format!(
            "it has {} regions of {} bytes, the journal {} of {}",
            slot.regions, slot.region_size, regions, region_size
        ))
    } else if slot.epoch + 1 != epoch {
        Some(format!(
            "it was written by writer epoch {}, but the writer before this one (epoch {epoch}) \
             was epoch {}",
            slot.epoch,
            epoch - 1
        ))
    } else {
        None
    };
    Ok(match stale {
        Some(why) => Previous::Unusable(format!("activity log {} is stale: {why}", path.display())),
        None => Previous::Usable { bits: slot.bits },
    })
}

/// The valid slot with the higher generation in a log file's bytes, for `regions` regions.
fn newest_slot(data: &[u8], regions: u64) -> Option<Slot> {
    let len = slot_len(regions) as usize;
    [0, len]
        .iter()
        .filter_map(|&at| data.get(at..at + len).and_then(Slot::decode))
        .max_by_key(|s| s.generation)
}

/// The newest valid slot of the log at `path` as it is, judged for nothing (`rejoin` reads
/// which epoch wrote it and the regions it names); `None` when the file is missing or holds
/// no valid slot.
pub(crate) fn read_slot(path: &Path, regions: u64) -> Result<Option<Slot>, ActivityLogError> {
    match std::fs::read(path) {
        Ok(data) => Ok(newest_slot(&data, regions)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ActivityLogError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

struct Inner {
    file: Option<File>,
    slot: Slot,
}

/// The running writer's log. See the module documentation.
///
/// # Invariants
/// Every bit set in `durable` is set in the newest slot on disk (or the log is broken and
/// `durable` is all ones, so activation is free); `inner.slot.bits` is what the next write
/// puts on disk.
pub(crate) struct ActivityLog {
    path: PathBuf,
    region_size: u64,
    device_size: u64,
    durable: Vec<AtomicU64>,
    /// Per region: the highest LSN journaled for it (RESYNC_DATA included).
    last_lsn: Vec<AtomicU64>,
    inner: Mutex<Inner>,
    broken: AtomicBool,
    writes: AtomicU64,
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("path", &self.path)
            .field("active", &self.active())
            .finish()
    }
}

impl ActivityLog {
    /// Starts the log of writer `epoch` at `path` with `initial` regions active (those the
    /// previous writer's log named, or every region), written durably (temp file, fsync,
    /// rename, directory fsync) before any I/O is served.
    pub(crate) fn create(
        path: &Path,
        uuid: Uuid,
        epoch: u64,
        device_size: u64,
        region_size: u64,
        initial: &[u64],
    ) -> Result<Arc<ActivityLog>, ActivityLogError> {
        let err = |source| ActivityLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let regions = device_size.div_ceil(region_size);
        let words = regions.div_ceil(64) as usize;
        let mut bits = vec![0u64; words];
        for (b, i) in bits.iter_mut().zip(initial) {
            *b = *i;
        }
        if regions % 64 != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u64 << (regions % 64)) - 1;
            }
        }
        let slot = Slot {
            uuid,
            epoch,
            generation: 1,
            region_size,
            regions,
            bits,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        let encoded = slot.encode();
        // Generation 1 goes to slot 1; slot 0 stays zero (invalid) until the next write.
        file.set_len(2 * encoded.len() as u64).map_err(err)?;
        file.write_all_at(&encoded, encoded.len() as u64)
            .map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        sync_parent(path).map_err(err)?;
        let durable = slot.bits.iter().map(|w| AtomicU64::new(*w)).collect();
        Ok(Arc::new(ActivityLog {
            path: path.to_path_buf(),
            region_size,
            device_size,
            durable,
            last_lsn: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            inner: Mutex::new(Inner {
                file: Some(file),
                slot,
            }),
            broken: AtomicBool::new(false),
            writes: AtomicU64::new(1),
        }))
    }

    /// A log that is not kept (`--no-activity-log`): activation costs nothing, nothing is
    /// written, and the next start after a crash resyncs the whole device.
    pub(crate) fn disabled(device_size: u64, region_size: u64) -> Arc<ActivityLog> {
        let regions = device_size.div_ceil(region_size);
        let words = regions.div_ceil(64) as usize;
        Arc::new(ActivityLog {
            path: PathBuf::new(),
            region_size,
            device_size,
            durable: (0..words).map(|_| AtomicU64::new(u64::MAX)).collect(),
            last_lsn: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            inner: Mutex::new(Inner {
                file: None,
                slot: Slot {
                    uuid: Uuid::nil(),
                    epoch: 0,
                    generation: 0,
                    region_size,
                    regions,
                    bits: vec![0; words],
                },
            }),
            broken: AtomicBool::new(true),
            writes: AtomicU64::new(0),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn regions_of(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.device_size);
        if range.start >= end {
            return 0..0;
        }
        range.start / self.region_size..(end - 1) / self.region_size + 1
    }

    fn is_durable(&self, r: u64) -> bool {
        self.durable[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }

    /// Makes every region `range` touches durably active. Free when they already are; else
    /// one write and fsync of the log (on the blocking pool). Never fails: a log that cannot
    /// be written is removed and abandoned (see the module documentation).
    pub(crate) async fn activate(self: &Arc<Self>, range: Range<u64>) {
        let regions = self.regions_of(range);
        if regions.clone().all(|r| self.is_durable(r)) {
            return;
        }
        let log = self.clone();
        let _ = tokio::task::spawn_blocking(move || log.persist_with(regions)).await;
    }

    /// Sets `regions` and writes the log (under its mutex, so writes are ordered and each
    /// carries every bit set before it).
    fn persist_with(&self, regions: Range<u64>) {
        let mut inner = lock(&self.inner);
        for r in regions.clone() {
            inner.slot.bits[(r / 64) as usize] |= 1 << (r % 64);
        }
        if self.write_locked(&mut inner) {
            for r in regions {
                self.durable[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::AcqRel);
            }
        }
    }

    /// Writes the next slot; false (and the log abandoned) when that fails.
    fn write_locked(&self, inner: &mut Inner) -> bool {
        let Some(file) = &inner.file else {
            return false;
        };
        inner.slot.generation += 1;
        let encoded = inner.slot.encode();
        let at = (inner.slot.generation % 2) * encoded.len() as u64;
        let written = file
            .write_all_at(&encoded, at)
            .and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                self.writes.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) => {
                tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "cannot write the activity log; removing it: the next start after a crash \
                     will resync the whole device (forward-full)"
                );
                inner.file = None;
                let _ = std::fs::remove_file(&self.path);
                let _ = sync_parent(&self.path);
                self.broken.store(true, Ordering::Release);
                for w in &self.durable {
                    w.store(u64::MAX, Ordering::Release);
                }
                false
            }
        }
    }

    /// Notes that record `lsn` touches `range` (called once the LSN is assigned, under the
    /// range lock).
    pub(crate) fn touch(&self, range: Range<u64>, lsn: u64) {
        for r in self.regions_of(range) {
            self.last_lsn[r as usize].fetch_max(lsn, Ordering::AcqRel);
        }
    }

    /// Active regions whose records are all at or below `quiet_lsn` (the durable LSN of the
    /// previous cleaning round), ascending: candidates for [`ActivityLog::retire`].
    pub(crate) fn candidates(&self, quiet_lsn: u64) -> Vec<u64> {
        if self.broken.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (w, word) in self.durable.iter().enumerate() {
            let mut word = word.load(Ordering::Acquire);
            while word != 0 {
                let r = w as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                if self.last_lsn[r as usize].load(Ordering::Acquire) <= quiet_lsn {
                    out.push(r);
                }
            }
        }
        out
    }

    /// Whether region `r`'s records are all at or below `lsn`.
    pub(crate) fn quiet(&self, r: u64, lsn: u64) -> bool {
        self.last_lsn[r as usize].load(Ordering::Acquire) <= lsn
    }

    /// Drops region `r` from the log in memory (the caller holds its range lock and has
    /// checked it is clean and durable); [`ActivityLog::flush_retired`] writes it out.
    pub(crate) fn retire(&self, r: u64) {
        let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
        // Off the fast path first: a change from now on writes the log itself.
        self.durable[w].fetch_and(!bit, Ordering::AcqRel);
        lock(&self.inner).slot.bits[w] &= !bit;
    }

    /// Writes the log after [`ActivityLog::retire`]s (blocking: call on the blocking pool).
    pub(crate) fn flush_retired(&self) {
        let mut inner = lock(&self.inner);
        self.write_locked(&mut inner);
    }

    /// Regions active now (on disk).
    pub(crate) fn active(&self) -> u64 {
        if self.broken.load(Ordering::Acquire) {
            return 0;
        }
        self.durable
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Bytes of the log file.
    pub(crate) fn file_size(&self) -> u64 {
        2 * slot_len(self.last_lsn.len() as u64)
    }

    /// Writes (with fsync) since start.
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// The log could not be written and was abandoned.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }
}

// Critical sections leave the slot consistent (bits are set before the write that may
// fail); a poisoned lock still guards a usable state.
use crate::sync::lock;

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn bits_of(regions: &[u64], total: u64) -> Vec<u64> {
        let mut bits = vec![0u64; total.div_ceil(64) as usize];
        for r in regions {
            bits[(r / 64) as usize] |= 1 << (r % 64);
        }
        bits
    }

    #[tokio::test]
    async fn a_crashed_writers_regions_are_read_back_by_the_next_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img.tinylag-al");
        let uuid = Uuid::new_v4();
        let log = ActivityLog::create(&path, uuid, 4, 100 * MIB, MIB, &[]).unwrap();
        log.activate(3 * MIB..3 * MIB + 10).await;
        log.activate(70 * MIB - 1..70 * MIB + 1).await;
        let writes = log.writes();
        log.activate(3 * MIB + 100..3 * MIB + 200).await;
        assert_eq!(log.writes(), writes, "an active region costs no write");
        assert_eq!(log.active(), 3);
        // Retire region 3 once quiet; the next epoch sees only 69 and 70.
        log.touch(3 * MIB..3 * MIB + 1, 10);
        log.touch(69 * MIB..69 * MIB + 1, 12);
        assert_eq!(log.candidates(11), vec![3, 70]);
        log.retire(3);
        log.flush_retired();
        drop(log);
        let prev = read_previous(&path, uuid, 5, MIB, 100).unwrap();
        assert_eq!(
            prev,
            Previous::Usable {
                bits: bits_of(&[69, 70], 100)
            }
        );
        assert_eq!(prev.count(), 2);
    }

    #[test]
    fn missing_stale_and_corrupt_logs_are_unusable_and_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("al");
        let uuid = Uuid::new_v4();
        let why = |p: Previous| match p {
            Previous::Unusable(w) => w,
            other => panic!("usable: {other:?}"),
        };
        assert!(why(read_previous(&path, uuid, 2, MIB, 8).unwrap()).contains("missing"));
        drop(ActivityLog::create(&path, uuid, 1, 8 * MIB, MIB, &[1]).unwrap());
        assert!(matches!(
            read_previous(&path, uuid, 2, MIB, 8).unwrap(),
            Previous::Usable { .. }
        ));
        assert!(why(read_previous(&path, uuid, 3, MIB, 8).unwrap()).contains("epoch 1"));
        assert!(why(read_previous(&path, Uuid::new_v4(), 2, MIB, 8).unwrap()).contains("journal"));
        assert!(why(read_previous(&path, uuid, 2, MIB, 16).unwrap()).contains("regions"));
        // One flipped byte of the only valid slot (generation 1 is in slot 1).
        let mut data = std::fs::read(&path).unwrap();
        data[slot_len(8) as usize + HEADER_LEN] ^= 0x40;
        std::fs::write(&path, &data).unwrap();
        assert!(why(read_previous(&path, uuid, 2, MIB, 8).unwrap()).contains("corrupt"));
    }

    /// A torn write spoils only the slot being written; the other copy is still read.
    #[tokio::test]
    async fn a_torn_write_falls_back_to_the_older_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("al");
        let uuid = Uuid::new_v4();
        let log = ActivityLog::create(&path, uuid, 1, 8 * MIB, MIB, &[]).unwrap();
        log.activate(0..1).await; // generation 2, slot 0
        log.activate(MIB..MIB + 1).await; // generation 3, slot 1
        drop(log);
        let len = slot_len(8) as usize;
        let mut data = std::fs::read(&path).unwrap();
        data[len + 20] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            read_previous(&path, uuid, 2, MIB, 8).unwrap(),
            Previous::Usable { bits: vec![1] },
            "slot 0 (generation 2) holds region 0 only"
        );
    }
}
