//! The adapter's request translation against an in-memory device: op codes, sector
//! offsets, flags and errors back to the kernel, without a kernel.

use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::block::{check_range, BlockDevice, BlockError, DeviceInfo};

const MIB: u64 = 1 << 20;

/// A RAM disk that logs every call, and fails every call with `fail` when set.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    calls: Mutex<Vec<String>>,
    fail: Option<i32>,
}

impl MemDisk {
    fn new(size: u64) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0xAA; size as usize]),
            calls: Mutex::new(Vec::new()),
            fail: None,
        }
    }

    fn log(&self, call: String) -> Result<(), BlockError> {
        self.calls.lock().unwrap().push(call);
        match self.fail {
            Some(code) => Err(BlockError::Io(std::io::Error::from_raw_os_error(code))),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl BlockDevice for MemDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.data.lock().unwrap().len() as u64,
            block_size: 4096,
            read_only: false,
            supports_trim: true,
            supports_write_zeroes: true,
            flush_covers_all_connections: true,
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.log(format!("read {offset}+{len}"))?;
        let data = self.data.lock().unwrap();
        check_range(offset, u64::from(len), data.len() as u64)?;
        Ok(Bytes::copy_from_slice(
            &data[offset as usize..offset as usize + len as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        self.log(format!("write {offset}+{} fua={fua}", data.len()))?;
        let mut disk = self.data.lock().unwrap();
        check_range(offset, data.len() as u64, disk.len() as u64)?;
        disk[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.log("flush".into())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.log(format!("trim {offset}+{len}"))?;
        let mut disk = self.data.lock().unwrap();
        disk[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.log(format!("write_zeroes {offset}+{len} fua={fua}"))?;
        let mut disk = self.data.lock().unwrap();
        disk[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn geo() -> Geometry {
    Geometry {
        size: 16 * MIB,
        block_size: 4096,
        buf_size: 512 << 10,
        read_only: false,
        trim: true,
        write_zeroes: true,
    }
}

/// Runs one descriptor the way a queue does: translate, execute, complete.
async fn run(disk: &MemDisk, op_flags: u32, sector: u64, sectors: u32, buf: &mut [u8]) -> i32 {
    let request = match translate(op_flags, sector, sectors, &geo()) {
        Ok(r) => r,
        Err(errno) => return errno,
    };
    let payload = match request {
        Request::Write { len, .. } => Bytes::copy_from_slice(&buf[..len as usize]),
        _ => Bytes::new(),
    };
    let outcome = execute(disk, request, payload).await;
    completion(&request, outcome, buf)
}

#[test]
fn op_codes_and_sectors_become_byte_ranges() {
    let g = geo();
    assert_eq!(
        translate(OP_READ, 8, 16, &g),
        Ok(Request::Read {
            offset: 4096,
            len: 8192
        })
    );
    assert_eq!(
        translate(OP_WRITE, 16, 8, &g),
        Ok(Request::Write {
            offset: 8192,
            len: 4096,
            fua: false
        })
    );
    assert_eq!(
        translate(OP_WRITE | F_FUA, 16, 8, &g),
        Ok(Request::Write {
            offset: 8192,
            len: 4096,
            fua: true
        })
    );
    assert_eq!(
        translate(OP_DISCARD, 0, 2048, &g),
        Ok(Request::Discard {
            offset: 0,
            len: MIB
        })
    );
    assert_eq!(
        translate(OP_WRITE_ZEROES | F_FUA, 2048, 2048, &g),
        Ok(Request::WriteZeroes {
            offset: MIB,
            len: MIB,
            fua: true
        })
    );
    // Discard and write-zeroes may be larger than the buffer: they carry no data.
    assert_eq!(
        translate(OP_DISCARD, 0, (16 * MIB / 512) as u32, &g),
        Ok(Request::Discard {
            offset: 0,
            len: 16 * MIB
        })
    );
}

#[test]
fn a_flush_is_recognised_before_its_sector_fields_are_read() {
    let g = geo();
    // Linux 6.12: FLUSH with start_sector = u64::MAX and no sectors.
    assert_eq!(translate(OP_FLUSH, u64::MAX, 0, &g), Ok(Request::Flush));
    assert_eq!(translate(OP_FLUSH | F_FUA, 0, 0, &g), Ok(Request::Flush));
    // Even on a read-only device, a flush is harmless.
    let ro = Geometry {
        read_only: true,
        ..g
    };
    assert_eq!(translate(OP_FLUSH, u64::MAX, 0, &ro), Ok(Request::Flush));
}

#[test]
fn bad_descriptors_get_an_errno_and_never_reach_the_device() {
    let g = geo();
    let end = g.size / SECTOR;
    // Past the end: reads EINVAL, changes ENOSPC (the block layer's "no space").
    assert_eq!(translate(OP_READ, end, 8, &g), Err(-libc::EINVAL));
    assert_eq!(translate(OP_WRITE, end - 7, 8, &g), Err(-libc::ENOSPC));
    assert_eq!(translate(OP_DISCARD, end, 8, &g), Err(-libc::ENOSPC));
    // start_sector * 512 overflows.
    assert_eq!(translate(OP_READ, u64::MAX, 8, &g), Err(-libc::EINVAL));
    assert_eq!(
        translate(OP_WRITE, u64::MAX / 256, 8, &g),
        Err(-libc::EINVAL)
    );
    // Not on the logical block size.
    assert_eq!(translate(OP_WRITE, 1, 8, &g), Err(-libc::EINVAL));
    assert_eq!(translate(OP_READ, 0, 1, &g), Err(-libc::EINVAL));
    // Bigger than the tag's buffer.
    assert_eq!(translate(OP_READ, 0, 1032, &g), Err(-libc::EINVAL));
    // Ops we do not serve (WRITE_SAME, zone ops, anything unknown).
    for op in [4, 10, 13, 18, 0xff] {
        assert_eq!(translate(op, 0, 8, &g), Err(-libc::EOPNOTSUPP), "op {op}");
    }
    // Not advertised, so not honoured.
    let plain = Geometry {
        trim: false,
        write_zeroes: false,
        ..g
    };
    assert_eq!(translate(OP_DISCARD, 0, 8, &plain), Err(-libc::EOPNOTSUPP));
    assert_eq!(
        translate(OP_WRITE_ZEROES, 0, 8, &plain),
        Err(-libc::EOPNOTSUPP)
    );
    let ro = Geometry {
        read_only: true,
        ..g
    };
    for op in [OP_WRITE, OP_DISCARD, OP_WRITE_ZEROES] {
        assert_eq!(translate(op, 0, 8, &ro), Err(-libc::EROFS), "op {op}");
    }
    assert!(translate(OP_READ, 0, 8, &ro).is_ok());
}

#[tokio::test]
async fn requests_reach_the_device_with_their_flags_and_data() {
    let disk = MemDisk::new(16 * MIB);
    let mut buf = vec![0u8; 512 << 10];
    buf[..8192].fill(0x5A);
    assert_eq!(run(&disk, OP_WRITE | F_FUA, 8, 16, &mut buf).await, 8192);
    assert_eq!(run(&disk, OP_FLUSH, u64::MAX, 0, &mut buf).await, 0);
    assert_eq!(run(&disk, OP_DISCARD, 8, 8, &mut buf).await, 0);
    assert_eq!(run(&disk, OP_WRITE_ZEROES, 24, 8, &mut buf).await, 0);
    buf.fill(0xEE);
    assert_eq!(run(&disk, OP_READ, 0, 40, &mut buf).await, 20480);
    assert_eq!(&buf[..4096], &[0xAA; 4096][..], "block 0 untouched");
    assert_eq!(&buf[4096..8192], &[0; 4096][..], "block 1 discarded");
    assert_eq!(&buf[8192..12288], &[0x5A; 4096][..], "block 2 written");
    assert_eq!(&buf[12288..16384], &[0; 4096][..], "block 3 zeroed");
    assert_eq!(&buf[16384..20480], &[0xAA; 4096][..], "block 4 untouched");
    assert_eq!(&buf[20480..20488], &[0xEE; 8][..], "nothing past the read");
    assert_eq!(
        disk.calls(),
        [
            "write 4096+8192 fua=true",
            "flush",
            "trim 4096+4096",
            "write_zeroes 12288+4096 fua=false",
            "read 0+20480",
        ]
    );
    // A rejected descriptor never reaches the device.
    assert_eq!(run(&disk, OP_WRITE, 1, 8, &mut buf).await, -libc::EINVAL);
    assert_eq!(disk.calls().len(), 5);
}

#[tokio::test]
async fn device_errors_go_back_to_the_kernel_as_errnos() {
    let mut buf = vec![0u8; 512 << 10];
    for (code, expect) in [
        (libc::EIO, -libc::EIO),
        (libc::ENOSPC, -libc::ENOSPC),
        (libc::EDQUOT, -libc::ENOSPC),
        (libc::EBADF, -libc::EIO),
    ] {
        let disk = MemDisk {
            fail: Some(code),
            ..MemDisk::new(MIB)
        };
        assert_eq!(run(&disk, OP_WRITE, 0, 8, &mut buf).await, expect, "{code}");
        assert_eq!(run(&disk, OP_FLUSH, u64::MAX, 0, &mut buf).await, expect);
        assert_eq!(run(&disk, OP_READ, 0, 8, &mut buf).await, expect);
    }
    let read = Request::Read { offset: 0, len: 8 };
    let write = Request::Write {
        offset: 0,
        len: 8,
        fua: false,
    };
    let out = || BlockError::OutOfRange {
        offset: 0,
        len: 1,
        size: 0,
    };
    assert_eq!(errno_of(&out(), &read), libc::EINVAL);
    assert_eq!(errno_of(&out(), &write), libc::ENOSPC);
    assert_eq!(errno_of(&BlockError::ReadOnly, &write), libc::EROFS);
    assert_eq!(
        errno_of(&BlockError::NotSupported("x"), &Request::Flush),
        libc::EOPNOTSUPP
    );
}

#[test]
fn a_short_read_is_an_error_not_a_success() {
    let mut buf = vec![0u8; 8192];
    let read = Request::Read {
        offset: 0,
        len: 8192,
    };
    let short = Ok(Some(Bytes::from_static(&[1u8; 4096])));
    assert_eq!(completion(&read, short, &mut buf), -libc::EIO);
    let full = Ok(Some(Bytes::from(vec![7u8; 8192])));
    assert_eq!(completion(&read, full, &mut buf), 8192);
    assert_eq!(buf, vec![7u8; 8192]);
}

/// Descriptors through the primary core (the device `serve` hands the frontend), with an
/// in-memory primary and journal: each lands in the journal as the same operation. Only
/// this test touches the writer; the frontend's code never imports it.
#[tokio::test]
async fn through_the_primary_core_each_op_is_journaled_as_itself() {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::clock::SystemClock;
    use crate::journal::manifest::ManifestParams;
    use crate::journal::reader::{Cursor, JournalReader, Step};
    use crate::journal::{Manifest, Op};
    use crate::store::memory::MemoryStore;
    use crate::store::ObjectStore;
    use crate::writer::{AckMode, JournalSetup, Labels, PrimaryCore, WriterConfig};

    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let manifest = Manifest::new(
        &ManifestParams {
            device_name: "disk0".into(),
            size: 16 * MIB,
            block_size: 4096,
            region_size: 4 * MIB,
            splay_width: 4,
            segment_size: 256 << 10,
        },
        1,
    )
    .unwrap();
    manifest.create(store.as_ref()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let primary_path = dir.path().join("primary.img");
    std::fs::File::create(&primary_path)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let disk = Arc::new(MemDisk::new(16 * MIB));
    let setup = JournalSetup {
        store: store.clone(),
        manifest: manifest.clone(),
        writer: WriterConfig {
            linger: Duration::from_millis(10),
            ..WriterConfig::for_manifest(&manifest)
        },
        pool_size: 16 * MIB,
        ack: AckMode::parse("journal", None).unwrap(),
        clock: Arc::new(SystemClock),
        activity_log: Some(dir.path().join("primary.img.tinylag-al")),
        primary_path,
        member_paths: Vec::new(),
        abandon_after_hole: false,
        claim: Default::default(),
        on_fence: Default::default(),
        promotion: None,
    };
    let core = PrimaryCore::start(disk.clone(), Labels::default(), Some(setup))
        .await
        .unwrap();

    let g = geo();
    let mut buf = vec![0x3Cu8; 512 << 10];
    for (op_flags, sector, sectors) in [
        (OP_WRITE | F_FUA, 8, 16),
        (OP_FLUSH, u64::MAX, 0),
        (OP_DISCARD, 8, 8),
        (OP_WRITE_ZEROES, 24, 8),
        (OP_READ, 0, 40),
    ] {
        let request = translate(op_flags, sector, sectors, &g).unwrap();
        let payload = match request {
            Request::Write { len, .. } => Bytes::copy_from_slice(&buf[..len as usize]),
            _ => Bytes::new(),
        };
        let outcome = execute(&core, request, payload).await;
        assert!(completion(&request, outcome, &mut buf) >= 0, "{request:?}");
    }
    // The read came back through the core: untouched, discarded, written, zeroed blocks.
    assert_eq!(&buf[..4096], &[0xAA; 4096][..]);
    assert_eq!(&buf[4096..8192], &[0; 4096][..]);
    assert_eq!(&buf[8192..12288], &[0x3C; 4096][..]);
    assert_eq!(&buf[12288..16384], &[0; 4096][..]);
    let report = core.shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.durable_lsn, report.head_lsn);

    let reader = JournalReader::new(store, manifest);
    let mut cursor = Cursor {
        seq: 0,
        next_lsn: 1,
    };
    let mut ops = Vec::new();
    while let Step::Segment(s) = reader.step(&mut cursor).await.unwrap() {
        for r in s.records {
            match r.op {
                Op::Write { offset, data } => ops.push(format!("write {offset}+{}", data.len())),
                Op::Flush => ops.push("flush".into()),
                Op::Discard { offset, len } => ops.push(format!("discard {offset}+{len}")),
                Op::WriteZeroes { offset, len } => ops.push(format!("write_zeroes {offset}+{len}")),
                _ => {}
            }
        }
    }
    assert_eq!(
        ops,
        [
            "write 4096+8192",
            "flush",
            "discard 4096+4096",
            "write_zeroes 12288+4096",
        ]
    );
    // FUA reached the primary as FUA.
    assert_eq!(disk.calls()[0], "write 4096+8192 fua=true");
}
