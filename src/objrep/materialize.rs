//! Promote's image from an object replica: the image as of a point written onto a local
//! file or block device, which then becomes the primary, and the journal's later records
//! applied onto it when the new writer's plan asks for them (its catch-up).
//!
//! The image is written as `restore` writes one: what [`ReplicaManifest::sources`] names for
//! the checkpoint, one layer or image part at a time (never the image in memory), then the
//! journal's records after it; zeroes and never-written ranges are not written at all.
//!
//! - A regular file is written as `<target>.materializing` (sparse), fsync'd, and only then
//!   linked into place, so a kill -9 leaves no target, only the partial file, which a rerun
//!   replaces. An existing target that holds data is refused; an empty one is replaced.
//! - A block device (at least the image's size, and not in use: opened `O_EXCL`, which a
//!   mounted file system or a holder refuses) is zeroed whole first (discard, or
//!   `FALLOC_FL_ZERO_RANGE`, or zeroes written), then written; a rerun redoes it whole.
//!
//! Must never: write over a regular file that holds data; name the target before the image
//! in it is whole and durable; hold the image in memory.
//!
//! [`ReplicaManifest::sources`]: super::ReplicaManifest::sources

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::{ObjrepError, ObjrepResult};
use super::restore::{ObjPoint, ObjRestoreReport, ObjSources, Restored};
use crate::replayer::replica::{ReplicaFile, ReplicaTarget};

/// A promote's target, checked before anything is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaterializeTarget {
    /// A regular file: absent, or present and empty.
    File(PathBuf),
    /// A block device of at least the image's size, not in use.
    BlockDevice(PathBuf),
}

impl MaterializeTarget {
    /// Checks `path` as a target for an image of `size` bytes; a refusal says why in one line
    /// and changes nothing.
    pub fn check(path: &Path, size: u64) -> ObjrepResult<MaterializeTarget> {
        let refuse = |why: String| Err(ObjrepError::Refused(format!("{}: {why}", path.display())));
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                if parent.is_some_and(|p| !p.is_dir()) {
                    return refuse("its directory does not exist".into());
                }
                return Ok(MaterializeTarget::File(path.to_path_buf()));
            }
            Err(e) => return refuse(format!("cannot inspect it: {e}")),
        };
        if meta.file_type().is_file() {
            if meta.len() > 0 {
                return refuse(format!(
                    "the file exists and holds {} bytes; promote writes the image into a new \
                     (or empty) file or onto a block device: remove it or name another",
                    meta.len()
                ));
            }
            return Ok(MaterializeTarget::File(path.to_path_buf()));
        }
        if !meta.file_type().is_block_device() {
            return refuse("not a regular file or a block device".into());
        }
        // O_EXCL on a block device: refused (EBUSY) while a file system is mounted on it or
        // another process holds it exclusively.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return refuse("the block device is in use (mounted, or held open)".into())
            }
            Err(e) => return refuse(format!("cannot open it: {e}")),
        };
        drop(file);
        // The size check is ReplicaFile's (a device may be larger than the image).
        drop(ReplicaFile::open(path, size)?);
        Ok(MaterializeTarget::BlockDevice(path.to_path_buf()))
    }

    /// Where the image is, once whole.
    pub fn path(&self) -> &Path {
        match self {
            MaterializeTarget::File(p) | MaterializeTarget::BlockDevice(p) => p,
        }
    }
}

/// An image written by [`ObjSources::materialize`].
#[derive(Debug)]
pub struct Materialized {
    pub target: MaterializeTarget,
    restored: Restored,
}

impl Materialized {
    /// What the image holds (the LSN, the checkpoint it came from, the bytes read).
    pub fn report(&self) -> &ObjRestoreReport {
        &self.restored.report
    }

    /// The journal segment that holds the record after the image's LSN.
    pub fn next_seq(&self) -> u64 {
        self.restored.next_seq
    }
}

/// `<path>.materializing`: where a regular file's image is written until it is whole.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".materializing");
    PathBuf::from(p)
}

impl ObjSources {
    /// Writes the image as of `point` onto `target` (checked by [`MaterializeTarget::check`]).
    /// A regular file appears at its path only once the image is whole and durable; after an
    /// error nothing is left but, for a file, nothing at all (the partial file is removed).
    pub async fn materialize(
        &self,
        point: &ObjPoint,
        target: MaterializeTarget,
    ) -> ObjrepResult<Materialized> {
        let size = self.identity.size;
        let restored = match &target {
            MaterializeTarget::File(path) => {
                let partial = partial_path(path);
                // A killed run's partial file: its image is redone whole.
                match std::fs::remove_file(&partial) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(ObjrepError::Refused(format!(
                            "cannot remove the partial image {}: {e}",
                            partial.display()
                        )))
                    }
                }
                let (file, _) = ReplicaFile::open_or_create(&partial, size)?;
                let result = self.restore_onto(point, &file).await;
                drop(file);
                let restored = match result {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = std::fs::remove_file(&partial);
                        return Err(e);
                    }
                };
                place(&partial, path)?;
                restored
            }
            MaterializeTarget::BlockDevice(path) => {
                let device = ReplicaFile::open(path, size)?;
                device.punch_hole(0, size).map_err(|e| {
                    ObjrepError::Refused(format!("cannot zero {}: {e}", path.display()))
                })?;
                self.restore_onto(point, &device).await?
            }
        };
        Ok(Materialized { target, restored })
    }

    /// Applies the journal's records after the image through LSN `through` (the core's
    /// catch-up, after its claim); returns the LSN the image holds.
    pub async fn extend_materialized(
        &self,
        image: &mut Materialized,
        through: u64,
    ) -> ObjrepResult<u64> {
        if image.restored.report.lsn < through {
            let file = ReplicaFile::open(image.target.path(), self.identity.size)?;
            self.extend(&file, &mut image.restored, through).await?;
        }
        Ok(image.restored.report.lsn)
    }
}

/// Links the whole, fsync'd `partial` image to `path` (replacing an empty file there), then
/// removes the partial name and syncs the directory.
fn place(partial: &Path, path: &Path) -> ObjrepResult<()> {
    let fail = |e: std::io::Error| {
        ObjrepError::Refused(format!(
            "cannot move the image {} into place at {}: {e}",
            partial.display(),
            path.display()
        ))
    };
    // Still empty (checked before the restore): replaced; absent: linked, so a file created
    // meanwhile is never overwritten.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == 0 => std::fs::rename(partial, path).map_err(fail)?,
        Ok(_) => {
            return Err(ObjrepError::Refused(format!(
                "{} appeared while the image was written; the image stays at {}",
                path.display(),
                partial.display()
            )))
        }
        Err(_) => {
            std::fs::hard_link(partial, path).map_err(fail)?;
            std::fs::remove_file(partial).map_err(fail)?;
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)?;
    Ok(())
}
