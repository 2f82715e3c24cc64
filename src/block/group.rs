//! A consistency group's devices as block devices: [`GroupDevice`] puts several devices side
//! by side in the group's one address space (the journal's [`DeviceLayout`]), so the primary
//! core journals them in one order; [`DeviceSlice`] is one device's window of that space,
//! what a frontend serves as that device's export.
//!
//! Must never: let a request through a slice reach bytes outside its device; write into the
//! padding between two devices (it belongs to no device and always reads as zeroes).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::allocation::{Allocation, Extent};
use super::{check_range, BlockDevice, BlockError, DeviceInfo, ReadTicket};
use crate::journal::layout::{DeviceLayout, Piece};

/// Several devices in the group's address space (see the module documentation).
pub struct GroupDevice {
    layout: DeviceLayout,
    members: Vec<Arc<dyn BlockDevice>>,
    info: DeviceInfo,
}

/// A member whose size or block size is not what the layout says.
#[derive(Debug, thiserror::Error)]
#[error("device {name}: {what}")]
pub struct GroupMismatch {
    pub name: String,
    pub what: String,
}

impl GroupDevice {
    /// The group of `members` (index order = the layout's), checked against `layout`.
    pub fn new(
        layout: DeviceLayout,
        members: Vec<Arc<dyn BlockDevice>>,
    ) -> Result<GroupDevice, GroupMismatch> {
        assert_eq!(layout.count(), members.len(), "one member per device");
        let first = members[0].info();
        let mut info = DeviceInfo {
            size: layout.span(),
            ..first
        };
        for (placed, member) in layout.devices().iter().zip(&members) {
            let m = member.info();
            let mismatch = |what: String| GroupMismatch {
                name: placed.name.clone(),
                what,
            };
            if m.size != placed.size {
                return Err(mismatch(format!(
                    "{} bytes, but the journal replicates {} bytes for it",
                    m.size, placed.size
                )));
            }
            if m.block_size != first.block_size {
                return Err(mismatch(format!(
                    "block size {}, but the group's first device has {}",
                    m.block_size, first.block_size
                )));
            }
            info.read_only |= m.read_only;
            info.supports_trim &= m.supports_trim;
            info.supports_write_zeroes &= m.supports_write_zeroes;
            info.flush_covers_all_connections &= m.flush_covers_all_connections;
        }
        Ok(GroupDevice {
            layout,
            members,
            info,
        })
    }

