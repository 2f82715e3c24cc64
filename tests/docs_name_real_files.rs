//! ARCHITECTURE.md and docs/DESIGN.md name only files and modules that exist: a newcomer
//! follows them as a map, so a name left behind by a move or a rename is a wrong turn.
//!
//! Checked, in backticks: paths from the repository root (`src/…`, `tests/…`, `bench/…`),
//! paths relative to some folder of the code (`primary/start.rs`, `ublk/queue.rs`), bare
//! file names (`status.rs`: some file of that name exists), and module paths from a
//! top-level module of the library (`journal::head::gallop_end`: each segment a module file
//! while there is one, then a name that module's file mentions).
//!
//! Must never: pass on a document that names a missing file (the self-check below feeds it
//! one), or read anything outside the repository.

use std::path::{Path, PathBuf};

use regex_lite::Regex;

const DOCS: &[&str] = &["ARCHITECTURE.md", "docs/DESIGN.md"];
const ROOTS: &[&str] = &[
    "src", "bin", "tests", "bench", "examples", "docs", "scripts", "contrib",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, recursively (`target/` and hidden folders left out).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The file of module `name` inside the folder `dir` (`name.rs` or `name/mod.rs`).
fn module_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The folder holding the submodules of the module whose file is `file`.
fn module_dir(file: &Path) -> PathBuf {
    if file
        .file_name()
        .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
    {
        file.parent().unwrap().to_path_buf()
    } else {
        file.with_extension("")
    }
}

/// The names in `text` (a document) that name nothing in the repository at `root`.
fn missing_names(root: &Path, text: &str) -> Vec<String> {
    let mut all = Vec::new();
    for dir in ROOTS {
        files_under(&root.join(dir), &mut all);
    }
    let relative: Vec<String> = all
        .iter()
        .filter_map(|p| p.strip_prefix(root).ok())
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap_or_default();
    let top_modules: Vec<String> = Regex::new(r"(?m)^(?:pub(?:\(crate\))? )?mod (\w+);")
        .unwrap()
        .captures_iter(&lib)
        .map(|c| c[1].to_string())
        .collect();

    let rooted = Regex::new(&format!(r"^(?:{})/[\w./-]+$", ROOTS.join("|"))).unwrap();
    let rust_file = Regex::new(r"^[\w/-]+\.rs$").unwrap();
    let module_path = Regex::new(r"^(?:crate::)?\w+(?:::\w+)+(?:\(\))?$").unwrap();
    let mut missing = Vec::new();
    for span in Regex::new(r"`([^`\n]+)`").unwrap().captures_iter(text) {
        let name = span[1].trim();
        let found = if rooted.is_match(name) {
            root.join(name).exists()
        } else if rust_file.is_match(name) {
            // Relative to a section's folder, or a bare name: some file ends so.
            let tail = format!("/{name}");
            relative.iter().any(|f| f.ends_with(&tail))
        } else if module_path.is_match(name) {
            let path = name.trim_end_matches("()");
            let path = path.strip_prefix("crate::").unwrap_or(path);
            let segments: Vec<&str> = path.split("::").collect();
            if !top_modules.iter().any(|m| m == segments[0]) {
                continue;
            }
            module_path_exists(&root.join("src"), &segments)
        } else {
            continue;
        };
        if !found && !missing.iter().any(|m| m == name) {
            missing.push(name.to_string());
        }
    }
    missing
}

/// Whether `segments` (from a top-level module) walk through module files and end at a
/// name the last module file mentions (an item, a re-export, a method; the rest of the
/// path past the first non-module name is not checked).
fn module_path_exists(src: &Path, segments: &[&str]) -> bool {
    let Some(mut file) = module_file(src, segments[0]) else {
        return false;
    };
    for segment in &segments[1..] {
        match module_file(&module_dir(&file), segment) {
            Some(sub) => file = sub,
            None => {
                let body = std::fs::read_to_string(&file).unwrap_or_default();
                let word = Regex::new(&format!(r"\b{}\b", regex_lite::escape(segment))).unwrap();
                return word.is_match(&body);
            }
        }
    }
    true
}

#[test]
fn the_architecture_and_design_documents_name_only_real_files_and_modules() {
    let root = repo();
    let mut report = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(root.join(doc)).expect(doc);
        let missing = missing_names(&root, &text);
        if !missing.is_empty() {
            report.push(format!(
                "{doc} names what does not exist: {}",
                missing.join(", ")
            ));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn the_check_reports_a_missing_file_a_missing_module_and_a_missing_item() {
    // A repository of three files, so the check is seen to fail on what it must catch.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src/journal")).unwrap();
    std::fs::write(root.join("src/lib.rs"), "pub mod journal;\n").unwrap();
    std::fs::write(root.join("src/journal/mod.rs"), "pub mod head;\n").unwrap();
    std::fs::write(root.join("src/journal/head.rs"), "pub fn probe_end() {}\n").unwrap();
    let doc = "`src/journal/head.rs` `journal/head.rs` `head.rs` `journal::head::probe_end` \
               `src/journal/tail.rs` `tail.rs` `journal::tail` `journal::head::gone` \
               `std::sync::Mutex` `--flag`";
    assert_eq!(
        missing_names(root, doc),
        [
            "src/journal/tail.rs",
            "tail.rs",
            "journal::tail",
            "journal::head::gone"
        ]
    );
}

/// ARCHITECTURE.md stays a map a newcomer reads in ten minutes (about 1,800 words): how a
/// part works in detail belongs in its module's `//!` header.
#[test]
fn the_architecture_document_stays_a_ten_minute_read() {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let words = text.split_whitespace().count();
    assert!(
        words <= 1_800,
        "ARCHITECTURE.md has {words} words: move the detail into the module headers"
    );
}
