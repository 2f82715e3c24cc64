//! Where each device of a consistency group lives in the group's one address space.
//!
//! A group journal replicates several devices in one LSN order. The writer, the replay
//! agent and time travel each keep one address space for the whole group: device `d`
//! starts at `base(d)`, the sum of the earlier devices' sizes each rounded up to the
//! journal's region size. Every region therefore belongs to exactly one device, so the
//! dirty map, the activity log, resync spans and the undo log work unchanged on the group,
//! and a resync span covers whichever devices have dirty regions — one span, one order.
//! The bytes between a device's end and the next base (the padding) belong to no device:
//! they read as zeroes and nothing is ever written there.
//!
//! Records on disk keep device-local offsets with their device number (`dev`): the
//! journal format does not depend on this layout. [`DeviceLayout::globalize`] and
//! [`DeviceLayout::localize`] convert at the edges (the writer's record builder, the
//! readers' record intake). A one-device journal has base 0 and no padding: both
//! conversions are the identity.
//!
//! Must never: move a device that exists (bases depend only on the devices before it, and
//! devices are only ever appended); let an offset of one device reach another's bytes.

use std::ops::Range;

use super::manifest::{DeviceSpec, Manifest};
use super::record::{Op, Record};

/// One device placed in the group's address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedDevice {
    pub name: String,
    pub base: u64,
    pub size: u64,
}

impl PlacedDevice {
    /// The device's bytes in the group's address space.
    pub fn extent(&self) -> Range<u64> {
        self.base..self.base + self.size
    }
}

/// A piece of a group range that lies on one device, or in the padding after one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The device and the piece's offset on it; `None` for padding.
    pub on: Option<(u32, u64)>,
    /// The piece in the group's address space.
    pub range: Range<u64>,
}

/// See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLayout {
    devices: Vec<PlacedDevice>,
}

/// A record or an extent that names a device or bytes the group does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("device {dev} does not exist (the journal has {count} device(s))")]
    NoSuchDevice { dev: u32, count: usize },
    #[error("bytes {start}..{end} lie outside device {dev} ({name}, {size} bytes)")]
    OutsideDevice {
        dev: u32,
        name: String,
        start: u64,
        end: u64,
        size: u64,
    },
}

impl DeviceLayout {
    /// Places `devices` one after another, each at a multiple of `region_size`.
    pub fn new(devices: &[DeviceSpec], region_size: u64) -> DeviceLayout {
        let mut base = 0u64;
        let devices = devices
            .iter()
            .map(|d| {
                let placed = PlacedDevice {
                    name: d.name.clone(),
                    base,
                    size: d.size,
                };
                base = base.saturating_add(d.size.div_ceil(region_size) * region_size);
                placed
            })
            .collect();
        DeviceLayout { devices }
    }

    /// The layout of `manifest`'s devices.
    pub fn of(manifest: &Manifest) -> DeviceLayout {
        DeviceLayout::new(&manifest.devices, manifest.region_size)
    }

    /// The devices in index order.
    pub fn devices(&self) -> &[PlacedDevice] {
        &self.devices
    }

    /// How many devices the group has.
    pub fn count(&self) -> usize {
        self.devices.len()
    }

    /// Whether this is a one-device journal (every conversion is the identity).
    pub fn is_single(&self) -> bool {
        self.devices.len() == 1
    }

    /// Bytes of the group's address space: the last device's end.
    pub fn span(&self) -> u64 {
        self.devices.last().map_or(0, |d| d.base + d.size)
    }

    /// Device `dev`, if it exists.
    pub fn device(&self, dev: u32) -> Option<&PlacedDevice> {
        self.devices.get(dev as usize)
    }

