//! `--config FILE`: the settings of `serve`, `replay`, `up`, `journal trim` and `undo trim` in a TOML file,
//! one section per daemon, and `tinylag config check FILE`.
//!
//! There is no second list of settings to keep in step with the flags: a section's keys are
//! the long flags of its subcommand (`pool-size = "1G"` is `--pool-size 1G`), found in the
//! clap definition, and each value goes through that flag's own clap value parser. A daemon
//! started with `--config` gets the section's settings appended to its command line as flags,
//! except those the command line (or the flag's environment variable) already gives, or that
//! conflict with a flag given there: the command line wins.
//!
//! Must never: accept a credential (no flag takes one; a key that looks like one is refused
//! by name), or print a value it cannot vouch for: an unknown key is named without its value,
//! and a TOML syntax error is placed by line and column without the text of the line.
//!
//! The file format:
//!
//! ```toml
//! [serve]                      # tinylag serve
//! primary = "/dev/vdb"         # --primary /dev/vdb
//! journal = "s3://bucket/db1"
//! pool-size = "1G"             # strings, or integers for numbers
//! direct = true                # a flag without a value: true sets it, false leaves it out
//! [replay]                     # tinylag replay
//! [up]                         # tinylag up
//! [journal-trim]               # tinylag journal trim
//! [undo-trim]                  # tinylag undo trim
//! ```
//!
//! Every problem of a file is reported in one run, in file order, each at its line, with the
//! nearest section or key name when one is close (`retian` → `retain`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command};

use crate::cmd::args::usage;

/// The sections of a config file and the subcommand (path from the root) each configures.
pub const SECTIONS: [(&str, &[&str]); 5] = [
    ("serve", &["serve"]),
    ("replay", &["replay"]),
    ("up", &["up"]),
    ("journal-trim", &["journal", "trim"]),
    ("undo-trim", &["undo", "trim"]),
];

/// Commands that read another command's section: a promoted site serves under the flags of
/// its `[serve]` (it becomes this site's primary), an old primary rejoins under those of its
/// `[replay]` (it becomes this site's replica). Keys the command does not take (`primary`
/// for `promote`, which takes `--replica`) are left out, as the command line's are.
const SHARED_SECTIONS: [(&str, &[&str]); 2] = [("serve", &["promote"]), ("replay", &["rejoin"])];

/// Key fragments that mark a credential; refused by name whatever the section, unless the
/// key names a place to read one from (`…-file`, `…-path`, `…-dir`).
const CREDENTIAL_WORDS: [&str; 6] = [
    "secret",
    "password",
    "token",
    "access-key",
    "access_key",
    "session",
];

/// Whether `key` looks like it holds a credential itself.
fn is_credential(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    CREDENTIAL_WORDS.iter().any(|w| key.contains(w))
        && !["-file", "-path", "-dir"].iter().any(|s| key.ends_with(s))
}

/// `--config FILE` of a daemon subcommand (flattened into its arguments). By the time the
/// subcommand runs, the file's settings are already on its command line.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// Read settings from this command's section of a TOML file ([serve], [replay], [up],
    /// [journal-trim] or [undo-trim]; promote reads [serve], rejoin [replay]): keys are its
    /// long flags (pool-size = "1G"); flags on the command line win. See `tinylag config
    /// check`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `tinylag config …`.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate every section of a config file and show the command line each one gives.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The TOML file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Where in a config file a problem is: `FILE:LINE` (the line of the section or key).
