//! The repository stands alone: no file in it (code, tests, scripts, docs) refers to a
//! file outside it, such as a `shared` folder beside the checkout or a path on the machine
//! it was developed on. `scripts/test` proves the same by running the whole suite from a
//! copy in a temporary directory; this test says *which* line is wrong, in a second.

use std::path::{Path, PathBuf};

/// Fragments that only a reference outside the repository contains. Built at run time so
/// this file does not match itself.
fn forbidden() -> Vec<String> {
    vec![
        ["..", "/shared"].concat(),
        ["/wo", "rk/"].concat(),
        ["shared", "/tools"].concat(),
        ["shared", "/DESIGN"].concat(),
        ["e2fsck", "-verdict"].concat(),
        ["project's shared", " folder"].concat(),
    ]
}

/// Directories that are not part of the repository's content.
const SKIP_DIRS: &[&str] = &["target", ".git", "tinylag-data"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        if SKIP_DIRS.contains(&name.to_str().unwrap_or_default()) {
            continue; // (a worktree's .git is a file naming where the repository is)
        }
        if entry.file_type().unwrap().is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn nothing_in_the_repository_refers_outside_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    files(root, &mut all);
    let patterns = forbidden();
    let mut hits = Vec::new();
    for path in &all {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue; // not text
        };
        for (n, line) in text.lines().enumerate() {
            if let Some(p) = patterns.iter().find(|p| line.contains(p.as_str())) {
                hits.push(format!(
                    "{}:{}: refers outside the repository ({p:?}): {}",
                    path.strip_prefix(root).unwrap_or(path).display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        all.len() > 20,
        "found only {} files under {}",
        all.len(),
        root.display()
    );
    assert!(hits.is_empty(), "{}", hits.join("\n"));
}