    /// The index of the device named `name`.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.devices
            .iter()
            .position(|d| d.name == name)
            .map(|i| i as u32)
    }

    /// The device holding group byte `at`, with its index (`None` in padding or past the end).
    pub fn device_at(&self, at: u64) -> Option<(u32, &PlacedDevice)> {
        let i = self
            .devices
            .partition_point(|d| d.base <= at)
            .checked_sub(1)?;
        let d = &self.devices[i];
        (at < d.base + d.size).then_some((i as u32, d))
    }

    /// `range` clipped to the device extent it starts in: what of it holds a device's bytes
    /// (empty when it starts in padding). A region never spans two devices, so clipping a
    /// region's range loses only padding.
    pub fn clip(&self, range: Range<u64>) -> Range<u64> {
        match self.device_at(range.start) {
            Some((_, d)) => range.start..range.end.min(d.base + d.size),
            None => range.start..range.start,
        }
    }

    /// `range` cut at device edges, in order: what a read across devices or padding does.
    pub fn pieces(&self, range: Range<u64>) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let (on, end) = match self.device_at(at) {
                Some((dev, d)) => (Some((dev, at - d.base)), d.base + d.size),
                None => {
                    let next = self.devices.iter().map(|d| d.base).find(|&b| b > at);
                    (None, next.unwrap_or(range.end))
                }
            };
            let end = end.min(range.end);
            out.push(Piece { on, range: at..end });
            at = end;
        }
        out
    }

    /// The group offset of `offset..offset + len` on device `dev`, checked to lie on it.
    pub fn to_global(&self, dev: u32, offset: u64, len: u64) -> Result<u64, LayoutError> {
        let d = self.device(dev).ok_or(LayoutError::NoSuchDevice {
            dev,
            count: self.devices.len(),
        })?;
        match offset.checked_add(len) {
            Some(end) if end <= d.size => Ok(d.base + offset),
            _ => Err(LayoutError::OutsideDevice {
                dev,
                name: d.name.clone(),
                start: offset,
                end: offset.saturating_add(len),
                size: d.size,
            }),
        }
    }

    /// The device and device-local offset of a group range that lies on one device.
    pub fn to_local(&self, range: Range<u64>) -> Option<(u32, u64)> {
        let (dev, d) = self.device_at(range.start)?;
        (range.end <= d.base + d.size).then_some((dev, range.start - d.base))
    }

    /// `record` with its offsets moved into the group's address space, after checking that
    /// its bytes lie on its device. Records without offsets (`FLUSH`, `MARK`, …) pass as
    /// they are, whatever their `dev`.
    pub fn globalize(&self, mut record: Record) -> Result<Record, LayoutError> {
        let Some((offset, len)) = op_extent(&record.op) else {
            return Ok(record);
        };
        let global = self.to_global(record.dev, offset, len)?;
        record.op = shift_op(record.op, global - offset, true);
        Ok(record)
    }

    /// The device and device-local op of a group-space `op` whose bytes lie on one device;
    /// `None` when they do not (they span padding or two devices). Ops without offsets
    /// belong to device 0.
    pub fn localize(&self, op: Op) -> Option<(u32, Op)> {
        let Some((offset, len)) = op_extent(&op) else {
            return Some((0, op));
        };
        let (dev, local) = self.to_local(offset..offset + len)?;
        Some((dev, shift_op(op, offset - local, false)))
    }
}

/// Matches paths given on a command line (`--primary`, `--replica`: `[NAME=]PATH`, repeated)
/// to `devices` (the journal's device names, in index order) and returns one path per device
/// in index order. One device takes one path, named or not; a group takes exactly one
/// `NAME=PATH` per device. The error is one line naming `flag` and what is wrong.
pub fn match_named_paths<P: Clone + PartialEq>(
    devices: &[&str],
    given: &[(Option<String>, P)],
    flag: &str,
) -> Result<Vec<P>, String> {
    if devices.len() <= 1 {
        if given.len() > 1 {
            return Err(format!(
                "{flag} given {} times, but the journal has one device",
                given.len()
            ));
        }
        let Some((name, path)) = given.first() else {
            return Err(format!("{flag} is required"));
        };
        if let (Some(name), Some(device)) = (name, devices.first()) {
            if name != device {
                return Err(format!(
                    "{flag} {name}=…: the journal's device is named {device:?}"
                ));
            }
        }
        return Ok(vec![path.clone()]);
    }
    let mut matched: Vec<Option<P>> = vec![None; devices.len()];
    for (name, path) in given {
        let Some(name) = name else {
            return Err(format!(
                "{flag} without a name: this journal is a group of {} devices ({}); give each as \
                 {flag} NAME=PATH",
                devices.len(),
                devices.join(", ")
            ));
        };
        let Some(index) = devices.iter().position(|d| d == name) else {
            return Err(format!(
                "{flag} {name}=…: the journal has no device {name:?} (its devices: {})",
                devices.join(", ")
            ));
        };
        if matched[index].replace(path.clone()).is_some() {
            return Err(format!("{flag} {name}=… is given twice"));
        }
    }
    let missing: Vec<&str> = devices
        .iter()
        .zip(&matched)
        .filter(|(_, m)| m.is_none())
        .map(|(d, _)| *d)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no {flag} for device(s) {}: a group is taken whole, one {flag} NAME=PATH per device",
            missing.join(", ")
        ));
    }
    let paths: Vec<P> = matched.into_iter().flatten().collect();
    if paths
        .iter()
        .enumerate()
        .any(|(i, p)| paths[..i].contains(p))
    {
        return Err(format!("{flag}: one path is given for two devices"));
    }
    Ok(paths)
}