#[derive(Debug, Clone)]
pub struct Place {
    pub path: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// Why a config file was refused. Every message names the file and, where there is one, the
/// line, section and key, and says what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML (placed by line and column only: the line could hold a secret).
    #[error("{path}:{line}:{column}: not valid TOML: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A table that is not one of the sections.
    #[error(
        "{at}: unknown section [{section}]{hint}; the sections are {}",
        section_list()
    )]
    UnknownSection {
        at: Place,
        section: String,
        /// " (did you mean [serve]?)" or nothing.
        hint: String,
    },
    /// A key outside any section.
    #[error(
        "{at}: `{key}` is outside any section; put it under one of {}",
        section_list()
    )]
    NotInSection { at: Place, key: String },
    /// A key that is not a long flag of the section's subcommand.
    #[error("{at}: [{section}] has no key `{key}`; {hint}")]
    UnknownKey {
        at: Place,
        section: String,
        key: String,
        /// "did you mean `retain`?", else where the keys are listed.
        hint: String,
    },
    /// A key that looks like a credential.
    #[error(
        "{at}: [{section}] `{key}`: credentials are not accepted in a config file; use the standard AWS chain: \
         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (under systemd: EnvironmentFile= \
         with mode 0600), a profile in AWS_SHARED_CREDENTIALS_FILE, or instance metadata"
    )]
    Credential {
        at: Place,
        section: String,
        key: String,
    },
    /// The TOML type of a value does not fit its flag.
    #[error("{at}: [{section}] `{key}`: {expected}")]
    WrongType {
        at: Place,
        section: String,
        key: String,
        expected: String,
    },
    /// The flag's own parser refused the value.
    #[error("{at}: [{section}] `{key}`: {message}")]
    BadValue {
        at: Place,
        section: String,
        key: String,
        message: String,
    },
    /// The settings of a section contradict each other (clap's conflict rules).
    #[error("{at}: [{section}]: {message}")]
    Conflict {
        at: Place,
        section: String,
        message: String,
    },
    /// The command was started with a file that has no section for it.
    #[error("{path} has no [{section}] section (it has: {found})")]
    MissingSection {
        path: PathBuf,
        section: String,
        found: String,
    },
}

fn section_list() -> String {
    let names: Vec<String> = SECTIONS.iter().map(|(s, _)| format!("[{s}]")).collect();
    names.join(", ")
}

/// One setting: a key and the command-line arguments it stands for.
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: String,
    /// The clap id of the flag.
    id: String,
    pub argv: Vec<OsString>,
}

/// A validated section.
#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    /// The subcommand path, e.g. `["journal", "trim"]`.
    pub command: Vec<String>,
    pub settings: Vec<Setting>,
    /// Where its header is.
    pub place: Place,
}

/// A config file whose every section, key and value has been checked.
#[derive(Debug)]
pub struct ConfigFile {
    pub sections: Vec<Section>,
}

impl ConfigFile {
    /// Reads and checks `path` against `root`, the whole `tinylag` command.
    pub fn load(path: &Path, root: &Command) -> Result<ConfigFile, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            ConfigErrors::one(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        })?;
        Self::parse(path, &text, root)
    }

    /// Checks `text` (the contents of `path`): every section, key and value, each problem
    /// reported (in file order), not only the first.
    pub fn parse(path: &Path, text: &str, root: &Command) -> Result<ConfigFile, ConfigErrors> {
        let syntax = |e: toml::de::Error| {
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_column(text, span.start));
            ConfigErrors::one(ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            })
        };
        let table: toml::Table = toml::from_str(text).map_err(syntax)?;
        // The same document with its spans, for the file order and the line numbers.
        let spanned = toml::de::DeTable::parse(text).map_err(syntax)?;
        let at = |offset: usize| Place {
            path: path.to_path_buf(),
            line: line_column(text, offset).0,
        };
        let mut root = root.clone();
        root.build();
        let mut sections = Vec::new();
        let mut problems = Vec::new();
        for ((name, offset), keys) in in_file_order(spanned.get_ref()) {
            let value = &table[&name];
            let section_command = SECTIONS.iter().find(|(s, _)| *s == name);
            let (Some((_, command_path)), toml::Value::Table(entries)) = (section_command, value)
            else {
                problems.push(match value {
                    toml::Value::Table(_) => ConfigError::UnknownSection {
                        at: at(offset),
                        hint: closest(&name, SECTIONS.iter().map(|(s, _)| *s))
                            .map(|s| format!(" (did you mean [{s}]?)"))
                            .unwrap_or_default(),
                        section: name,
                    },
                    _ => ConfigError::NotInSection {
                        at: at(offset),
                        key: name,
                    },
                });
                continue;
            };
            let command = find_command(&root, command_path);
            let mut section = Section {
                name: name.clone(),
                command: command_path.iter().map(|s| s.to_string()).collect(),
                settings: Vec::new(),
                place: at(offset),
            };
            for (key, offset) in keys {
                match check_setting(&section, command, &key, &entries[&key], at(offset)) {
                    Ok(setting) => section.settings.push(setting),
                    Err(problem) => problems.push(problem),
                }
            }
            sections.push(section);
        }
        if problems.is_empty() {
            Ok(ConfigFile { sections })
        } else {
            Err(ConfigErrors {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }
}

/// Every problem found in a config file, in file order. Shown as the one problem's line, or
/// as a count followed by one line per problem.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub problems: Vec<ConfigError>,
}

