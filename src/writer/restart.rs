//! How a starting writer decides whether the journal still reproduces the primary.
//!
//! A writer that stops cleanly (everything drained to the journal, mode `logging`, primary
//! fsync'd) leaves a *clean-stop marker* beside the primary. The next writer takes the marker
//! (reads and deletes it before serving any I/O) and starts in `logging` only when the
//! marker names exactly the journal end it finds. Anything else means acknowledged writes
//! may be missing from the journal, and it starts in `forward-full`:
//!
//! | journal | primary / marker | initial mode |
//! |---|---|---|
//! | new (no segment) | a regular file with no data extents (e.g. made by `init`) | `logging` |
//! | new | a file with data, or a block device (cannot tell) | `forward-full` |
//! | has segments | marker matches the journal end, no holes or orphans | `logging` |
//! | has segments | no marker, another journal's marker, or another end | `forward-full` |
//!
//! After an unclean stop the core then asks the previous writer's activity log
//! ([`super::activity_log`]) which regions were active: a usable log narrows the resync to
//! them (`forward-part`); without one it stays `forward-full`. A primary changed behind
//! tinylag's back between two runs cannot be detected here.
//!
//! Must never: leave a marker in place while a writer runs (a crash must not look clean);
//! report `logging` when it cannot show that nothing was lost.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::journal_writer::Prepared;
use super::mode::FullReason;
use crate::sys::{self, sync_parent};

/// The clean-stop marker, stored as JSON at [`marker_path`]:
///
/// ```json
/// {"uuid":"…","epoch":3,"next_seq":42,"next_lsn":1234}
/// ```
///
/// `next_seq` and `next_lsn` are where the stopped writer would have continued: the journal
/// end a restarting writer must find for the stop to count as clean.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanMarker {
    pub uuid: Uuid,
    pub epoch: u64,
    pub next_seq: u64,
    pub next_lsn: u64,
}

/// Every way reading or writing the marker fails.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// The marker file could not be read, written or removed.
    #[error("clean-stop marker {path}: {source}")]
    Marker {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The primary could not be inspected for data.
    #[error("cannot inspect the primary {path} for data: {source}")]
    Primary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the marker of `primary` lives: beside it, `<primary>.tinylag-clean`.
pub fn marker_path(primary: &Path) -> PathBuf {
    let mut name = primary.as_os_str().to_owned();
    name.push(".tinylag-clean");
    PathBuf::from(name)
}

/// Reads and removes the marker (durably: the directory is synced), so that a crash of the
/// writer now starting cannot look clean. A marker that does not parse counts as absent.
pub fn take_marker(path: &Path) -> Result<Option<CleanMarker>, RestartError> {
    let err = |source| RestartError::Marker {
        path: path.to_path_buf(),
        source,
    };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    std::fs::remove_file(path).map_err(err)?;
    sync_parent(path).map_err(err)?;
    match serde_json::from_slice(&data) {
        Ok(marker) => Ok(Some(marker)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a malformed clean-stop marker");
            Ok(None)
        }
    }
}

/// Reads the marker without removing it (`rejoin` looks before it decides); a marker that
/// does not parse counts as absent.
pub(crate) fn read_marker(path: &Path) -> Result<Option<CleanMarker>, RestartError> {
    match std::fs::read(path) {
        Ok(data) => Ok(serde_json::from_slice(&data).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RestartError::Marker {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the marker durably (temp file, fsync, rename, directory fsync).
pub(crate) fn write_marker(path: &Path, marker: &CleanMarker) -> Result<(), RestartError> {
    let err = |source| RestartError::Marker {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let body = serde_json::to_vec(marker).map_err(|e| err(io::Error::other(e)))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(&body).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    sync_parent(path).map_err(err)
}

/// Whether the primary may hold data: false only for a regular file without a single data
/// extent (`SEEK_DATA` finds none). Block devices cannot tell, so they count as holding data.
pub(crate) fn primary_has_data(path: &Path) -> Result<bool, RestartError> {
    let err = |source| RestartError::Primary {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if meta.file_type().is_block_device() || !meta.is_file() {
        return Ok(true);
    }
    match sys::seek_data(&file, 0) {
        Ok(Some(_)) => Ok(true),
        // No data at or after offset 0: the file is one hole.
        Ok(None) => Ok(false),
        // A file system without SEEK_DATA: assume data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(true),
        Err(e) => Err(err(e)),
    }
}

/// The verdict for a starting writer: `None` means `logging`.
pub(crate) fn initial_full_reason(
    prepared: &Prepared,
    uuid: Uuid,
    marker: Option<&CleanMarker>,
    primary_has_data: impl FnOnce() -> Result<bool, RestartError>,
) -> Result<Option<FullReason>, RestartError> {
    if prepared.abandoned.is_some() {
        return Ok(Some(FullReason::AbandonedHole));
    }
    let plan = &prepared.plan;
    let clean = marker.is_some_and(|m| {
        m.uuid == uuid
            && m.next_seq == plan.next_seq
            && m.next_lsn == plan.next_lsn
            && plan.holes.is_empty()
            && plan.last_orphan.is_none()
    });
    if clean {
        return Ok(None);
    }
    // A journal that never held a segment (not one trimmed empty) starts from a primary
    // that only `init` touched, or from data the journal never saw.
    if prepared.journal_is_empty() && prepared.trim.first_seq == 0 {
        return Ok(primary_has_data()?.then_some(FullReason::PrimaryHasData));
    }
    Ok(Some(FullReason::UncleanRestart))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = marker_path(&dir.path().join("disk.img"));
        assert!(path.ends_with("disk.img.tinylag-clean"));
        assert_eq!(take_marker(&path).unwrap(), None);
        let m = CleanMarker {
            uuid: Uuid::new_v4(),
            epoch: 2,
            next_seq: 9,
            next_lsn: 100,
        };
        write_marker(&path, &m).unwrap();
        assert_eq!(take_marker(&path).unwrap(), Some(m));
        assert!(!path.exists());
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(take_marker(&path).unwrap(), None);
        assert!(!path.exists());
    }

    #[test]
    fn sparse_files_hold_no_data_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        assert!(!primary_has_data(&path).unwrap());
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"x", 5 << 20).unwrap();
        file.sync_all().unwrap();
        assert!(primary_has_data(&path).unwrap());
        assert!(primary_has_data(&dir.path().join("missing")).is_err());
    }
}
