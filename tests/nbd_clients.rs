//! The NBD server against real clients we did not write: qemu-io, nbdinfo, nbdcopy,
//! fio's nbd engine, and nbdfuse + a loop device + ext4.
//!
//! Every test serves file targets (`block::file::open`) on temp files from an in-process server and checks
//! the backing files themselves, not only what the client reports.

mod support;

use std::path::Path;
use std::process::Command;

use support::ext4::{NbdLoop, ReadOnlyMount};
use support::nbd::wire::*;
use support::nbd::*;
use support::procs::path;

const MIB: u64 = 1 << 20;

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

#[test]
fn qemu_io_writes_reads_discards_zeroes_and_flushes() {
    let size = 4 * MIB;
    let server = TestServer::start(&[ExportSpec::new("disk", size)]);
    let uri = server.uri("");
    let end = size - 4096;
    let write_end = format!("write -P 0x33 {end} 4k");
    let read_end = format!("read -P 0x33 {end} 4k");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Zeroes over data, and a discard over data, both read back as zeroes.
            "write -P 0x11 128k 64k",
            "write -z 128k 64k",
            "read -P 0 128k 64k",
            "write -P 0x22 256k 64k",
            "discard 256k 64k",
            "read -P 0 256k 64k",
            // FUA write, then a flush.
            "write -f -P 0x44 512k 8k",
            "flush",
            // The last block of the device.
            &write_end,
            &read_end,
            // 512-byte writes between existing data, and a 1-byte write that qemu turns
            // into a read-modify-write of one 512-byte block (the advertised minimum).
            "write -P 0x55 512 512",
            "read -P 0x55 512 512",
            "read -P 0xab 0 512",
            "read -P 0xab 1024 1024",
            "write -P 0x77 3000 1",
            "read -P 0x77 3000 1",
        ],
    );

    // A pattern read that does not match must fail, or the checks above prove nothing.
    let (ok, text) = qemu_io(&uri, &["read -P 0xcd 0 4k"]);
    assert!(!ok, "a wrong pattern read passed:\n{text}");
    // Past the end of the device.
    let past_end = format!("write -P 0x66 {size} 512");
    let (ok, text) = qemu_io(&uri, &[&past_end]);
    assert!(!ok, "a write past the end passed:\n{text}");

    // The backing file holds exactly what the client wrote.
    let image = read_file(&server.image("disk"));
    assert_eq!(image.len() as u64, size);
    let mut expected = vec![0u8; size as usize];
    expected[..64 << 10].fill(0xab);
    expected[512..1024].fill(0x55);
    expected[3000] = 0x77;
    expected[512 << 10..520 << 10].fill(0x44);
    expected[end as usize..].fill(0x33);
    assert!(
        image == expected,
        "backing file differs from what qemu-io wrote"
    );
}