impl ConfigErrors {
    fn one(problem: ConfigError) -> ConfigErrors {
        let path = match &problem {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::MissingSection { path, .. } => path.clone(),
            ConfigError::UnknownSection { at, .. }
            | ConfigError::NotInSection { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::Credential { at, .. }
            | ConfigError::WrongType { at, .. }
            | ConfigError::BadValue { at, .. }
            | ConfigError::Conflict { at, .. } => at.path.clone(),
        };
        ConfigErrors {
            path,
            problems: vec![problem],
        }
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{}: {} problems", self.path.display(), all.len())?;
                all.iter().try_for_each(|p| write!(f, "\n  {p}"))
            }
        }
    }
}

/// A name (a section's or a key's) and the byte offset it is written at.
type Written = (String, usize);

/// The sections of a parsed document in file order, each with the offset of its name and its
/// keys (with their offsets) in file order. (The parsed tables keep their keys sorted.)
fn in_file_order(document: &toml::de::DeTable<'_>) -> Vec<(Written, Vec<Written>)> {
    let mut sections: Vec<_> = document
        .iter()
        .map(|(name, value)| {
            let mut keys: Vec<Written> = match value.get_ref() {
                toml::de::DeValue::Table(entries) => entries
                    .keys()
                    .map(|k| (k.get_ref().to_string(), k.span().start))
                    .collect(),
                _ => Vec::new(),
            };
            keys.sort_by_key(|(_, offset)| *offset);
            ((name.get_ref().to_string(), name.span().start), keys)
        })
        .collect();
    sections.sort_by_key(|((_, offset), _)| *offset);
    sections
}

/// The candidate nearest to `typed`, if it is near enough to be what was meant: `pool_size`
/// for `pool-size`, `retian` for `retain`, `serv` for `serve`.
fn closest<'a>(typed: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let typed = typed.to_ascii_lowercase().replace('_', "-");
    candidates
        .map(|c| (strsim::damerau_levenshtein(&typed, c), c))
        .filter(|(distance, c)| *distance <= (c.len() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The subcommand of a built `root` at `path`.
fn find_command<'a>(root: &'a Command, path: &[&str]) -> &'a Command {
    path.iter().fold(root, |cmd, name| {
        cmd.find_subcommand(name)
            .unwrap_or_else(|| panic!("config section for a missing subcommand {name}"))
    })
}

/// The flags a section may set: every long flag of the subcommand (global ones included),
/// but not --help, --version or --config.
fn settable(command: &Command) -> impl Iterator<Item = (&str, &Arg)> {
    command.get_arguments().filter_map(|arg| {
        let long = arg.get_long()?;
        let settable = !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        ) && long != "config";
        settable.then_some((long, arg))
    })
}

