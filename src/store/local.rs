//! Local directory store: the embedded default journal root (`/path` or `file:///path`).
//!
//! Each key is a file under the root (`journal/3/00000000000000000042` is
//! `<root>/journal/3/00000000000000000042`). Writes go to a temporary file in the same
//! directory (`.tmp-<uuid>`, never listed, never a valid key), which is fsync'd before it
//! becomes visible, and the directory is fsync'd after, so a visible object is complete and
//! survives a power cut:
//!
//! - `put_if_absent`: temp file, fsync, `link(2)` to the final name (fails with `EEXIST`
//!   atomically, also between processes and over NFS), unlink the temp, fsync the directory.
//! - `put`: temp file, fsync, `rename(2)` over the final name, fsync the directory.
//! - new directories are fsync'd into their parents before anything is created in them.
//!
//! Objects of 256 KiB and more (journal segments) are written with `O_DIRECT` into a
//! preallocated temp file, around the page cache (`local/direct.rs` says why and how), and
//! through the page cache where the file system refuses that. Buffered data goes to disk
//! before the fsync: writeback of each 1 MiB piece starts as soon as it is written
//! (`sync_file_range(WRITE)`), and all of it is waited for before the fsync
//! (`sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`). Either way the fsync then commits
//! metadata only, so the file-system journal commit it forces is short, and another file's
//! writers on the same file system (the primary) wait less for it. Durability still rests on
//! the fsync alone; the sync_file_range calls are hints whose errors are ignored.
//!
//! Blocking file-system calls run on tokio's blocking pool, never on a runtime worker.
//!
//! Must never: overwrite an object in `put_if_absent`; let a reader see a partial object;
//! leave a temporary file behind after a call returns; touch a path outside the root.
//!
//! Limits: a key cannot be both an object and a "folder" of other keys (`a` and `a/b`),
//! because a name is either a file or a directory. The journal layout never does that.
//! Deleting keys leaves their (possibly empty) directories in place, so a concurrent create
//! in the same folder never loses its directory.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

mod direct;

use super::{
    check_object_range, validate_key, validate_prefix, ListPage, ObjectMeta, ObjectStore,
    StoreError, StoreResult,
};

/// Names starting with this are in-flight temporary files: skipped by `list`, refused as keys.
const TEMP_PREFIX: &str = ".tmp-";
/// Largest single write(2) when creating an object.
const WRITE_CHUNK: usize = 1 << 20;

/// A journal root in a local directory. Holds no state besides the root path, so any number
/// of instances (in any number of processes) may share one directory.
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
    name: String,
}

