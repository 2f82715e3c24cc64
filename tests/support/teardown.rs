//! Undoing what a test mounted or attached — mounts, loop devices, FUSE mounts — newest first,
//! on the normal path and on every failure path (a panic unwinds through [`Cleanup`]'s drop).
//!
//! Each step waits until the kernel has really let go, because the next step depends on it:
//! `losetup -d` on a loop device that is still open (udev probing it after an unmount) only
//! marks it for auto-clear, and the loop keeps the nbdfuse file open until the last opener
//! closes; unmounting the FUSE file system before then fails with "Device or resource busy".
//! So a detach waits until the loop device has no backing file any more, and every unmount is
//! retried with backoff while the kernel says busy. A detach asks once and then only watches:
//! once the kernel has auto-cleared the device, another test may bind the same `/dev/loopN`,
//! and a second `losetup -d` by name would detach *its* device (seen as "unable to read
//! superblock" in a neighbour test), so a device bound to another file is no longer ours.
//!
//! Must never: leave a mount or a loop device behind because one attempt failed; touch a mount
//! or loop device the test did not register; wait without a bound.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::nbd::run;

/// How long one step may keep retrying before it gives up (and, on drop, falls back to a lazy
/// unmount so that nothing stays in the mount table).
const STEP_BUDGET: Duration = Duration::from_secs(30);
/// The first pause between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// One thing to undo.
#[derive(Debug)]
enum Step {
    /// `umount PATH`, retried while busy, until PATH is no mount point.
    Unmount(PathBuf),
    /// `losetup -d DEVICE` (once, while it is bound to `backing`), then waiting until it is
    /// bound to nothing or to another file.
    DetachLoop {
        device: String,
        backing: Option<PathBuf>,
        asked: std::cell::Cell<bool>,
    },
    /// Every loop device on IMAGE (what `mount -o loop` attached), detached and waited for.
    DetachLoopsOf(PathBuf),
    /// `fusermount3 -u PATH`, retried while busy, until PATH is no mount point.
    UnmountFuse(PathBuf),
}

/// Teardown steps run newest first: explicitly one by one ([`Cleanup::run_last`], which fails
/// the test if a step cannot be done) or all at drop (best effort, with a lazy unmount as the
/// last resort), so a failing test leaves no mount behind.
#[derive(Debug, Default)]
pub struct Cleanup {
    steps: Vec<Step>,
}

impl Cleanup {
    /// Registers unmounting `mnt`. Register it before running `mount`: a mount that happened
    /// although the command failed or timed out is undone too (a step that finds nothing
    /// mounted is done).
    pub fn unmount(&mut self, mnt: &Path) {
        self.steps.push(Step::Unmount(mnt.to_owned()));
    }

    /// Registers detaching the loop device `device` (`/dev/loopN`).
    pub fn detach_loop(&mut self, device: &str) {
        self.steps.push(Step::DetachLoop {
            device: device.to_owned(),
            backing: loop_backing_file(device),
            asked: std::cell::Cell::new(false),
        });
    }

    /// Registers detaching every loop device backed by `image` (`mount -o loop` attaches one
    /// that its unmount only auto-clears, lazily).
    pub fn detach_loops_of(&mut self, image: &Path) {
        // The kernel names the backing file by its resolved path.
        let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_owned());
        self.steps.push(Step::DetachLoopsOf(image));
    }

    /// Registers unmounting the FUSE file system at `dir` (nbdfuse exits once it is unmounted).
    pub fn unmount_fuse(&mut self, dir: &Path) {
        self.steps.push(Step::UnmountFuse(dir.to_owned()));
    }

    /// True when no step is left to run.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs the newest step now (the normal path) and fails the test if it cannot be done; the
    /// step stays registered until it succeeded, so the drop that follows a failure retries it.
    pub fn run_last(&mut self) {
        if let Some(step) = self.steps.last() {
            if let Err(e) = step.undo() {
                panic!("teardown step {step:?} failed: {e}");
            }
            self.steps.pop();
        }
    }

    /// Runs every step left, newest first.
    pub fn run_all(&mut self) {
        while !self.is_empty() {
            self.run_last();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some(step) = self.steps.pop() {
            if let Err(e) = step.undo() {
                eprintln!("teardown: {step:?} failed: {e}");
                step.last_resort();
            }
        }
    }
}