/// Checks `key = value` of `section` against the flags of its `command`.
fn check_setting(
    section: &Section,
    command: &Command,
    key: &str,
    value: &toml::Value,
    at: Place,
) -> Result<Setting, ConfigError> {
    let (name, key) = (section.name.clone(), key.to_string());
    if is_credential(&key) {
        return Err(ConfigError::Credential {
            at,
            section: name,
            key,
        });
    }
    let Some((_, arg)) = settable(command).find(|(long, _)| *long == key) else {
        let hint = match closest(&key, settable(command).map(|(long, _)| long)) {
            Some(long) => format!("did you mean `{long}`?"),
            None => format!(
                "the keys are the long flags of `tinylag {}` (see its --help)",
                section.command.join(" ")
            ),
        };
        return Err(ConfigError::UnknownKey {
            at,
            section: name,
            key,
            hint,
        });
    };
    let argv = match to_argv(&key, arg, value) {
        Ok(argv) => argv,
        Err(expected) => {
            return Err(ConfigError::WrongType {
                at,
                section: name,
                key,
                expected,
            })
        }
    };
    if let Err(message) = check_value(&section.command.join(" "), &key, arg, &argv) {
        return Err(ConfigError::BadValue {
            at,
            section: name,
            key,
            message,
        });
    }
    Ok(Setting {
        key,
        id: arg.get_id().to_string(),
        argv,
    })
}

/// The command-line arguments `key = value` stands for, or what the flag expects.
fn to_argv(key: &str, arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let flag = format!("--{key}");
    let value_form = || {
        let name = arg
            .get_value_names()
            .and_then(|names| names.first())
            .map_or_else(|| key.to_uppercase(), |n| n.to_string());
        format!("expects a string (or an integer) like --{key} <{name}> takes, e.g. {key} = \"…\"")
    };
    let scalar = |v: &toml::Value| -> Option<String> {
        match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Datetime(d) => Some(d.to_string()),
            _ => None,
        }
    };
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value {
            toml::Value::Boolean(b) => {
                let set = *b == matches!(arg.get_action(), ArgAction::SetTrue);
                Ok(if set { vec![flag.into()] } else { Vec::new() })
            }
            _ => Err(format!(
                "expects true or false (--{key} is a flag without a value)"
            )),
        },
        ArgAction::Count => match value {
            toml::Value::Integer(n) if *n >= 0 => Ok(vec![flag.into(); *n as usize]),
            _ => Err(format!(
                "expects a count, 0 or more (how many times --{key} is given)"
            )),
        },
        ArgAction::Append => {
            let items: Vec<&toml::Value> = match value {
                toml::Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            items
                .into_iter()
                .map(|v| {
                    scalar(v)
                        .map(|s| format!("{flag}={s}").into())
                        .ok_or_else(value_form)
                })
                .collect()
        }
        _ => scalar(value)
            .map(|s| vec![format!("{flag}={s}").into()])
            .ok_or_else(value_form),
    }
}

/// Runs `argv` through the flag's own value parser (in a command holding that flag alone, so
/// the rules between flags do not apply yet); the error says what is wrong and what is
/// accepted.
fn check_value(command: &str, key: &str, arg: &Arg, argv: &[OsString]) -> Result<(), String> {
    let mut alone = Arg::new(arg.get_id().clone())
        .long(key.to_string())
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone())
        .allow_hyphen_values(arg.get_action().takes_values());
    if let Some(names) = arg.get_value_names() {
        alone = alone.value_names(names.to_vec());
    }
    Command::new(format!("tinylag {command}"))
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(alone)
        .try_get_matches_from(argv)
        .map(|_| ())
        .map_err(|e| clap_message(&e))
}

/// A clap error as one line, without `error: ` and the `--help` hint.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .collect();
    lines.join("; ").trim_start_matches("error: ").to_string()
}

/// A command line with the settings of its `--config FILE` added.
#[derive(Debug)]
pub struct Merged {
    pub argv: Vec<OsString>,
    /// The file, its section, and the keys taken from it (not overridden).
    pub from_file: Option<(PathBuf, String, Vec<String>)>,
}

