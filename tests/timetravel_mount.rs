//! `tinylag mount --at`: the disk as of a point, served over NBD at once. Checked with real
//! clients against `tinylag restore` of the same point (qemu-img compare, nbdcopy), going
//! back through the undo log and forward on a delayed replica; writes are refused without
//! `--writable` and land in the scratch file with it; an ext4 filesystem mounted read-only
//! through nbdfuse + a loop device shows the files of the phase; and a replay agent applying
//! beside the mount does not change what it shows.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::nbd::{
    pattern, qemu_io, qemu_io_ok, run_ok as run_cmd, ChildGuard, Cleanup, CLIENT_TIMEOUT,
};
use support::procs::{self, wait_for_path};
use support::replay::{file_hash, now_ns, replay_args, run_ok, spawn, tinylag, TestJournal};
use support::timetravel::{assert_phase, phase, Model, Mount, PhaseEnd, SEC};
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::Op;

const SIZE: u64 = 16 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn base_time() -> u64 {
    (now_ns() - 7200 * SEC) / SEC * SEC
}

fn restore(journal: &TestJournal, replica: &Path, point: &[&str], out: &Path) {
    let mut args = vec![
        "restore".to_string(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(replica),
        "--output".into(),
        s(out),
    ];
    args.extend(point.iter().map(|p| p.to_string()));
    run_ok(&args);
}

async fn phases(journal: &mut TestJournal, t0: u64, n: usize) -> Vec<PhaseEnd> {
    let mut model = Model::new(SIZE);
    let mut ends = Vec::new();
    for i in 0..n {
        ends.push(
            phase(
                journal,
                &mut model,
                &format!("p{}", i + 1),
                t0 + 60 * SEC * i as u64,
                3,
                20,
            )
            .await,
        );
    }
    ends
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_at_every_point_serves_what_restore_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 11).await;
    let t0 = base_time();
    let ends = phases(&mut journal, t0, 3).await;
    // One replica at the head (back through undo), one delayed at phase 1 (forward).
    let head = dir.path().join("head.img");
    run_ok(&{
        let mut a = replay_args(journal.uri(), &head, "head");
        a.push("--once".into());
        a
    });
    let delayed = dir.path().join("delayed.img");
    run_ok(&{
        let mut a = replay_args(journal.uri(), &delayed, "delayed");
        a.extend(["--until".into(), ends[0].at()]);
        a
    });
    let hashes = (file_hash(&head), file_hash(&delayed));
    for replica in [&head, &delayed] {
        for end in &ends {
            let restored = dir.path().join("restored.img");
            let _ = std::fs::remove_file(&restored);
            restore(&journal, replica, &["--mark", &end.mark], &restored);
            assert_phase(&restored, end, "restore");
            let mount = Mount::start(&journal, replica, &["--mark", &end.mark], &[], dir.path());
            run_cmd(Command::new("qemu-img").args([
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &s(&restored),
                &mount.uri(),
            ]));
            let served = dir.path().join("served.img");
            mount.copy_to(&served);
            assert_phase(
                &served,
                end,
                &format!("mount --mark {} of {}", end.mark, s(replica)),
            );
            mount.stop();
            // And by time.
            let mount = Mount::start(&journal, replica, &["--at", &end.at()], &[], dir.path());
            mount.copy_to(&served);
            assert_phase(
                &served,
                end,
                &format!("mount --at {} of {}", end.at(), s(replica)),
            );
            mount.stop();
        }
    }
    assert_eq!(
        (file_hash(&head), file_hash(&delayed)),
        hashes,
        "a mount wrote to a replica"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_need_writable_and_land_in_the_scratch_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 12).await;
    let ends = phases(&mut journal, base_time(), 2).await;
    let replica = dir.path().join("replica.img");
    run_ok(&{
        let mut a = replay_args(journal.uri(), &replica, "dr");
        a.push("--once".into());
        a
    });
    let replica_hash = file_hash(&replica);

    let mount = Mount::start(&journal, &replica, &["--mark", "p1"], &[], dir.path());
    let (ok, text) = qemu_io(&mount.uri(), &["write -P 0x55 0 4k"]);
    assert!(!ok, "a write to a read-only mount succeeded: {text}");
    let served = dir.path().join("served.img");
    mount.copy_to(&served);
    assert_phase(&served, &ends[0], "after the refused write");
    mount.stop();

    let scratch = dir.path().join("scratch.img");
    let mount = Mount::start(
        &journal,
        &replica,
        &["--mark", "p1"],
        &["--writable", &s(&scratch)],
        dir.path(),
    );
    qemu_io_ok(&mount.uri(), &["write -P 0x55 4096 8k", "write -z 1M 64k"]);
    let out = qemu_io_ok(&mount.uri(), &["read -P 0x55 4096 8k", "read -P 0 1M 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    mount.copy_to(&served);
    let got = std::fs::read(&served).unwrap();
    assert!(got[4096..12288].iter().all(|&b| b == 0x55));
    assert!(got[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0));
    // Outside the writes, still phase 1.
    let restored = dir.path().join("p1.img");
    restore(&journal, &replica, &["--mark", "p1"], &restored);
    let want = std::fs::read(&restored).unwrap();
    assert_eq!(&got[..4096], &want[..4096]);
    assert_eq!(&got[12288..1 << 20], &want[12288..1 << 20]);
    assert_eq!(&got[(1 << 20) + 65536..], &want[(1 << 20) + 65536..]);
    mount.stop();
    assert_eq!(
        file_hash(&replica),
        replica_hash,
        "a writable mount wrote to the replica"
    );
    // An existing scratch file is refused.
    let mut cmd = tinylag();
    cmd.args([
        "mount",
        "--journal",
        journal.uri(),
        "--replica",
        &s(&replica),
        "--mark",
        "p1",
        "--writable",
        &s(&scratch),
        "--listen",
        &format!("unix:{}", s(&dir.path().join("x.sock"))),
    ]);
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--writable"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_agent_beside_the_mount_does_not_change_what_it_shows() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 13).await;
    let t0 = base_time();
    let mut model = Model::new(SIZE);
    let _p1 = phase(&mut journal, &mut model, "p1", t0, 3, 20).await;
    let p2 = phase(&mut journal, &mut model, "p2", t0 + 60 * SEC, 3, 20).await;
    let replica = dir.path().join("replica.img");
    run_ok(&{
        let mut a = replay_args(journal.uri(), &replica, "dr");
        a.push("--once".into());
        a
    });
    let p3 = phase(&mut journal, &mut model, "p3", t0 + 120 * SEC, 150, 8).await;
    let mount = Mount::start(&journal, &replica, &["--mark", "p2"], &[], dir.path());
    let mut args = replay_args(journal.uri(), &replica, "dr");
    args.extend(["--batch-records".into(), "4".into()]);
    let mut agent = spawn(&args, &dir.path().join("replay.log"));
    let served = dir.path().join("served.img");
    let (mut rounds, mut overlapped) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let before = journal.position("dr").await.applied_lsn;
        mount.copy_to(&served);
        assert_phase(
            &served,
            &p2,
            &format!("round {rounds} while replay applies"),
        );
        let after = journal.position("dr").await.applied_lsn;
        rounds += 1;
        overlapped += usize::from(after > before);
        if after >= p3.lsn || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        overlapped > 0,
        "no read ran while the agent applied ({rounds} rounds)"
    );
    agent.terminate(Duration::from_secs(10)).unwrap();
    mount.copy_to(&served);
    assert_phase(&served, &p2, "after replay caught up");
    mount.stop();
}

/// The mount skips its undo probe while the undo log's generation file says what it said at
/// the last probe, so it must stop trusting a file that can no longer change: here the file it
/// holds is moved aside (as a replaced or copied-over directory leaves it), then an agent writes
/// new undo segments and applies p3 to the replica (publishing in a new file). A mount that
/// kept trusting the file it held would skip the probe and serve p3's bytes from the replica.
#[tokio::test(flavor = "multi_thread")]
async fn a_mount_never_trusts_a_generation_file_that_was_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 17).await;
    let t0 = base_time();
    let mut model = Model::new(SIZE);
    let _p1 = phase(&mut journal, &mut model, "p1", t0, 3, 20).await;
    let p2 = phase(&mut journal, &mut model, "p2", t0 + 60 * SEC, 3, 20).await;
    let replica = dir.path().join("replica.img");
    let once = |uri: &str| {
        let mut a = replay_args(uri, &replica, "dr");
        a.push("--once".into());
        a
    };
    run_ok(&once(journal.uri()));
    let p3 = phase(&mut journal, &mut model, "p3", t0 + 120 * SEC, 20, 8).await;
    let mount = Mount::start(&journal, &replica, &["--mark", "p2"], &[], dir.path());
    let served = dir.path().join("served.img");
    // The first reads probe and trust the stamp they read before it.
    mount.copy_to(&served);
    assert_phase(&served, &p2, "before the agent runs again");
    let undo = dir.path().join("replica.img.undo");
    let published = undo.join("generation");
    assert!(published.exists(), "the agent published no generation");
    std::fs::rename(&published, undo.join("generation.moved")).unwrap();
    run_ok(&once(journal.uri()));
    assert_eq!(journal.position("dr").await.applied_lsn, p3.lsn);
    assert!(published.exists(), "the agent did not publish again");
    mount.copy_to(&served);
    assert_phase(
        &served,
        &p2,
        "after an agent applied p3 behind a generation file moved aside",
    );
    mount.stop();
}

