//! The undo log's generation: a small file the replay agent rewrites in place after every
//! undo segment it makes durable, before it changes the replica, so that a `mount --at`
//! beside it learns "no new undo segment since I last looked" from one read of a local file
//! instead of a store probe per batch of reads.
//!
//! ```text
//! <undo root>/generation   64 bytes, rewritten in place (never replaced), little-endian:
//!   0..8    magic "TLUNDOG1"
//!   8..24   incarnation: 16 random bytes, new each time a process opens the log to write
//!   24..32  generation: undo segments this incarnation has made durable (starts at 0)
//!   32..48  the undo log's journal UUID (undo.json `journal_uuid`)
//!   48..56  the undo log's `created_ns` (undo.json)
//!   56..60  CRC32C of the undo log's consumer name (undo.json `consumer`)
//!   60..64  CRC32C of bytes 0..60
//! ```
//!
//! Only for an undo log in a local directory (an undo log on S3 has no file to share, and a
//! mount keeps probing the store). Why a reader may trust it, and when it must not, is
//! DESIGN.md "A mount's read path": the writer publishes a new incarnation before it changes
//! anything and a new generation after each durable undo segment, before the replica
//! changes; undo logs a publishing writer opened are format version 2, which older agents
//! refuse; a reader trusts a stamp only when the path still names the file it holds, the CRC
//! and the identity match its undo log, and the stamp equals the one it read before its last
//! successful probe.
//!
//! Must never: let a reader skip a probe on a stamp it cannot vouch for (torn, foreign,
//! replaced, unreadable: each is "probe"); publish a generation before its segment is
//! durable; be fsync'd for its own sake (a mount that outlives a power cut is impossible, and
//! one that starts after reads the stamp before its first probe).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use uuid::Uuid;

use super::undo::UndoManifest;

/// The file's name in the undo log's directory (not a store key: written in place, outside
/// the store's create-by-rename, so a reader holding it sees every rewrite).
pub(crate) const FILE_NAME: &str = "generation";
const MAGIC: &[u8; 8] = b"TLUNDOG1";
const LEN: usize = 64;

/// What one read of the file says: which writer, and how many undo segments it has made
/// durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) incarnation: u128,
    pub(crate) generation: u64,
}

/// The undo log a stamp belongs to (from its `undo.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    journal: Uuid,
    created_ns: u64,
    consumer: u32,
}

impl Identity {
    fn of(m: &UndoManifest) -> Identity {
        Identity {
            journal: m.journal_uuid,
            created_ns: m.created_ns,
            consumer: crc32c::crc32c(m.consumer.as_bytes()),
        }
    }
}

