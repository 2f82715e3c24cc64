//! Reading many ranges of the replica at once with io_uring: a batch's pre-image runs are
//! submitted together (up to [`ENTRIES`] in flight), so a replica whose blocks are not in the
//! page cache is read with the disk's parallelism instead of one `pread` after another, and a
//! cached one with a few `io_uring_enter` calls instead of one syscall per run.
//!
//! Only reads: on ext4 a buffered write submitted to io_uring is handed to a kernel worker
//! thread (measured slower than `pwrite`, see BENCHMARKS.md "replay"), so the replica is
//! written with positional writes, one thread hand-off per batch.
//!
//! The engine is chosen once per process ([`engine`]) by the same choice the primary makes
//! ([`crate::block::engine::select`]: `TINYLAG_IO_ENGINE`, else a probe of io_uring, which an
//! old kernel, seccomp or `io_uring_disabled` refuses), logged once; the fallback reads with
//! `pread`, one range after another.
//!
//! Must never: return while the kernel may still write into a caller's buffer (every
//! submitted read is reaped first, or its buffer is leaked when the ring itself fails); report
//! a short read as success.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, OnceLock};

use io_uring::{opcode, types, IoUring};

use crate::block::engine::IoEngine;

/// Submission queue entries of a ring (reads in flight at most).
pub(crate) const ENTRIES: u32 = 64;
/// The engine this process reads the replica with, decided on first use and logged once. A
/// bad `TINYLAG_IO_ENGINE` is refused at the start of `replay` (the agent checks it first);
/// here it only falls back to `pread`.
pub(crate) fn engine() -> IoEngine {
    static ENGINE: OnceLock<IoEngine> = OnceLock::new();
    *ENGINE.get_or_init(|| match crate::block::engine::select() {
        Ok(choice) => {
            tracing::info!("replica read engine: {} ({})", choice.engine, choice.reason);
            choice.engine
        }
        Err(e) => {
            tracing::warn!("{e}; the replica is read with pread");
            IoEngine::Threads
        }
    })
}

/// An io_uring that reads ranges of one file descriptor.
pub(crate) struct RingReader {
    ring: Mutex<IoUring>,
}

impl std::fmt::Debug for RingReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingReader")
    }
}

impl RingReader {
    /// A ring, when [`engine`] is io_uring and the kernel gives one.
    pub(crate) fn new() -> Option<RingReader> {
        if engine() != IoEngine::Uring {
            return None;
        }
        match IoUring::new(ENTRIES) {
            Ok(ring) => Some(RingReader {
                ring: Mutex::new(ring),
            }),
            Err(e) => {
                tracing::warn!("cannot set up an io_uring ({e}); reading with pread");
                None
            }
        }
    }

    /// Fills every buffer from its offset of `fd`. A read that ends early is continued; one
    /// that reaches the end of the file is an `UnexpectedEof` error.
    pub(crate) fn read_many(&self, fd: RawFd, reads: &mut [(u64, Vec<u8>)]) -> io::Result<()> {
        let mut ring = crate::sync::lock(&self.ring);
        let mut done = vec![0usize; reads.len()];
        let mut queue: Vec<usize> = (0..reads.len()).rev().collect();
        let mut in_flight = 0usize;
        let mut failure: Option<io::Error> = None;
        loop {
            while failure.is_none() && in_flight < ENTRIES as usize {
                let Some(i) = queue.pop() else { break };
                let (offset, buf) = &mut reads[i];
                let rest = &mut buf[done[i]..];
                if rest.is_empty() {
                    continue;
                }
                let len = rest.len().min(1 << 30) as u32;
                let entry = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len)
                    .offset(*offset + done[i] as u64)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the buffer lives in `reads`, which outlives this call, and is not
                // touched again until the entry's completion is reaped below (or, if the
                // ring fails, the buffer is leaked, never freed under the kernel).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    queue.push(i);
                    break;
                }
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The kernel may hold any buffer still in flight: never free them.
                    for (_, buf) in reads.iter_mut() {
                        std::mem::forget(std::mem::take(buf));
                    }
                    return Err(e);
                }
            }
            for cqe in ring.completion() {
                in_flight -= 1;
                let i = cqe.user_data() as usize;
                match cqe.result() {
                    n if n > 0 => {
                        done[i] += n as usize;
                        if done[i] < reads[i].1.len() {
                            queue.push(i);
                        }
                    }
                    0 => {
                        failure.get_or_insert_with(|| {
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!(
                                    "end of file at byte {} reading {} bytes from {}",
                                    reads[i].0 + done[i] as u64,
                                    reads[i].1.len(),
                                    reads[i].0
                                ),
                            )
                        });
                    }
                    e if -e == libc::EINTR || -e == libc::EAGAIN => queue.push(i),
                    e => {
                        failure.get_or_insert(io::Error::from_raw_os_error(-e));
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn many_ranges_read_like_pread_and_eof_is_an_error() {
        let Some(reader) = RingReader::new() else {
            // No io_uring here (or TINYLAG_IO_ENGINE=threads): the fallback is what runs,
            // and the replica tests cover it.
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let content: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&content, 0).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // More ranges than the ring has entries, of many sizes, some overlapping.
        let mut reads: Vec<(u64, Vec<u8>)> = (0..300u64)
            .map(|i| {
                (
                    i * 9973 % (2 << 20),
                    vec![0u8; 1 + (i as usize * 4099) % 70_000],
                )
            })
            .collect();
        reads.push((0, vec![0u8; 3 << 20]));
        reader.read_many(file.as_raw_fd(), &mut reads).unwrap();
        for (offset, buf) in &reads {
            let at = *offset as usize;
            assert_eq!(&buf[..], &content[at..at + buf.len()], "at {offset}");
        }
        let mut past = vec![((3u64 << 20) - 10, vec![0u8; 20])];
        let e = reader.read_many(file.as_raw_fd(), &mut past).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
