//! Consistency groups with the real binary: one `serve` journals two disks in one order, one
//! replay agent keeps the pair at one LSN. An independent checker (below, not the product's
//! code) proves write-order fidelity: a client writes record k to disk k mod 2 and waits for
//! its acknowledgement before writing k + 1, so any state the group really had holds writes
//! 1..n and none after; every replica pair the tests look at — replayed to 20 random points
//! with `--until`, and after each of several `kill -9`s of the agent — must be such a prefix.
//! Real clients list and read the exports (`nbdinfo`, `qemu-io`). Bad input (a name used
//! twice, a device without its primary or replica) is refused with one line, nothing made.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::daemon::{tinylag, tinylag_ok, Daemon};
use support::nbd::{run_ok as run_cmd_ok, RawClient};
use support::procs::path;
use support::replay::{consumer_seed, now_ns, run, run_ok, spawn, will_move};
use tinylag::journal::Seed;

const BLOCK: usize = 4096;
/// Sizes that are not multiples of the 4 MiB region, so the layout has padding.
const WAL_SIZE: u64 = 6 << 20;
const DATA_SIZE: u64 = 10 << 20;

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Write k: its disk, its offset there, and its block (k in the first 8 bytes, then a
/// pattern of k), each at its own place so no write hides an earlier one.
fn write_k(k: u64) -> (usize, u64, Vec<u8>) {
    let disk = (k % 2) as usize;
    let offset = (k / 2) * BLOCK as u64;
    let mut block = vec![0u8; BLOCK];
    block[..8].copy_from_slice(&k.to_le_bytes());
    for (i, b) in block[8..].iter_mut().enumerate() {
        *b = (k as usize * 31 + i) as u8;
    }
    (disk, offset, block)
}

/// The independent checker: which writes 1..=total the pair of images holds. Panics unless
/// they are exactly 1..=n for some n (a prefix of the order the client wrote them in), and
/// returns n.
fn prefix_held(images: [&Path; 2], total: u64, what: &str) -> u64 {
    let data = images.map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{what}: {p:?}: {e}")));
    let held: Vec<bool> = (1..=total)
        .map(|k| {
            let (disk, offset, block) = write_k(k);
            let at = offset as usize;
            match data[disk].get(at..at + BLOCK) {
                Some(found) if found == block.as_slice() => true,
                Some(found) if found.iter().all(|&b| b == 0) => false,
                Some(_) => panic!("{what}: write {k} on disk {disk} is neither there nor blank"),
                None => panic!("{what}: image of disk {disk} is too small"),
            }
        })
        .collect();
    let n = held.iter().take_while(|&&h| h).count() as u64;
    if let Some(later) = held.iter().skip(n as usize).position(|&h| h) {
        panic!(
            "{what}: the pair holds writes 1..={n} and write {} (on disk {}) but not write {} \
             (on disk {}): a state the group never had",
            n + 1 + later as u64 + 1,
            (n + 1 + later as u64 + 1) % 2,
            n + 1,
            (n + 1) % 2
        );
    }
    n
}

struct Group {
    dir: tempfile::TempDir,
    journal: String,
}

impl Group {
    fn new() -> Group {
        Group::sized(WAL_SIZE, DATA_SIZE)
    }

    /// A group of a wal and a data device of these sizes (4 MiB regions).
    fn sized(wal_size: u64, data_size: u64) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal").display().to_string();
        let wal = format!("wal={wal_size}:{}", dir.path().join("wal.img").display());
        let data = format!("data={data_size}:{}", dir.path().join("data.img").display());
        tinylag_ok(
            &[
                "init",
                "--journal",
                &journal,
                "--device",
                &wal,
                "--device",
                &data,
                "--segment-size",
                "64K",
            ],
            &[],
        );
        Group { dir, journal }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&self) -> Daemon {
        self.serve_with(&[])
    }

    /// [`Group::serve`] with more of `serve`'s flags.
    fn serve_with(&self, extra: &[&str]) -> Daemon {
        let mut args = s(&[
            "serve",
            "--primary",
            &format!("wal={}", path(&self.path("wal.img"))),
            "--primary",
            &format!("data={}", path(&self.path("data.img"))),
            "--journal",
            &self.journal,
            "--linger",
            "20ms",
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        Daemon::start_args(&self.path("wal.img"), None, &args, &[])
    }

    /// `replay` of the pair `prefix`-wal.img / `prefix`-data.img as consumer `name`.
    fn replay(&self, name: &str, prefix: &str, extra: &[&str]) -> Vec<String> {
        let mut args = s(&[
            "replay",
            "--journal",
            &self.journal,
            "--name",
            name,
            "--replica",
            &format!("wal={}", path(&self.path(&format!("{prefix}-wal.img")))),
            "--replica",
            &format!("data={}", path(&self.path(&format!("{prefix}-data.img")))),
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    fn pair(&self, prefix: &str) -> [PathBuf; 2] {
        [
            self.path(&format!("{prefix}-wal.img")),
            self.path(&format!("{prefix}-data.img")),
        ]
    }
}

/// When write k was sent and when its acknowledgement came back (ns since the epoch).
struct Sent {
    sent_ns: Vec<u64>,
    acked_ns: Vec<u64>,
}

/// Writes 1..=total in order, each to its disk's export, each after the previous one's
/// acknowledgement; `during` runs between writes (to kill the agent under load).
fn write_in_order(socket: &Path, total: u64, during: impl FnMut(u64)) -> Sent {
    write_range(socket, 1..=total, during)
}

/// [`write_in_order`] of writes `ks` only (the `Sent` entries are theirs, in order).
fn write_range(
    socket: &Path,
    ks: std::ops::RangeInclusive<u64>,
    mut during: impl FnMut(u64),
) -> Sent {
    let mut clients = [
        RawClient::go(socket, "wal").0,
        RawClient::go(socket, "data").0,
    ];
    let mut sent = Sent {
        sent_ns: Vec::new(),
        acked_ns: Vec::new(),
    };
    for k in ks {
        let (disk, offset, block) = write_k(k);
        sent.sent_ns.push(now_ns());
        clients[disk].write(offset, &block);
        sent.acked_ns.push(now_ns());
        during(k);
    }
    sent
}

#[test]
fn every_replayed_point_and_every_crash_of_the_agent_is_a_prefix_of_the_group_order() {
    const TOTAL: u64 = 1200;
    let group = Group::new();
    let mut serve = group.serve();

    // Real clients see one export per device, each of its own size.
    let list = String::from_utf8_lossy(
        &run_cmd_ok(std::process::Command::new("nbdinfo").args([
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", path(&serve.socket)),
        ]))
        .stdout,
    )
    .to_string();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let mut sizes: Vec<(String, u64)> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    sizes.sort();
    assert_eq!(
        sizes,
        [
            ("data".to_string(), DATA_SIZE),
            ("wal".to_string(), WAL_SIZE)
        ]
    );

    // The agent runs while the client writes, and is killed -9 at random moments; after each
    // kill a `--once` run recovers the pair and stops at a consistent point: a prefix.
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let kill_at: Vec<u64> = {
        let mut at: Vec<u64> = (0..6).map(|_| rng.gen_range(50..TOTAL - 50)).collect();
        at.sort_unstable();
        at
    };
    let log = group.path("replay.log");
    let live = group.replay("set", "live", &[]);
    let once = group.replay("set", "live", &["--once"]);
    let mut agent = Some(spawn(&live, &log));
    let mut crash_points = Vec::new();
    let sent = write_in_order(&serve.socket, TOTAL, |k| {
        if kill_at.contains(&k) {
            let mut a = agent.take().expect("agent running");
            a.child_mut().kill().expect("kill -9 the agent");
            a.child_mut().wait().expect("reap");
            run_ok(&once);
            let n = prefix_held(
                [&group.pair("live")[0], &group.pair("live")[1]],
                TOTAL,
                &format!("after kill -9 at write {k}"),
            );
            crash_points.push((k, n));
            agent = Some(spawn(&live, &log));
        }
    });
    drop(agent);
    eprintln!("after each kill -9 (write, prefix held): {crash_points:?}");
    assert!(
        crash_points.iter().any(|&(_, n)| n > 0),
        "no crash point held any write: the test checked nothing"
    );

    // 20 random points: a fresh pair replayed `--until` each holds exactly the writes acked
    // before it, plus perhaps ones in flight at that instant — and never a gap; and the live
    // set restored to the same instant through its undo log (`restore --output-dir`) is that
    // pair byte for byte.
    run_ok(&once);
    let mut points = Vec::new();
    for i in 0..20 {
        let k = rng.gen_range(1..TOTAL as usize);
        let t = (sent.acked_ns[k - 1] + sent.sent_ns[k]) / 2;
        let until = format!("@{}", t as f64 / 1e9);
        let name = format!("point{i}");
        run_ok(&group.replay(&name, &name, &["--once", "--until", &until]));
        let [wal, data] = group.pair(&name);
        let n = prefix_held(
            [&wal, &data],
            TOTAL,
            &format!("point {i} (between writes {k} and {})", k + 1),
        );
        // The float time may round by a microsecond: allow the neighbour, never more.
        assert!(
            (k as u64).abs_diff(n) <= 1,
            "point {i} between writes {k} and {}: the pair holds writes 1..={n}",
            k + 1
        );
        run_ok(&s(&[
            "journal",
            "unregister",
            "--journal",
            &group.journal,
            "--name",
            &name,
        ]));
        points.push((until, name));
    }
    for (until, name) in &points {
        let out = group.path(&format!("restored-{name}"));
        run_ok(&s(&[
            "restore",
            "--journal",
            &group.journal,
            "--replica",
            &format!("wal={}", path(&group.pair("live")[0])),
            "--replica",
            &format!("data={}", path(&group.pair("live")[1])),
            "--at",
            until,
            "--output-dir",
            path(&out),
        ]));
        for (device, replayed) in ["wal", "data"].iter().zip(group.pair(name)) {
            let restored = out.join(format!("{device}.img"));
            assert!(
                std::fs::read(&restored).unwrap() == std::fs::read(&replayed).unwrap(),
                "restore --at {until}: {} differs from the pair replayed --until it",
                restored.display()
            );
        }
    }

    // Caught up, the pair is the primaries byte for byte, and real clients read the same.
    run_ok(&once);
    let n = prefix_held(
        [&group.pair("live")[0], &group.pair("live")[1]],
        TOTAL,
        "caught up",
    );
    assert_eq!(n, TOTAL);
    serve.stop_ok();
    for (replica, primary) in group.pair("live").iter().zip(["wal.img", "data.img"]) {
        assert!(
            std::fs::read(replica).unwrap() == std::fs::read(group.path(primary)).unwrap(),
            "{} differs from {primary}",
            replica.display()
        );
    }
    let serve = group.serve();
    // A real client reads each export whole: exactly its own primary.
    for name in ["wal", "data"] {
        let copy = group.path(&format!("copied-{name}.img"));
        run_cmd_ok(std::process::Command::new("nbdcopy").args([
            &format!("nbd+unix:///{name}?socket={}", path(&serve.socket)),
            path(&copy),
        ]));
        assert!(
            std::fs::read(&copy).unwrap()
                == std::fs::read(group.path(&format!("{name}.img"))).unwrap(),
            "nbdcopy of export {name} differs from its primary"
        );
    }
    let verified = tinylag_ok(&["journal", "verify", "--journal", &group.journal], &[]);
    assert!(verified.contains("verified"), "{verified}");
}

#[test]
fn a_group_is_refused_whole_with_one_line_when_a_device_or_name_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j").display().to_string();
    // A name used twice: nothing is created.
    let out = tinylag(
        &[
            "init",
            "--journal",
            &journal,
            "--device",
            "a=4M",
            "--device",
            "a=8M",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("used by two devices"),
        "{err}"
    );
    assert!(!Path::new(&journal).join("tinylag.json").exists());

    let group = Group::new();
    let wal = format!("wal={}", path(&group.path("wal.img")));
    // serve without the data disk's primary, or with an unknown name, or unnamed.
    for (extra, expect) in [
        (
            vec!["--primary", wal.as_str()],
            "no --primary for device(s) data",
        ),
        (
            vec!["--primary", wal.as_str(), "--primary", "logs=/x"],
            "has no device \"logs\"",
        ),
        (
            vec!["--primary", wal.as_str(), "--primary", "/x"],
            "give each as --primary NAME=PATH",
        ),
    ] {
        let mut args = vec!["serve", "--journal", &group.journal];
        args.extend(extra);
        let out = tinylag(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    // A replica map that misses a device: refused, no image created.
    let lone = group.path("lone-wal.img");
    let out = run(&s(&[
        "replay",
        "--journal",
        &group.journal,
        "--name",
        "x",
        "--replica",
        &format!("wal={}", path(&lone)),
        "--once",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no --replica for device(s) data"),
        "{err}"
    );
    assert!(
        !lone.exists(),
        "a refused replay created {}",
        lone.display()
    );
    let info = tinylag_ok(
        &["journal", "info", "--journal", &group.journal, "--json"],
        &[],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["consumers"],
        serde_json::json!([]),
        "a refused replay registered: {info:#}"
    );

    // A group is restored into an empty directory only; a file output is refused.
    let full = group.path("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let never = group.path("never-written.img");
    let replicas = [
        "--replica".to_string(),
        format!("wal={}", path(&group.path("r-wal.img"))),
        "--replica".to_string(),
        format!("data={}", path(&group.path("r-data.img"))),
    ];
    run_ok(&group.replay("r", "r", &["--once"]));
    for (output, expect) in [
        (vec!["--output-dir", path(&full)], "is not empty"),
        (
            vec!["--output", path(&never)],
            "restore it with --output-dir",
        ),
    ] {
        let at = format!("@{}", now_ns() as f64 / 1e9);
        let mut args = s(&["restore", "--journal", &group.journal, "--at", &at]);
        args.extend(replicas.iter().cloned());
        args.extend(s(&output));
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&full).unwrap().count(),
        1,
        "nothing written into it"
    );
    assert!(!never.exists());

    // add-device appends; a second device of the same name is refused.
    let added = tinylag_ok(
        &[
            "journal",
            "add-device",
            "--journal",
            &group.journal,
            "--name",
            "logs",
            "--size",
            "4M",
        ],
        &[],
    );
    assert!(added.contains("as device 2"), "{added}");
    let out = tinylag(
        &[
            "journal",
            "add-device",
            "--journal",
            &group.journal,
            "--name",
            "wal",
            "--size",
            "4M",
        ],
        &[],
    );
    assert!(!out.status.success());
    let info = tinylag_ok(&["journal", "info", "--journal", &group.journal], &[]);
    for line in ["device 0     wal", "device 1     data", "device 2     logs"] {
        assert!(info.contains(line), "{line:?} not in {info}");
    }
}

/// The names and sizes `nbdinfo --list` reports at `uri`, sorted by name.
fn listed_exports(uri: &str) -> Vec<(String, u64)> {
    let out = run_cmd_ok(std::process::Command::new("nbdinfo").args(["--list", "--json", uri]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut sizes: Vec<(String, u64)> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    sizes.sort();
    sizes
}

/// `mount --at|--mark` of the set: one export per device, all as of the same point, each
/// byte for byte what `restore --output-dir` writes for that point — going back through the
/// undo log (points the agent has passed) and forward through the journal (points it has not
/// reached) — and every pair a prefix of the group's order. A writable mount's writes stay on
/// their device's export; an unknown export name is refused.
#[test]
fn mount_of_a_group_serves_every_device_as_of_one_point() {
    const TOTAL: u64 = 600;
    const APPLIED: u64 = 400;
    let group = Group::new();
    let mut serve = group.serve();
    let replicas = [
        "--replica".to_string(),
        format!("wal={}", path(&group.pair("live")[0])),
        "--replica".to_string(),
        format!("data={}", path(&group.pair("live")[1])),
    ];
    // Writes 1..=APPLIED, a mark, then the agent catches up and stops: the later writes are in
    // the journal only, so their points are mounted forward.
    let first = write_in_order(&serve.socket, APPLIED, |_| {});
    let marked = tinylag_ok(&["mark", "half", "--control", path(&serve.control)], &[]);
    assert!(marked.contains("half"), "{marked}");
    run_ok(&group.replay("set", "live", &["--once"]));
    let second = write_range(&serve.socket, APPLIED + 1..=TOTAL, |_| {});
    serve.stop_ok();

    // Random instants between two writes: three the agent passed (back through the undo
    // log), three it never reached (forward through the journal).
    let mut rng = rand::rngs::StdRng::seed_from_u64(2121);
    let mut points: Vec<(Vec<String>, String, u64)> =
        vec![(s(&["--mark", "half"]), "--mark half".to_string(), APPLIED)];
    for i in 0..6 {
        let (sent, from, to) = if i < 3 {
            (&first, 1, APPLIED)
        } else {
            (&second, APPLIED + 1, TOTAL)
        };
        let k = rng.gen_range(from..to);
        let at_k = (k - from) as usize;
        let t = (sent.acked_ns[at_k] + sent.sent_ns[at_k + 1]) / 2;
        let at = format!("@{}", t as f64 / 1e9);
        points.push((s(&["--at", &at]), format!("--at {at} (after write {k})"), k));
    }
    let dir = group.path("mounts");
    std::fs::create_dir(&dir).unwrap();
    for (i, (point, what, expect)) in points.iter().enumerate() {
        let restored = group.path(&format!("restored-{i}"));
        let mut args = s(&["restore", "--journal", &group.journal]);
        args.extend(replicas.iter().cloned());
        args.extend(point.iter().cloned());
        args.extend(s(&["--output-dir", path(&restored)]));
        run_ok(&args);

        let mut args = s(&["--journal", &group.journal]);
        args.extend(replicas.iter().cloned());
        args.extend(point.iter().cloned());
        let mount = support::timetravel::Mount::spawn(&args, &dir);
        assert_eq!(
            listed_exports(&mount.uri_of("")),
            [
                ("data".to_string(), DATA_SIZE),
                ("wal".to_string(), WAL_SIZE)
            ],
            "{what}: the exports listed"
        );
        let mut copies = Vec::new();
        for device in ["wal", "data"] {
            let copy = group.path(&format!("mounted-{i}-{device}.img"));
            run_cmd_ok(
                std::process::Command::new("nbdcopy").args([&mount.uri_of(device), path(&copy)]),
            );
            assert!(
                std::fs::read(&copy).unwrap()
                    == std::fs::read(restored.join(format!("{device}.img"))).unwrap(),
                "mount {what}: export {device} differs from restore --output-dir of the point"
            );
            copies.push(copy);
        }
        // The empty name is device 0.
        let default = group.path(&format!("mounted-{i}-default.img"));
        run_cmd_ok(std::process::Command::new("nbdcopy").args([&mount.uri_of(""), path(&default)]));
        assert!(
            std::fs::read(&default).unwrap() == std::fs::read(&copies[0]).unwrap(),
            "mount {what}: the empty export name is not device 0 (wal)"
        );
        let n = prefix_held([&copies[0], &copies[1]], TOTAL, &format!("mount {what}"));
        // The float time may round by a microsecond: allow the neighbour, never more.
        assert!(
            expect.abs_diff(n) <= 1,
            "mount {what}: the pair holds writes 1..={n}"
        );
        // An export the group lacks: the client is refused, the mount keeps serving.
        let out = support::nbd::run(
            std::process::Command::new("nbdinfo").arg(mount.uri_of("logs")),
            std::time::Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("logs"),
            "nbdinfo of export logs: {err}"
        );
        assert_eq!(listed_exports(&mount.uri_of("")).len(), 2);
        mount.stop();
    }

    // Writable: a write to the data export lands in the scratch at that device's place only.
    let scratch = group.path("scratch.img");
    let mut args = s(&["--journal", &group.journal]);
    args.extend(replicas.iter().cloned());
    args.extend(s(&["--mark", "half", "--writable", path(&scratch)]));
    let before: Vec<Vec<u8>> = group
        .pair("live")
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mount = support::timetravel::Mount::spawn(&args, &dir);
    support::nbd::qemu_io_ok(&mount.uri_of("data"), &["write -P 0x5a 0 8k"]);
    support::nbd::qemu_io_ok(&mount.uri_of("data"), &["read -P 0x5a 0 8k"]);
    let wal = group.path("writable-wal.img");
    run_cmd_ok(std::process::Command::new("nbdcopy").args([&mount.uri_of("wal"), path(&wal)]));
    assert!(
        std::fs::read(&wal).unwrap() == std::fs::read(group.path("restored-0/wal.img")).unwrap(),
        "a write to the data export changed the wal export"
    );
    mount.stop();
    for (p, b) in group.pair("live").iter().zip(&before) {
        assert!(
            std::fs::read(p).unwrap() == *b,
            "a writable mount wrote to {}",
            p.display()
        );
    }
    assert!(scratch.exists(), "no scratch file");

    // --export names one export; a group's are its devices' names.
    let mut args = s(&["mount", "--journal", &group.journal, "--mark", "half"]);
    args.extend(replicas.iter().cloned());
    args.extend(s(&["--export", "x"]));
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a group's exports are its device names"),
        "{err}"
    );
}

/// `tinylag promote` of the replica set `prefix`-wal.img / `prefix`-data.img as consumer
/// `name` (a daemon: its sockets beside the first image).
fn promote_set(group: &Group, prefix: &str, name: &str, extra: &[&str]) -> Daemon {
    promote_images(group, group.pair(prefix), name, extra)
}

/// [`promote_set`] of the images `wal` and `data`.
fn promote_images(group: &Group, [wal, data]: [PathBuf; 2], name: &str, extra: &[&str]) -> Daemon {
    let mut args = s(&[
        "promote",
        "--replica",
        &format!("wal={}", path(&wal)),
        "--replica",
        &format!("data={}", path(&data)),
        "--journal",
        &group.journal,
        "--name",
        name,
        "--linger",
        "20ms",
    ]);
    args.extend(extra.iter().map(|a| a.to_string()));
    Daemon::start_args(&wal, None, &args, &[])
}

/// Waits until the daemon's log holds `needle` (promote says so once it serves).
fn wait_log(daemon: &Daemon, needle: &str) {
    support::procs::wait_until(std::time::Duration::from_secs(60), || {
        daemon.log_tail().contains(needle)
    })
    .unwrap_or_else(|()| panic!("no {needle:?} in the log:\n{}", daemon.log_tail()));
}

/// Failover of the group as a unit: A demotes, B's replica set is promoted at the DEMOTE
/// (both images equal A's, zero bytes resynced), serves both devices and takes writes on
/// both; B demotes and A's old set, stamped at its own DEMOTE, follows B and is promoted back
/// (planned failback); then A is killed -9 and C's set is promoted with --force. Every pair the test looks
/// at is a prefix of the group's order, and C equals a fresh replay of the whole journal.
#[test]
fn a_group_fails_over_as_a_unit_planned_and_forced() {
    let group = Group::new();
    let mut a = group.serve();
    let log = group.path("b.replay.log");
    let mut agent = spawn(&group.replay("siteb", "b", &[]), &log);
    write_in_order(&a.socket, 200, |_| {});

    // A live primary that has not demoted: refused, nothing changes.
    let [b_wal, b_data] = group.pair("b");
    let out = run(&s(&[
        "promote",
        "--replica",
        &format!("wal={}", path(&b_wal)),
        "--replica",
        &format!("data={}", path(&b_data)),
        "--journal",
        &group.journal,
        "--name",
        "siteb",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has not released its lease"),
        "{err}"
    );
    let out = tinylag_ok(&["demote", "--control", path(&a.control), "--json"], &[]);
    let demoted: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lsn = demoted["lsn"].as_u64().unwrap();
    agent.terminate(std::time::Duration::from_secs(30)).unwrap();
    a.stop_ok();

    let mut b = promote_set(&group, "b", "siteb", &[]);
    wait_log(&b, &format!("promoted at LSN {lsn}:"));
    let status = b.status();
    assert_eq!(status["mode"], "logging", "{status:#}");
    assert_eq!(status["resync"]["bytes_done"], 0, "{status:#}");
    // Status shows each device of the set (name, size, place, its dirty share).
    let devices: Vec<(String, u64, u64)> = status["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices in {status:#}"))
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["size"].as_u64().unwrap(),
                d["dirty_regions"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        devices,
        [
            ("wal".to_string(), WAL_SIZE, 0),
            ("data".to_string(), DATA_SIZE, 0)
        ]
    );
    let text = tinylag_ok(&["status", "--control", path(&b.control)], &[]);
    assert!(
        text.contains("device wal") && text.contains("device data"),
        "{text}"
    );
    for (promoted, old) in group.pair("b").iter().zip(["wal.img", "data.img"]) {
        assert!(
            std::fs::read(promoted).unwrap() == std::fs::read(group.path(old)).unwrap(),
            "{} differs from A's {old} at the DEMOTE",
            promoted.display()
        );
    }
    // B serves both devices and takes writes on both, in one order.
    assert_eq!(
        listed_exports(&format!("nbd+unix:///?socket={}", path(&b.socket))),
        [
            ("data".to_string(), DATA_SIZE),
            ("wal".to_string(), WAL_SIZE)
        ]
    );
    write_range(&b.socket, 201..=400, |_| {});
    let n = prefix_held([&b_wal, &b_data], 400, "B after its writes");
    assert_eq!(n, 400, "B holds writes 1..={n}");

    // Failback: B demotes; A's old primaries, stamped at A's DEMOTE (beside every image),
    // follow the chain from there as one set and reach B's DEMOTE; A is promoted again.
    let out = tinylag_ok(&["demote", "--control", path(&b.control), "--json"], &[]);
    let demoted: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lsn = demoted["lsn"].as_u64().unwrap();
    let a_images = [group.path("wal.img"), group.path("data.img")];
    run_ok(&s(&[
        "replay",
        "--journal",
        &group.journal,
        "--name",
        "sitea",
        "--replica",
        &format!("wal={}", path(&a_images[0])),
        "--replica",
        &format!("data={}", path(&a_images[1])),
        "--once",
    ]));
    b.stop_ok();
    for (a_image, b_image) in a_images.iter().zip(group.pair("b")) {
        assert!(
            std::fs::read(a_image).unwrap() == std::fs::read(&b_image).unwrap(),
            "{} differs from B's {} at B's DEMOTE",
            a_image.display(),
            b_image.display()
        );
    }
    let mut a = promote_images(&group, a_images.clone(), "sitea", &[]);
    wait_log(&a, &format!("promoted at LSN {lsn}:"));
    assert_eq!(a.status()["resync"]["bytes_done"], 0);
    let c_log = group.path("c.replay.log");
    let mut c_agent = spawn(&group.replay("sitec", "c", &[]), &c_log);
    write_range(&a.socket, 401..=500, |_| {});
    let n = prefix_held([&a_images[0], &a_images[1]], 500, "A after failback");
    assert_eq!(n, 500, "A holds writes 1..={n}");

    // A dies without a demote: a plain promote of C is refused, --force promotes it.
    a.kill9();
    c_agent
        .terminate(std::time::Duration::from_secs(30))
        .unwrap();
    let [c_wal, c_data] = group.pair("c");
    let out = run(&s(&[
        "promote",
        "--replica",
        &format!("wal={}", path(&c_wal)),
        "--replica",
        &format!("data={}", path(&c_data)),
        "--journal",
        &group.journal,
        "--name",
        "sitec",
    ]));
    assert!(
        !out.status.success(),
        "a plain promote after kill -9 succeeded"
    );
    let mut c = promote_set(&group, "c", "sitec", &["--force"]);
    wait_log(&c, "promoted at LSN");
    let held = prefix_held([&c_wal, &c_data], 500, "C promoted with --force");
    eprintln!("C promoted with --force holds writes 1..={held} of 500");
    assert!(
        held >= 400,
        "C lost writes A had before its failback: 1..={held}"
    );
    c.stop_ok();
    run_ok(&group.replay("check", "check", &["--once"]));
    for (promoted, check) in group.pair("c").iter().zip(group.pair("check")) {
        assert!(
            std::fs::read(promoted).unwrap() == std::fs::read(&check).unwrap(),
            "{} differs from a fresh replay of the whole journal",
            promoted.display()
        );
    }
    let verified = tinylag_ok(&["journal", "verify", "--journal", &group.journal], &[]);
    assert!(verified.contains("verified"), "{verified}");
}

/// `promote --mark` of a group: A marks the pair after write 100 and writes on to 200, then
/// stops; B's set is promoted at the mark as one set — both images wound back to the mark's
/// LSN by the one agent and undo log (the checker finds exactly writes 1..=100, never 1..=100
/// on one disk and more on the other), A's later records kept as a branch — and the new chain
/// continues from there: B's own writes 101..=150 follow, and a fresh replay of the journal
/// (which follows the new chain past the branch) equals B's set.
#[test]
fn a_group_is_promoted_at_a_mark_as_one_set() {
    let group = Group::new();
    let mut a = group.serve();
    let mut agent = spawn(
        &group.replay("siteb", "b", &[]),
        &group.path("b.replay.log"),
    );
    write_in_order(&a.socket, 100, |_| {});
    tinylag_ok(&["mark", "before", "--control", path(&a.control)], &[]);
    write_range(&a.socket, 101..=200, |_| {});
    a.stop_ok();
    agent.terminate(std::time::Duration::from_secs(30)).unwrap();

    let mut b = promote_set(&group, "b", "siteb", &["--mark", "before"]);
    wait_log(&b, "promoted at LSN");
    let [b_wal, b_data] = group.pair("b");
    assert_eq!(
        prefix_held([&b_wal, &b_data], 200, "B promoted at the mark"),
        100
    );
    assert!(
        b.log_tail().contains("branch before-e2"),
        "A's writes after the mark are not named as a branch:\n{}",
        b.log_tail()
    );
    write_range(&b.socket, 101..=150, |_| {});
    assert_eq!(
        prefix_held([&b_wal, &b_data], 200, "B after its writes"),
        150
    );
    b.stop_ok();
    run_ok(&group.replay("check", "check", &["--once"]));
    for (promoted, check) in group.pair("b").iter().zip(group.pair("check")) {
        assert!(
            std::fs::read(promoted).unwrap() == std::fs::read(&check).unwrap(),
            "{} differs from a fresh replay of the new chain",
            promoted.display()
        );
    }
}

/// A set `restore --output-dir` wrote carries a seed stamp beside every image, and a new
/// consumer adopts it and replays on to the end; a set with one image changed after the
/// restore, or with one stamp missing, is refused in one line and nothing is registered.
#[test]
fn a_restored_set_is_adopted_by_its_stamps_and_a_changed_image_is_refused() {
    let group = Group::new();
    let mut serve = group.serve();
    write_in_order(&serve.socket, 100, |_| {});
    let mid = format!("@{}", now_ns() as f64 / 1e9);
    run_ok(&group.replay("live", "live", &["--once"]));
    write_range(&serve.socket, 101..=200, |_| {});
    serve.stop_ok();
    let restore = |dir: &str| {
        let out = group.path(dir);
        run_ok(&s(&[
            "restore",
            "--journal",
            &group.journal,
            "--replica",
            &format!("wal={}", path(&group.pair("live")[0])),
            "--replica",
            &format!("data={}", path(&group.pair("live")[1])),
            "--at",
            &mid,
            "--output-dir",
            path(&out),
        ]));
        for device in ["wal", "data"] {
            assert!(
                out.join(format!("{device}.img.seed.json")).exists(),
                "no seed stamp beside {device}.img"
            );
        }
        out
    };
    let replay_set = |dir: &Path, name: &str| {
        run(&s(&[
            "replay",
            "--journal",
            &group.journal,
            "--name",
            name,
            "--replica",
            &format!("wal={}", path(&dir.join("wal.img"))),
            "--replica",
            &format!("data={}", path(&dir.join("data.img"))),
            "--once",
        ]))
    };
    let consumers = || {
        let info = tinylag_ok(
            &["journal", "info", "--journal", &group.journal, "--json"],
            &[],
        );
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        info["consumers"].as_array().unwrap().len()
    };

    // Adopted at the point, replayed to the end: the primaries byte for byte.
    let good = restore("good");
    assert_eq!(
        prefix_held(
            [&good.join("wal.img"), &good.join("data.img")],
            200,
            "restored"
        ),
        100
    );
    let out = replay_set(&good, "adopted");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (device, primary) in ["wal", "data"].iter().zip(["wal.img", "data.img"]) {
        assert!(
            std::fs::read(good.join(format!("{device}.img"))).unwrap()
                == std::fs::read(group.path(primary)).unwrap(),
            "the adopted {device} differs from its primary"
        );
        assert!(!good.join(format!("{device}.img.seed.json")).exists());
    }

    // One image changed after the restore: refused, nothing registered.
    let before = consumers();
    let changed = restore("changed");
    let data = changed.join("data.img");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let out = replay_set(&changed, "changed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("device data") && err.trim().lines().count() == 1,
        "{err}"
    );
    // One stamp missing: refused the same way.
    let partial = restore("partial");
    std::fs::remove_file(partial.join("data.img.seed.json")).unwrap();
    let out = replay_set(&partial, "partial");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no seed stamp beside it"),
        "{err}"
    );
    assert_eq!(consumers(), before, "a refused set registered a consumer");
}

/// After `journal add-device`, a consumer registered for the first two devices takes the new
/// device's image when it is new (blank): it replays on and all three replicas equal their
/// primaries. An added device's image that exists already is refused in one line.
#[test]
fn a_consumer_registered_before_add_device_takes_the_new_device() {
    const LOGS_SIZE: u64 = 4 << 20;
    let group = Group::new();
    let mut serve = group.serve();
    write_in_order(&serve.socket, 60, |_| {});
    serve.stop_ok();
    run_ok(&group.replay("set", "r", &["--once"]));
    run_ok(&group.replay("other", "o", &["--once"]));
    let added = tinylag_ok(
        &[
            "journal",
            "add-device",
            "--journal",
            &group.journal,
            "--name",
            "logs",
            "--size",
            "4M",
        ],
        &[],
    );
    assert!(added.contains("as device 2"), "{added}");
    let logs = group.path("logs.img");
    std::fs::File::create(&logs)
        .unwrap()
        .set_len(LOGS_SIZE)
        .unwrap();
    let args = s(&[
        "serve",
        "--primary",
        &format!("wal={}", path(&group.path("wal.img"))),
        "--primary",
        &format!("data={}", path(&group.path("data.img"))),
        "--primary",
        &format!("logs={}", path(&logs)),
        "--journal",
        &group.journal,
        "--linger",
        "20ms",
    ]);
    let mut serve = Daemon::start_args(&group.path("wal.img"), None, &args, &[]);
    let (mut client, _, _) = RawClient::go(&serve.socket, "logs");
    client.write(8192, &support::nbd::pattern(7, BLOCK));
    drop(client);
    write_range(&serve.socket, 61..=80, |_| {});
    serve.stop_ok();

    let with_logs = |name: &str, prefix: &str| {
        let mut args = group.replay(name, prefix, &["--once"]);
        args.extend(s(&[
            "--replica",
            &format!("logs={}", path(&group.path(&format!("{prefix}-logs.img")))),
        ]));
        run(&args)
    };
    let out = with_logs("set", "r");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for device in ["wal", "data", "logs"] {
        assert!(
            std::fs::read(group.path(&format!("r-{device}.img"))).unwrap()
                == std::fs::read(group.path(&format!("{device}.img"))).unwrap(),
            "replica {device} differs from its primary"
        );
    }
    // Consumer `other`, given an image for logs that exists already: refused, and it keeps
    // its registration as it was.
    let existing = group.path("o-logs.img");
    std::fs::write(&existing, vec![1u8; LOGS_SIZE as usize]).unwrap();
    let out = with_logs("other", "o");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("registered before device(s) logs were added")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    let info = tinylag_ok(
        &["journal", "info", "--journal", &group.journal, "--json"],
        &[],
    );
    assert!(
        !info.contains(path(&existing)),
        "the refused consumer's registration changed: {info}"
    );
}

/// `rejoin` of a group as one set. A serves the pair (the wal 30 MiB, so its last 4 MiB
/// region is half padding) and B's agent follows; B's set is promoted with `--force` while A
/// still runs, which fences A; A keeps taking writes the journal never gets, on both disks
/// (one in the wal's padded last region), and is killed. B writes on. A's old set rejoins:
/// one fork for the set, only the diverged regions asked for (the fenced writes' and those
/// A's activity log still held: far less than the set), the writer's one span proves them,
/// and after catch-up A's pair equals B's and a fresh replay of the whole journal, and holds
/// the group's writes 1..=400 in order.
#[test]
fn a_fenced_groups_old_primaries_rejoin_as_one_set_moving_only_what_diverged() {
    const MIB: u64 = 1 << 20;
    const WAL: u64 = 30 * MIB;
    const DATA: u64 = 34 * MIB;
    let group = Group::sized(WAL, DATA);
    let journal_dir = group.path("journal");
    let mut a = group.serve_with(&["--lease-time", "3s"]);
    let mut agent = spawn(
        &group.replay("siteb", "b", &[]),
        &group.path("b.replay.log"),
    );
    write_in_order(&a.socket, 200, |_| {});
    // A's activity log keeps only the regions it wrote (the wal's 0 and the data's first,
    // the group's 8) once they are durable, as a primary that has run a while does.
    a.wait_status(Duration::from_secs(60), "A durable, its log retired", |s| {
        s["durable_lsn"] == s["head_lsn"]
            && s["activity_log"]["regions"]
                .as_u64()
                .is_some_and(|r| r <= 2)
    });
    agent.terminate(Duration::from_secs(30)).unwrap();
    let mut b = promote_set(&group, "b", "siteb", &["--force", "--lease-time", "3s"]);
    wait_log(&b, "promoted at LSN");
    a.wait_status(Duration::from_secs(60), "A fenced", |s| {
        s["mode"] == "fenced"
    });
    // Fenced, A keeps serving: writes the journal never gets, in the wal's last region (the
    // group's 7: bytes 28..30 MiB of the wal, the padding after) and the data's 20 MiB (13).
    let garbage = vec![0xeeu8; 64 << 10];
    RawClient::go(&a.socket, "wal")
        .0
        .write(WAL - (1 << 20), &garbage);
    RawClient::go(&a.socket, "data").0.write(20 * MIB, &garbage);
    a.kill9();
    write_range(&b.socket, 201..=400, |_| {});

    // A replica map that misses a device: one line, nothing registered or asked for.
    let out = run(&s(&[
        "rejoin",
        "--journal",
        &group.journal,
        "--name",
        "sitea",
        "--replica",
        &format!("wal={}", path(&group.path("wal.img"))),
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--replica") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(consumer_seed(&journal_dir, "sitea").is_none(), "registered");
    assert!(!journal_dir.join("requests/resync/sitea").exists(), "asked");

    let log = group.path("rejoin.log");
    let mut args = s(&["rejoin", "--journal", &group.journal, "--name", "sitea"]);
    for device in ["wal", "data"] {
        args.push("--replica".into());
        args.push(format!(
            "{device}={}",
            path(&group.path(&format!("{device}.img")))
        ));
    }
    let mut rejoin = spawn(&args, &log);
    let request = journal_dir.join("requests/resync/sitea");
    support::procs::wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("will move"))
            && consumer_seed(&journal_dir, "sitea").is_some()
    })
    .unwrap_or_else(|()| panic!("rejoin made no plan: {}", rejoin.log_tail(4096)));
    let out = std::fs::read_to_string(&log).unwrap();
    eprintln!("{out}");
    let (bytes, regions) = will_move(&out);
    // The fenced writes' regions at least (2 MiB of the wal's, 4 MiB of the data's), at most
    // those and the two A's log held: 14 MiB of the set's 64.
    assert!(
        (6 * MIB..=14 * MIB).contains(&bytes) && (2..=4).contains(&regions),
        "only what diverged: {bytes} bytes in {regions} regions\n{out}"
    );
    assert!(out.contains("of the set's 64.0 MiB"), "{out}");
    match consumer_seed(&journal_dir, "sitea") {
        Some(Seed::Checking { unproven, .. }) => {
            assert_eq!(unproven.count(), regions);
            assert!(unproven.contains(7) && unproven.contains(13), "{unproven}");
        }
        other => panic!("registered at the fork checking what diverged, not {other:?}"),
    }
    support::procs::wait_until(Duration::from_secs(120), || !request.exists())
        .unwrap_or_else(|()| panic!("the request was never served; B:\n{}", b.log_tail()));
    // B journaled exactly the regions asked for, as one span.
    let status = b.status();
    assert_eq!(status["resync"]["lifetime_regions"], regions, "{status:#}");
    b.stop_ok();
    rejoin.terminate(Duration::from_secs(30)).unwrap();
    let mut once = args.clone();
    once[0] = "replay".into();
    once.push("--once".into());
    run_ok(&once);
    assert!(
        matches!(
            consumer_seed(&journal_dir, "sitea"),
            Some(Seed::Checked { .. })
        ),
        "every diverged region proven by the span: {:?}",
        consumer_seed(&journal_dir, "sitea")
    );
    let a_pair = [group.path("wal.img"), group.path("data.img")];
    assert_eq!(
        prefix_held([&a_pair[0], &a_pair[1]], 400, "A after the rejoin"),
        400
    );
    run_ok(&group.replay("check", "check", &["--once"]));
    for ((rejoined, promoted), check) in a_pair.iter().zip(group.pair("b")).zip(group.pair("check"))
    {
        let rejoined = std::fs::read(rejoined).unwrap();
        assert!(
            rejoined == std::fs::read(&promoted).unwrap(),
            "{} differs from the new primary",
            promoted.display()
        );
        assert!(
            rejoined == std::fs::read(&check).unwrap(),
            "{} differs from a fresh replay",
            check.display()
        );
    }
}

/// Each device's changes since start, beside the group's totals (which stay as they are): in
/// `status --json` (`devices[].io`), in the text status, and in the metrics under a `device`
/// label. The wal takes 25 writes and the data disk 15, so a count put on the wrong device,
/// or only on the first, fails.
#[test]
fn status_and_metrics_count_each_devices_writes() {
    let group = Group::new();
    let port = support::procs::free_port();
    let mut serve = group.serve_with(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    write_in_order(&serve.socket, 30, |_| {});
    let (mut wal, _, _) = RawClient::go(&serve.socket, "wal");
    for i in 0..10u64 {
        wal.write((4 << 20) + i * BLOCK as u64, &[0x77; BLOCK]);
    }
    drop(wal);
    let block = BLOCK as u64;
    let expected = [("wal", 25, 25 * block), ("data", 15, 15 * block)];

    let status = serve.status();
    let devices: Vec<(String, u64, u64)> = status["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices in {status:#}"))
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["io"]["writes"].as_u64().unwrap(),
                d["io"]["bytes_written"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64, u64)> = expected
        .iter()
        .map(|(n, w, b)| (n.to_string(), *w, *b))
        .collect();
    assert_eq!(devices, want, "{status:#}");
    assert_eq!(status["io"]["writes"], 40, "the group's total: {status:#}");
    let text = tinylag_ok(&["status", "--control", path(&serve.control)], &[]);
    for (name, writes, _) in expected {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("device {name}")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{text}"));
        assert!(line.contains(&format!("{writes} writes")), "{line}");
    }

    let (code, metrics) = support::prometheus::http_get(port, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    let value = |name: &str, labels: &[&str]| -> Option<u64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| labels.iter().all(|label| l.contains(label)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    for (name, writes, bytes) in expected {
        let device = format!("device=\"{name}\"");
        assert_eq!(
            value("tinylag_group_device_written_bytes_total", &[&device]),
            Some(bytes),
            "{metrics}"
        );
        assert_eq!(
            value(
                "tinylag_group_device_requests_total",
                &[&device, "op=\"write\""]
            ),
            Some(writes),
            "{metrics}"
        );
    }
    assert_eq!(
        value("tinylag_primary_written_bytes_total", &[]),
        Some(40 * block),
        "the group's total stays: {metrics}"
    );
    if let Err(e) = support::prometheus::promtool_check(&metrics) {
        panic!("promtool: {e}\n{metrics}");
    }
    serve.stop_ok();
}
