//! Tests only: every `tinylag …` command line the documentation shows parses, so README.md
//! and the systemd units cannot show a command the CLI refuses. Covered: the lines of
//! README.md's shell blocks (```sh, ```console's `$ ` lines; `cargo run -- ARGS` counts as
//! `tinylag ARGS`), the man pages' EXAMPLES, and each unit's `ExecStart=` in contrib/systemd, whose `--config
//! /etc/tinylag/%i.toml` is the README's example file (so the example has every section a
//! unit reads, and each section makes a complete command line). The units' `systemctl
//! enable` examples must name that file's instance.
//!
//! Parsing is clap's (`Cli::try_parse_from`, after `config::merge` like `main`): flags,
//! values, required flags and conflicts are checked; nothing runs.
//!
//! (tests/readme_commands.rs checks the README's command table against `--help`; this test
//! lives in the binary because it needs the clap definition itself.)

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};

use crate::cmd::config;
use crate::Cli;

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shell command lines of a Markdown text's code blocks, with their line numbers:
/// continuation lines joined, comments dropped; ```console blocks contribute their `$ ` lines.
fn shell_lines(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        if let Some(fence) = line.strip_prefix("```") {
            block = match block {
                Some(_) => None,
                None => Some(fence.trim().to_string()),
            };
            continue;
        }
        let Some(kind) = &block else { continue };
        let line = match kind.as_str() {
            "sh" | "shell" | "bash" | "" => line,
            "console" => match line.strip_prefix("$ ") {
                Some(command) => command,
                None if pending.is_some() => line,
                None => continue,
            },
            _ => continue,
        };
        let line = without_comment(line);
        let (number, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        match line.trim_end().strip_suffix('\\') {
            Some(start) => {
                joined.push_str(start);
                joined.push(' ');
                pending = Some((number, joined));
            }
            None => {
                joined.push_str(line);
                if !joined.trim().is_empty() {
                    out.push((number, joined));
                }
            }
        }
    }
    out
}

/// `line` without a `# comment` (a `#` at the start or after a blank, outside quotes).
fn without_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (at, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous.is_whitespace() => return &line[..at],
            _ => {}
        }
        previous = c;
    }
    line
}

/// The words of a shell line, split into its commands at `&&`, `||`, `|` and `;`, each
/// command cut at its first redirection or `&`. Quotes group and are removed.
fn shell_commands(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    let mut cut = false;
    let mut chars = line.chars().peekable();
    let end_word =
        |word: &mut String, in_word: &mut bool, cut: bool, commands: &mut Vec<Vec<String>>| {
            if *in_word && !cut {
                commands
                    .last_mut()
                    .expect("one command")
                    .push(std::mem::take(word));
            }
            word.clear();
            *in_word = false;
        };
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => end_word(&mut word, &mut in_word, cut, &mut commands),
            (None, '&' | '|' | ';') => {
                end_word(&mut word, &mut in_word, cut, &mut commands);
                if matches!(chars.peek(), Some('&' | '|')) {
                    chars.next();
                } else if c == '&' {
                    cut = true; // `cmd &`: the rest of this command is not its arguments
                    continue;
                }
                commands.push(Vec::new());
                cut = false;
            }
            (None, '>' | '<') => {
                if word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear(); // the `2` of `2>`
                    in_word = false;
                }
                end_word(&mut word, &mut in_word, cut, &mut commands);
                cut = true;
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut word, &mut in_word, cut, &mut commands);
    commands.retain(|c| !c.is_empty());
    commands
}

/// The arguments of `tinylag` in a command (after `VAR=value`s and `sudo`), if it runs
/// tinylag: `tinylag ARGS`, `/path/to/tinylag ARGS` or `cargo run [--release] -- ARGS`.
fn tinylag_argv(command: &[String]) -> Option<Vec<String>> {
    let start = command.iter().position(|w| {
        let assignment = w.contains('=') && !w.starts_with('-');
        !assignment && w != "sudo"
    })?;
    let command = &command[start..];
    let program = command.first()?;
    let args = if program == "tinylag" || program.ends_with("/tinylag") {
        &command[1..]
    } else if program == "cargo" && command.get(1).is_some_and(|w| w == "run") {
        let dashes = command.iter().position(|w| w == "--")?;
        &command[dashes + 1..]
    } else {
        return None;
    };
    Some(
        std::iter::once("tinylag".to_string())
            .chain(args.iter().cloned())
            .collect(),
    )
}

/// Why `argv` does not parse as `main` would parse it, or `None`.
fn refusal(argv: &[String]) -> Option<String> {
    let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
    let merged = match config::merge(&Cli::command(), argv) {
        Ok(merged) => merged,
        Err(e) => return Some(e.to_string()),
    };
    match Cli::try_parse_from(&merged.argv) {
        Ok(_) => None,
        Err(e) if !e.use_stderr() => None, // --help, --version
        Err(e) => Some(e.render().to_string()),
    }
}

