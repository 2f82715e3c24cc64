//! The FUSE/loop tear-down under failure: a test that panics with ext4 mounted on a loop
//! device on an nbdfuse file leaves no mount, no loop device and no nbdfuse behind — also
//! when the loop device is still held open elsewhere at that moment (as udev holds it after
//! an unmount), which makes `losetup -d` detach only lazily and an immediate FUSE unmount
//! fail with "Device or resource busy" (the failure seen in `scripts/test`).
//!
//! The panicking test runs as a child process (this test binary, one ignored test), so the
//! parent sees the panic's whole unwinding and then looks at what is left.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::ext4::NbdLoop;
use support::nbd::{run, run_ok, ExportSpec, TestServer};
use support::procs::{path, text, wait_until};
use support::teardown::{is_mount_point, loop_backing_file, Cleanup};

/// Where the parent tells the child to work (the child's test is a no-op without it).
const WORK_DIR_VAR: &str = "TINYLAG_TEARDOWN_WORK_DIR";
/// What the child panics with, so the parent knows it got that far.
const PANIC_TEXT: &str = "panicking on purpose with ext4 mounted";

fn has_fuse_and_loop() -> bool {
    Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists()
}

/// Runs [`child_panics_with_ext4_mounted`] in a child process and checks it left nothing.
#[test]
fn a_test_that_panics_with_ext4_mounted_leaves_nothing_behind() {
    if !has_fuse_and_loop() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_panics_with_ext4_mounted",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WORK_DIR_VAR, work.path())
        .output()
        .unwrap();
    let output = text(&out);
    assert!(
        !out.status.success() && output.contains(PANIC_TEXT),
        "the child test did not panic where it should:\n{output}"
    );

    let fuse_dir = work.path().join("fuse");
    let mnt = work.path().join("mnt");
    for dir in [&mnt, &fuse_dir] {
        assert!(
            !is_mount_point(dir),
            "{} is still mounted after the panic:\n{output}",
            dir.display()
        );
    }
    let device = std::fs::read_to_string(work.path().join("loop-device")).unwrap();
    assert!(
        loop_backing_file(&device).is_none_or(|f| !f.starts_with(work.path())),
        "{device} is still attached to {:?}:\n{output}",
        loop_backing_file(&device)
    );
    for (what, pid_file) in [("nbdfuse", "nbdfuse-pid"), ("the holder", "holder-pid")] {
        let pid = std::fs::read_to_string(work.path().join(pid_file)).unwrap();
        let gone = wait_until(Duration::from_secs(10), || !process_alive(pid.trim())).is_ok();
        assert!(gone, "{what} (pid {pid}) is still running:\n{output}");
    }
}

/// The child: ext4 mounted through nbdfuse + a loop device, a file open in it, the loop
/// device held open by another process for a few seconds, then a panic.
#[test]
#[ignore = "run as a child process by a_test_that_panics_with_ext4_mounted_leaves_nothing_behind"]
fn child_panics_with_ext4_mounted() {
    let Some(work) = std::env::var_os(WORK_DIR_VAR).map(PathBuf::from) else {
        panic!("run by the parent test, which sets {WORK_DIR_VAR}");
    };
    let server = TestServer::start(&[ExportSpec::new("disk", 32 << 20)]);
    let mut disk = NbdLoop::attach(&server.uri(""), &work);
    std::fs::write(work.join("loop-device"), &disk.device).unwrap();
    std::fs::write(work.join("nbdfuse-pid"), disk.nbdfuse_pid().to_string()).unwrap();
    disk.mkfs_ext4();
    disk.mount();
    let mut open_file = std::fs::File::create(disk.mnt.join("open-while-panicking")).unwrap();
    std::io::Write::write_all(&mut open_file, b"data").unwrap();
    // Holds the loop device open past the panic, as udev's probe does after an unmount: the
    // detach is then only lazy and the FUSE unmount busy until the holder exits by itself.
    // Not waited for here (that would end the hold before the tear-down): it is reaped once
    // this process exits, and the parent test waits for its pid to be gone.
    #[allow(clippy::zombie_processes)]
    let holder = Command::new("sh")
        .args(["-c", "exec 3<\"$1\"; sleep 3", "holder", &disk.device])
        .spawn()
        .unwrap();
    std::fs::write(work.join("holder-pid"), holder.id().to_string()).unwrap();
    wait_until(Duration::from_secs(10), || {
        holds_open(holder.id(), &disk.device)
    })
    .expect("the holder to open the loop device");
    panic!("{PANIC_TEXT}");
}