impl LocalStore {
    /// A store rooted at `root`. Touches nothing on disk: the root is created (and fsync'd
    /// into its parent) by the first write, and reads of a missing root find nothing.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let name = root.display().to_string();
        LocalStore { root, name }
    }

    /// The directory holding the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Validates `key` and maps it to its file.
    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        validate_key(key)?;
        if key.split('/').any(|c| c.starts_with(TEMP_PREFIX)) {
            return Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason: "a component starting with `.tmp-` is reserved for temporary files",
            });
        }
        Ok(self.root.join(key))
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.name.clone(),
            key: key.to_string(),
        }
    }

    /// `ENOENT` and `ENOTDIR` (a path component is a file) both mean the object is not there.
    fn read_error(&self, key: &str, path: &Path, err: io::Error) -> StoreError {
        if is_missing(&err) {
            self.not_found(key)
        } else {
            io_error(path, err)
        }
    }

    /// Opens an object for reading; a directory is not an object.
    fn open_object(&self, key: &str) -> StoreResult<(File, u64)> {
        let path = self.path_of(key)?;
        let file = File::open(&path).map_err(|e| self.read_error(key, &path, e))?;
        let meta = file.metadata().map_err(|e| io_error(&path, e))?;
        if !meta.is_file() {
            return Err(self.not_found(key));
        }
        Ok((file, meta.len()))
    }

    /// Creates `dir` and any missing ancestors, each fsync'd into its parent so that a file
    /// made durable inside it is reachable after a crash.
    fn ensure_dir(&self, dir: &Path) -> StoreResult<()> {
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(io_error(
                    dir,
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "exists and is not a directory (a key is used both as an object and as a folder)",
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(dir, e)),
        }
        let parent = dir.parent().ok_or_else(|| {
            io_error(
                dir,
                io::Error::new(io::ErrorKind::NotFound, "no parent directory"),
            )
        })?;
        self.ensure_dir(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => fsync_dir(parent),
            // Another writer created it between our check and our mkdir; it fsyncs it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
            Err(e) => Err(io_error(dir, e)),
        }
    }

    fn put_if_absent_sync(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let dir = parent_of(&path)?;
        self.ensure_dir(dir)?;
        let temp = TempFile::write(dir, data)?;
        match fs::hard_link(temp.path(), &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists {
                    store: self.name.clone(),
                    key: key.to_string(),
                })
            }
            Err(e) => return Err(io_error(&path, e)),
        }
        temp.remove()?;
        fsync_dir(dir)
    }

    fn put_sync(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let dir = parent_of(&path)?;
        self.ensure_dir(dir)?;
        let temp = TempFile::write(dir, data)?;
        temp.rename_to(&path)?;
        fsync_dir(dir)
    }

    fn get_sync(&self, key: &str) -> StoreResult<Bytes> {
        let (mut file, size) = self.open_object(key)?;
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut buf)
            .map_err(|e| io_error(&self.root.join(key), e))?;
        Ok(Bytes::from(buf))
    }

    fn get_range_sync(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let (file, size) = self.open_object(key)?;
        let len = check_object_range(&self.name, key, &range, size)?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start)
            .map_err(|e| io_error(&self.root.join(key), e))?;
        Ok(Bytes::from(buf))
    }

    fn head_sync(&self, key: &str) -> StoreResult<ObjectMeta> {
        let path = self.path_of(key)?;
        let meta = fs::metadata(&path).map_err(|e| self.read_error(key, &path, e))?;
        if !meta.is_file() {
            return Err(self.not_found(key));
        }
        Ok(ObjectMeta {
            key: key.to_string(),
            size: meta.len(),
        })
    }

    fn list_sync(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        validate_prefix(prefix)?;
        let max_keys = max_keys.max(1);
        // Start in the deepest folder the prefix names; nothing above it can match.
        let folder = match prefix.rfind('/') {
            Some(i) => &prefix[..=i],
            None => "",
        };
        let mut walk = Walk {
            store: self,
            prefix,
            start_after,
            // One more than a page tells whether another page exists.
            limit: max_keys + 1,
            found: Vec::new(),
        };
        walk.folder(folder)?;
        let mut objects = walk.found;
        let next_start_after = if objects.len() > max_keys {
            objects.truncate(max_keys);
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(ListPage {
            objects,
            next_start_after,
        })
    }

    fn delete_many_sync(&self, keys: &[String]) -> StoreResult<()> {
        let paths = keys
            .iter()
            .map(|k| self.path_of(k))
            .collect::<StoreResult<Vec<_>>>()?;
        let mut touched = BTreeSet::new();
        for path in &paths {
            match fs::remove_file(path) {
                Ok(()) => {
                    touched.insert(parent_of(path)?.to_path_buf());
                }
                Err(e) if is_missing(&e) || e.raw_os_error() == Some(libc::EISDIR) => {}
                Err(e) => return Err(io_error(path, e)),
            }
        }
        for dir in &touched {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    /// Runs a blocking file-system call on tokio's blocking pool.
    async fn blocking<T, F>(&self, key: &str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&LocalStore) -> StoreResult<T> + Send + 'static,
    {
        let this = self.clone();
        // A panic in the file-system call is a bug: it goes on unwinding in the caller.
        crate::sync::blocking(
            move || f(&this),
            |e| {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic())
                }
                StoreError::Transient {
                    store: self.name.clone(),
                    key: key.to_string(),
                    message: format!("blocking file-system task did not run: {e}"),
                }
            },
        )
        .await
    }
}