/// The README's example config file: its name (`db1` for `# /etc/tinylag/db1.toml`) and text.
fn readme_config(readme: &str) -> (String, String) {
    let start = readme
        .find("```toml\n")
        .expect("a ```toml block in README.md")
        + 8;
    let end = start + readme[start..].find("```").expect("the block's end");
    let text = &readme[start..end];
    let name = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# /etc/tinylag/"))
        .and_then(|l| l.trim().strip_suffix(".toml"))
        .expect("the README's config example starts with `# /etc/tinylag/NAME.toml`");
    (name.to_string(), text.to_string())
}

#[test]
fn every_command_line_in_the_readme_parses() {
    let readme = read(&repo_file("README.md"));
    let mut checked = 0;
    let mut problems = Vec::new();
    for (number, line) in shell_lines(&readme) {
        for command in shell_commands(&line) {
            let Some(argv) = tinylag_argv(&command) else {
                continue;
            };
            checked += 1;
            if let Some(why) = refusal(&argv) {
                problems.push(format!("README.md:{number}: `{}`:\n{why}", argv.join(" ")));
            }
        }
    }
    assert!(
        checked >= 5,
        "only {checked} tinylag command lines found in README.md"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_unit_runs_a_command_line_the_readme_config_completes() {
    let readme = read(&repo_file("README.md"));
    let (instance, example) = readme_config(&readme);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{instance}.toml"));
    std::fs::write(&file, example).unwrap();
    let units: Vec<PathBuf> = std::fs::read_dir(repo_file("contrib/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mut problems = Vec::new();
    let mut services = 0;
    for unit in &units {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let text = read(unit);
        for line in text.lines() {
            if let Some(exec) = line.strip_prefix("ExecStart=") {
                services += 1;
                let exec = exec.replace("/etc/tinylag/%i.toml", &file.display().to_string());
                for command in shell_commands(&exec) {
                    let argv = tinylag_argv(&command)
                        .unwrap_or_else(|| panic!("{name}: ExecStart runs no tinylag"));
                    // A unit's command must be complete: no flag left for a command line.
                    if let Some(why) = refusal(&argv) {
                        problems.push(format!("{name}: `{}`:\n{why}", argv.join(" ")));
                    }
                }
            }
            // `systemctl enable --now tinylag-replay@db1`: the README's example instance.
            for word in without_comment(line.trim_start_matches('#')).split_whitespace() {
                if let Some((_, example)) = word
                    .strip_prefix("tinylag-")
                    .and_then(|w| w.split_once('@'))
                {
                    let example = example.split('.').next().unwrap_or(example);
                    if !example.is_empty() && !example.starts_with('%') && example != instance {
                        problems.push(format!(
                            "{name}: its example instance `{word}` is not the README's ({instance}, /etc/tinylag/{instance}.toml)"
                        ));
                    }
                }
            }
        }
        // Every unit is named in the README's service section.
        if !readme.contains(&name) {
            problems.push(format!("{name} is not named in README.md"));
        }
    }
    assert!(
        services >= 4,
        "only {services} ExecStart= lines in contrib/systemd"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_man_page_example_parses() {
    // `--config /etc/tinylag/db1.toml` is the README's example file.
    let (instance, example_config) = readme_config(&read(&repo_file("README.md")));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{instance}.toml"));
    std::fs::write(&file, example_config).unwrap();
    let installed = format!("/etc/tinylag/{instance}.toml");
    let mut problems = Vec::new();
    for example in crate::cmd::shell_docs::EXAMPLES {
        for command in shell_commands(example.command) {
            let argv: Vec<String> = tinylag_argv(&command)
                .expect("an example runs tinylag")
                .into_iter()
                .map(|a| {
                    if a == installed {
                        file.display().to_string()
                    } else {
                        a
                    }
                })
                .collect();
            if let Some(why) = refusal(&argv) {
                problems.push(format!("`{}`:\n{why}", example.command));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn shell_lines_are_split_into_commands() {
    let words = |line: &str| shell_commands(without_comment(line));
    assert_eq!(
        words("tinylag manpage /usr/share/man1 && mandb -q   # man tinylag-serve"),
        [
            vec!["tinylag", "manpage", "/usr/share/man1"],
            vec!["mandb", "-q"]
        ]
    );
    assert_eq!(
        words("TINYLAG_LOG=debug tinylag up --dir 'a b' 2>log &"),
        [vec!["TINYLAG_LOG=debug", "tinylag", "up", "--dir", "a b"]]
    );
    assert_eq!(
        tinylag_argv(&words("cargo run --release -- up --size 1G")[0]),
        Some(vec![
            "tinylag".into(),
            "up".into(),
            "--size".into(),
            "1G".into()
        ])
    );
    let md = "```sh\ntinylag serve --primary p \\\n  --journal j   # c\n```\n```toml\ntinylag = 1\n```\n";
    assert_eq!(
        shell_lines(md),
        [(2, "tinylag serve --primary p    --journal j   ".to_string())]
    );
}