/// Adds the settings of `--config FILE` (when the command line names one for a daemon
/// subcommand) to `argv`, skipping each key the command line or the environment already
/// sets, or that conflicts with a flag the command line gives. Any other command line comes
/// back as it was, for clap to parse (and refuse or explain).
pub fn merge(root: &Command, argv: Vec<OsString>) -> Result<Merged, ConfigErrors> {
    let unchanged = |argv| Merged {
        argv,
        from_file: None,
    };
    // A first, lenient parse: which subcommand, which config file, which flags are given.
    let Ok(top) = root.clone().ignore_errors(true).try_get_matches_from(&argv) else {
        return Ok(unchanged(argv));
    };
    let mut built = root.clone();
    built.build();
    for &(section_name, path) in SECTIONS.iter().chain(SHARED_SECTIONS.iter()) {
        let mut matches: &ArgMatches = &top;
        let mut command: &Command = &built;
        let mut found = true;
        for name in path {
            match matches.subcommand() {
                Some((n, sub)) if n == *name => {
                    matches = sub;
                    command = command.find_subcommand(name).expect("a matched subcommand");
                }
                _ => {
                    found = false;
                    break;
                }
            }
        }
        if !found {
            continue;
        }
        let Some(file) = given(matches, "config")
            .then(|| matches.get_one::<PathBuf>("config").cloned())
            .flatten()
        else {
            return Ok(unchanged(argv));
        };
        let config = ConfigFile::load(&file, root)?;
        let Some(section) = config.section(section_name) else {
            let found: Vec<String> = config
                .sections
                .iter()
                .map(|s| format!("[{}]", s.name))
                .collect();
            return Err(ConfigErrors::one(ConfigError::MissingSection {
                path: file,
                section: section_name.to_string(),
                found: if found.is_empty() {
                    "no sections".into()
                } else {
                    found.join(", ")
                },
            }));
        };
        let on_command_line: Vec<&Arg> = command
            .get_arguments()
            .filter(|a| given(matches, a.get_id().as_str()) || given(&top, a.get_id().as_str()))
            .collect();
        let mut argv = argv;
        let mut used = Vec::new();
        for setting in &section.settings {
            let Some(arg) = command
                .get_arguments()
                .find(|a| a.get_id().as_str() == setting.id)
            else {
                continue;
            };
            let overridden = on_command_line
                .iter()
                .any(|given| given.get_id() == arg.get_id() || conflicts(command, arg, given));
            if !overridden {
                argv.extend(setting.argv.iter().cloned());
                used.push(setting.key.clone());
            }
        }
        return Ok(Merged {
            argv,
            from_file: Some((file, section_name.to_string(), used)),
        });
    }
    Ok(unchanged(argv))
}

/// Whether `id` was given on the command line or by its environment variable.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches.ids().any(|i| i.as_str() == id)
        && matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
}

/// Whether clap refuses `a` and `b` together (either side may declare it).
fn conflicts(command: &Command, a: &Arg, b: &Arg) -> bool {
    if a.is_global_set() || b.is_global_set() {
        return false;
    }
    command
        .get_arg_conflicts_with(a)
        .iter()
        .any(|c| c.get_id() == b.get_id())
        || command
            .get_arg_conflicts_with(b)
            .iter()
            .any(|c| c.get_id() == a.get_id())
}