/// A depth-first walk of the folders that can hold keys of one listing page, in key order.
struct Walk<'a> {
    store: &'a LocalStore,
    prefix: &'a str,
    start_after: Option<&'a str>,
    limit: usize,
    found: Vec<ObjectMeta>,
}

impl Walk<'_> {
    /// Lists folder `folder` (`""` for the root, else a key prefix ending in `/`).
    ///
    /// A folder's entries are sorted with a `/` appended to sub-folder names: every key under
    /// sub-folder `d` starts with `d/`, so sorting the entries that way yields keys in byte
    /// order (`a-b` < `a/x` < `a0`) without reading any folder that cannot contribute.
    fn folder(&mut self, folder: &str) -> StoreResult<()> {
        let dir = self.store.root.join(folder);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(io_error(&dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&dir, e))?;
            // A name that is not UTF-8 was not written through a store.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let file_type = entry.file_type().map_err(|e| io_error(&entry.path(), e))?;
            let is_dir = if file_type.is_symlink() {
                fs::metadata(entry.path()).is_ok_and(|m| m.is_dir())
            } else {
                file_type.is_dir()
            };
            let key = if is_dir {
                format!("{folder}{name}/")
            } else {
                format!("{folder}{name}")
            };
            names.push((key, is_dir));
        }
        names.sort_unstable();

        for (key, is_dir) in names {
            if self.found.len() >= self.limit {
                break;
            }
            let under_prefix = key.starts_with(self.prefix);
            // A folder whose name is a start of the prefix may hold matching keys.
            let relevant = under_prefix || (is_dir && self.prefix.starts_with(&key));
            if !relevant {
                if key.as_str() > self.prefix {
                    // Sorted: this and every later entry lie past the prefix.
                    break;
                }
                continue;
            }
            if is_dir {
                // Skip a folder whose every key is <= start_after.
                if let Some(after) = self.start_after {
                    if after > key.as_str() && !after.starts_with(&key) {
                        continue;
                    }
                }
                self.folder(&key)?;
            } else {
                if self.start_after.is_some_and(|after| key.as_str() <= after) {
                    continue;
                }
                let path = self.store.root.join(&key);
                match fs::metadata(&path) {
                    Ok(meta) => self.found.push(ObjectMeta {
                        key,
                        size: meta.len(),
                    }),
                    // Deleted since we read the folder.
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err(io_error(&path, e)),
                }
            }
        }
        Ok(())
    }
}

/// A fsync'd temporary file next to its final name; unlinked on drop unless renamed.
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    fn write(dir: &Path, data: &[u8]) -> StoreResult<TempFile> {
        let path = dir.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        // From here on, drop removes the file whatever fails.
        let temp = TempFile { path: Some(path) };
        let buffered_from = if data.len() >= direct::DIRECT_MIN {
            match direct::write_new(&file, data).map_err(|e| io_error(temp.path(), e))? {
                direct::Written::Direct => data.len(),
                direct::Written::Refused => 0,
                direct::Written::RefusedAt { from } => from,
            }
        } else {
            0
        };
        write_buffered(&file, data, buffered_from)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(temp.path(), e))?;
        Ok(temp)
    }

    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    fn rename_to(mut self, target: &Path) -> StoreResult<()> {
        if let Some(path) = self.path.take() {
            if let Err(e) = fs::rename(&path, target) {
                self.path = Some(path);
                return Err(io_error(target, e));
            }
        }
        Ok(())
    }

    fn remove(mut self) -> StoreResult<()> {
        match self.path.take() {
            Some(path) => fs::remove_file(&path).map_err(|e| io_error(&path, e)),
            None => Ok(()),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove temporary file");
            }
        }
    }
}

/// Writes `data[from..]` at its offset through the page cache, starting the writeback of each
/// piece at once and waiting for all of it at the end (see the module header).
fn write_buffered(file: &File, data: &[u8], from: usize) -> io::Result<()> {
    if from >= data.len() {
        return Ok(());
    }
    // In pieces: one multi-megabyte write(2) into new page-cache pages is several times
    // slower than the same bytes in 1 MiB writes (measured 112 ms vs 11 ms for 32 MiB).
    let mut offset = from as u64;
    for chunk in data[from..].chunks(WRITE_CHUNK) {
        file.write_all_at(chunk, offset)?;
        crate::sys::start_writeback(file, offset, chunk.len() as u64);
        offset += chunk.len() as u64;
    }
    crate::sys::wait_writeback(file);
    Ok(())
}

