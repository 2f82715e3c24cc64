//! `mount --at|--mark --replica URI` (issue 24): a point of an object replica served lazily
//! over NBD through a bounded local cache, read by real clients (nbdcopy, qemu-io) and
//! compared with the journal's own image there (the oracle): random marks on a local store
//! and on s3s-fs; a full read of an image larger than the cache never lets the cache
//! directory pass its cap; compaction and trim deleting what the mount's manifest generation
//! named while it reads (the mount reloads and reads the same bytes, or fails cleanly once
//! the point left the retention: never a wrong byte); bad arguments refused in one line.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::nbd::{run as run_client, RawClient, CLIENT_TIMEOUT};
use support::objrep::Replica;
use support::replay::{first_difference, run, TestJournal};
use support::s3::{S3Server, S3ServerKind};
use support::timetravel::Mount;
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::Op;
use tinylag::objrep::manifest;

const SIZE: u64 = 16 << 20;
const T0: u64 = 1_790_000_000_000_000_000;
const HOUR: u64 = 3_600_000_000_000;
const MINUTE: u64 = 60_000_000_000;

/// Round `round`'s `i`-th minute: rounds an hour apart, so a `--retain` computed from the
/// wall clock cuts between two rounds whatever the test's pace.
fn t(round: u64, i: u64) -> u64 {
    T0 + round * HOUR + i * MINUTE
}

/// `replica trim --retain` that keeps round `round`'s checkpoint and the ones after it.
fn retain_after(round: u64) -> String {
    let horizon = t(round, 30);
    format!("{}s", (support::replay::now_ns() - horizon) / 1_000_000_000)
}

/// The steps this file's scenarios repeat on a replica.
impl Replica {
    /// `replay --once` into the replica with small layers.
    fn replay_once(&self, journal: &TestJournal) {
        self.run_ok(&self.args(
            journal,
            &["replay"],
            &["--name", "objm", "--once", "--layer-size", "512K"],
        ));
    }

