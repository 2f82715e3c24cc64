//! A consistency group's replica set as one [`ReplicaTarget`]: one image per device, placed
//! in the group's address space as the journal's [`DeviceLayout`] says, so the agent, its
//! undo log and crash recovery see one replica at one LSN — the set is always a state the
//! group really had, never disk 2 ahead of disk 1.
//!
//! Must never: write a byte of one device into another's image, or into the padding between
//! two devices (it reads as zeroes and belongs to none).

use std::io;
use std::ops::Range;
use std::sync::Arc;

use super::replica::ReplicaTarget;
use crate::journal::layout::DeviceLayout;

/// See the module documentation.
#[derive(Debug)]
pub struct GroupReplica {
    layout: DeviceLayout,
    members: Vec<Arc<dyn ReplicaTarget>>,
}

impl GroupReplica {
    /// The set of `members` (index order = the layout's; each already checked to have its
    /// device's size).
    pub fn new(layout: DeviceLayout, members: Vec<Arc<dyn ReplicaTarget>>) -> GroupReplica {
        assert_eq!(layout.count(), members.len(), "one image per device");
        GroupReplica { layout, members }
    }

    /// The member and local offset of a change, which lies on one device.
    fn member_for_change(&self, offset: u64, len: u64) -> io::Result<(&dyn ReplicaTarget, u64)> {
        let (dev, local) = self.layout.to_local(offset..offset + len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bytes {offset}+{len} do not lie on one device of the group"),
            )
        })?;
        Ok((self.members[dev as usize].as_ref(), local))
    }
}

impl ReplicaTarget for GroupReplica {
    fn size(&self) -> u64 {
        self.layout.span()
    }

    fn describe(&self) -> String {
        self.layout
            .devices()
            .iter()
            .zip(&self.members)
            .map(|(d, m)| format!("{}={}", d.name, m.describe()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for piece in self.layout.pieces(offset..offset + buf.len() as u64) {
            let (start, end) = (piece.range.start - offset, piece.range.end - offset);
            let out = &mut buf[start as usize..end as usize];
            match piece.on {
                Some((dev, local)) => self.members[dev as usize].read_at(local, out)?,
                None => out.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let (member, local) = self.member_for_change(offset, data.len() as u64)?;
        member.write_at(local, data)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (member, local) = self.member_for_change(offset, len)?;
        member.punch_hole(local, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let (member, local) = self.member_for_change(offset, len)?;
        member.zero_range(local, len)
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        for piece in self.layout.pieces(offset..offset + len) {
            if let Some((dev, local)) = piece.on {
                let len = piece.range.end - piece.range.start;
                if !self.members[dev as usize].is_hole(local, len)? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn sync(&self) -> io::Result<()> {
        // The commit position that follows vouches for every image: each is made durable.
        self.members.iter().try_for_each(|m| m.sync())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        for (dev, d) in self.layout.devices().iter().enumerate() {
            if d.base + d.size <= offset {
                continue;
            }
            let local = offset.saturating_sub(d.base);
            if let Some(found) = self.members[dev].next_data(local)? {
                return Ok(Some(d.base + found.start..d.base + found.end));
            }
        }
        Ok(None)
    }

    fn read_many(&self, reads: &mut [(u64, Vec<u8>)]) -> io::Result<()> {
        reads
            .iter_mut()
            .try_for_each(|(offset, buf)| self.read_at(*offset, buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::manifest::DeviceSpec;
    use crate::replayer::replica::MemoryReplica;

    #[test]
    fn each_image_gets_only_its_device_bytes() {
        let specs = [
            DeviceSpec {
                name: "wal".into(),
                size: 8192,
            },
            DeviceSpec {
                name: "data".into(),
                size: 4096,
            },
        ];
        let members: Vec<Arc<MemoryReplica>> = specs
            .iter()
            .map(|s| Arc::new(MemoryReplica::new(s.size)))
            .collect();
        let set = GroupReplica::new(
            DeviceLayout::new(&specs, 16384),
            members
                .iter()
                .map(|m| m.clone() as Arc<dyn ReplicaTarget>)
                .collect(),
        );
        assert_eq!(set.size(), 16384 + 4096);
        set.write_at(16384, &[7; 4096]).unwrap();
        set.write_at(4096, &[3; 4096]).unwrap();
        assert!(set.write_at(8192, &[1; 4096]).is_err(), "padding");
        assert!(
            set.write_at(4096, &[1; 8192]).is_err(),
            "across a device end"
        );
        assert_eq!(members[1].contents(), vec![7; 4096]);
        assert_eq!(&members[0].contents()[4096..], &[3; 4096][..]);
        let mut all = vec![9u8; 16384 + 4096];
        set.read_at(0, &mut all).unwrap();
        assert!(all[8192..16384].iter().all(|&b| b == 0));
        assert_eq!(
            set.describe(),
            format!(
                "wal={},data={}",
                members[0].describe(),
                members[1].describe()
            )
        );
    }
}
