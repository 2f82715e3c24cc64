//! A new consumer never adopts an image nothing vouches for: `tinylag replay --name NEW` on an
//! existing file that does not hold the journal's state is refused and changes nothing, and
//! each way forward (a restore's seed stamp, `--check-seed` with the primary's verify and
//! resync, `--assume-seeded` for a copy the operator made) ends with the replica byte for
//! byte the primary. Real `serve`, `replay`, `restore`, `verify` and `resync` processes.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::daemon::{init, tinylag_ok, Daemon};
use support::nbd::{pattern, qemu_io_ok};
use support::oracle::assert_same_image;
use support::replay::{file_hash, replay_args, run};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A journal, a primary served by `serve` and written by qemu-io, and a vouched replica `dr`
/// (created blank by its agent) following it.
struct Setup {
    dir: tempfile::TempDir,
    journal: String,
    primary: PathBuf,
    daemon: Daemon,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let primary = dir.path().join("primary.img");
        let journal = dir.path().join("journal").display().to_string();
        init(&journal, &primary, "16M", &["--region-size", "4M"], &[]);
        let daemon = Daemon::start(&primary, &journal, &[], &[]);
        let setup = Setup {
            dir,
            journal,
            primary,
            daemon,
        };
        // Regions 0 and 1 written in part; 2 and 3 never.
        setup.write(&["write -P 0xab 0 1M", "write -P 0xcd 5M 64k", "flush"]);
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, commands: &[&str]) {
        qemu_io_ok(&self.daemon.uri(), commands);
        self.drained();
    }

    /// Waits until everything the primary acknowledged is durable in the journal.
    fn drained(&self) {
        self.daemon
            .wait_status(Duration::from_secs(30), "the journal to drain", |s| {
                s["durable_lsn"] == s["head_lsn"]
            });
    }

    fn replay_once(&self, replica: &Path, name: &str, extra: &[&str]) -> std::process::Output {
        let mut args = replay_args(&self.journal, replica, name);
        args.push("--once".into());
        args.extend(extra.iter().map(|a| a.to_string()));
        run(&args)
    }

    fn replay_once_ok(&self, replica: &Path, name: &str, extra: &[&str]) -> String {
        let out = self.replay_once(replica, name, extra);
        assert!(
            out.status.success(),
            "replay {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The consumer `name`'s committed state, from `journal info --json`.
    fn consumer(&self, name: &str) -> Option<serde_json::Value> {
        let info: serde_json::Value = serde_json::from_str(&tinylag_ok(
            &["journal", "info", "--journal", &self.journal, "--json"],
            &[],
        ))
        .unwrap();
        info["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// More writes, then the primary stopped and every replica brought to its end.
    fn finish(&mut self, replicas: &[(&Path, &str)]) {
        self.write(&["write -P 0x5a 2M 4k", "write -z 5M 4k", "flush"]);
        self.drained();
        self.daemon.stop_ok();
        for (replica, name) in replicas {
            self.replay_once_ok(replica, name, &[]);
            assert_same_image(replica, &self.primary);
        }
    }
}

/// An image that is not the journal's state: zeros with garbage in regions 2 and 3, which the
/// journal never writes.
fn stale_image(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&pattern(7, 4096), 9 * MIB).unwrap();
    f.write_all_at(&pattern(8, 4096), 13 * MIB).unwrap();
}

#[test]
fn a_stale_image_is_refused_and_a_restore_seeds_it() {
    let mut setup = Setup::new();
    let reference = setup.path("dr.img");
    setup.replay_once_ok(&reference, "dr", &[]);
    let stale = setup.path("stale.img");
    stale_image(&stale);
    let before = file_hash(&stale);

    let out = setup.replay_once(&stale, "newguy", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stale image was adopted: {err}");
    for needle in [
        "nothing vouches",
        "Nothing was changed",
        "tinylag restore --output",
        "--check-seed",
        "--assume-seeded",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert_eq!(file_hash(&stale), before, "the refused image was changed");
    assert!(
        setup.consumer("newguy").is_none(),
        "a refused consumer was registered"
    );
    assert!(!setup.path("stale.img.undo").exists());
    assert!(!setup.path("stale.img.ctl").exists());

    // A file without any data is the blank device an agent creates (one killed before it
    // registered leaves such a file): adopted as blank.
    let blank = setup.path("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    setup.replay_once_ok(&blank, "blank", &[]);
    assert_eq!(setup.consumer("blank").unwrap()["seed"]["by"], "blank");

    // Way 1: the image comes from a restore of the vouched replica, which leaves a stamp.
    std::fs::remove_file(&stale).unwrap();
    tinylag_ok(
        &["mark", "seed-point", "--primary", &s(&setup.primary)],
        &[],
    );
    setup.write(&["write -P 0x11 1M 4k"]);
    setup.replay_once_ok(&reference, "dr", &[]);
    let restored = tinylag_ok(
        &[
            "restore",
            "--journal",
            &setup.journal,
            "--replica",
            &s(&reference),
            "--output",
            &s(&stale),
            "--mark",
            "seed-point",
        ],
        &[],
    );
    assert!(restored.contains("seed stamp"), "{restored}");
    let stamp = setup.path("stale.img.seed.json");
    assert!(stamp.exists());
    // A stamp vouches only for the file the restore left: touch it, and it is refused.
    let touched = setup.path("touched.img");
    std::fs::copy(&stale, &touched).unwrap();
    std::fs::copy(&stamp, setup.path("touched.img.seed.json")).unwrap();
    let out = setup.replay_once(&touched, "copycat", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not match its image"),
        "{err}"
    );
    assert!(setup.consumer("copycat").is_none());

    setup.replay_once_ok(&stale, "newguy", &[]);
    let state = setup.consumer("newguy").unwrap();
    assert_eq!(state["seed"]["by"], "restore", "{state:#}");
    assert!(!stamp.exists(), "the adopted image's stamp stays behind");
    // A stray or broken stamp matters only to a new consumer: an existing one restarts.
    std::fs::write(setup.path("dr.img.seed.json"), b"not a stamp").unwrap();
    setup.replay_once_ok(&reference, "dr", &[]);
    setup.finish(&[(&stale, "newguy"), (&reference, "dr"), (&blank, "blank")]);
}

#[test]
fn check_seed_proves_a_stale_image_against_the_primary_and_resyncs_what_differs() {
    let mut setup = Setup::new();
    let stale = setup.path("stale.img");
    stale_image(&stale);
    let primary = s(&setup.primary);

    let said = setup.replay_once_ok(&stale, "checker", &["--check-seed"]);
    assert!(said.contains("NOT VOUCHED YET"), "{said}");
    let state = setup.consumer("checker").unwrap();
    assert_eq!(state["seed"]["by"], "checking", "{state:#}");

    // The primary journals a VERIFY of every region; the agent compares its own.
    tinylag_ok(&["verify", "--primary", &primary], &[]);
    setup.drained();
    let said = setup.replay_once_ok(&stale, "checker", &[]);
    assert!(said.contains("resync --regions 2-3"), "{said}");
    let state = setup.consumer("checker").unwrap();
    assert_eq!(state["seed"]["by"], "checking");
    assert_eq!(state["seed"]["mismatched"], serde_json::json!([[2, 4]]));
    // A restore from an image not vouched for leaves no stamp.
    let restored = tinylag_ok(
        &[
            "restore",
            "--journal",
            &setup.journal,
            "--replica",
            &s(&stale),
            "--output",
            &s(&setup.path("from-unvouched.img")),
            "--at",
            &format!("@{}", support::replay::now_ns() as f64 / 1e9),
        ],
        &[],
    );
    assert!(restored.contains("no seed stamp"), "{restored}");
    assert!(!setup.path("from-unvouched.img.seed.json").exists());

    // The regions that differ come back as a resync span from the primary.
    tinylag_ok(&["resync", "--regions", "2-3", "--primary", &primary], &[]);
    setup
        .daemon
        .wait_status(Duration::from_secs(30), "the resync to be journaled", |s| {
            s["mode"] == "logging" && s["durable_lsn"] == s["head_lsn"]
        });
    let said = setup.replay_once_ok(&stale, "checker", &[]);
    assert!(!said.contains("NOT VOUCHED"), "{said}");
    let state = setup.consumer("checker").unwrap();
    assert_eq!(state["seed"]["by"], "checked", "{state:#}");
    setup.finish(&[(&stale, "checker")]);
}

#[test]
fn assume_seeded_adopts_an_operators_copy_and_says_so() {
    let mut setup = Setup::new();
    // The operator's own copy of the primary, taken while everything is journaled.
    let copy = setup.path("copy.img");
    std::fs::copy(&setup.primary, &copy).unwrap();

    let mut args = replay_args(&setup.journal, &copy, "copied");
    args.push("--assume-seeded".into());
    let log = setup.path("replay.log");
    let mut agent = support::replay::spawn(&args, &log);
    let control = setup.path("copy.img.ctl");
    // The text status, once the agent answers.
    agent.wait_for_path(&control, Duration::from_secs(30));
    let status = support::procs::wait_for("replay to answer", Duration::from_secs(30), || {
        let out = support::daemon::tinylag(&["status", "--control", &s(&control)], &[]);
        assert!(agent.exited().is_none(), "{}", agent.log_tail(4000));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    assert!(status.contains("ASSUMED"), "{status}");
    assert!(status.contains("--assume-seeded"), "{status}");
    let ended = agent.terminate(Duration::from_secs(20)).unwrap();
    assert!(ended.success(), "{}", agent.log_tail(4000));
    assert!(agent.log_tail(8000).contains("on the operator's word"));
    let state = setup.consumer("copied").unwrap();
    assert_eq!(state["seed"]["by"], "assumed", "{state:#}");
    let info = tinylag_ok(&["journal", "info", "--journal", &setup.journal], &[]);
    assert!(info.contains("seeded     ASSUMED"), "{info}");
    setup.finish(&[(&copy, "copied")]);
}