    /// `mount` of `point` with its cache under `cache` capped at `cap`.
    fn mount(
        &self,
        journal: &TestJournal,
        point: &[&str],
        cache: &Path,
        cap: &str,
        dir: &Path,
    ) -> Mount {
        let mut extra = point.to_vec();
        let cache = path(cache);
        extra.extend(["--cache-dir", &cache, "--cache-size", cap]);
        // No command: `Mount::spawn_env` puts `mount` first.
        let args = self.args(journal, &[], &extra);
        Mount::spawn_env(&args, &self.env, dir)
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Appends `n` segments of random operations stamped from minute `from` of `round`.
async fn append_round(journal: &mut TestJournal, round: u64, from: u64, n: u64) {
    for i in from..from + n {
        let ops = (0..16).map(|_| journal.random_op()).collect();
        journal.append_at(ops, t(round, i)).await;
    }
}

/// Appends a segment holding one `MARK` record and publishes the mark.
async fn append_mark(journal: &mut TestJournal, name: &str, ts: u64) -> u64 {
    let lsn = journal
        .append_at(vec![Op::Mark { name: name.into() }], ts)
        .await
        .start;
    mark::create(
        journal.store.as_ref(),
        &MarkPoint {
            name: name.into(),
            lsn,
            timestamp_ns: ts,
        },
    )
    .await
    .expect("publish the mark");
    lsn
}

/// The whole export read with nbdcopy: its bytes, or the client's error.
fn read_all(mount: &Mount, out: &Path) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(out);
    let done = run_client(
        Command::new("nbdcopy").args([&mount.uri(), &path(out)]),
        CLIENT_TIMEOUT,
    );
    if !done.status.success() {
        return Err(support::procs::text(&done));
    }
    let bytes = std::fs::read(out).expect("read the copy");
    let _ = std::fs::remove_file(out);
    Ok(bytes)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(at) = first_difference(got, want) {
        panic!("{what}: the mount differs from the oracle from byte {at}");
    }
}

/// Random writes with marks in rounds, each round replayed `--once` (a checkpoint) and some
/// compacted (an image under later marks); then random marks are mounted and read whole
/// with nbdcopy, and a few random ranges with qemu-io, against the oracle.
async fn random_marks_scenario(replica: &Replica, dir: &Path) {
    let mut journal = TestJournal::create(&dir.join("journal"), SIZE, 77).await;
    let mut marks = Vec::new();
    for round in 0..6 {
        append_round(&mut journal, round, 0, 2).await;
        let name = format!("m{round}");
        let lsn = append_mark(&mut journal, &name, t(round, 3)).await;
        marks.push((name, lsn));
        append_round(&mut journal, round, 4, 2).await;
        if round % 2 == 1 {
            replica.replay_once(&journal);
        }
        if round == 3 {
            replica.run_ok(&replica.args(
                &journal,
                &["replica", "compact"],
                &["--force", "--part-size", "1M"],
            ));
        }
    }
    let m = manifest::load_latest(replica.store.as_ref())
        .await
        .unwrap()
        .expect("a manifest");
    assert!(!m.images.is_empty(), "the scenario wants an image");
    let cache = dir.join("cache");
    let out = dir.join("copy.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // Every mark's kind is covered: from the journal alone (m0), from delta layers and the
    // journal (m2), from the image and the journal (m4, m5 past the last checkpoint); the
    // rest at random.
    let mut picks = vec![0usize, 2, 4, 5];
    picks.push(rng.gen_range(0..marks.len()));
    for i in picks {
        let (name, lsn) = &marks[i];
        let mount = replica.mount(&journal, &["--mark", name], &cache, "4M", dir);
        let want = journal.chain_image(Some(*lsn)).await;
        let got = read_all(&mount, &out).unwrap_or_else(|e| panic!("mark {name}: {e}"));
        assert_same(&got, &want, &format!("mark {name} (LSN {lsn})"));
        // Random ranges through one connection, then a real client's read of one of them.
        let (mut client, size, _) = RawClient::go(&mount.socket, "disk0");
        assert_eq!(size, SIZE);
        for _ in 0..8 {
            let len = 4096 * rng.gen_range(1..=64u64);
            let at = 4096 * rng.gen_range(0..(SIZE - len) / 4096);
            let got = client.read(at, len as u32);
            assert_same(
                &got,
                &want[at as usize..(at + len) as usize],
                &format!("mark {name}, {len} bytes at {at}"),
            );
        }
        client.hang_up();
        let read = run_client(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                "-r",
                "-c",
                "read 4096 65536",
                &mount.uri(),
            ]),
            CLIENT_TIMEOUT,
        );
        let text = support::procs::text(&read);
        assert!(
            read.status.success() && text.contains("read 65536/65536 bytes"),
            "qemu-io on mark {name}: {text}"
        );
        mount.stop();
        assert!(
            std::fs::read_dir(&cache).unwrap().next().is_none(),
            "a stopped mount left its cache behind"
        );
    }
    // A checkpoint's time, from its layers alone.
    let cp = m.checkpoints[1].clone();
    let at = tinylag::clock::format_ns(cp.timestamp_ns);
    let mount = replica.mount(&journal, &["--at", &at], &cache, "4M", dir);
    let got = read_all(&mount, &out).expect("read the checkpoint");
    assert_same(
        &got,
        &journal.chain_image(Some(cp.lsn)).await,
        &format!("checkpoint {}", cp.lsn),
    );
    mount.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_marks_mounted_from_an_object_replica_in_a_local_store_read_as_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::local(&dir.path().join("replica"));
    random_marks_scenario(&replica, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_marks_mounted_from_an_object_replica_on_s3s_fs_read_as_the_oracle() {
    let Some(s3) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::on_s3(&s3, "objm/");
    random_marks_scenario(&replica, dir.path()).await;
}

/// Bytes the cache files under `dir` take (each rounded up to 4 KiB, as the cap counts).
fn cache_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(mounts) = std::fs::read_dir(dir) else {
        return 0;
    };
    for m in mounts.flatten() {
        if let Ok(files) = std::fs::read_dir(m.path()) {
            for f in files.flatten() {
                if let Ok(meta) = f.metadata() {
                    total += meta.len().div_ceil(4096) * 4096;
                }
            }
        }
    }
    total
}

/// A device written whole (an image of 16 MiB of data), compacted, with delta layers of
/// small writes over it, mounted with a 4 MiB cache: while nbdcopy reads it all (twice), the
/// cache directory never holds more than the cap, and it is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_never_passes_its_cap_during_a_full_read_of_a_larger_image() {
    const CAP: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 3).await;
    let replica = Replica::local(&dir.path().join("replica"));
    for chunk in 0..SIZE / (1 << 20) {
        let ops = (0..16)
            .map(|i| Op::Write {
                offset: chunk * (1 << 20) + i * (64 << 10),
                data: journal.data(64 << 10),
            })
            .collect();
        journal.append_at(ops, t(0, chunk)).await;
    }
    replica.replay_once(&journal);
    replica.run_ok(&replica.args(&journal, &["replica", "compact"], &["--part-size", "4M"]));
    append_round(&mut journal, 1, 0, 3).await;
    let lsn = append_mark(&mut journal, "over", t(1, 5)).await;
    replica.replay_once(&journal);

    let cache = dir.path().join("cache");
    let mount = replica.mount(&journal, &["--mark", "over"], &cache, "4M", dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, peak, cache) = (stop.clone(), peak.clone(), cache.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(cache_bytes(&cache), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let want = journal.chain_image(Some(lsn)).await;
    let out = dir.path().join("copy.img");
    for pass in 0..2 {
        let got = read_all(&mount, &out).expect("read the mount");
        assert_same(&got, &want, &format!("pass {pass}"));
        peak.fetch_max(cache_bytes(&cache), Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= CAP,
        "the cache held {peak} bytes, over its cap of {CAP}"
    );
    assert!(
        peak >= CAP / 2,
        "the cache was hardly used ({peak} bytes at most): the test reads nothing through it"
    );
    mount.stop();
    assert_eq!(cache_bytes(&cache), 0, "a stopped mount left its cache");
}

/// While a mount reads, compaction and trim make new generations and delete what the
/// mount's generation named: the mount finds an object missing, reloads, resolves the same
/// LSN again and reads the same bytes. Once the point has left the retention (its checkpoint
/// dropped, the journal trimmed behind the replica) reads fail cleanly, and the log names
/// the point; no read ever returns a byte that is not the point's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_trim_under_a_mount_keep_it_exact_or_fail_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 11).await;
    let replica = Replica::local(&dir.path().join("replica"));
    for round in 0..4 {
        append_round(&mut journal, round, 0, 3).await;
        replica.replay_once(&journal);
    }
    // The mark after the newest checkpoint: the mount reads its delta layers and the journal.
    append_round(&mut journal, 4, 0, 2).await;
    let lsn = append_mark(&mut journal, "held", t(4, 3)).await;
    append_round(&mut journal, 4, 4, 2).await;
    let held = manifest::load_latest(replica.store.as_ref())
        .await
        .unwrap()
        .expect("a manifest");
    let named: Vec<String> = held.keys().map(String::from).collect();

    let cache = dir.path().join("cache");
    // The smallest cache: most fetched ranges are read again from the store each time.
    let mount = replica.mount(&journal, &["--mark", "held"], &cache, "1M", dir.path());
    let want = journal.chain_image(Some(lsn)).await;
    let out = dir.path().join("copy.img");
    let got = read_all(&mount, &out).expect("the first read");
    assert_same(&got, &want, "before compaction");

    // Compaction folds the layers into an image at the newest checkpoint; trim keeps only
    // that checkpoint's points, so the layers the mount's generation named go once two newer
    // generations exist (new checkpoints of the agent make them). Reads run meanwhile.
    let jobs = {
        let args = |job: &str, extra: &[&str]| {
            let mut a: Vec<String> = ["replica", job, "--journal", journal.uri(), "--replica"]
                .map(String::from)
                .to_vec();
            a.push(replica.uri.clone());
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        (
            args("compact", &["--force", "--part-size", "1M"]),
            args("trim", &["--retain", &retain_after(3)]),
        )
    };
    let mut deleted = false;
    for round in 5..9 {
        let (compact, trim) = jobs.clone();
        let racing = std::thread::spawn(move || {
            for args in [compact, trim] {
                let done = run(&args);
                assert!(done.status.success(), "{}", support::procs::text(&done));
            }
        });
        let got = read_all(&mount, &out);
        racing.join().unwrap();
        let got = got.unwrap_or_else(|e| panic!("a read racing round {round}'s jobs: {e}"));
        assert_same(&got, &want, &format!("racing round {round}"));
        append_round(&mut journal, round, 0, 1).await;
        replica.replay_once(&journal);
        let keys = replica.keys().await;
        if named.iter().any(|k| !keys.contains(k)) {
            deleted = true;
        }
    }
    assert!(
        deleted,
        "no object the mount's generation {} named was deleted: the test checks no reload",
        held.gen
    );
    let got = read_all(&mount, &out).expect("a read after the deletions");
    assert_same(&got, &want, "after the deletions");
    let log = mount.guard.log_tail(1 << 20);
    assert!(
        log.contains("resolved again"),
        "the mount never reloaded its manifest: {log}"
    );

    // The point leaves the retention: only the newest checkpoint is kept, its older objects
    // are deleted after two more generations, and the journal is trimmed behind the replica.
    for round in 9..12 {
        replica.run_ok(&replica.args(&journal, &["replica", "trim"], &["--retain", "0s"]));
        append_round(&mut journal, round, 0, 1).await;
        replica.replay_once(&journal);
    }
    replica.run_ok(&replica.args(&journal, &["replica", "trim"], &["--retain", "0s"]));
    support::objrep::trim_the_journal(&journal);
    // The cache holds a megabyte of the point at most: a full read must go to the store,
    // find the objects gone, and no generation or journal holds the point any more.
    if let Ok(got) = read_all(&mount, &out) {
        assert_same(&got, &want, "after the point left the retention");
        panic!("the point left the retention, and a full read still succeeded");
    }
    let log = mount.guard.log_tail(1 << 20);
    assert!(
        log.contains("reads fail") && log.contains(&format!("LSN {lsn}")),
        "a failed read without a line naming the point: {log}"
    );
    assert_eq!(
        log.matches("reads fail").count(),
        1,
        "the failure is one line, not one per read: {log}"
    );
    mount.stop();
}

/// Lines saying what is wrong (clap adds a hint line after a bad value: not an error).
fn error_lines(stderr: &str) -> usize {
    stderr.lines().filter(|l| l.contains("error")).count()
}

/// Bad arguments are refused in one line, before anything is opened or created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mount_arguments_of_an_object_replica_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 1).await;
    let replica = Replica::local(&dir.path().join("replica"));
    append_round(&mut journal, 0, 0, 1).await;
    append_mark(&mut journal, "m", t(0, 2)).await;
    replica.replay_once(&journal);
    let cache = dir.path().join("cache");
    let sock = format!("unix:{}", path(&dir.path().join("m.sock")));
    let c = path(&cache);
    let base = [
        "mount",
        "--journal",
        journal.uri(),
        "--replica",
        &replica.uri,
        "--mark",
        "m",
        "--cache-dir",
        &c,
    ];
    let file_replica = path(&dir.path().join("file.img"));
    let scratch = path(&dir.path().join("scratch.img"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--listen", &sock, "--writable", &scratch],
            "--writable",
        ),
        (
            vec!["--listen", &sock, "--changes-since", "m"],
            "--changes-since",
        ),
        (vec![], "--listen"),
        (
            vec!["--listen", &sock, "--cache-size", "100K"],
            "--cache-size",
        ),
    ];
    let before = replica.keys().await;
    for (extra, names) in cases {
        let mut args = base.to_vec();
        args.extend(extra);
        let out = replica.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert_eq!(error_lines(&err), 1, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
        assert!(!cache.exists(), "{args:?} created the cache directory");
        assert!(!dir.path().join("scratch.img").exists(), "{args:?} wrote");
    }
    // --branch with an object replica, and the cache flags with a file replica.
    let mut args = base[..5].to_vec();
    args.extend(["--branch", "b", "--listen", &sock]);
    let out = replica.run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--branch"), "{err}");
    let out = replica.run(&[
        "mount",
        "--journal",
        journal.uri(),
        "--replica",
        &file_replica,
        "--mark",
        "m",
        "--cache-size",
        "8M",
        "--listen",
        &sock,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--cache-size with a file replica was accepted"
    );
    assert_eq!(error_lines(&err), 1, "{err}");
    assert!(err.contains("--cache-size"), "{err}");
    assert_eq!(
        replica.keys().await,
        before,
        "a refused mount wrote to the replica"
    );
}
