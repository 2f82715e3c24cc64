//! What a range of a device holds — data, zeroes, or an unallocated hole — as consecutive
//! extents: the answer to NBD's block status (`base:allocation`), so copy and backup tools
//! skip what needs no copying.
//!
//! Files answer from the filesystem (`SEEK_DATA` / `SEEK_HOLE`); a block device, or a
//! filesystem without those, reports everything as data, which is always correct.
//!
//! Must never: call a range a hole or zero unless it reads as zeroes (reporting data where
//! there are zeroes only costs the reader a copy; the reverse loses data); return extents
//! that are empty, overlap, leave a gap, or reach past the range asked for.

use std::fs::File;
use std::io;

use crate::sys;

/// What one extent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// May hold data (or the device cannot tell).
    Data,
    /// Reads as zeroes; the space is allocated.
    Zero,
    /// Unallocated: reads as zeroes and takes no space.
    Hole,
}

/// `len` bytes of one [`Allocation`]; a list of them covers a range from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub allocation: Allocation,
}

/// Appends `len` bytes of `allocation` to `out`, merging with the last extent when it is
/// the same. Returns false (and appends nothing) when that would make `out` longer than
/// `max` extents.
pub(crate) fn push(out: &mut Vec<Extent>, len: u64, allocation: Allocation, max: usize) -> bool {
    if len == 0 {
        return true;
    }
    if let Some(last) = out.last_mut().filter(|l| l.allocation == allocation) {
        last.len += len;
        return true;
    }
    if out.len() >= max {
        return false;
    }
    out.push(Extent { len, allocation });
    true
}

/// The data and holes of `offset..offset + len` of `file`, from `SEEK_DATA`/`SEEK_HOLE`,
/// at most `max` extents (at least one; fewer than the range needs ends early). Hole
/// boundaries are rounded inwards to `block` bytes, so every extent but the range's own
/// ends is a whole number of blocks. Filesystems without the calls report data.
pub(crate) fn seek_extents(
    file: &File,
    offset: u64,
    len: u64,
    block: u64,
    max: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let data = match seek(sys::seek_data(file, at))? {
            Seek::Found(d) => d.min(end),
            // Nothing but hole from here to the end of the file.
            Seek::Beyond => end,
            Seek::Unsupported => {
                push(&mut out, end - at, Allocation::Data, max);
                break;
            }
        };
        // `at..data` is a hole: only whole blocks inside it are reported as one.
        let hole_start = at.next_multiple_of(block).min(data);
        let hole_end = if data == end {
            end
        } else {
            data - data % block
        };
        if hole_end > hole_start {
            if !push(&mut out, hole_start - at, Allocation::Data, max)
                || !push(&mut out, hole_end - hole_start, Allocation::Hole, max)
            {
                break;
            }
            at = hole_end;
        }
        if at >= end {
            break;
        }
        let hole = match seek(sys::seek_hole(file, at))? {
            Seek::Found(h) => h.min(end),
            Seek::Beyond | Seek::Unsupported => end,
        };
        // Data up to the next hole, at least to the next block boundary so a hole that is
        // not block-aligned cannot stop progress.
        let data_end = hole.max((at + 1).next_multiple_of(block)).min(end);
        if !push(&mut out, data_end - at, Allocation::Data, max) {
            break;
        }
        at = data_end;
    }
    if out.is_empty() && len > 0 {
        // `max` was 0: one extent is still the least a caller can make progress with.
        out.push(Extent {
            len: len.min(block),
            allocation: Allocation::Data,
        });
    }
    Ok(out)
}

enum Seek {
    Found(u64),
    /// `ENXIO`: no data (or hole) at or after the offset, within the file.
    Beyond,
    /// The filesystem or file type does not answer.
    Unsupported,
}

/// What a `SEEK_DATA`/`SEEK_HOLE` answer means for the walk.
fn seek(found: io::Result<Option<u64>>) -> io::Result<Seek> {
    match found {
        Ok(Some(at)) => Ok(Seek::Found(at)),
        Ok(None) => Ok(Seek::Beyond),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            Ok(Seek::Unsupported)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const K: u64 = 1024;

    fn sparse(dir: &tempfile::TempDir, size: u64, data_at: &[u64]) -> File {
        let path = dir.path().join("img");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        for &at in data_at {
            file.write_all_at(&[0xab; 4096], at).unwrap();
        }
        file.sync_all().unwrap();
        file
    }

    fn summary(extents: &[Extent]) -> Vec<(u64, char)> {
        extents
            .iter()
            .map(|e| {
                (
                    e.len,
                    match e.allocation {
                        Allocation::Data => 'd',
                        Allocation::Zero => 'z',
                        Allocation::Hole => 'h',
                    },
                )
            })
            .collect()
    }

    #[test]
    fn holes_and_data_come_from_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let file = sparse(&dir, 1024 * K, &[64 * K, 512 * K]);
        let all = seek_extents(&file, 0, 1024 * K, 512, 100).unwrap();
        if all.len() == 1 {
            // A filesystem that allocates everything (or lacks SEEK_HOLE): all data.
            assert_eq!(summary(&all), [(1024 * K, 'd')]);
            return;
        }
        assert_eq!(
            summary(&all),
            [
                (64 * K, 'h'),
                (4 * K, 'd'),
                (444 * K, 'h'),
                (4 * K, 'd'),
                (508 * K, 'h')
            ]
        );
        // A range starting inside data and ending inside a hole.
        assert_eq!(
            summary(&seek_extents(&file, 66 * K, 100 * K, 512, 100).unwrap()),
            [(2 * K, 'd'), (98 * K, 'h')]
        );
        // At most `max` extents, from the start.
        assert_eq!(
            summary(&seek_extents(&file, 0, 1024 * K, 512, 2).unwrap()),
            [(64 * K, 'h'), (4 * K, 'd')]
        );
        let total: u64 = all.iter().map(|e| e.len).sum();
        assert_eq!(total, 1024 * K);
    }

    #[test]
    fn push_merges_and_bounds() {
        let mut out = Vec::new();
        assert!(push(&mut out, 512, Allocation::Data, 1));
        assert!(push(&mut out, 512, Allocation::Data, 1));
        assert!(!push(&mut out, 512, Allocation::Hole, 1));
        assert!(push(&mut out, 0, Allocation::Hole, 1));
        assert_eq!(
            out,
            [Extent {
                len: 1024,
                allocation: Allocation::Data
            }]
        );
    }
}
