//! Requests the primary core served, by kind, and their bytes: the primary's IOPS and
//! throughput as `status` and `/metrics` show them (`io` in `status --json`). A group also
//! counts each device's changes (writes, trims, write-zeroes and bytes written: the records
//! it journals), shown per device beside the group's totals.
//!
//! Must never: slow the I/O path (relaxed atomic adds only, no lock, no allocation); count
//! per device for a one-device journal (its totals are the device's).

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

/// One device's changes since the daemon started (a group's device; see the module
/// documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIoStatus {
    pub writes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
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
    /// One per device of a group, by index; empty for one device.
    devices: Box<[DeviceCounts]>,
}

#[derive(Debug, Default)]
struct DeviceCounts {
    writes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_written: AtomicU64,
}

fn add(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl IoCounts {
    /// Counts for a journal of `devices` devices (per device only for a group).
    pub(crate) fn for_devices(devices: usize) -> IoCounts {
        IoCounts {
            devices: if devices > 1 {
                (0..devices).map(|_| DeviceCounts::default()).collect()
            } else {
                Box::default()
            },
            ..IoCounts::default()
        }
    }

    /// Device `dev`'s counts, when per-device counts are kept.
    fn device(&self, dev: Option<u32>) -> Option<&DeviceCounts> {
        self.devices.get(dev? as usize)
    }

    pub(crate) fn read(&self, len: u64) {
        add(&self.reads, 1);
        add(&self.bytes_read, len);
    }

    /// A write of `len` bytes to device `dev` (`None`: not known, or one device).
    pub(crate) fn write(&self, dev: Option<u32>, len: u64) {
        add(&self.writes, 1);
        add(&self.bytes_written, len);
        if let Some(d) = self.device(dev) {
            add(&d.writes, 1);
            add(&d.bytes_written, len);
        }
    }

    pub(crate) fn flush(&self) {
        add(&self.flushes, 1);
    }

    pub(crate) fn trim(&self, dev: Option<u32>) {
        add(&self.trims, 1);
        if let Some(d) = self.device(dev) {
            add(&d.trims, 1);
        }
    }

    pub(crate) fn write_zeroes(&self, dev: Option<u32>) {
        add(&self.write_zeroes, 1);
        if let Some(d) = self.device(dev) {
            add(&d.write_zeroes, 1);
        }
    }

    /// Each device's counts, by index (empty for one device).
    pub(crate) fn devices(&self) -> Vec<DeviceIoStatus> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.devices
            .iter()
            .map(|d| DeviceIoStatus {
                writes: load(&d.writes),
                trims: load(&d.trims),
                write_zeroes: load(&d.write_zeroes),
                bytes_written: load(&d.bytes_written),
            })
            .collect()
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
        c.write(None, 512);
        c.write(Some(0), 1024);
        c.flush();
        c.trim(None);
        c.write_zeroes(None);
        let s = c.status();
        assert_eq!(
            (s.reads, s.writes, s.flushes, s.trims, s.write_zeroes),
            (1, 2, 1, 1, 1)
        );
        assert_eq!((s.bytes_read, s.bytes_written), (4096, 1536));
        assert!(c.devices().is_empty(), "one device: no per-device counts");
    }

    #[test]
    fn a_group_counts_each_devices_changes_beside_the_totals() {
        let c = IoCounts::for_devices(2);
        c.write(Some(0), 4096);
        c.write(Some(1), 8192);
        c.write(Some(1), 512);
        c.trim(Some(0));
        c.write_zeroes(Some(1));
        // A device the counts do not know (never passed by the core) counts in the totals only.
        c.write(Some(7), 1);
        let devices = c.devices();
        assert_eq!(
            devices,
            [
                DeviceIoStatus {
                    writes: 1,
                    trims: 1,
                    write_zeroes: 0,
                    bytes_written: 4096
                },
                DeviceIoStatus {
                    writes: 2,
                    trims: 0,
                    write_zeroes: 1,
                    bytes_written: 8704
                }
            ]
        );
        let s = c.status();
        assert_eq!((s.writes, s.bytes_written), (4, 4096 + 8704 + 1));
        assert!(IoCounts::for_devices(1).devices().is_empty());
    }
}
