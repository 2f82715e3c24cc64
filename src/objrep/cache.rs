//! The bounded local cache of a lazy object-replica mount (`mount --replica URI`): the units
//! a read fetched (one layer extent, one journal record's payload — the smallest pieces a
//! reader can check), kept as files in a directory of its own so a second read of them costs
//! no request.
//!
//! One mount owns one directory, `<cache dir>/mount-<pid>`, created empty at start and
//! removed at stop; directories of mounts whose process is gone (a kill -9) are removed by the
//! next mount that starts under the same cache dir. The units are immutable (every object of
//! a replica and every journal segment is created once), so an entry never goes stale.
//!
//! **The cap is hard**: the bytes of every file in the directory (each rounded up to 4 KiB,
//! what a file system allocates), plus the files being written, never exceed it. Room is
//! made before a file is written (least recently used entries out first) and reserved while
//! it is written; a unit larger than a quarter of the cap, or one there is no room for
//! (everything left being written), is served without being kept.
//!
//! Must never: exceed the cap on disk; serve a file that is still being written; keep a
//! file whose write failed; touch anything outside its own directory (but stale siblings
//! named `mount-<pid>` of dead processes).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::sync::lock;

/// What the file system allocates per file, at least: the cap counts a file as its length
/// rounded up to this.
const ALLOCATION: u64 = 4096;

// The index is locked with `sync::lock`, poison-tolerant: every critical section changes
// the entries, the order and the byte count with single map calls and additions that cannot
// panic between them, so a panicking holder (there is none that can panic there) would leave
// at worst bytes counted for a file that is gone, which only makes the cache keep less.

/// The cache of one mount (see the module docs).
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    cap: u64,
    index: Mutex<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// Unit name → its file.
    entries: HashMap<String, Entry>,
    /// Use tick → unit name: the least recently used first.
    order: BTreeMap<u64, String>,
    tick: u64,
    /// Bytes of the files of `entries`, plus the files being written (rounded).
    bytes: u64,
    next_file: u64,
}

#[derive(Debug)]
struct Entry {
    file: u64,
    len: u64,
    tick: u64,
}

/// Bytes a file of `len` bytes counts against the cap.
fn charged(len: u64) -> u64 {
    len.div_ceil(ALLOCATION) * ALLOCATION
}