/// Writes `image` over the model's current image as the journal's next phase: a WRITE for
/// every changed 64 KiB chunk (WRITE_ZEROES where it became zero), then a MARK.
async fn phase_from_image(
    journal: &mut TestJournal,
    model: &mut Model,
    image: &[u8],
    name: &str,
    time_ns: u64,
) -> PhaseEnd {
    const CHUNK: usize = 64 << 10;
    let mut ops = Vec::new();
    for (i, chunk) in image.chunks(CHUNK).enumerate() {
        let offset = (i * CHUNK) as u64;
        if model.image[i * CHUNK..i * CHUNK + chunk.len()] == *chunk {
            continue;
        }
        let op = if chunk.iter().all(|&b| b == 0) {
            Op::WriteZeroes {
                offset,
                len: chunk.len() as u64,
            }
        } else {
            Op::Write {
                offset,
                data: bytes::Bytes::copy_from_slice(chunk),
            }
        };
        model.apply(&op);
        ops.push(op);
    }
    for group in ops.chunks(32) {
        journal.append_at(group.to_vec(), time_ns).await;
    }
    let lsns = journal
        .append_at(vec![Op::Mark { name: name.into() }], time_ns)
        .await;
    let point = MarkPoint {
        name: name.into(),
        lsn: lsns.start,
        timestamp_ns: time_ns,
    };
    mark::create(journal.store.as_ref(), &point).await.unwrap();
    PhaseEnd {
        mark: name.into(),
        lsn: lsns.start,
        time_ns,
        hash: model.hash(),
    }
}

