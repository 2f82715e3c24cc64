//! NBD block status with clients we did not write: `nbdinfo --map` and `qemu-img map` on
//! `serve`'s sparse primary agree with the file's own SEEK_DATA/SEEK_HOLE map (found here
//! with lseek, not with the server's code); `nbdcopy` of a sparse 1 GiB disk holding 10 MiB
//! makes the server read about 10 MiB; on `mount --at` the map follows the point's
//! writes, discards and holes, and `mount --changes-since` offers the writes between two
//! marks as `qemu:dirty-bitmap:<mark>`.

mod support;

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::daemon::{init, Daemon};
use support::nbd::wire::*;
use support::nbd::{run_ok, ExportSpec, RawClient, TestServer};
use support::oracle::assert_same_image;
use support::replay::{now_ns, replay_args, run_ok as tinylag_ok, TestJournal};
use support::timetravel::{Mount, SEC};
use tinylag::clock::format_ns;
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::Op;

const MIB: u64 = 1 << 20;

/// (offset, length, hole) runs, adjacent runs of the same kind merged.
type Map = Vec<(u64, u64, bool)>;

fn merge(runs: impl IntoIterator<Item = (u64, u64, bool)>) -> Map {
    let mut out: Map = Vec::new();
    for (offset, len, hole) in runs {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == hole && last.0 + last.1 == offset => last.1 += len,
            _ => out.push((offset, len, hole)),
        }
    }
    out
}

/// The file's data and holes from SEEK_DATA/SEEK_HOLE, walked here independently.
fn seek_map(path: &Path) -> Map {
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let seek = |at: u64, whence| {
        // SAFETY: lseek reads only its integer arguments on a descriptor `file` keeps open.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            size // ENXIO: nothing more of that kind before the end.
        } else {
            r as u64
        }
    };
    let mut runs = Vec::new();
    let mut at = 0;
    while at < size {
        let data = seek(at, libc::SEEK_DATA).min(size);
        runs.push((at, data - at, true));
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE).min(size);
        runs.push((data, hole - data, false));
        at = hole;
    }
    merge(runs)
}

/// `nbdinfo --map[=CONTEXT] --json`: (offset, length, type) of every extent.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run_ok(Command::new("nbdinfo").args([&map, "--json", uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `nbdinfo --map` of `base:allocation` as a [`Map`]: a hole must also read as zero.
fn allocation_map(uri: &str) -> Map {
    merge(nbdinfo_map(uri, None).into_iter().map(|(o, l, t)| {
        assert!(
            t == 0 || t == 3,
            "extent type {t} at {o}: expected data or hole,zero"
        );
        (o, l, t == 3)
    }))
}

/// `qemu-img map --output=json` over NBD as a [`Map`] (not data = hole).
fn qemu_img_map(uri: &str) -> Map {
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    merge(v.as_array().unwrap().iter().map(|e| {
        let data = e["data"].as_bool().unwrap();
        if !data {
            assert_eq!(e["zero"], true, "a hole that does not read as zero: {e}");
        }
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            !data,
        )
    }))
}

fn holes_and_data(map: &Map) -> (u64, u64) {
    map.iter().fold(
        (0, 0),
        |(h, d), &(_, len, hole)| {
            if hole {
                (h + len, d)
            } else {
                (h, d + len)
            }
        },
    )
}

#[test]
fn maps_of_a_sparse_primary_are_its_seek_data_map() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal").display().to_string();
    init(&journal, &primary, "64M", &[], &[]);
    let daemon = Daemon::start(&primary, &journal, &[], &[]);
    let uri = daemon.uri();
    support::nbd::qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 8M 64k",
            "write -P 0x11 20M 4k",
            "write -z 30M 1M",
            "write -P 0x22 40M 2M",
            "discard 40M 1M",
            "flush",
        ],
    );
    let expected = seek_map(&primary);
    let (holes, data) = holes_and_data(&expected);
    assert!(
        holes >= 50 * MIB && data >= 2 * MIB,
        "the primary is not sparse here: {expected:?}"
    );
    assert_eq!(allocation_map(&uri), expected, "nbdinfo --map");
    assert_eq!(qemu_img_map(&uri), expected, "qemu-img map");
}