fn parent_of(path: &Path) -> StoreResult<&Path> {
    path.parent().ok_or_else(|| {
        io_error(
            path,
            io::Error::new(io::ErrorKind::NotFound, "no parent directory"),
        )
    })
}

fn fsync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

fn is_missing(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ENOTDIR)
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let owned = key.to_string();
        self.blocking(key, move |s| s.put_if_absent_sync(&owned, &data))
            .await
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let owned = key.to_string();
        self.blocking(key, move |s| s.put_sync(&owned, &data)).await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let owned = key.to_string();
        self.blocking(key, move |s| s.get_sync(&owned)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let owned = key.to_string();
        self.blocking(key, move |s| s.get_range_sync(&owned, range))
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let owned = key.to_string();
        self.blocking(key, move |s| s.head_sync(&owned)).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let owned_prefix = prefix.to_string();
        let owned_after = start_after.map(str::to_string);
        self.blocking(prefix, move |s| {
            s.list_sync(&owned_prefix, owned_after.as_deref(), max_keys)
        })
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let owned = keys.to_vec();
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.blocking(first, move |s| s.delete_many_sync(&owned))
            .await
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name under `dir`, recursively, that is a temporary file.
    fn temp_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).expect("read_dir") {
                let entry = entry.expect("dir entry");
                let path = entry.path();
                if entry.file_type().expect("file type").is_dir() {
                    stack.push(path);
                } else if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    out.push(path);
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn no_temp_files_after_successful_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("root"));
        store
            .put_if_absent("epochs/00000000000000000001", Bytes::from_static(b"claim"))
            .await
            .expect("create");
        store
            .put("consumers/a", Bytes::from_static(b"one"))
            .await
            .expect("put");
        store
            .put("consumers/a", Bytes::from_static(b"two"))
            .await
            .expect("overwrite");
        assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
        assert_eq!(
            store.get("consumers/a").await.expect("get"),
            Bytes::from_static(b"two")
        );
    }

    #[tokio::test]
    async fn no_temp_files_after_failed_exclusive_create() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path());
        store
            .put_if_absent("k", Bytes::from_static(b"first"))
            .await
            .expect("create");
        let err = store
            .put_if_absent("k", Bytes::from_static(b"second"))
            .await
            .expect_err("second create must fail");
        assert!(err.is_already_exists(), "{err}");
        assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
        assert_eq!(
            store.get("k").await.expect("get"),
            Bytes::from_static(b"first")
        );
    }

    #[tokio::test]
    async fn no_temp_files_after_failed_put() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path());
        // `a` becomes a folder, so a put of the object `a` cannot rename over it.
        store
            .put("a/b", Bytes::from_static(b"x"))
            .await
            .expect("put a/b");
        let err = store
            .put("a", Bytes::from_static(b"y"))
            .await
            .expect_err("put over a folder must fail");
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
    }

    #[tokio::test]
    async fn temp_files_are_not_listed_and_not_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path());
        store
            .put("f/x", Bytes::from_static(b"x"))
            .await
            .expect("put");
        // A writer that crashed between create and link leaves its temp file behind.
        fs::write(dir.path().join("f/.tmp-crashed"), b"partial").expect("write temp");
        let page = store.list("", None, 10).await.expect("list");
        let keys: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["f/x"]);
        let err = store
            .get("f/.tmp-crashed")
            .await
            .expect_err("temp is no key");
        assert!(matches!(err, StoreError::InvalidKey { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_root_reads_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("never-created"));
        let page = store.list("journal/", None, 10).await.expect("list");
        assert_eq!(page, ListPage::default());
        assert!(store
            .get("tinylag.json")
            .await
            .expect_err("get")
            .is_not_found());
        assert!(!dir.path().join("never-created").exists());
    }
}