fn encode(id: &Identity, stamp: Stamp) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[0..8].copy_from_slice(MAGIC);
    b[8..24].copy_from_slice(&stamp.incarnation.to_le_bytes());
    b[24..32].copy_from_slice(&stamp.generation.to_le_bytes());
    b[32..48].copy_from_slice(id.journal.as_bytes());
    b[48..56].copy_from_slice(&id.created_ns.to_le_bytes());
    b[56..60].copy_from_slice(&id.consumer.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The stamp in `b`, if it is whole (magic, CRC: a read that raced a rewrite fails it) and
/// of `id`'s undo log.
fn decode(id: &Identity, b: &[u8; LEN]) -> Option<Stamp> {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    if &b[0..8] != MAGIC || crc32c::crc32c(&b[..60]) != u32_at(60) {
        return None;
    }
    let found = Identity {
        journal: Uuid::from_bytes(b[32..48].try_into().expect("16 bytes")),
        created_ns: u64_at(48),
        consumer: u32_at(56),
    };
    (found == *id).then(|| Stamp {
        incarnation: u128::from_le_bytes(b[8..24].try_into().expect("16 bytes")),
        generation: u64_at(24),
    })
}

/// The writer's side: one per process that opened the undo log to write.
#[derive(Debug)]
pub(crate) struct Publisher {
    path: PathBuf,
    id: Identity,
    /// The file and the stamp it holds; rewrites are serialized so the file only moves
    /// forward (a batch's segments are written at once).
    state: Mutex<(File, Stamp)>,
}

impl Publisher {
    /// Opens (or creates) the file in `dir`, the undo log's directory, and publishes a new
    /// incarnation at generation 0. Call before this process changes the replica or the undo
    /// log in any way (crash recovery included).
    pub(crate) fn start(dir: &Path, manifest: &UndoManifest) -> io::Result<Publisher> {
        let path = dir.join(FILE_NAME);
        // In place, never replaced: a mount holding the file sees the new incarnation.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut incarnation = 0;
        while incarnation == 0 {
            incarnation = Uuid::new_v4().as_u128();
        }
        let stamp = Stamp {
            incarnation,
            generation: 0,
        };
        let id = Identity::of(manifest);
        file.write_all_at(&encode(&id, stamp), 0)?;
        Ok(Publisher {
            path,
            id,
            state: Mutex::new((file, stamp)),
        })
    }

    /// Announces one more durable undo segment: call after the segment is durable and before
    /// the replica changes. A 64-byte write into the page cache, no fsync (see the module
    /// docs).
    pub(crate) fn bump(&self) -> io::Result<()> {
        // Poison is harmless: the stamp is assigned only after its write succeeded.
        let mut state = crate::sync::lock(&self.state);
        let next = Stamp {
            generation: state.1.generation + 1,
            ..state.1
        };
        state.0.write_all_at(&encode(&self.id, next), 0)?;
        state.1 = next;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The reader's side (a mount): the file it holds open, and where it found it.
#[derive(Debug)]
pub(crate) struct Watcher {
    path: PathBuf,
    id: Identity,
    /// The file as opened, with its device and inode; `None` until found.
    held: RwLock<Option<(File, u64, u64)>>,
}

impl Watcher {
    /// Watches the file of the undo log in `dir` (a local directory) whose manifest is
    /// `manifest`. Opens nothing yet.
    pub(crate) fn new(dir: &Path, manifest: &UndoManifest) -> Watcher {
        Watcher {
            path: dir.join(FILE_NAME),
            id: Identity::of(manifest),
            held: RwLock::new(None),
        }
    }

    /// The stamp now, or `None` when it cannot be vouched for: the path gone or naming
    /// another file than the one held (replaced, moved aside), a torn or foreign stamp, an
    /// I/O error. One `statx` of the path and one `pread`; never opens a file.
    pub(crate) fn read(&self) -> Option<Stamp> {
        let meta = std::fs::metadata(&self.path).ok()?;
        // Poison is harmless: `held` is only ever assigned whole.
        let held = crate::sync::read(&self.held);
        let (file, dev, ino) = held.as_ref()?;
        if (*dev, *ino) != (meta.dev(), meta.ino()) {
            return None;
        }
        let mut b = [0u8; LEN];
        file.read_exact_at(&mut b, 0).ok()?;
        decode(&self.id, &b)
    }

    /// As [`read`](Self::read), first (re)opening the path when it names another file than
    /// the one held (or none was): for the probe's path, where a store look-up follows anyway.
    pub(crate) fn read_reopening(&self) -> Option<Stamp> {
        if let Some(stamp) = self.read() {
            return Some(stamp);
        }
        let file = File::open(&self.path).ok()?;
        let meta = file.metadata().ok()?;
        *crate::sync::write(&self.held) = Some((file, meta.dev(), meta.ino()));
        self.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replayer::undo::UNDO_FORMAT_VERSION;

    fn manifest(consumer: &str, created_ns: u64) -> UndoManifest {
        UndoManifest {
            format_version: UNDO_FORMAT_VERSION,
            journal_uuid: Uuid::from_u128(7),
            consumer: consumer.into(),
            replica: "/r.img".into(),
            device_size: 1 << 20,
            created_ns,
        }
    }

    #[test]
    fn a_reader_sees_every_bump_and_every_new_writer() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest("dr", 5);
        let watcher = Watcher::new(dir.path(), &m);
        assert_eq!(watcher.read_reopening(), None, "no file yet");
        let first = Publisher::start(dir.path(), &m).unwrap();
        let s0 = watcher.read_reopening().unwrap();
        assert_eq!(s0.generation, 0);
        first.bump().unwrap();
        let s1 = watcher.read().unwrap();
        assert_eq!((s1.incarnation, s1.generation), (s0.incarnation, 1));
        // A writer that starts again (after a crash, say) is another incarnation: a reader
        // that trusted the old one's stamp sees a change even at generation 0.
        drop(first);
        let second = Publisher::start(dir.path(), &m).unwrap();
        let s2 = watcher.read().unwrap();
        assert_ne!(s2.incarnation, s0.incarnation);
        assert_eq!(s2.generation, 0);
        second.bump().unwrap();
        assert_eq!(watcher.read().unwrap().generation, 1);
    }

    #[test]
    fn stamps_it_cannot_vouch_for_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest("dr", 5);
        let publisher = Publisher::start(dir.path(), &m).unwrap();
        // Another undo log's reader (consumer, creation, journal): foreign.
        for other in [manifest("dr2", 5), manifest("dr", 6)] {
            assert_eq!(Watcher::new(dir.path(), &other).read_reopening(), None);
        }
        let watcher = Watcher::new(dir.path(), &m);
        let trusted = watcher.read_reopening().unwrap();
        // A torn or damaged stamp fails its CRC.
        let path = publisher.path().to_owned();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&bytes, 0)
            .unwrap();
        assert_eq!(watcher.read(), None);
        publisher.bump().unwrap();
        assert!(watcher.read().is_some());
        // Moved aside (a copied or replaced directory): the file held still says what it
        // said, but the path names another file, so the reader cannot vouch for it.
        std::fs::rename(&path, dir.path().join("generation.old")).unwrap();
        assert_eq!(watcher.read(), None, "path gone");
        let replacement = Publisher::start(dir.path(), &m).unwrap();
        assert_eq!(watcher.read(), None, "path names another file");
        let fresh = watcher.read_reopening().unwrap();
        assert_ne!(fresh.incarnation, trusted.incarnation);
        replacement.bump().unwrap();
        assert_eq!(watcher.read().unwrap().generation, 1);
    }
}