/// The bytes an op names: what it changes, or what a `VERIFY` covers.
fn op_extent(op: &Op) -> Option<(u64, u64)> {
    match op {
        Op::Verify { offset, len, .. } => Some((*offset, *len)),
        other => other.range().map(|r| (r.start, r.end - r.start)),
    }
}

fn shift_op(op: Op, by: u64, up: bool) -> Op {
    let moved = |offset: u64| if up { offset + by } else { offset - by };
    match op {
        Op::Write { offset, data } => Op::Write {
            offset: moved(offset),
            data,
        },
        Op::ResyncData { offset, data } => Op::ResyncData {
            offset: moved(offset),
            data,
        },
        Op::Discard { offset, len } => Op::Discard {
            offset: moved(offset),
            len,
        },
        Op::WriteZeroes { offset, len } => Op::WriteZeroes {
            offset: moved(offset),
            len,
        },
        Op::Verify {
            offset,
            len,
            checksum,
        } => Op::Verify {
            offset: moved(offset),
            len,
            checksum,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn layout() -> DeviceLayout {
        DeviceLayout::new(
            &[
                DeviceSpec {
                    name: "wal".into(),
                    size: 6 << 20,
                },
                DeviceSpec {
                    name: "data".into(),
                    size: 8 << 20,
                },
                DeviceSpec {
                    name: "tmp".into(),
                    size: 4096,
                },
            ],
            4 << 20,
        )
    }

    #[test]
    fn devices_start_at_region_boundaries_in_order() {
        let l = layout();
        let bases: Vec<u64> = l.devices().iter().map(|d| d.base).collect();
        assert_eq!(bases, [0, 8 << 20, 16 << 20]);
        assert_eq!(l.span(), (16 << 20) + 4096);
        assert_eq!(l.index_of("data"), Some(1));
        assert_eq!(l.device_at(6 << 20), None, "padding belongs to no device");
        assert_eq!(l.device_at((8 << 20) + 1).map(|(i, _)| i), Some(1));
        assert_eq!(l.clip((4 << 20)..(8 << 20)), (4 << 20)..(6 << 20));
        assert!(l.clip((6 << 20)..(8 << 20)).is_empty());
    }

    #[test]
    fn records_round_trip_and_never_cross_a_device() {
        let l = layout();
        let record = Record {
            lsn: 9,
            timestamp_ns: 1,
            dev: 1,
            op: Op::Write {
                offset: 4096,
                data: Bytes::from_static(&[7; 512]),
            },
        };
        let global = l.globalize(record.clone()).unwrap();
        assert_eq!(global.op.range(), Some((8 << 20) + 4096..(8 << 20) + 4608));
        assert_eq!(l.localize(global.op), Some((1, record.op.clone())));

        let past_end = Record {
            op: Op::Discard {
                offset: (8 << 20) - 4096,
                len: 8192,
            },
            ..record.clone()
        };
        assert!(matches!(
            l.globalize(past_end),
            Err(LayoutError::OutsideDevice { dev: 1, .. })
        ));
        let no_device = Record {
            dev: 3,
            ..record.clone()
        };
        assert!(matches!(
            l.globalize(no_device),
            Err(LayoutError::NoSuchDevice { dev: 3, count: 3 })
        ));
        let across = Op::WriteZeroes {
            offset: (6 << 20) - 4096,
            len: 8192,
        };
        assert_eq!(l.localize(across), None, "into padding");
        let flush = Record {
            dev: 0,
            op: Op::Flush,
            ..record
        };
        assert_eq!(l.globalize(flush.clone()).unwrap(), flush);
    }

    #[test]
    fn one_device_is_the_identity() {
        let l = DeviceLayout::new(
            &[DeviceSpec {
                name: "disk0".into(),
                size: 5 << 20,
            }],
            4 << 20,
        );
        assert!(l.is_single());
        assert_eq!(l.span(), 5 << 20);
        let op = Op::Write {
            offset: 4 << 20,
            data: Bytes::from_static(&[1; 4096]),
        };
        assert_eq!(l.localize(op.clone()), Some((0, op)));
    }
}