impl DiskCache {
    /// Creates the mount's directory under `parent` (made, owner-only, when missing), after
    /// removing the directories of dead mounts there.
    pub fn create(parent: &Path, cap: u64) -> io::Result<DiskCache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        for entry in std::fs::read_dir(parent)?.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("mount-"))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() as i32 && !crate::sys::process_exists(pid) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = parent.join(format!("mount-{}", std::process::id()));
        // Ours from a dead process with the same pid, or a leftover: nothing in it is used.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(DiskCache {
            dir,
            cap,
            index: Mutex::new(Index::default()),
        })
    }

    /// The mount's own directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes the cache holds or is writing (rounded as the cap counts them).
    pub fn bytes(&self) -> u64 {
        lock(&self.index).bytes
    }

    fn path(&self, file: u64) -> PathBuf {
        self.dir.join(format!("{file:016x}"))
    }

    /// Copies bytes `from..from + out.len()` of unit `name` into `out`; false when the cache
    /// does not hold it.
    pub fn read(&self, name: &str, from: u64, out: &mut [u8]) -> io::Result<bool> {
        let file = {
            let mut index = lock(&self.index);
            let index = &mut *index;
            let Some(entry) = index.entries.get_mut(name) else {
                return Ok(false);
            };
            if from + out.len() as u64 > entry.len {
                return Err(io::Error::other(format!(
                    "cached unit {name} holds {} bytes, {} asked from {from}",
                    entry.len,
                    out.len()
                )));
            }
            index.order.remove(&entry.tick);
            index.tick += 1;
            entry.tick = index.tick;
            index.order.insert(entry.tick, name.to_string());
            // Opened under the lock: an eviction (which unlinks under it too) after this
            // leaves the open file readable.
            File::open(self.path(entry.file))?
        };
        file.read_exact_at(out, from)?;
        Ok(true)
    }

    /// Keeps `data` as unit `name` when it fits (see the module docs); a failure to write is
    /// returned, with nothing kept.
    pub fn put(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let need = charged(data.len() as u64);
        if need > self.cap / 4 {
            return Ok(());
        }
        let file = {
            let mut index = lock(&self.index);
            if index.entries.contains_key(name) {
                return Ok(());
            }
            while index.bytes + need > self.cap {
                let Some((_, old)) = index.order.pop_first() else {
                    // What is left is being written: no room now.
                    return Ok(());
                };
                let entry = index.entries.remove(&old).expect("ordered entries exist");
                let _ = std::fs::remove_file(self.path(entry.file));
                index.bytes -= charged(entry.len);
            }
            index.bytes += need;
            index.next_file += 1;
            index.next_file
        };
        let path = self.path(file);
        let written = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| f.write_all(data));
        let mut index = lock(&self.index);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            index.bytes -= need;
            return Err(e);
        }
        if index.entries.contains_key(name) {
            // Another read kept the same unit meanwhile.
            let _ = std::fs::remove_file(&path);
            index.bytes -= need;
            return Ok(());
        }
        index.tick += 1;
        let tick = index.tick;
        index.order.insert(tick, name.to_string());
        index.entries.insert(
            name.to_string(),
            Entry {
                file,
                len: data.len() as u64,
                tick,
            },
        );
        Ok(())
    }

    /// Removes the mount's directory (at stop).
    pub fn remove(&self) {
        let mut index = lock(&self.index);
        index.entries.clear();
        index.order.clear();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "removing the mount's cache failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn du(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| charged(e.unwrap().metadata().unwrap().len()))
            .sum()
    }

    #[test]
    fn the_cap_holds_the_least_recently_used_go_first_and_big_units_are_not_kept() {
        let parent = tempfile::tempdir().unwrap();
        let cache = DiskCache::create(parent.path(), 64 << 10).unwrap();
        for i in 0..40u8 {
            cache.put(&format!("u{i}"), &[i; 5000]).unwrap();
            assert!(
                du(cache.dir()) <= 64 << 10,
                "the cap was exceeded at unit {i}"
            );
            assert_eq!(cache.bytes(), du(cache.dir()));
            // u0 is read after every put: it stays while others go.
            let mut b = [0u8; 10];
            assert!(
                cache.read("u0", 100, &mut b).unwrap(),
                "u0 was evicted at {i}"
            );
            assert_eq!(b, [0; 10]);
        }
        let mut b = [0u8; 4];
        assert!(!cache.read("u1", 0, &mut b).unwrap(), "u1 should be gone");
        assert!(cache.read("u39", 4996, &mut b).unwrap());
        assert_eq!(b, [39; 4]);
        // Over a quarter of the cap: served, not kept.
        cache.put("big", &[1; (16 << 10) + 1]).unwrap();
        assert!(!cache.read("big", 0, &mut b).unwrap());
        assert!(
            cache.read("u39", 0, &mut [0; 5001]).is_err(),
            "past the unit"
        );
        let dir = cache.dir().to_path_buf();
        cache.remove();
        assert!(!dir.exists());
    }

    #[test]
    fn a_dead_mounts_directory_is_removed_a_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        // A pid that is not running: above the kernel's pid_max default.
        let dead = parent.path().join("mount-2147483646");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("x"), b"x").unwrap();
        let live = parent.path().join("mount-1");
        std::fs::create_dir(&live).unwrap();
        let other = parent.path().join("notes");
        std::fs::write(&other, b"mine").unwrap();
        let cache = DiskCache::create(parent.path(), 1 << 20).unwrap();
        assert!(!dead.exists(), "a dead mount's cache was left");
        assert!(live.exists(), "a live process's cache was removed");
        assert!(other.exists(), "something not a mount's cache was removed");
        cache.remove();
    }
}
