//! The calibrated ext4 judge, `shared/tools/e2fsck-verdict`, found beside the checkout
//! (as CI lays it out) or at `$TINYLAG_E2FSCK_VERDICT`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Path of the judge; panics with where it looked when it is missing (a filesystem test
/// without its judge must fail, not pass).
pub fn e2fsck_verdict() -> PathBuf {
    let candidates: Vec<PathBuf> = std::env::var_os("TINYLAG_E2FSCK_VERDICT")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/e2fsck-verdict"),
            PathBuf::from("/work/shared/tools/e2fsck-verdict"),
        ])
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("e2fsck-verdict not found; looked at {candidates:?}"))
}

/// Judges an ext4 image (a copy is made; the judge repairs what it checks). Returns the
/// judge's output on failure.
pub fn judge_ext4(image: &Path) -> Result<(), String> {
    let copy = image.with_extension("verdict-copy");
    std::fs::copy(image, &copy).map_err(|e| format!("copy {}: {e}", image.display()))?;
    let out = Command::new(e2fsck_verdict())
        .arg(&copy)
        .output()
        .map_err(|e| format!("run e2fsck-verdict: {e}"))?;
    let _ = std::fs::remove_file(&copy);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}
