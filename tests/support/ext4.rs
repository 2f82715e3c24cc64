//! A real file system on an NBD export without the kernel's nbd driver: `nbdfuse` shows the
//! export as a file, a loop device sits on that file, and `mkfs.ext4`/`mount` use it. Also
//! read-only loop mounts of images, to read files back out of what a test produced.
//!
//! Must never: leave a mount, a loop device or a FUSE mount behind when a test fails (the
//! guards undo them on drop, newest first, each waited for (see [`super::teardown`]), before
//! nbdfuse is killed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::init;
use super::nbd::{run_ok, ChildGuard, Cleanup, CLIENT_TIMEOUT};
use super::procs::{path, wait_for_path};

/// Whether this machine has FUSE and loop devices; when not, says on stderr that the test is
/// skipped (the caller returns), so every file-system test skips with the same line.
pub fn fuse_and_loop_or_skip() -> bool {
    let present = Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    if !present {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
    }
    present
}

/// `tinylag init` of a journal and primary of `size` for a file system through [`NbdLoop`]:
/// 1 MiB segments and 512-byte blocks, because nbdfuse passes the loop device's 512-byte
/// requests through unchanged, so the export must accept them.
pub fn init_for_loop(journal: &Path, primary: &Path, size: &str) {
    init(
        path(journal),
        primary,
        size,
        &["--segment-size", "1M", "--block-size", "512"],
        &[],
    );
}

/// A loop device on an `nbdfuse` file of one NBD export, with a mount point beside it.
pub struct NbdLoop {
    /// Undoes the mount, the loop device and the FUSE mount, newest first. Declared before
    /// `nbdfuse` so that it is dropped first: unmount before the kill.
    cleanup: Cleanup,
    nbdfuse: ChildGuard,
    /// The nbdfuse file: the export's bytes.
    pub file: PathBuf,
    /// The loop device on it (`/dev/loopN`).
    pub device: String,
    /// Where [`mount`](Self::mount) mounts it (`<dir>/mnt`, created empty).
    pub mnt: PathBuf,
}

impl NbdLoop {
    /// Starts `nbdfuse` on the export at `uri` under `<dir>/fuse` and puts a loop device on
    /// its file. Nothing is formatted or mounted yet.
    pub fn attach(uri: &str, dir: &Path) -> NbdLoop {
        let fuse_dir = dir.join("fuse");
        let mnt = dir.join("mnt");
        for d in [&fuse_dir, &mnt] {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let pidfile = dir.join("nbdfuse.pid");
        let file = fuse_dir.join("nbd");
        let nbdfuse = ChildGuard::spawn(Command::new("nbdfuse").args([
            "-P".as_ref(),
            pidfile.as_os_str(),
            file.as_os_str(),
            uri.as_ref(),
        ]));
        let mut cleanup = Cleanup::default();
        cleanup.unmount_fuse(&fuse_dir);
        wait_for_path(&pidfile, Duration::from_secs(30)).expect("nbdfuse to be ready");
        let out = run_ok(Command::new("losetup").args(["-f", "--show", path(&file)]));
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        cleanup.detach_loop(&device);
        NbdLoop {
            cleanup,
            nbdfuse,
            file,
            device,
            mnt,
        }
    }

    /// [`attach`](Self::attach), `mkfs.ext4` and [`mount`](Self::mount): a fresh ext4 on the
    /// export, mounted on [`mnt`](Self::mnt).
    pub fn ext4(uri: &str, dir: &Path) -> NbdLoop {
        let mut disk = NbdLoop::attach(uri, dir);
        disk.mkfs_ext4();
        disk.mount();
        disk
    }

    /// `mkfs.ext4` on the loop device.
    pub fn mkfs_ext4(&self) {
        run_ok(Command::new("mkfs.ext4").args(["-q", &self.device]));
    }

    /// Mounts the loop device on [`mnt`](Self::mnt).
    pub fn mount(&mut self) {
        self.cleanup.unmount(&self.mnt);
        run_ok(Command::new("mount").args([&self.device, path(&self.mnt)]));
    }

    /// The pid of nbdfuse (for tests that check it is gone after a failure).
    pub fn nbdfuse_pid(&self) -> u32 {
        self.nbdfuse.id()
    }

    /// Unmounts (when mounted), detaches the loop device, unmounts the FUSE file and checks
    /// that nbdfuse then exited cleanly (it flushes and disconnects on unmount).
    pub fn finish(self) {
        let NbdLoop {
            mut cleanup,
            nbdfuse,
            ..
        } = self;
        cleanup.run_all();
        let exited = nbdfuse.wait(CLIENT_TIMEOUT);
        assert!(
            exited.status.success(),
            "nbdfuse exited with {}",
            exited.status
        );
    }
}

/// A read-only loop mount of an image, unmounted on drop.
pub struct ReadOnlyMount {
    cleanup: Cleanup,
}

impl ReadOnlyMount {
    /// Mounts `image` read-only at `mnt`.
    pub fn new(image: &Path, mnt: &Path) -> ReadOnlyMount {
        let mut cleanup = Cleanup::default();
        cleanup.detach_loops_of(image);
        cleanup.unmount(mnt);
        run_ok(Command::new("mount").args(["-o", "loop,ro", path(image), path(mnt)]));
        ReadOnlyMount { cleanup }
    }

    /// Unmounts now and waits until the loop device is gone, failing the test if that fails.
    pub fn unmount(mut self) {
        self.cleanup.run_all();
    }
}
