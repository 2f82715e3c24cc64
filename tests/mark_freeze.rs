//! `tinylag mark --freeze`: ext4 mounted through nbdfuse + a loop device on a `serve`. A mark
//! taken with the file system frozen restores to an image that needs no journal recovery (a
//! plain mark of the same mounted file system restores to one that does: crash-consistent);
//! a failing `--exec-before` freezes nothing and records no mark; a mark that outlasts
//! `--freeze-timeout`, or a SIGTERM while frozen, leaves the file system unfrozen.

mod support;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::daemon::{tinylag, tinylag_ok, Daemon};
use support::ext4::{fuse_and_loop_or_skip, init_for_loop, NbdLoop, ReadOnlyMount};
use support::nbd::{pattern, run_ok};
use support::procs::{path, text, ChildGuard};
use support::replay::{replay_args, run_ok as run_tinylag_ok};
use support::verdict::{ext4_clean_without_recovery, ext4_needs_recovery, judge_ext4};

/// ext4 on a loop device on nbdfuse on a `serve` of a local journal. Fields drop in order:
/// the file system is unfrozen (should a test have failed while it was frozen), unmounted and
/// detached before the daemon stops and the directory goes.
struct MountedExt4 {
    disk: Option<NbdLoop>,
    daemon: Daemon,
    mnt: PathBuf,
    journal: PathBuf,
    dir: tempfile::TempDir,
}

impl MountedExt4 {
    fn new() -> MountedExt4 {
        let dir = tempfile::tempdir().unwrap();
        let primary = dir.path().join("primary.img");
        let journal = dir.path().join("journal");
        init_for_loop(&journal, &primary, "64M");
        let daemon = Daemon::start(&primary, path(&journal), &[], &[]);
        let disk = NbdLoop::ext4(&daemon.uri(), dir.path());
        MountedExt4 {
            mnt: disk.mnt.clone(),
            disk: Some(disk),
            daemon,
            journal,
            dir,
        }
    }

    fn control(&self) -> &str {
        path(&self.daemon.control)
    }

    /// Writes `count` files named `{prefix}{i}` (not synced: a plain mark may miss them).
    fn write_files(&self, prefix: &str, count: u64) -> Vec<(String, Vec<u8>)> {
        (0..count)
            .map(|i| {
                let name = format!("{prefix}{i}");
                let content = pattern(i + prefix.len() as u64 * 1000, 40_000 + i as usize * 512);
                std::fs::write(self.mnt.join(&name), &content).unwrap();
                (name, content)
            })
            .collect()
    }

    /// Unmounts everything, lets the journal drain, stops `serve`, replays the journal onto a
    /// replica and returns its path.
    fn finish_and_replay(&mut self) -> PathBuf {
        self.disk.take().expect("mounted").finish();
        self.daemon
            .wait_status(Duration::from_secs(60), "the journal to drain", |s| {
                s["durable_lsn"] == s["head_lsn"]
            });
        self.daemon.stop_ok();
        let replica = self.dir.path().join("replica.img");
        let mut args = replay_args(path(&self.journal), &replica, "dr");
        args.push("--once".into());
        run_tinylag_ok(&args);
        replica
    }

    /// `tinylag restore --mark NAME` into `<dir>/NAME.img`.
    fn restore(&self, replica: &Path, mark: &str) -> PathBuf {
        let out = self.dir.path().join(format!("{mark}.img"));
        tinylag_ok(
            &[
                "restore",
                "--mark",
                mark,
                "--replica",
                path(replica),
                "--journal",
                path(&self.journal),
                "--output",
                path(&out),
            ],
            &[],
        );
        out
    }
}