/// An ext4 image of `size` bytes holding `files` (made with mkfs.ext4 -d, no mount needed).
fn ext4_image(dir: &Path, name: &str, size: u64, files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let tree = dir.join(format!("{name}-tree"));
    for (rel, content) in files {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let image = dir.join(format!("{name}.ext4"));
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    run_cmd(Command::new("mkfs.ext4").args(["-q", "-b", "4096", "-d", &s(&tree), &s(&image)]));
    std::fs::read(&image).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ext4_through_nbdfuse_and_a_loop_device_shows_the_phase_files() {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    const FS: u64 = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut journal =
        TestJournal::create_with_block_size(&dir.path().join("journal"), FS, 14, 512).await;
    let t0 = base_time();
    let v1: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("a/file{i}.bin"),
                pattern(100 + i, 50_000 + i as usize * 3000),
            )
        })
        .collect();
    let v2: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("b/other{i}.bin"), pattern(200 + i, 80_000)))
        .collect();
    let img1 = ext4_image(dir.path(), "v1", FS, &v1);
    let img2 = ext4_image(dir.path(), "v2", FS, &v2);
    let mut model = Model::new(FS);
    let p1 = phase_from_image(&mut journal, &mut model, &img1, "v1", t0).await;
    let _p2 = phase_from_image(&mut journal, &mut model, &img2, "v2", t0 + 60 * SEC).await;
    let replica = dir.path().join("replica.img");
    run_ok(&{
        let mut a = replay_args(journal.uri(), &replica, "dr");
        a.push("--once".into());
        a
    });
    assert_eq!(std::fs::read(&replica).unwrap(), img2);

    let mount = Mount::start(&journal, &replica, &["--mark", &p1.mark], &[], dir.path());
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("nbdfuse.pid");
    let nbd_file = fuse_dir.join("nbd");
    let nbdfuse = ChildGuard::spawn(Command::new("nbdfuse").args([
        "-r",
        "-P",
        &s(&pidfile),
        &s(&nbd_file),
        &mount.uri(),
    ]));
    let mut cleanup = Cleanup::default();
    cleanup.unmount_fuse(&fuse_dir);
    wait_for_path(&pidfile, Duration::from_secs(30)).unwrap();
    let out = run_cmd(Command::new("losetup").args(["-r", "-f", "--show", &s(&nbd_file)]));
    let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    cleanup.detach_loop(&loop_dev);
    cleanup.unmount(&mnt);
    run_cmd(Command::new("mount").args(["-t", "ext4", "-o", "ro,noload", &loop_dev, &s(&mnt)]));
    for (rel, content) in &v1 {
        let got = std::fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(got == *content, "{rel} differs in the mounted phase");
    }
    for (rel, _) in &v2 {
        assert!(!mnt.join(rel).exists(), "{rel} of the later phase shows");
    }
    cleanup.run_all(); // umount, losetup -d, fusermount3 -u
    let exited = nbdfuse.wait(CLIENT_TIMEOUT);
    assert!(
        exited.status.success(),
        "nbdfuse exited with {}",
        exited.status
    );
    mount.stop();
}

