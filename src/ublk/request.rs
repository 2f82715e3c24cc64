//! One ublk request, from the kernel's descriptor to the errno-or-length the kernel gets
//! back: [`translate`] reads the descriptor (op code, sectors, flags) into a [`Request`],
//! [`execute`] runs it on a [`BlockDevice`], and [`completion`] turns the outcome into the
//! result of the commit (bytes done, or a negative errno). Pure apart from the device call,
//! so it is tested without a kernel.
//!
//! Must never: touch the device for a request it rejected; read a sector field of a FLUSH
//! (Linux 6.12 sends FLUSH with `start_sector` = u64::MAX and 0 sectors); let a read or
//! write reach past the per-tag buffer.

use bytes::Bytes;

use crate::block::{check_range, BlockDevice, BlockError};

/// Op codes of `ublksrv_io_desc.op_flags` (bits 0-7), from the kernel's `ublk_cmd.h`.
pub(crate) const OP_READ: u32 = 0;
pub(crate) const OP_WRITE: u32 = 1;
pub(crate) const OP_FLUSH: u32 = 2;
pub(crate) const OP_DISCARD: u32 = 3;
pub(crate) const OP_WRITE_ZEROES: u32 = 5;
/// `UBLK_IO_F_FUA`: the data must be durable when the request completes.
pub(crate) const F_FUA: u32 = 1 << 13;

/// The ublk sector is always 512 bytes, whatever the logical block size.
pub(crate) const SECTOR: u64 = 512;

/// What the adapter knows about the device it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size: every offset and length must be a multiple of it.
    pub block_size: u32,
    /// Bytes of each tag's buffer: the largest read or write.
    pub buf_size: u32,
    pub read_only: bool,
    pub trim: bool,
    pub write_zeroes: bool,
}

/// A request the device can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, fua: bool },
}

/// Reads a descriptor into a request, or the negative errno the kernel gets back.
pub(crate) fn translate(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    geo: &Geometry,
) -> Result<Request, i32> {
    let op = op_flags & 0xff;
    let fua = op_flags & F_FUA != 0;
    // The op first: a FLUSH carries no range (6.12 sets start_sector to u64::MAX).
    if op == OP_FLUSH {
        return Ok(Request::Flush);
    }
    if !matches!(op, OP_READ | OP_WRITE | OP_DISCARD | OP_WRITE_ZEROES) {
        return Err(-libc::EOPNOTSUPP);
    }
    if op != OP_READ && geo.read_only {
        return Err(-libc::EROFS);
    }
    if (op == OP_DISCARD && !geo.trim) || (op == OP_WRITE_ZEROES && !geo.write_zeroes) {
        return Err(-libc::EOPNOTSUPP);
    }
    let len = u64::from(nr_sectors) * SECTOR;
    let offset = start_sector.checked_mul(SECTOR).ok_or(-libc::EINVAL)?;
    if check_range(offset, len, geo.size).is_err() {
        return Err(if op == OP_READ {
            -libc::EINVAL
        } else {
            -libc::ENOSPC
        });
    }
    let bs = u64::from(geo.block_size);
    if offset % bs != 0 || len % bs != 0 {
        return Err(-libc::EINVAL);
    }
    Ok(match op {
        OP_READ | OP_WRITE => {
            if len > u64::from(geo.buf_size) {
                return Err(-libc::EINVAL);
            }
            let len = len as u32;
            if op == OP_READ {
                Request::Read { offset, len }
            } else {
                Request::Write { offset, len, fua }
            }
        }
        OP_DISCARD => Request::Discard { offset, len },
        _ => Request::WriteZeroes { offset, len, fua },
    })
}

/// Runs a request; `payload` is a write's data (copied out of the tag's buffer). A read
/// returns its data.
pub(crate) async fn execute(
    device: &dyn BlockDevice,
    request: Request,
    payload: Bytes,
) -> Result<Option<Bytes>, BlockError> {
    match request {
        Request::Read { len: 0, .. } => Ok(Some(Bytes::new())),
        Request::Read { offset, len } => device.read(offset, len).await.map(Some),
        Request::Write { offset, fua, .. } => {
            device.write(offset, payload, fua).await.map(|_| None)
        }
        Request::Flush => device.flush().await.map(|_| None),
        Request::Discard { offset, len } => device.trim(offset, len).await.map(|_| None),
        Request::WriteZeroes { offset, len, fua } => {
            device.write_zeroes(offset, len, fua).await.map(|_| None)
        }
    }
}

/// The commit result for a request's outcome: the bytes done (a read's data copied into
/// `buf`), or a negative errno.
pub(crate) fn completion(
    request: &Request,
    outcome: Result<Option<Bytes>, BlockError>,
    buf: &mut [u8],
) -> i32 {
    match outcome {
        Err(e) => -errno_of(&e, request),
        Ok(data) => match *request {
            Request::Read { len, .. } => match data {
                Some(d) if d.len() == len as usize && d.len() <= buf.len() => {
                    buf[..d.len()].copy_from_slice(&d);
                    len as i32
                }
                // A short read must not be acknowledged as a full one.
                _ => -libc::EIO,
            },
            Request::Write { len, .. } => len as i32,
            _ => 0,
        },
    }
}

/// The one place device errors become errnos for the kernel (which turns them into block
/// statuses: ENOSPC, EOPNOTSUPP and EINVAL keep their meaning, the rest is an I/O error).
pub(crate) fn errno_of(error: &BlockError, request: &Request) -> i32 {
    match error {
        BlockError::OutOfRange { .. } if matches!(request, Request::Read { .. }) => libc::EINVAL,
        BlockError::OutOfRange { .. } => libc::ENOSPC,
        BlockError::ReadOnly => libc::EROFS,
        BlockError::NotSupported(_) => libc::EOPNOTSUPP,
        BlockError::Io(e) => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => libc::ENOSPC,
            _ => libc::EIO,
        },
    }
}

#[cfg(test)]
mod tests;
