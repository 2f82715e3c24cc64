//! The ublk device's parameters: the CLI's options checked before anything is made, and the
//! kernel parameters (sizes, block size, cache, discard, chunks) a device is made with.
//!
//! Must never: let a request buffer cross `MAX_REQUEST_BUFFERS` in total, or advertise a
//! feature the [`BlockDevice`](crate::block::BlockDevice) does not report.

use super::request::{Geometry, SECTOR};
use super::{UblkOptions, UblkServeError};

/// The most memory the request buffers (one per tag) may take.
const MAX_REQUEST_BUFFERS: u64 = 1 << 30;

/// Checks `options` against the device before anything is created.
pub fn validate(options: &UblkOptions, block_size: u32) -> Result<(), UblkServeError> {
    let bad = |s: String| Err(UblkServeError::BadOption(s));
    if options.queues == 0 || options.queues > 64 {
        return bad(format!(
            "--queues {} is out of range: use 1 to 64",
            options.queues
        ));
    }
    if options.depth == 0 || options.depth > 4096 {
        return bad(format!(
            "--depth {} is out of range: use 1 to 4096",
            options.depth
        ));
    }
    let buf = options.io_buf_size;
    if !(4096..=32 << 20).contains(&buf) || buf % 4096 != 0 || buf % block_size != 0 {
        return bad(format!(
            "--io-buf-size {buf} is not usable: use a multiple of 4K and of the block size \
             ({block_size}) from 4K to 32M"
        ));
    }
    // Every tag owns a buffer of --io-buf-size: keep their sum bounded.
    let total = u64::from(options.queues) * u64::from(options.depth) * u64::from(buf);
    if total > MAX_REQUEST_BUFFERS {
        return bad(format!(
            "--queues {} x --depth {} x --io-buf-size {buf} is {total} bytes of request \
             buffers: keep the product at most 1G",
            options.queues, options.depth
        ));
    }
    Ok(())
}

/// The kernel parameters of a device: sizes from `info`, the block size as logical and
/// physical block size, a write-back cache with FUA, discard and write-zeroes when the
/// device honours them, and chunks of one region.
pub(super) fn device_params(
    geo: &Geometry,
    region_size: u64,
    max_io_bytes: u32,
) -> libublk::sys::ublk_params {
    use libublk::sys;
    let shift = geo.block_size.trailing_zeros() as u8;
    let region_sectors = region_size / SECTOR;
    // The kernel wants a power of two here; other region sizes simply go without.
    let chunk_sectors = if region_sectors.is_power_of_two() && region_sectors <= u64::from(u32::MAX)
    {
        region_sectors as u32
    } else {
        0
    };
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if geo.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: max_io_bytes >> 9,
            chunk_sectors,
            dev_sectors: geo.size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if !geo.read_only && (geo.trim || geo.write_zeroes) {
        // One region at most per request, like reads and writes.
        let max = if chunk_sectors != 0 {
            chunk_sectors
        } else {
            u32::MAX >> 9
        };
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_granularity: geo.block_size,
            max_discard_sectors: if geo.trim { max } else { 0 },
            max_write_zeroes_sectors: if geo.write_zeroes { max } else { 0 },
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            size: 64 << 20,
            block_size: 4096,
            buf_size: 512 << 10,
            read_only: false,
            trim: true,
            write_zeroes: true,
        }
    }

    #[test]
    fn the_device_advertises_block_size_cache_discard_and_region_chunks() {
        let p = device_params(&geo(), 4 << 20, 512 << 10);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) / 512);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.chunk_sectors, 8192);
        let attrs = p.basic.attrs;
        assert_ne!(attrs & libublk::sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(attrs & libublk::sys::UBLK_ATTR_FUA, 0);
        assert_eq!(attrs & libublk::sys::UBLK_ATTR_READ_ONLY, 0);
        assert_ne!(p.types & libublk::sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_sectors, 8192);
        assert_eq!(p.discard.max_write_zeroes_sectors, 8192);

        let small = Geometry {
            block_size: 512,
            read_only: true,
            ..geo()
        };
        let p = device_params(&small, 3 << 20, 512 << 10);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.chunk_sectors, 0, "not a power of two: no chunks");
        assert_ne!(p.basic.attrs & libublk::sys::UBLK_ATTR_READ_ONLY, 0);
        assert_eq!(p.types & libublk::sys::UBLK_PARAM_TYPE_DISCARD, 0);
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let ok = UblkOptions::default();
        assert!(validate(&ok, 4096).is_ok());
        for (opts, flag) in [
            (
                UblkOptions {
                    queues: 0,
                    ..ok.clone()
                },
                "--queues",
            ),
            (
                UblkOptions {
                    depth: 5000,
                    ..ok.clone()
                },
                "--depth",
            ),
            (
                UblkOptions {
                    io_buf_size: 6000,
                    ..ok.clone()
                },
                "--io-buf-size",
            ),
            (
                UblkOptions {
                    io_buf_size: 64 << 20,
                    ..ok.clone()
                },
                "--io-buf-size",
            ),
            (
                UblkOptions {
                    queues: 8,
                    depth: 4096,
                    ..ok.clone()
                },
                "at most 1G",
            ),
        ] {
            let e = validate(&opts, 4096).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }
}
