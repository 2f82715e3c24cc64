//! The seed stamp: proof that `restore --output` left beside an image it wrote, that the image
//! holds a journal's state at one LSN, so that `replay` may adopt it as a new consumer's
//! replica (see [`crate::journal::seed`] for every way an image is vouched for).
//!
//! Stamp file `<image>.seed.json` (JSON), written after the image is complete and fsync'd:
//!
//! | field | meaning |
//! |---|---|
//! | `format_version` | [`STAMP_FORMAT_VERSION`] |
//! | `journal_uuid` | the journal (device group) the image is a state of |
//! | `lsn`, `timestamp_ns` | the image is the primary's state after this record (0: before any) |
//! | `seq` | the segment holding `lsn` (where a consumer starting there reads first) |
//! | `epoch` | the writer epoch of that segment |
//! | `size`, `mtime_ns`, `inode` | the image file as the restore left it: any later change to it (a mount, a copy over it) breaks the stamp |
//!
//! Must never: vouch for a file that changed after the stamp was written, or for another
//! journal's state.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The stamp's format version.
pub(crate) const STAMP_FORMAT_VERSION: u32 = 1;

/// What a restore vouches for (see the module docs for the file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedStamp {
    pub format_version: u32,
    pub journal_uuid: Uuid,
    pub lsn: u64,
    pub timestamp_ns: u64,
    pub seq: u64,
    pub epoch: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

/// How a new consumer on an existing image may start (`replay`'s choice).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SeedChoice {
    /// None given: an existing image is refused.
    #[default]
    Refuse,
    /// `--assume-seeded`: the operator vouches.
    Assume,
    /// `--check-seed`: prove it region by region against the primary.
    Check,
    /// A seed stamp beside the image, checked against the file.
    Stamp(SeedStamp),
    /// A seed stamp beside the image that cannot vouch for it (why): refused if the consumer
    /// is new, ignored if it already exists (its position says how its image was seeded).
    BrokenStamp(String),
}

/// Why a stamp cannot vouch for its image.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    /// The stamp or the image could not be read or written.
    #[error("seed stamp {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The stamp is not JSON this tinylag writes.
    #[error("seed stamp {path} is unreadable: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// The image was changed after the restore wrote it.
    #[error(
        "seed stamp {path} does not match its image any more ({what} changed since the restore): the image may no longer hold the state the stamp vouches for"
    )]
    Changed { path: PathBuf, what: &'static str },
}

/// `<image>.seed.json`.
pub(crate) fn stamp_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".seed.json");
    PathBuf::from(s)
}

fn identity(image: &Path) -> std::io::Result<(u64, i128, u64)> {
    let meta = std::fs::metadata(image)?;
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    Ok((meta.len(), mtime_ns, meta.ino()))
}

impl SeedStamp {
    /// A stamp for `image` (complete and fsync'd) as the state at `lsn` of journal `uuid`.
    pub fn for_image(
        image: &Path,
        journal_uuid: Uuid,
        lsn: u64,
        timestamp_ns: u64,
        seq: u64,
        epoch: u64,
    ) -> Result<SeedStamp, StampError> {
        let (size, mtime_ns, inode) = identity(image).map_err(|source| StampError::Io {
            path: image.to_owned(),
            source,
        })?;
        Ok(SeedStamp {
            format_version: STAMP_FORMAT_VERSION,
            journal_uuid,
            lsn,
            timestamp_ns,
            seq,
            epoch,
            size,
            mtime_ns,
            inode,
        })
    }

    /// Writes the stamp beside `image` (temp file, fsync, rename).
    pub fn write(&self, image: &Path) -> Result<PathBuf, StampError> {
        let path = stamp_path(image);
        let io = |source| StampError::Io {
            path: path.clone(),
            source,
        };
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let body = serde_json::to_vec_pretty(self).expect("a stamp serializes");
        let mut file = File::create(&temp).map_err(io)?;
        file.write_all(&body).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(io)?;
        Ok(path)
    }

    /// The stamp beside `image`, if there is one, checked against the file as it is now.
    pub fn read_checked(image: &Path) -> Result<Option<SeedStamp>, StampError> {
        let path = stamp_path(image);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StampError::Io { path, source }),
        };
        let stamp: SeedStamp =
            serde_json::from_slice(&data).map_err(|e| StampError::Malformed {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if stamp.format_version != STAMP_FORMAT_VERSION {
            return Err(StampError::Malformed {
                path,
                reason: format!(
                    "format version {} (this tinylag writes {STAMP_FORMAT_VERSION})",
                    stamp.format_version
                ),
            });
        }
        let (size, mtime_ns, inode) = identity(image).map_err(|source| StampError::Io {
            path: image.to_owned(),
            source,
        })?;
        let changed = if inode != stamp.inode {
            Some("the file (inode)")
        } else if size != stamp.size {
            Some("its size")
        } else if mtime_ns != stamp.mtime_ns {
            Some("its modification time")
        } else {
            None
        };
        if let Some(what) = changed {
            return Err(StampError::Changed { path, what });
        }
        Ok(Some(stamp))
    }

    /// Removes the stamp beside `image` (once a consumer adopted it: the agent changes the
    /// image from then on, and its commit position says how it was seeded).
    pub fn remove(image: &Path) {
        let _ = std::fs::remove_file(stamp_path(image));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_vouches_only_for_the_unchanged_file() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        std::fs::write(&image, vec![1u8; 8192]).unwrap();
        assert!(SeedStamp::read_checked(&image).unwrap().is_none());
        let stamp = SeedStamp::for_image(&image, Uuid::new_v4(), 42, 7, 3, 1).unwrap();
        assert_eq!(stamp.write(&image).unwrap(), stamp_path(&image));
        assert_eq!(SeedStamp::read_checked(&image).unwrap(), Some(stamp));
        // Any write moves the modification time.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&image, vec![2u8; 8192]).unwrap();
        let err = SeedStamp::read_checked(&image).unwrap_err();
        assert!(matches!(err, StampError::Changed { .. }), "{err}");
        std::fs::write(stamp_path(&image), b"not json").unwrap();
        assert!(matches!(
            SeedStamp::read_checked(&image).unwrap_err(),
            StampError::Malformed { .. }
        ));
        SeedStamp::remove(&image);
        assert!(!stamp_path(&image).exists());
    }
}