impl Step {
    /// Does the step, retrying with backoff until it is done or [`STEP_BUDGET`] has passed.
    fn undo(&self) -> Result<(), String> {
        let deadline = Instant::now() + STEP_BUDGET;
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::new();
        loop {
            match self.attempt() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not done after {STEP_BUDGET:?}; last error: {last_error}"
                ));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt: `Ok(true)` when the step is done (also when there was nothing to undo),
    /// `Ok(false)` to wait and look again, `Err` to retry after a failed command.
    fn attempt(&self) -> Result<bool, String> {
        match self {
            Step::Unmount(mnt) => unmount_with(mnt, "umount", &[]),
            Step::UnmountFuse(dir) => unmount_with(dir, "fusermount3", &["-u"]),
            Step::DetachLoop {
                device,
                backing,
                asked,
            } => match (loop_backing_file(device), backing) {
                (None, _) => Ok(true),
                // Auto-cleared and bound again by someone else: ours is gone.
                (Some(now), Some(ours)) if &now != ours => Ok(true),
                (Some(_), _) if asked.get() => Ok(false),
                (Some(_), _) => {
                    let done = detach(device)?;
                    asked.set(true);
                    Ok(done)
                }
            },
            Step::DetachLoopsOf(image) => {
                let mut done = true;
                for device in loops_of(image) {
                    done &= detach(&device)?;
                }
                Ok(done)
            }
        }
    }

    /// What is left when the step could not be done: take a mount out of the mount table
    /// lazily (the kernel finishes it when the last user goes), so no later test or run trips
    /// over it; a loop device has no such fallback beyond the auto-clear already set.
    fn last_resort(&self) {
        let (program, args) = match self {
            Step::Unmount(mnt) => ("umount", vec!["-l", super::procs::path(mnt)]),
            Step::UnmountFuse(dir) => ("fusermount3", vec!["-u", "-z", super::procs::path(dir)]),
            Step::DetachLoop { .. } | Step::DetachLoopsOf(_) => return,
        };
        let out = run(Command::new(program).args(&args), Duration::from_secs(30));
        if !out.status.success() {
            eprintln!(
                "teardown: {program} {args:?} failed too: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
}

/// Runs `program args… mnt` unless `mnt` is no mount point; done once it is not.
fn unmount_with(mnt: &Path, program: &str, args: &[&str]) -> Result<bool, String> {
    if !is_mount_point(mnt) {
        return Ok(true);
    }
    let out = run(
        Command::new(program).args(args).arg(mnt),
        Duration::from_secs(30),
    );
    if !is_mount_point(mnt) {
        return Ok(true);
    }
    Err(format!(
        "{program} {}: {} {}",
        mnt.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Whether `path` is a mount point in this process's mount namespace (read from
/// /proc/self/mountinfo, so a dead FUSE mount — "Transport endpoint is not connected" — counts).
pub fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    mount_points().iter().any(|m| *m == wanted)
}

/// Every mount point of this mount namespace.
pub fn mount_points() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file a loop device is bound to, or `None` once it is really detached (the kernel
/// removes `/sys/block/loopN/loop` when it clears the device).
pub fn loop_backing_file(device: &str) -> Option<PathBuf> {
    let name = device.trim_start_matches("/dev/");
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(backing.trim_end_matches('\n')))
}

/// Asks the kernel to detach `device` while it is still bound; done once it is not.
fn detach(device: &str) -> Result<bool, String> {
    if loop_backing_file(device).is_none() {
        return Ok(true);
    }
    // A device still open elsewhere is only marked for auto-clear: the next look decides.
    let out = run(
        Command::new("losetup").args(["-d", device]),
        Duration::from_secs(30),
    );
    if loop_backing_file(device).is_none() {
        return Ok(true);
    }
    if out.status.success() {
        Ok(false)
    } else {
        Err(format!(
            "losetup -d {device}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The loop devices bound to `image` right now (`/dev/loopN`).
pub fn loops_of(image: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .filter(|dev| loop_backing_file(dev).as_deref() == Some(image))
        .collect()
}