#[test]
fn nbdcopy_of_a_sparse_gigabyte_reads_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal").display().to_string();
    init(&journal, &primary, "1G", &[], &[]);
    let daemon = Daemon::start(&primary, &journal, &[], &[]);
    let uri = daemon.uri();
    let writes: Vec<String> = (0..10)
        .map(|i| format!("write -P {} {}M 1M", 0x10 + i, 3 + i * 100))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    support::nbd::qemu_io_ok(&uri, &writes);
    let read_bytes = || daemon.status()["io"]["bytes_read"].as_u64().unwrap();
    let before = read_bytes();
    let copy = dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").args([&uri, &copy.display().to_string()]));
    let moved = read_bytes() - before;
    assert!(
        (10 * MIB..=12 * MIB).contains(&moved),
        "nbdcopy made the server read {moved} bytes for 10 MiB of data"
    );
    assert_same_image(&copy, &primary);
}

#[test]
fn a_fragmented_export_is_mapped_in_bounded_replies() {
    // Data in every other 4 KiB block of 40 MiB: 10240 data extents and as many holes,
    // more than one reply may carry (8192 descriptors).
    const SIZE: u64 = 40 * MIB;
    let server = TestServer::start(&[ExportSpec::new("frag", SIZE)]);
    let image = server.image("frag");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        for block in (0..SIZE / 4096).step_by(2) {
            file.write_all_at(&[0x5a; 4096], block * 4096).unwrap();
        }
        file.sync_all().unwrap();
    }
    let expected = seek_map(&image);
    assert!(
        expected.len() > 8192,
        "the filesystem merged the holes away"
    );

    let mut c = RawClient::connect(server.socket());
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.meta_context(OPT_SET_META_CONTEXT, "frag", &["base:allocation"])
        .unwrap();
    c.info_or_go(OPT_GO, "frag", &[]).unwrap();
    c.request(0, CMD_BLOCK_STATUS, 1, 0, SIZE as u32, &[]);
    let (_, chunk_type, _, payload) = c.chunk();
    assert_eq!(chunk_type, REPLY_TYPE_BLOCK_STATUS);
    let descriptors = (payload.len() - 4) / 8;
    assert_eq!(descriptors, 8192, "one reply is bounded, and full");
    // nbdinfo asks again from where each reply ended and sees every extent.
    assert_eq!(allocation_map(&server.uri("frag")), expected);
}

/// Appends `ops` at `time_ns`, then a mark named `name`.
async fn marked(journal: &mut TestJournal, ops: Vec<Op>, time_ns: u64, name: &str) {
    journal.append_at(ops, time_ns).await;
    let lsns = journal
        .append_at(vec![Op::Mark { name: name.into() }], time_ns)
        .await;
    let point = MarkPoint {
        name: name.into(),
        lsn: lsns.start,
        timestamp_ns: time_ns,
    };
    mark::create(journal.store.as_ref(), &point).await.unwrap();
}

