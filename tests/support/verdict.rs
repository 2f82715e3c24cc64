//! The project's ext4 judge: is an image a state a legal crash could have left?
//!
//! `e2fsck`'s exit code cannot tell: a legal crash image (a journal to replay, free counts
//! out of date, orphans to clean up) and a corrupt one (a directory block lost, a block
//! claimed twice) both exit 1 under `-fy`, and a following `-fn` exits 0 for both because
//! `-fy` repaired the damage. So the judge runs `e2fsck -fy` on a copy and classifies every
//! line it prints: it accepts only journal recovery, free block / inode count corrections and
//! orphan cleanup, then checks with `e2fsck -fn` that nothing is left to repair. Anything else
//! — a problem e2fsck found, a repair it made, an exit code above 1 — is a corrupt image.
//! Calibrated by `tests/fsjudge_calibration.rs` on images cut from a real ext4 write stream.
//!
//! Must never: accept a line it does not know (new e2fsck messages are rejected until
//! someone decides they are legal), or modify the image it is given (it works on a copy).

use std::path::Path;
use std::process::{Command, Output};

/// Lines e2fsck prints that are not problems: the banner, pass headers, blank lines, the
/// summary, and the "modified" notice that follows any repair (allowed or not: a disallowed
/// repair is rejected by its own problem line).
const INFORMATIONAL: &[&str] = &[
    r"^e2fsck \d+\.\d+",
    r"^Pass \d[A-Z]?: ",
    r"^\s*$",
    r"^[^:]*: \d+/\d+ files \(\d+\.\d+% non-contiguous\), \d+/\d+ blocks$",
    r"^[^:]*: \*+ FILE SYSTEM WAS MODIFIED \*+$",
];

/// What a legal crash state may need: replaying the jbd2 journal, correcting the free
/// block / inode counts (ext4 does not journal every counter update), and releasing the
/// inodes on the orphan list (files unlinked or truncated while open). The answer line
/// that follows an allowed problem is allowed too.
const LEGAL_REPAIRS: &[&str] = &[
    r"^[^:]*: recovering journal$",
    r"^Free (blocks|inodes) count wrong( for group #\d+)? \(\d+, counted=\d+\)\.$",
    r"^Fix\? yes$",
    r"^([^:]*: )?Clearing orphaned inode \d+ \(uid=\d+, gid=\d+, mode=0\d+, size=\d+\)$",
    r"^([^:]*: )?Truncating orphaned inode \d+ \(uid=\d+, gid=\d+, mode=0\d+, size=\d+\)$",
];

/// Judges an ext4 image. A copy is judged (e2fsck repairs what it checks); `image` is left
/// as it was. `Err` carries the offending e2fsck lines and its full output.
pub fn judge_ext4(image: &Path) -> Result<(), String> {
    let copy = tempfile::Builder::new()
        .prefix("fsjudge-")
        .suffix(".img")
        .tempfile_in(image.parent().unwrap_or(Path::new(".")))
        .map_err(|e| format!("cannot create a copy beside {}: {e}", image.display()))?;
    std::fs::copy(image, copy.path())
        .map_err(|e| format!("cannot copy {}: {e}", image.display()))?;
    let repair = e2fsck(&["-fy"], copy.path())?;
    let text = output_text(&repair);
    classify(&text, repair.status.code()).map_err(|bad| {
        format!(
            "not a legal crash state: e2fsck -fy exited {:?} and reported:\n{}\n--- full e2fsck output ---\n{text}",
            repair.status.code(),
            bad.join("\n")
        )
    })?;
    let check = e2fsck(&["-fn"], copy.path())?;
    if check.status.code() != Some(0) {
        return Err(format!(
            "e2fsck -fn still finds problems after the allowed repairs (exit {:?}):\n{}",
            check.status.code(),
            output_text(&check)
        ));
    }
    Ok(())
}

/// Sorts e2fsck `-fy` output: `Ok` when every line is informational or a legal repair and
/// the exit code is 0 (clean) or 1 (repaired); otherwise the lines that are neither (or the
/// exit code) as `Err`.
pub fn classify(output: &str, exit_code: Option<i32>) -> Result<(), Vec<String>> {
    let informational = regexes(INFORMATIONAL);
    let legal = regexes(LEGAL_REPAIRS);
    let mut bad: Vec<String> = output
        .lines()
        .filter(|line| !informational.iter().chain(&legal).any(|r| r.is_match(line)))
        .map(str::to_owned)
        .collect();
    if !matches!(exit_code, Some(0 | 1)) {
        bad.insert(
            0,
            format!("exit code {exit_code:?} (0 = clean and 1 = repaired are the only legal ones)"),
        );
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

fn regexes(patterns: &[&str]) -> Vec<regex_lite::Regex> {
    patterns
        .iter()
        .map(|p| regex_lite::Regex::new(p).expect("the judge's patterns are valid"))
        .collect()
}

fn e2fsck(flags: &[&str], image: &Path) -> Result<Output, String> {
    Command::new("e2fsck")
        .args(flags)
        .arg(image)
        .env("LC_ALL", "C")
        .env("E2FSCK_CONFIG", "/dev/null")
        .output()
        .map_err(|e| format!("cannot run e2fsck (install e2fsprogs): {e}"))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether an ext4 image is clean as it is, with nothing to recover: its superblock does not
/// ask for journal recovery (`needs_recovery`, set on every mounted ext4 and cleared by an
/// unmount or a freeze) and `e2fsck -fn` finds nothing. Read-only: the image is not changed.
/// `Err` says which and carries the tools' output.
pub fn ext4_clean_without_recovery(image: &Path) -> Result<(), String> {
    if ext4_needs_recovery(image)? {
        return Err(format!(
            "{} needs journal recovery (its superblock has needs_recovery)",
            image.display()
        ));
    }
    let check = e2fsck(&["-fn"], image)?;
    if check.status.code() != Some(0) {
        return Err(format!(
            "e2fsck -fn finds problems (exit {:?}):\n{}",
            check.status.code(),
            output_text(&check)
        ));
    }
    Ok(())
}

/// Whether an ext4 image's superblock asks for journal recovery (`dumpe2fs -h`).
pub fn ext4_needs_recovery(image: &Path) -> Result<bool, String> {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("cannot run dumpe2fs (install e2fsprogs): {e}"))?;
    let text = output_text(&out);
    let features = text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .ok_or_else(|| format!("dumpe2fs -h {} shows no features:\n{text}", image.display()))?;
    Ok(features.split_whitespace().any(|f| f == "needs_recovery"))
}