impl Drop for MountedExt4 {
    fn drop(&mut self) {
        if self.disk.is_some() {
            // A frozen file system cannot be unmounted; not frozen, this fails harmlessly.
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether the file system at `mnt` is frozen, asked without blocking: a second freeze of a
/// frozen file system fails with EBUSY; one that succeeds is undone at once.
fn is_frozen(mnt: &Path) -> bool {
    let freeze = Command::new("fsfreeze")
        .arg("--freeze")
        .arg(mnt)
        .output()
        .unwrap();
    if freeze.status.success() {
        run_ok(Command::new("fsfreeze").arg("--unfreeze").arg(mnt));
        return false;
    }
    let err = String::from_utf8_lossy(&freeze.stderr);
    assert!(
        err.contains("busy"),
        "fsfreeze --freeze {} failed otherwise: {err}",
        mnt.display()
    );
    true
}

/// Whether `journal` holds a mark named `name` (`journal info --json` lists none by name,
/// so ask the way an operator would: a second mark of that name is refused).
fn mark_exists(fs: &MountedExt4, name: &str) -> bool {
    let out = tinylag(&["mark", name, "--control", fs.control()], &[]);
    if out.status.success() {
        return false;
    }
    let err = text(&out);
    assert!(
        err.contains("already"),
        "mark {name} failed otherwise: {err}"
    );
    true
}

#[test]
fn a_frozen_mark_restores_to_an_ext4_that_needs_no_recovery() {
    if !fuse_and_loop_or_skip() {
        return;
    }
    let mut fs = MountedExt4::new();
    let before_plain = fs.write_files("a", 8);
    tinylag_ok(&["mark", "plain", "--control", fs.control()], &[]);
    let before_frozen = fs.write_files("b", 8);
    let marker = fs.dir.path().join("hooks-ran");
    let out = tinylag_ok(
        &[
            "mark",
            "frozen",
            "--control",
            fs.control(),
            "--freeze",
            path(&fs.mnt),
            "--exec-before",
            &format!("echo before >> {}", path(&marker)),
            "--exec-after",
            &format!("echo after >> {}", path(&marker)),
            "--json",
        ],
        &[],
    );
    let answer: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("mark --json prints only JSON ({e}): {out}"));
    assert_eq!(answer["name"], "frozen", "{answer}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "before\nafter\n",
        "the hooks ran once each, in order"
    );
    assert!(
        !is_frozen(&fs.mnt),
        "mark --freeze left the file system frozen"
    );
    let after = fs.write_files("c", 4);

    let replica = fs.finish_and_replay();
    let frozen = fs.restore(&replica, "frozen");
    if let Err(e) = ext4_clean_without_recovery(&frozen) {
        panic!("the image at the frozen mark is not clean as it is: {e}");
    }
    // The contrast: at the plain mark the file system was mounted and busy, so its image is
    // a crash state (legal, but it needs the journal replayed).
    let plain = fs.restore(&replica, "plain");
    assert!(
        ext4_needs_recovery(&plain).unwrap(),
        "the plain mark of a mounted ext4 should need journal recovery"
    );
    if let Err(verdict) = judge_ext4(&plain) {
        panic!("the plain mark is not even crash-consistent:\n{verdict}");
    }

    // Everything written before the frozen mark is in it, nothing written after.
    let look = fs.dir.path().join("look");
    std::fs::create_dir(&look).unwrap();
    let mounted = ReadOnlyMount::new(&frozen, &look);
    for (name, content) in before_plain.iter().chain(&before_frozen) {
        let got = std::fs::read(look.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *content, "{name} differs at the frozen mark");
    }
    for (name, _) in &after {
        assert!(
            !look.join(name).exists(),
            "{name} was written after the mark"
        );
    }
    mounted.unmount();
}

#[test]
fn a_failing_exec_before_freezes_nothing_and_records_no_mark() {
    if !fuse_and_loop_or_skip() {
        return;
    }
    let fs = MountedExt4::new();
    let after_ran = fs.dir.path().join("after-ran");
    let out = tinylag(
        &[
            "mark",
            "checkpoint",
            "--control",
            fs.control(),
            "--freeze",
            path(&fs.mnt),
            "--exec-before",
            "echo checkpoint failed >&2; exit 3",
            "--exec-after",
            &format!("touch {}", path(&after_ran)),
        ],
        &[],
    );
    let err = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--exec-before")
            && err.contains("exit status: 3")
            && err.contains("nothing was frozen and no mark recorded"),
        "{err}"
    );
    assert!(
        !after_ran.exists(),
        "--exec-after ran although --exec-before failed"
    );
    assert!(!is_frozen(&fs.mnt), "the file system was left frozen");
    assert!(!mark_exists(&fs, "checkpoint"), "a mark was recorded");

    // Bad input changes nothing either: a mount point that is not there.
    let out = tinylag(
        &[
            "mark",
            "nowhere",
            "--control",
            fs.control(),
            "--freeze",
            path(&fs.dir.path().join("absent")),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not a directory"), "{}", text(&out));
    assert!(!mark_exists(&fs, "nowhere"), "a mark was recorded");
}

/// A `mark --freeze` against a control socket that accepts but never answers: the file
/// system is frozen while the mark waits. Returns the running mark (its output in `log`)
/// once its request is in.
fn mark_that_hangs_while_frozen(
    fs: &MountedExt4,
    timeout: &str,
    log: &Path,
) -> (ChildGuard, UnixListener) {
    let silent = log.with_extension("ctl");
    let listener = UnixListener::bind(&silent).unwrap();
    let (accepted, connections) = mpsc::channel();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        // Held open, never answered (the first connection is mark's reachability check).
        let mut held = Vec::new();
        while let Ok((stream, _)) = accepting.accept() {
            held.push(stream);
            if accepted.send(()).is_err() {
                break;
            }
        }
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tinylag"));
    cmd.args([
        "mark",
        "hangs",
        "--control",
        path(&silent),
        "--freeze",
        path(&fs.mnt),
        "--freeze-timeout",
        timeout,
    ]);
    let mark = ChildGuard::spawn_logged("tinylag mark", &mut cmd, log).unwrap();
    for _ in 0..2 {
        connections
            .recv_timeout(Duration::from_secs(30))
            .expect("mark to connect to the control socket");
    }
    (mark, listener)
}

#[test]
fn a_mark_that_outlasts_the_freeze_timeout_or_is_terminated_unfreezes() {
    if !fuse_and_loop_or_skip() {
        return;
    }
    let fs = MountedExt4::new();

    let log = fs.dir.path().join("timeout.log");
    let (mut mark, _listener) = mark_that_hangs_while_frozen(&fs, "2s", &log);
    let status = mark
        .wait_timeout(Duration::from_secs(30))
        .expect("mark to give up");
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("longer than --freeze-timeout 2s"), "{err}");
    assert!(!is_frozen(&fs.mnt), "left frozen after the timeout:\n{err}");

    let log = fs.dir.path().join("sigterm.log");
    let (mut mark, _listener2) = mark_that_hangs_while_frozen(&fs, "10m", &log);
    assert!(
        is_frozen(&fs.mnt),
        "the mark is not taken inside the freeze"
    );
    // SAFETY: kill(2) on our own child's pid, which it still holds (not reaped).
    unsafe { libc::kill(mark.pid() as i32, libc::SIGTERM) };
    let status = mark
        .wait_timeout(Duration::from_secs(30))
        .expect("mark to stop on SIGTERM");
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by SIGTERM while frozen"), "{err}");
    assert!(!is_frozen(&fs.mnt), "left frozen after SIGTERM:\n{err}");
}