/// Whether process `pid` has `device` open.
fn holds_open(pid: u32, device: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new(device)))
}

/// Whether `pid` names a live process (a zombie counts as gone: it holds nothing).
fn process_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// `scripts/check-leftovers` (the end of `scripts/test`) names a mount under the run's
/// temporary directory and a process carrying the run's marker, fails while they are there,
/// and passes once they are gone.
#[test]
fn the_leftover_check_names_what_a_run_left_and_passes_once_it_is_gone() {
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-leftovers");
    let marker = format!("TINYLAG_TEST_RUN=leftover-check-{}", std::process::id());
    let check = || {
        let out = Command::new(script)
            .args([work.path().as_os_str(), marker.as_ref()])
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    assert_eq!(
        check(),
        (Some(0), String::new()),
        "a clean directory passes"
    );

    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cleanup = support::teardown::Cleanup::default();
    cleanup.unmount(&mnt);
    support::nbd::run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "leftover-test"])
            .arg(&mnt),
    );
    // A program named like one the suite starts, with the run's marker in its environment.
    let named = work.path().join("nbdfuse");
    std::fs::copy("/bin/sleep", &named).unwrap();
    let (name, value) = marker.split_once('=').unwrap();
    let mut process = support::procs::ChildGuard::spawn(
        "a leftover",
        Command::new(&named).arg("600").env(name, value),
    )
    .unwrap();
    let (code, report) = check();
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains(&format!("mount: {}", mnt.display()))
            && report.contains(&format!("process: {}", process.pid())),
        "{report}"
    );

    cleanup.run_all();
    process.terminate(Duration::from_secs(5)).unwrap();
    assert_eq!(
        check(),
        (Some(0), String::new()),
        "nothing left, so it passes"
    );
}

/// A detach whose loop device the kernel already cleared, and another user bound again to a
/// different file, leaves that device alone: a second `losetup -d` by name used to detach
/// the neighbour's device (a parallel test's mount then failed with "unable to read
/// superblock").
#[test]
fn a_detach_never_touches_a_loop_device_bound_again_to_another_file() {
    if !has_fuse_and_loop() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours.img"), dir.path().join("theirs.img"));
    for file in [&ours, &theirs] {
        std::fs::File::create(file)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let theirs = std::fs::canonicalize(&theirs).unwrap();
    // Another test may take the device between our detach and the rebind: try again then.
    for _ in 0..5 {
        let out = run_ok(Command::new("losetup").args(["-f", "--show", path(&ours)]));
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let mut ours_cleanup = Cleanup::default();
        ours_cleanup.detach_loop(&device);
        // The kernel clears ours (as an auto-clear does) and the same device is bound again.
        run_ok(Command::new("losetup").args(["-d", &device]));
        let rebound = run(
            Command::new("losetup").args([device.as_str(), path(&theirs)]),
            Duration::from_secs(30),
        );
        if !rebound.status.success() {
            continue;
        }
        let mut theirs_cleanup = Cleanup::default();
        theirs_cleanup.detach_loop(&device);
        ours_cleanup.run_all();
        assert_eq!(
            loop_backing_file(&device).as_deref(),
            Some(theirs.as_path()),
            "our tear-down detached {device}, which another file holds now"
        );
        theirs_cleanup.run_all();
        // Once detached, the device is free for anyone (a parallel test may already hold
        // it again): what matters is that it no longer holds the file we detached.
        assert_ne!(
            loop_backing_file(&device).as_deref(),
            Some(theirs.as_path()),
            "{device} left attached to {}",
            theirs.display()
        );
        return;
    }
    panic!("could not rebind a loop device five times in a row");
}