#[test]
fn qemu_io_over_tcp() {
    let server = TestServer::start_tcp(&[ExportSpec::new("disk", 2 * MIB)]);
    let uri = server.uri("disk");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    qemu_io_ok(&uri, &["write -P 0x5a 1M 128k", "read -P 0x5a 1M 128k"]);
    let (ok, _) = qemu_io(&uri, &["read -P 0x5b 1M 4k"]);
    assert!(!ok, "a wrong pattern read passed over TCP");
    let image = read_file(&server.image("disk"));
    assert!(image[MIB as usize..][..128 << 10]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(image[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn nbdinfo_reports_size_block_sizes_flags_and_exports() {
    let server = TestServer::start(&[
        ExportSpec {
            description: "the main disk",
            ..ExportSpec::new("disk", 8 * MIB)
        },
        ExportSpec {
            read_only: true,
            block_size: 4096,
            description: "a frozen copy",
            ..ExportSpec::new("frozen", MIB)
        },
    ]);

    let json: serde_json::Value = serde_json::from_str(&stdout_of(
        Command::new("nbdinfo").args(["--json", &server.uri("")]),
    ))
    .expect("nbdinfo --json output");
    let disk = &json["exports"][0];
    assert_eq!(disk["export-name"], "disk");
    assert_eq!(disk["export-size"], 8 * MIB);
    assert_eq!(disk["block_size_minimum"], 512);
    assert_eq!(disk["block_size_preferred"], 4096);
    assert_eq!(disk["block_size_maximum"], 32 * MIB);
    for flag in [
        "can_trim",
        "can_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
    ] {
        assert_eq!(disk[flag], true, "{flag} in {disk}");
    }
    assert_eq!(disk["is_read_only"], false);
    assert_eq!(disk["description"], "the main disk");

    let json: serde_json::Value = serde_json::from_str(&stdout_of(
        Command::new("nbdinfo").args(["--json", &server.uri("frozen")]),
    ))
    .expect("nbdinfo --json output");
    let frozen = &json["exports"][0];
    assert_eq!(frozen["export-size"], MIB);
    assert_eq!(frozen["is_read_only"], true);
    assert_eq!(frozen["block_size_minimum"], 4096);
    assert_eq!(frozen["block_size_preferred"], 4096);
    assert_eq!(frozen["can_trim"], false);
    assert_eq!(frozen["can_zero"], false);

    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri("")]));
    for needle in [
        "export=\"disk\"",
        "export=\"frozen\"",
        "the main disk",
        "a frozen copy",
    ] {
        assert!(list.contains(needle), "{needle:?} missing from:\n{list}");
    }

    // An export that does not exist is refused with a message, not a hang.
    let out = run(
        Command::new("nbdinfo").arg(server.uri("nosuch")),
        CLIENT_TIMEOUT,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch"), "{err}");

    // Writing to the read-only export fails and changes nothing.
    let (ok, text) = qemu_io(&server.uri("frozen"), &["write -P 1 0 4k"]);
    assert!(!ok, "a write to a read-only export passed:\n{text}");
    // qemu sees READ_ONLY and refuses to open for writing: the flag reached the client.
    assert!(text.contains("Permission denied"), "{text}");
    assert!(read_file(&server.image("frozen")).iter().all(|&b| b == 0));
}

#[test]
fn nbdcopy_round_trips_64_mib_over_one_and_four_connections() {
    let size = 64 * MIB;
    let server = TestServer::start(&[ExportSpec::new("disk", size)]);
    let uri = server.uri("");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source.bin");
    let copied = work.path().join("copied.bin");

    // Random data in over one connection, out over four.
    let data = pattern(1, size as usize);
    std::fs::write(&source, &data).unwrap();
    run_ok(Command::new("nbdcopy").args(["--connections=1", path(&source), &uri]));
    run_ok(Command::new("nbdcopy").args(["--connections=4", &uri, path(&copied)]));
    assert!(
        read_file(&copied) == data,
        "copy out differs from the source"
    );
    assert!(read_file(&server.image("disk")) == data, "image differs");

    // New data with zeroed megabytes over the old: nbdcopy sends those as zero
    // requests, which must really zero what was there.
    let mut data = pattern(2, size as usize);
    for mib in [0, 5, 17, 40, 63] {
        data[mib * MIB as usize..][..MIB as usize].fill(0);
    }
    std::fs::write(&source, &data).unwrap();
    std::fs::remove_file(&copied).unwrap();
    run_ok(Command::new("nbdcopy").args(["--connections=4", "--flush", path(&source), &uri]));
    run_ok(Command::new("nbdcopy").args(["--connections=1", &uri, path(&copied)]));
    assert!(read_file(&copied) == data, "second copy out differs");
    assert!(read_file(&server.image("disk")) == data, "image differs");
}

#[test]
fn fio_nbd_engine_deep_queue_writes_and_verifies() {
    let server = TestServer::start(&[ExportSpec::new("disk", 16 * MIB)]);
    // fio drops verify state files into its working directory; keep them in the temp dir.
    let out = run_ok(Command::new("fio").current_dir(server.dir.path()).args([
        "--name=deep",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri("")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=1",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
    // Every block written, then every block read back and verified.
    assert!(
        text.contains("issued rwts: total=4096,4096,"),
        "fio did not write and verify all 4096 blocks:\n{text}"
    );
    // The queue really was deep: most I/O was submitted at depth 32.
    let depth32 = text
        .lines()
        .find(|l| l.contains("IO depths"))
        .and_then(|l| l.split("32=").nth(1))
        .and_then(|v| v.split('%').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no IO depths line:\n{text}"));
    assert!(
        depth32 > 90.0,
        "only {depth32}% of I/O at depth 32:\n{text}"
    );
    // fio really wrote through us: the image is no longer all zeroes.
    let image = read_file(&server.image("disk"));
    let written = image
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert!(written > 1000, "only {written} blocks written");
}

/// ext4 on a loop device on an nbdfuse file on our server: mkfs, copy a tree in, unmount,
/// then check the backing image with e2fsck and by reading the files back.
#[test]
fn ext4_through_nbdfuse_and_a_loop_device() {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let server = TestServer::start(&[ExportSpec::new("disk", 64 * MIB)]);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let files = make_tree(&tree);
    let mut disk = NbdLoop::attach(&server.uri(""), work.path());
    assert_eq!(std::fs::metadata(&disk.file).unwrap().len(), 64 * MIB);
    let mnt = disk.mnt.clone();
    disk.mkfs_ext4();
    disk.mount();
    run_ok(Command::new("cp").args(["-a", &format!("{}/.", path(&tree)), path(&mnt)]));
    run_ok(Command::new("sync").arg("-f").arg(path(&mnt)));
    disk.finish();

    // The image as the server wrote it: a copy goes to e2fsck, which repairs what it
    // checks; the original is mounted read-only and compared file by file.
    if let Err(verdict) = support::verdict::judge_ext4(&server.image("disk")) {
        panic!("e2fsck judged the image corrupt:\n{verdict}");
    }
    let image = server.image("disk");
    let mounted = ReadOnlyMount::new(&image, &mnt);
    for (rel, content) in &files {
        let got = read_file(&mnt.join(rel));
        assert!(got == *content, "{rel} differs after the round trip");
    }
    mounted.unmount();
}

/// A few MiB of files in nested directories; returns (relative path, content).
fn make_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for d in 0..4 {
        for s in 0..3 {
            let dir = root.join(format!("dir{d}/sub{s}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..5u64 {
                let seed = (d * 100 + s * 10) as u64 + f;
                let len = 1000 + (seed * 7919 % 200) as usize * 1024;
                let content = pattern(seed + 10, len);
                let rel = format!("dir{d}/sub{s}/file{f}.bin");
                std::fs::write(root.join(&rel), &content).unwrap();
                files.push((rel, content));
            }
        }
    }
    files
}

/// A real block device (a loop device) as the target: size from `BLKGETSIZE64`,
/// discard through `BLKDISCARD`, zeroes through `fallocate` on the device.
#[test]
fn block_device_target_served_over_nbd() {
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: loop devices are absent on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::write(&backing, pattern(7, 8 * MIB as usize)).unwrap();
    let loop_dev = stdout_of(Command::new("losetup").args(["-f", "--show", path(&backing)]))
        .trim()
        .to_owned();
    let mut cleanup = Cleanup::default();
    cleanup.detach_loop(&loop_dev);

    let device = tinylag::block::file::open(
        Path::new(&loop_dev),
        tinylag::block::file::FileOptions::new(512),
    )
    .expect("open the loop device");
    assert_eq!(device.info().size, 8 * MIB);
    let server = TestServer::serve_exports(
        tempfile::tempdir().unwrap(),
        vec![tinylag::nbd::Export {
            name: "dev".into(),
            description: String::new(),
            device,
        }],
        None,
    );
    let uri = server.uri("");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "write -z 1M 128k",
            "read -P 0 1M 128k",
            "discard 2M 64k",
            "flush",
            "read -P 0xab 0 64k",
        ],
    );
    let info: serde_json::Value =
        serde_json::from_str(&stdout_of(Command::new("nbdinfo").args(["--json", &uri]))).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 8 * MIB);
    drop(server);
    cleanup.run_last();

    // The loop device wrote through to its backing file.
    let image = read_file(&backing);
    let original = pattern(7, 8 * MIB as usize);
    assert!(image[..64 << 10].iter().all(|&b| b == 0xab));
    assert!(image[MIB as usize..][..128 << 10].iter().all(|&b| b == 0));
    assert!(image[64 << 10..MIB as usize] == original[64 << 10..MIB as usize]);
    assert!(image[3 * MIB as usize..] == original[3 * MIB as usize..]);
}

/// Shutdown closes idle and half-negotiated connections, returns promptly, and frees
/// the socket path for a successor.
#[test]
fn shutdown_closes_connections_and_frees_the_socket() {
    let mut server = TestServer::start(&[ExportSpec::new("disk", MIB)]);
    let socket = server.socket().to_owned();
    let (mut idle, _, _) = RawClient::go(&socket, "");
    idle.write(0, &[1; 512]);
    let mut negotiating = RawClient::connect(&socket);
    negotiating.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let started = std::time::Instant::now();
    server.stop(std::time::Duration::from_secs(5));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    idle.expect_closed();
    negotiating.expect_closed();
    // The temp directory is still there; only the socket is gone.
    assert!(server.image("disk").exists());
    assert!(!socket.exists(), "socket file left behind");
    // A successor binds the same path.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = tinylag::nbd::ListenAddr::Unix(socket.clone());
    let successor = rt
        .block_on(tinylag::nbd::bind(&addr))
        .expect("successor binds");
    drop(successor);
}