fn write(journal: &mut TestJournal, offset: u64, len: u64) -> Op {
    Op::Write {
        offset,
        data: journal.data(len as usize),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_maps_the_points_holes_and_its_changes_as_a_dirty_bitmap() {
    const SIZE: u64 = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 21).await;
    let t0 = (now_ns() - 7200 * SEC) / SEC * SEC;
    let p1 = vec![
        write(&mut journal, 0, MIB),
        write(&mut journal, 4 * MIB, MIB),
    ];
    marked(&mut journal, p1, t0, "p1").await;
    let p2 = vec![
        Op::Discard {
            offset: 4 * MIB,
            len: MIB,
        },
        write(&mut journal, 8 * MIB, MIB),
        Op::WriteZeroes {
            offset: 12 * MIB,
            len: MIB,
        },
    ];
    marked(&mut journal, p2, t0 + 60 * SEC, "p2").await;
    let p3 = vec![write(&mut journal, 2 * MIB, 64 << 10)];
    marked(&mut journal, p3, t0 + 120 * SEC, "p3").await;
    // A replica at the head: p1 is served back through the undo log.
    let replica = dir.path().join("replica.img");
    tinylag_ok(&{
        let mut a = replay_args(journal.uri(), &replica, "head");
        a.push("--once".into());
        a
    });

    // As of p1: data where p1 wrote, holes everywhere else, though the replica now holds
    // data at 8M and 2M (their pre-images were holes) and none at 4M (discarded later).
    let mount = Mount::start(&journal, &replica, &["--mark", "p1"], &[], dir.path());
    let expected = vec![
        (0, MIB, false),
        (MIB, 3 * MIB, true),
        (4 * MIB, MIB, false),
        (5 * MIB, 11 * MIB, true),
    ];
    assert_eq!(allocation_map(&mount.uri()), expected, "nbdinfo --map");
    assert_eq!(qemu_img_map(&mount.uri()), expected, "qemu-img map");
    // And nbdcopy through block status writes the image restore writes.
    let served = dir.path().join("served.img");
    mount.copy_to(&served);
    let restored = dir.path().join("restored.img");
    tinylag_ok(&[
        "restore".into(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        replica.display().to_string(),
        "--mark".into(),
        "p1".into(),
        "--output".into(),
        restored.display().to_string(),
    ]);
    assert_same_image(&served, &restored);
    mount.stop();

    // As of p3, with the changes since p1: exactly what p2 and p3 wrote, discarded or
    // zeroed, merged and sorted.
    let mount = Mount::start(
        &journal,
        &replica,
        &["--mark", "p3"],
        &["--changes-since", "p1"],
        dir.path(),
    );
    let written_since_p1 = [
        (2 * MIB, 64 << 10),
        (4 * MIB, MIB),
        (8 * MIB, MIB),
        (12 * MIB, MIB),
    ];
    assert_eq!(dirty_extents(&mount.uri(), "p1"), written_since_p1);
    // ... and exactly what `tinylag diff` lists for the same two marks.
    let diff = tinylag_ok(&[
        "diff".into(),
        "--journal".into(),
        journal.uri().into(),
        "--from".into(),
        "p1".into(),
        "--to".into(),
        "p3".into(),
        "--json".into(),
    ]);
    let diff: serde_json::Value = serde_json::from_slice(&diff.stdout).expect("diff --json");
    let listed: Vec<(u64, u64)> = diff["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        dirty_extents(&mount.uri(), "p1"),
        listed,
        "nbdinfo --map=qemu:dirty-bitmap:p1 against tinylag diff --from p1 --to p3"
    );
    // qemu's NBD client reads the same bitmap with x-dirty-bitmap (it then reports dirty
    // extents as "data": false, the layout qemu's own incremental backup tests use).
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk0,x-dirty-bitmap=qemu:dirty-bitmap:p1",
        mount.socket.display()
    );
    let out =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dirty: Vec<(u64, u64)> = merge(v.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            !e["data"].as_bool().unwrap(),
        )
    }))
    .into_iter()
    .filter(|r| r.2)
    .map(|(o, l, _)| (o, l))
    .collect();
    assert_eq!(dirty, written_since_p1, "qemu-img map with x-dirty-bitmap");
    // base:allocation is still offered beside it.
    // (p3's data; p2's discard and zeroes are holes.)
    let p3 = 2 * MIB + (64 << 10);
    assert_eq!(
        allocation_map(&mount.uri()),
        [
            (0, MIB, false),
            (MIB, MIB, true),
            (2 * MIB, 64 << 10, false),
            (p3, 8 * MIB - p3, true),
            (8 * MIB, MIB, false),
            (9 * MIB, 7 * MIB, true)
        ]
    );
    // Listing the contexts shows both.
    let out = run_ok(Command::new("nbdinfo").args(["--json", &mount.uri()]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let contexts = &info["exports"][0]["contexts"];
    assert_eq!(
        contexts,
        &serde_json::json!(["base:allocation", "qemu:dirty-bitmap:p1"]),
        "{info:#}"
    );
    mount.stop();

    // A time between p1 and p2 names the same changes, as the bitmap "changes".
    let mount = Mount::start(
        &journal,
        &replica,
        &["--mark", "p3"],
        &["--changes-since", &format_ns(t0 + SEC)],
        dir.path(),
    );
    assert_eq!(dirty_extents(&mount.uri(), "changes"), written_since_p1);
    mount.stop();

    // A mark that does not exist is one clear error, before anything is served.
    let out = tinylag_cmd_fails(&journal, &replica, dir.path());
    assert!(out.contains("nosuch"), "{out}");
}

/// The dirty extents `nbdinfo --map=qemu:dirty-bitmap:NAME` lists: (offset, length).
fn dirty_extents(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let context = format!("qemu:dirty-bitmap:{bitmap}");
    nbdinfo_map(uri, Some(&context))
        .into_iter()
        .filter(|&(_, _, t)| t & 1 == 1)
        .map(|(o, l, _)| (o, l))
        .collect()
}

/// `mount --changes-since nosuch`: must fail; returns its stderr.
fn tinylag_cmd_fails(journal: &TestJournal, replica: &Path, dir: &Path) -> String {
    let mut cmd = support::replay::tinylag();
    cmd.args([
        "mount",
        "--journal",
        journal.uri(),
        "--replica",
        &replica.display().to_string(),
        "--mark",
        "p3",
        "--changes-since",
        "nosuch",
        "--listen",
        &format!("unix:{}", dir.join("bad.sock").display()),
    ]);
    let out = support::nbd::run(&mut cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    err
}