/// `tinylag config check FILE`: every section checked, and what each gives. A file with
/// problems is refused like the commands that read it refuse it (every problem listed, exit 2).
pub fn check(args: CheckArgs, root: Command) -> anyhow::Result<()> {
    let config = ConfigFile::load(&args.file, &root).map_err(|e| usage(e.to_string()))?;
    if config.sections.is_empty() {
        return Err(usage(format!(
            "{}: no sections; expected one or more of {}",
            args.file.display(),
            section_list()
        )));
    }
    let mut report = Vec::new();
    let mut conflicts = Vec::new();
    for section in &config.sections {
        let mut argv: Vec<OsString> = vec!["tinylag".into()];
        argv.extend(section.command.iter().map(OsString::from));
        argv.extend(section.settings.iter().flat_map(|s| s.argv.iter().cloned()));
        let shown: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let n = section.settings.len();
        report.push(format!(
            "[{}] {n} key{}: {}",
            section.name,
            if n == 1 { "" } else { "s" },
            shown.join(" ")
        ));
        // The rules between flags (conflicts, requirements), as the command will apply them.
        match root.clone().try_get_matches_from(&argv) {
            Ok(_) => report.push(format!(
                "  complete: `tinylag {} --config {}` needs no other flag",
                section.command.join(" "),
                args.file.display()
            )),
            Err(e) if e.kind() == clap::error::ErrorKind::MissingRequiredArgument => {
                let missing = match e.get(clap::error::ContextKind::InvalidArg) {
                    Some(clap::error::ContextValue::Strings(v)) => v.join(", "),
                    _ => clap_message(&e),
                };
                report.push(format!("  the command line must add: {missing}"));
            }
            Err(e) => conflicts.push(ConfigError::Conflict {
                at: section.place.clone(),
                section: section.name.clone(),
                message: clap_message(&e),
            }),
        }
    }
    if !conflicts.is_empty() {
        let errors = ConfigErrors {
            path: args.file.clone(),
            problems: conflicts,
        };
        return Err(usage(errors.to_string()));
    }
    let n = config.sections.len();
    println!(
        "{}: {n} section{}, all keys and values valid",
        args.file.display(),
        if n == 1 { "" } else { "s" }
    );
    for line in report {
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("tinylag")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn shown(argv: &[OsString]) -> Vec<String> {
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn file(body: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, body).unwrap();
        let path = path.display().to_string();
        (dir, path)
    }

    const SERVE: &str = "[serve]\nprimary = \"/p\"\njournal = \"/j\"\npool-size = \"64M\"\n\
                         no-activity-log = true\nlog-format = \"json\"\n";

    #[test]
    fn the_file_fills_in_what_the_command_line_leaves_out() {
        let (_dir, path) = file(SERVE);
        let root = crate::Cli::command();
        let merged = merge(&root, argv(&["serve", "--config", &path])).unwrap();
        let args = shown(&merged.argv);
        for expected in [
            "--primary=/p",
            "--journal=/j",
            "--pool-size=64M",
            "--no-activity-log",
            "--log-format=json",
        ] {
            assert!(args.contains(&expected.to_string()), "{args:?}");
        }
        let (_, section, keys) = merged.from_file.unwrap();
        assert_eq!(section, "serve");
        assert_eq!(keys.len(), 5, "{keys:?}");
    }

    #[test]
    fn the_command_line_wins_and_drops_conflicting_keys() {
        let (_dir, path) = file(SERVE);
        let root = crate::Cli::command();
        let merged = merge(
            &root,
            argv(&[
                "--log-format",
                "text",
                "serve",
                "--config",
                &path,
                "--pool-size",
                "8M",
                "--activity-log",
                "/al",
            ]),
        )
        .unwrap();
        let args = shown(&merged.argv);
        assert!(
            !args.iter().any(|a| a.starts_with("--pool-size=")),
            "{args:?}"
        );
        assert!(!args.contains(&"--no-activity-log".to_string()), "{args:?}");
        assert!(
            !args.contains(&"--log-format=json".to_string()),
            "a global given before the subcommand wins: {args:?}"
        );
        assert!(args.contains(&"--primary=/p".to_string()), "{args:?}");
    }

    #[test]
    fn other_command_lines_pass_through_untouched() {
        let (_dir, path) = file(SERVE);
        let root = crate::Cli::command();
        for args in [
            vec!["serve", "--primary", "/p", "--journal", "/j"],
            vec!["serve", "--config", &path, "--help"],
            vec!["status", "--control", "/c"],
            vec!["journal", "info", "--journal", "/j"],
        ] {
            let merged = merge(&root, argv(&args)).unwrap();
            assert_eq!(merged.argv, argv(&args));
            assert!(merged.from_file.is_none());
        }
    }

    #[test]
    fn keys_holding_credentials_are_told_from_keys_naming_a_file() {
        for key in [
            "s3-secret-access-key",
            "aws_secret_access_key",
            "aws-session-token",
            "access_key_id",
            "password",
        ] {
            assert!(is_credential(key), "{key}");
        }
        for key in [
            "s3-secret-file",
            "token-path",
            "pool-size",
            "tls-certificates",
        ] {
            assert!(!is_credential(key), "{key}");
        }
    }

    #[test]
    fn nested_subcommands_read_their_own_section() {
        let (_dir, path) = file(
            "[journal-trim]\njournal = \"/j\"\nretain = \"2h\"\ndry-run = true\n\
             [replay]\nbatch-records = 100\n",
        );
        let root = crate::Cli::command();
        let merged = merge(&root, argv(&["journal", "trim", "--config", &path])).unwrap();
        let args = shown(&merged.argv);
        assert!(args.contains(&"--retain=2h".to_string()), "{args:?}");
        assert!(args.contains(&"--dry-run".to_string()), "{args:?}");
        assert!(
            !args.iter().any(|a| a.starts_with("--batch")),
            "only [journal-trim]: {args:?}"
        );
        let cli = crate::Cli::try_parse_from(&merged.argv);
        assert!(cli.is_ok(), "{:?}", cli.err());
        // Integers pass as their text, through the flag's own parser.
        let merged = merge(&root, argv(&["replay", "--config", &path])).unwrap();
        assert!(shown(&merged.argv).contains(&"--batch-records=100".to_string()));
    }

    #[test]
    fn promote_reads_serve_and_rejoin_reads_replay() {
        let (_dir, path) = file(
            "[serve]
primary = \"/p\"
journal = \"/j\"
lease-time = \"20s\"
             [replay]
journal = \"/j\"
delay = \"1h\"
",
        );
        let root = crate::Cli::command();
        let merged = merge(
            &root,
            argv(&[
                "promote",
                "--replica",
                "/r",
                "--name",
                "b",
                "--config",
                &path,
            ]),
        )
        .unwrap();
        let args = shown(&merged.argv);
        assert!(args.contains(&"--lease-time=20s".to_string()), "{args:?}");
        assert!(args.contains(&"--journal=/j".to_string()), "{args:?}");
        assert!(
            !args.iter().any(|a| a.starts_with("--primary")),
            "promote takes --replica: {args:?}"
        );
        let cli = crate::Cli::try_parse_from(&merged.argv);
        assert!(cli.is_ok(), "{:?}", cli.err());
        let merged = merge(
            &root,
            argv(&[
                "rejoin",
                "--replica",
                "/a",
                "--name",
                "a",
                "--config",
                &path,
            ]),
        )
        .unwrap();
        let args = shown(&merged.argv);
        assert!(args.contains(&"--delay=1h".to_string()), "{args:?}");
        let cli = crate::Cli::try_parse_from(&merged.argv);
        assert!(cli.is_ok(), "{:?}", cli.err());
    }

    #[test]
    fn every_problem_is_reported_in_file_order_with_the_nearest_name() {
        let text = "[up]\nsize = \"nope\"\n[serv]\nx = 1\n[journal-trim]\nretian = \"2h\"\n\
                    dry_run = true\nzzzz = 1\n";
        let root = crate::Cli::command();
        let errors = ConfigFile::parse(Path::new("c.toml"), text, &root).unwrap_err();
        let lines: Vec<String> = errors.problems.iter().map(|p| p.to_string()).collect();
        let starts: Vec<&str> = lines.iter().map(|l| &l[..l.find(' ').unwrap()]).collect();
        assert_eq!(
            starts,
            [
                "c.toml:2:",
                "c.toml:3:",
                "c.toml:6:",
                "c.toml:7:",
                "c.toml:8:"
            ],
            "{lines:#?}"
        );
        assert!(lines[1].contains("(did you mean [serve]?)"), "{}", lines[1]);
        assert!(lines[2].ends_with("did you mean `retain`?"), "{}", lines[2]);
        assert!(
            lines[3].ends_with("did you mean `dry-run`?"),
            "{}",
            lines[3]
        );
        assert!(lines[4].contains("see its --help"), "{}", lines[4]);
        assert!(errors
            .to_string()
            .starts_with("c.toml: 5 problems\n  c.toml:2:"));
    }
}