    /// The member and its local offset for a change to `range`, which must lie on one
    /// device: a change never spans padding or two devices.
    fn member_for_change(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(&dyn BlockDevice, u64), BlockError> {
        check_range(offset, len, self.info.size)?;
        let (dev, local) =
            self.layout
                .to_local(offset..offset + len)
                .ok_or(BlockError::OutOfRange {
                    offset,
                    len,
                    size: self.info.size,
                })?;
        Ok((self.members[dev as usize].as_ref(), local))
    }
}

#[async_trait]
impl BlockDevice for GroupDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        check_range(offset, u64::from(len), self.info.size)?;
        let pieces = self.layout.pieces(offset..offset + u64::from(len));
        if let [Piece {
            on: Some((dev, local)),
            ..
        }] = pieces.as_slice()
        {
            return self.members[*dev as usize].read(*local, len).await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for piece in pieces {
            let n = (piece.range.end - piece.range.start) as usize;
            match piece.on {
                Some((dev, local)) => {
                    let data = self.members[dev as usize].read(local, n as u32).await?;
                    out.extend_from_slice(&data);
                }
                None => out.resize(out.len() + n, 0),
            }
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let (member, local) = self.member_for_change(offset, data.len() as u64)?;
        member.write(local, data, fua).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        // A FLUSH record says the primary made everything before it durable: every member,
        // flushed side by side.
        if let [only] = self.members.as_slice() {
            return only.flush().await;
        }
        let mut flushes = tokio::task::JoinSet::new();
        for member in &self.members {
            let member = member.clone();
            flushes.spawn(async move { member.flush().await });
        }
        let mut result = Ok(());
        while let Some(done) = flushes.join_next().await {
            let outcome = done.unwrap_or_else(|e| Err(BlockError::Io(std::io::Error::other(e))));
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let (member, local) = self.member_for_change(offset, len)?;
        member.trim(local, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let (member, local) = self.member_for_change(offset, len)?;
        member.write_zeroes(local, len, fua).await
    }

    async fn has_data(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        check_range(offset, len, self.info.size)?;
        for piece in self.layout.pieces(offset..offset + len) {
            if let Some((dev, local)) = piece.on {
                let member = &self.members[dev as usize];
                if member
                    .has_data(local, piece.range.end - piece.range.start)
                    .await?
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.info.size)?;
        // The first piece is enough: a shorter answer makes the caller ask again from its end.
        let Some(first) = self.layout.pieces(offset..offset + len).into_iter().next() else {
            return Ok(Vec::new());
        };
        let piece_len = first.range.end - first.range.start;
        match first.on {
            Some((dev, local)) => {
                self.members[dev as usize]
                    .allocation(local, piece_len, max_extents)
                    .await
            }
            None => Ok(vec![Extent {
                len: piece_len,
                allocation: Allocation::Hole,
            }]),
        }
    }
}

/// One device's window `base..base + size` of a larger device: what a frontend serves as
/// that device. Every request is checked against the window before it goes on.
pub struct DeviceSlice {
    inner: Arc<dyn BlockDevice>,
    base: u64,
    info: DeviceInfo,
}

impl DeviceSlice {
    pub fn new(inner: Arc<dyn BlockDevice>, base: u64, size: u64) -> DeviceSlice {
        let info = DeviceInfo {
            size,
            ..inner.info()
        };
        DeviceSlice { inner, base, info }
    }
}

#[async_trait]
impl BlockDevice for DeviceSlice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        check_range(offset, u64::from(len), self.info.size)?;
        self.inner.read(self.base + offset, len).await
    }

    fn reads_to_confirm(&self) -> bool {
        self.inner.reads_to_confirm()
    }

    async fn read_to_confirm(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<(Bytes, Option<ReadTicket>), BlockError> {
        check_range(offset, u64::from(len), self.info.size)?;
        self.inner.read_to_confirm(self.base + offset, len).await
    }

    fn confirm_reads(&self, oldest: ReadTicket) -> bool {
        self.inner.confirm_reads(oldest)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.info.size)?;
        self.inner.write(self.base + offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        self.inner.trim(self.base + offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        self.inner.write_zeroes(self.base + offset, len, fua).await
    }

    async fn has_data(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        check_range(offset, len, self.info.size)?;
        self.inner.has_data(self.base + offset, len).await
    }

    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.info.size)?;
        self.inner
            .allocation(self.base + offset, len, max_extents)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::manifest::DeviceSpec;

    /// A member that remembers writes in memory.
    struct Memory(std::sync::Mutex<Vec<u8>>);

    #[async_trait]
    impl BlockDevice for Memory {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                size: self.0.lock().unwrap().len() as u64,
                block_size: 4096,
                read_only: false,
                supports_trim: true,
                supports_write_zeroes: true,
                flush_covers_all_connections: true,
            }
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
            let m = self.0.lock().unwrap();
            Ok(Bytes::copy_from_slice(
                &m[offset as usize..offset as usize + len as usize],
            ))
        }
        async fn write(&self, offset: u64, data: Bytes, _: bool) -> Result<(), BlockError> {
            self.0.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64) -> Result<(), BlockError> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
            Ok(())
        }
    }

    fn group() -> (GroupDevice, Vec<Arc<Memory>>) {
        let specs = [
            DeviceSpec {
                name: "a".into(),
                size: 12288,
            },
            DeviceSpec {
                name: "b".into(),
                size: 8192,
            },
        ];
        let members: Vec<Arc<Memory>> = specs
            .iter()
            .map(|s| Arc::new(Memory(std::sync::Mutex::new(vec![0; s.size as usize]))))
            .collect();
        let dyn_members = members
            .iter()
            .map(|m| m.clone() as Arc<dyn BlockDevice>)
            .collect();
        let group = GroupDevice::new(DeviceLayout::new(&specs, 16384), dyn_members).unwrap();
        (group, members)
    }

    #[tokio::test]
    async fn slices_reach_only_their_device_and_padding_reads_zero() {
        let (group, members) = group();
        assert_eq!(group.info().size, 16384 + 8192);
        let group: Arc<dyn BlockDevice> = Arc::new(group);
        let b = DeviceSlice::new(group.clone(), 16384, 8192);
        b.write(4096, Bytes::from_static(&[9; 4096]), false)
            .await
            .unwrap();
        assert_eq!(members[1].0.lock().unwrap()[4096], 9);
        assert!(members[0].0.lock().unwrap().iter().all(|&x| x == 0));
        assert!(matches!(
            b.write(8192, Bytes::from_static(&[1; 4096]), false).await,
            Err(BlockError::OutOfRange { .. })
        ));
        // A change into the padding is refused; a read across it sees zeroes there.
        assert!(matches!(
            group
                .write(12288, Bytes::from_static(&[1; 4096]), false)
                .await,
            Err(BlockError::OutOfRange { .. })
        ));
        let all = group.read(8192, 16384).await.unwrap();
        assert!(all[..12288].iter().all(|&x| x == 0));
        assert!(all[12288..].iter().all(|&x| x == 9));
    }

    #[test]
    fn a_member_of_the_wrong_size_is_named() {
        let specs = [DeviceSpec {
            name: "wal".into(),
            size: 8192,
        }];
        let member: Arc<dyn BlockDevice> = Arc::new(Memory(std::sync::Mutex::new(vec![0; 4096])));
        let err = GroupDevice::new(DeviceLayout::new(&specs, 8192), vec![member])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("wal") && err.contains("4096"), "{err}");
    }
}