/// Over TCP the mount has the same door as `serve`: plaintext on an address other hosts reach
/// is refused before anything is opened, and with `--tls require` a TLS client (nbdcopy over
/// `nbds://`) reads the past disk while a plaintext one is turned away.
#[tokio::test(flavor = "multi_thread")]
async fn over_tcp_the_past_needs_tls_like_the_present() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 13).await;
    let ends = phases(&mut journal, base_time(), 2).await;

    // Refused before the replica is looked at (there is none yet).
    let missing = dir.path().join("no-such-replica.img");
    let out = tinylag()
        .args([
            "mount",
            "--journal",
            journal.uri(),
            "--replica",
            &s(&missing),
        ])
        .args(["--mark", "p1", "--listen", "tcp:0.0.0.0:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--insecure-no-tls") && !stderr.contains("no-such-replica"),
        "{stderr}"
    );

    let replica = dir.path().join("replica.img");
    run_ok(&{
        let mut a = replay_args(journal.uri(), &replica, "dr");
        a.push("--once".into());
        a
    });
    let ca = support::tls::Ca::new(&dir.path().join("pki"), "mount");
    let srv = ca.server_dir(&dir.path().join("server"), 2);
    let cli = ca.client_dir(&dir.path().join("client"), None);
    let port = procs::free_port();
    let mut cmd = tinylag();
    cmd.args([
        "mount",
        "--journal",
        journal.uri(),
        "--replica",
        &s(&replica),
    ])
    .args(["--mark", "p1", "--listen", &format!("tcp:127.0.0.1:{port}")])
    .args(["--tls", "require", "--tls-certificates", &s(&srv)]);
    let mut guard =
        procs::ChildGuard::spawn_logged("tinylag mount", &mut cmd, &dir.path().join("tls.log"))
            .unwrap();
    guard
        .wait_for_port(port, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let served = dir.path().join("served.img");
    run_cmd(Command::new("nbdcopy").args([
        &format!("nbds://127.0.0.1:{port}/disk0?tls-certificates={}", s(&cli)),
        &s(&served),
    ]));
    assert_phase(&served, &ends[0], "mount --mark p1 over TLS");
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/disk0"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plaintext client was served");
    guard.terminate(Duration::from_secs(10)).unwrap();
    assert!(
        guard.log_tail(4000).contains("tls require"),
        "{}",
        guard.log_tail(4000)
    );
}
