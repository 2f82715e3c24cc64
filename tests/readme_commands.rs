//! README.md's command table is checked against the CLI itself, so it cannot drift: every
//! subcommand `tinylag --help` lists (recursively) has a row, every long flag its `--help`
//! shows appears in that row, and every flag a row names exists. (That every command line of
//! the README's shell blocks and of the systemd units parses is checked in the binary:
//! bin/tinylag/doc_examples.rs, `cargo test --bin tinylag doc_examples`.)
//!
//! To add a command: add a row `| \`tinylag NAME --flag VALUE [--other]\` | what it does |`
//! to the table under "## Commands" (global flags such as `--log` and `--color` are listed
//! once below the table, not in each row).

use std::collections::BTreeSet;
use std::process::Command;

/// Flags documented once, below the table (every command's, or every journal command's),
/// rather than in each row; each must still appear somewhere in README.md.
const GLOBAL_FLAGS: &[&str] = &[
    "--help",
    "--version",
    "--log",
    "--log-format",
    "--color",
    "--encryption-key",
    "--s3-endpoint",
    "--s3-region",
    "--s3-path-style",
];

fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tinylag"))
        .args(path)
        .arg("--help")
        .env("NO_COLOR", "1")
        .output()
        .expect("run tinylag --help");
    assert!(out.status.success(), "tinylag {path:?} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The subcommand names of a `--help` text's "Commands:" section (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The long flags of a `--help` text's "Options:" section.
fn long_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Options:"))
        .filter(|l| l.trim_start().starts_with('-'))
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ','))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split(['=', '<', '[']).next().unwrap_or(w).to_owned())
        .collect()
}

/// Every command path with its help text, depth first (`["journal", "info"]`, …).
fn leaf_commands() -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut todo: Vec<Vec<String>> = subcommands(&help(&[]))
        .into_iter()
        .map(|c| vec![c])
        .collect();
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        let children = subcommands(&text);
        if children.is_empty() {
            out.push((path, text));
        } else {
            todo.extend(children.into_iter().map(|c| {
                let mut p = path.clone();
                p.push(c);
                p
            }));
        }
    }
    out.sort();
    out
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md")
}

/// The first cells of the README's "## Commands" table: `tinylag journal info --journal URI …`.
fn readme_rows() -> Vec<String> {
    readme()
        .lines()
        .skip_while(|l| !l.starts_with("## Commands"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("| `tinylag "))
        .map(|l| {
            let cell = l.trim_start_matches("| ");
            let end = cell.find("` |").unwrap_or(cell.len());
            cell[1..end].replace(r"\|", "|")
        })
        .collect()
}

/// The row of `path`: the longest command prefix wins (`journal info`, not `journal`).
fn row_of<'a>(rows: &'a [String], path: &[String]) -> Option<&'a String> {
    let prefix = format!("tinylag {}", path.join(" "));
    rows.iter().find(|r| {
        r.strip_prefix(&prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
    })
}

fn flags_in(row: &str) -> BTreeSet<String> {
    row.split(|c: char| c.is_whitespace() || "[]|(),".contains(c))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap_or(w).to_owned())
        .collect()
}

#[test]
fn the_readme_command_table_matches_the_cli() {
    let rows = readme_rows();
    assert!(!rows.is_empty(), "README.md has no '## Commands' table");
    let mut problems = Vec::new();
    let mut used_rows = BTreeSet::new();
    for (path, text) in leaf_commands() {
        let name = format!("tinylag {}", path.join(" "));
        let Some(row) = row_of(&rows, &path) else {
            problems.push(format!(
                "`{name}` has no row: add `| \\`{name} …\\` | what it does |` (see `{name} --help`)"
            ));
            continue;
        };
        used_rows.insert(row.clone());
        let in_help: BTreeSet<String> = long_flags(&text)
            .into_iter()
            .filter(|f| !GLOBAL_FLAGS.contains(&f.as_str()))
            .collect();
        let in_row = flags_in(row);
        let missing: Vec<_> = in_help.difference(&in_row).cloned().collect();
        let stale: Vec<_> = in_row.difference(&in_help).cloned().collect();
        if !missing.is_empty() {
            problems.push(format!(
                "`{name}`: the README row lacks {}",
                missing.join(", ")
            ));
        }
        if !stale.is_empty() {
            problems.push(format!(
                "`{name}`: the README row names {}, which `{name} --help` does not show",
                stale.join(", ")
            ));
        }
    }
    let text = readme();
    for flag in GLOBAL_FLAGS
        .iter()
        .filter(|f| !["--help", "--version"].contains(f))
    {
        if !text.contains(&format!("`{flag}")) {
            problems.push(format!("{flag} is not described anywhere in README.md"));
        }
    }
    for row in rows.iter().filter(|r| !used_rows.contains(*r)) {
        problems.push(format!(
            "README row `{row}` is not a command of `tinylag --help`"
        ));
    }
    assert!(
        problems.is_empty(),
        "README.md's command table (## Commands) is out of step with the CLI:\n  {}",
        problems.join("\n  ")
    );
}
