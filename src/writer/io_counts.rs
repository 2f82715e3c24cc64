//! Requests the primary core served, by kind, and their bytes: the primary's IOPS and
//! throughput as `status` and `/metrics` show them (`io` in `status --json`).
//!
//! Must never: slow the I/O path (relaxed atomic adds only, no lock).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Counts since the daemon started: a request is counted once it passed the range check
/// and goes to the device (one the device then fails is counted; one outside the device
/// never is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStatus {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Discards (NBD TRIM).
    pub trims: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct IoCounts {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

fn add(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl IoCounts {
    pub(crate) fn read(&self, len: u64) {
        add(&self.reads, 1);
        add(&self.bytes_read, len);
    }

    pub(crate) fn write(&self, len: u64) {
        add(&self.writes, 1);
        add(&self.bytes_written, len);
    }

    pub(crate) fn flush(&self) {
        add(&self.flushes, 1);
    }

    pub(crate) fn trim(&self) {
        add(&self.trims, 1);
    }

    pub(crate) fn write_zeroes(&self) {
        add(&self.write_zeroes, 1);
    }

    pub(crate) fn status(&self) -> IoStatus {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IoStatus {
            reads: load(&self.reads),
            writes: load(&self.writes),
            flushes: load(&self.flushes),
            trims: load(&self.trims),
            write_zeroes: load(&self.write_zeroes),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_and_bytes() {
        let c = IoCounts::default();
        c.read(4096);
        c.write(512);
        c.write(1024);
        c.flush();
        c.trim();
        c.write_zeroes();
        let s = c.status();
        assert_eq!(
            (s.reads, s.writes, s.flushes, s.trims, s.write_zeroes),
            (1, 2, 1, 1, 1)
        );
        assert_eq!((s.bytes_read, s.bytes_written), (4096, 1536));
    }
}
