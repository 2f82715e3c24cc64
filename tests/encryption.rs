//! Encryption at rest, driven through the real binary: known random patterns written
//! through `serve` by `nbdcopy` never appear in the store or the undo log, every reader with
//! the key gives the bytes an unencrypted run of the same writes gives, and a missing,
//! wrong or world-readable key, a tampered object and a keyring rotated across three keys
//! behave as DESIGN.md "Encryption at rest" says.

mod support;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::daemon::{init, tinylag, tinylag_bin, tinylag_ok, Daemon};
use support::nbd::{pattern, run as run_with_timeout, run_ok as run_cmd_ok};
use support::oracle::assert_same_image;
use support::replay::{file_hash, replay_args, run, run_ok};
use support::timetravel::Mount;

const PHASE_LEN: usize = 1 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `tinylag key generate --output FILE [--append]`; returns the new key's id.
fn keygen(path: &Path, append: bool) -> String {
    let mut args = vec!["key", "generate", "--output", path.to_str().unwrap()];
    if append {
        args.push("--append");
    }
    let out = tinylag_ok(&args, &[]);
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("key generate printed {out:?}"))
        .to_string()
}

/// Every 16-byte window of `data`.
fn windows(data: &[u8]) -> HashSet<[u8; 16]> {
    data.windows(16).map(|w| w.try_into().unwrap()).collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The first file under `dir` holding a window of `set`, and where.
fn leak(dir: &Path, set: &HashSet<[u8; 16]>) -> Option<(PathBuf, usize)> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files.sort();
    files.into_iter().find_map(|f| {
        let data = std::fs::read(&f).unwrap();
        data.windows(16)
            .position(|w| set.contains(<&[u8; 16]>::try_from(w).unwrap()))
            .map(|at| (f, at))
    })
}

/// A journal written through `serve` in phases: phase `n` copies 1 MiB of pattern `n` to
/// offset 0 with nbdcopy, then marks `p<n>`; the primary as of each mark is kept.
struct Written {
    primary: PathBuf,
    journal: PathBuf,
    /// Copies of the primary at each mark.
    at_mark: Vec<PathBuf>,
}

fn phase_data(n: u64) -> Vec<u8> {
    pattern(0xe4c0 + n, PHASE_LEN)
}

fn key_args(key: Option<&Path>) -> Vec<String> {
    key.map(|k| vec!["--encryption-key".to_string(), s(k)])
        .unwrap_or_default()
}

fn serve_phases(w: &mut Written, dir: &Path, key: Option<&Path>, phases: std::ops::Range<u64>) {
    let extra = key_args(key);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&w.primary, &s(&w.journal), &extra, &[]);
    daemon.wait_status(Duration::from_secs(60), "logging", |st| {
        st["mode"] == "logging"
    });
    for n in phases {
        let src = dir.join(format!("phase{n}.bin"));
        std::fs::write(&src, phase_data(n)).unwrap();
        run_cmd_ok(Command::new("nbdcopy").arg(&src).arg(daemon.uri()));
        let name = format!("p{n}");
        tinylag_ok(
            &["mark", &name, "--control", &s(&daemon.control), "--json"],
            &[],
        );
        let copy = dir.join(format!("{name}.expected"));
        std::fs::copy(&w.primary, &copy).unwrap();
        w.at_mark.push(copy);
    }
    daemon.wait_status(Duration::from_secs(60), "the journal to drain", |st| {
        st["durable_lsn"] == st["head_lsn"]
    });
    daemon.stop_ok();
}

fn write_journal(dir: &Path, key: Option<&Path>, phases: u64) -> Written {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = Written {
        primary: dir.join("primary.img"),
        journal: dir.join("journal"),
        at_mark: Vec::new(),
    };
    // A journal is encrypted for its life, chosen at init.
    let mut extra = vec!["--segment-size".to_string(), "256K".to_string()];
    extra.extend(key_args(key));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    init(&s(&w.journal), &w.primary, "8M", &extra, &[]);
    serve_phases(&mut w, dir, key, 0..phases);
    w
}

fn with_key(mut args: Vec<String>, key: Option<&Path>) -> Vec<String> {
    args.extend(key_args(key));
    args
}

/// `replay --once` onto `replica`, as a consumer named after the replica's file.
fn replay_once(journal: &Path, replica: &Path, key: Option<&Path>) -> std::process::Output {
    let name = replica.file_stem().unwrap().to_str().unwrap();
    let mut args = replay_args(&s(journal), replica, name);
    args.push("--once".into());
    run(&with_key(args, key))
}

fn restore(journal: &Path, replica: &Path, mark: &str, out: &Path, key: Option<&Path>) {
    let args: Vec<String> = [
        "restore",
        "--mark",
        mark,
        "--replica",
        &s(replica),
        "--journal",
        &s(journal),
        "--output",
        &s(out),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    run_ok(&with_key(args, key));
}

fn diff_lines(journal: &Path, key: Option<&Path>) -> Vec<String> {
    let args: Vec<String> = [
        "diff",
        "--journal",
        &s(journal),
        "--from",
        "p0",
        "--to",
        "p1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let out = run_ok(&with_key(args, key));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn nothing_in_plaintext_and_every_reader_gives_the_bytes_of_an_unencrypted_run() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("tinylag.key");
    let id = keygen(&key, false);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key generate writes mode 0600");
    let again = tinylag(&["key", "generate", "--output", &s(&key)], &[]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));

    let enc = write_journal(&dir.path().join("enc"), Some(&key), 2);
    let plain = write_journal(&dir.path().join("plain"), None, 2);
    let patterns: Vec<u8> = (0..2).flat_map(phase_data).collect();
    let set = windows(&patterns);

    // The check can fail: the unencrypted journal holds the patterns in the clear.
    assert!(leak(&plain.journal, &set).is_some());
    assert_eq!(
        leak(&enc.journal, &set),
        None,
        "plaintext in the encrypted journal"
    );

    // Replay with the key: the replica is the primary; the undo log (pre-images of phase
    // 0, which phase 1 overwrote) holds no plaintext either.
    let (enc_replica, plain_replica) = (dir.path().join("enc.img"), dir.path().join("plain.img"));
    let out = replay_once(&enc.journal, &enc_replica, Some(&key));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(replay_once(&plain.journal, &plain_replica, None)
        .status
        .success());
    assert_same_image(&enc_replica, &enc.primary);
    assert_same_image(&enc_replica, &plain_replica);
    let undo = |replica: &Path| PathBuf::from(format!("{}.undo", replica.display()));
    assert!(leak(&undo(&plain_replica), &set).is_some());
    assert_eq!(
        leak(&undo(&enc_replica), &set),
        None,
        "plaintext in the undo log"
    );

    // Restore to each mark (backwards through the encrypted undo log): the same bytes.
    for (n, want) in enc.at_mark.iter().enumerate() {
        let out = dir.path().join(format!("enc-p{n}.restored"));
        restore(
            &enc.journal,
            &enc_replica,
            &format!("p{n}"),
            &out,
            Some(&key),
        );
        assert_same_image(&out, want);
        let plain_out = dir.path().join(format!("plain-p{n}.restored"));
        restore(
            &plain.journal,
            &plain_replica,
            &format!("p{n}"),
            &plain_out,
            None,
        );
        assert_same_image(&out, &plain_out);
    }

    // An object replica of the encrypted journal seals its layers: no pattern in the clear
    // there either, and each mark restores from it (with the key) to the primary's bytes.
    let objrep = dir.path().join("objrep");
    let objrep_uri = format!("file://{}", s(&objrep));
    let to_objrep: Vec<String> = ["replay", "--journal", &s(&enc.journal)]
        .iter()
        .map(|a| a.to_string())
        .chain([
            "--replica".into(),
            objrep_uri.clone(),
            "--name".into(),
            "obj".into(),
            "--once".into(),
        ])
        .collect();
    run_ok(&with_key(to_objrep, Some(&key)));
    // Its image layer (compaction) is sealed too: the leak check below covers its parts.
    let compact: Vec<String> = ["replica", "compact", "--journal", &s(&enc.journal)]
        .iter()
        .map(|a| a.to_string())
        .chain([
            "--replica".into(),
            objrep_uri.clone(),
            "--part-size".into(),
            "1M".into(),
        ])
        .collect();
    run_ok(&with_key(compact, Some(&key)));
    assert!(
        std::fs::read_dir(objrep.join("images")).map_or(0, |d| d.count()) > 0,
        "the compaction wrote no image part"
    );
    let layers: Vec<PathBuf> = {
        let mut files = Vec::new();
        files_under(&objrep, &mut files);
        files
            .into_iter()
            .filter(|f| f.to_string_lossy().contains("layer"))
            .collect()
    };
    assert!(!layers.is_empty(), "the object replica wrote no layer");
    assert_eq!(leak(&objrep, &set), None, "plaintext in the object replica");
    let restore_objrep = |mark: &str, out: &Path, key: Option<&Path>| {
        let args: Vec<String> = [
            "restore",
            "--mark",
            mark,
            "--replica",
            &objrep_uri,
            "--journal",
            &s(&enc.journal),
            "--output",
            &s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        run(&with_key(args, key))
    };
    for (n, want) in enc.at_mark.iter().enumerate() {
        let out = dir.path().join(format!("objrep-p{n}.restored"));
        let done = restore_objrep(&format!("p{n}"), &out, Some(&key));
        assert!(done.status.success(), "{}", stderr(&done));
        assert_same_image(&out, want);
    }
    let refused = dir.path().join("objrep-nokey.restored");
    let done = restore_objrep("p1", &refused, None);
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    assert!(stderr(&done).contains(&id), "{}", stderr(&done));
    assert!(!refused.exists(), "a refused restore left a file");

    // diff reads only (sealed) indexes: the same ranges as the unencrypted run.
    assert_eq!(
        diff_lines(&enc.journal, Some(&key)),
        diff_lines(&plain.journal, None)
    );
    // export-diff reads sealed payloads through the time-travel view: the same stream bytes
    // (its from/to names come from the marks, the same in both runs).
    let export = |journal: &Path, replica: &Path, out: &Path, key: Option<&Path>| {
        let args: Vec<String> = [
            "export-diff",
            "--journal",
            &s(journal),
            "--replica",
            &s(replica),
            "--from",
            "p0",
            "--to",
            "p1",
            "--output",
            &s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        run_ok(&with_key(args, key));
        std::fs::read(out).unwrap()
    };
    let enc_stream = export(
        &enc.journal,
        &enc_replica,
        &dir.path().join("enc.rbddiff"),
        Some(&key),
    );
    let plain_stream = export(
        &plain.journal,
        &plain_replica,
        &dir.path().join("plain.rbddiff"),
        None,
    );
    assert!(enc_stream.len() > PHASE_LEN, "{} bytes", enc_stream.len());
    assert!(
        enc_stream == plain_stream,
        "export-diff of the encrypted journal differs"
    );
    // mount --mark with the key serves the image at each mark (lazily, from the sealed
    // undo log and journal).
    for (n, want) in enc.at_mark.iter().enumerate() {
        let mut args = vec![
            "--journal".to_string(),
            s(&enc.journal),
            "--replica".to_string(),
            s(&enc_replica),
            "--mark".to_string(),
            format!("p{n}"),
        ];
        args.extend(key_args(Some(&key)));
        let mount = Mount::spawn(&args, dir.path());
        let out = dir.path().join(format!("enc-p{n}.mounted"));
        run_cmd_ok(Command::new("nbdcopy").args([&mount.uri_of(""), &s(&out)]));
        mount.stop();
        assert_same_image(&out, want);
    }

    // Without the key: refused at the first segment, naming the key id; nothing written.
    let bare = dir.path().join("bare.img");
    let out = replay_once(&enc.journal, &bare, None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains(&id),
        "names key id {id}: {}",
        stderr(&out)
    );
    assert!(!std::fs::read(&bare)
        .unwrap_or_default()
        .iter()
        .any(|&b| b != 0));

    // A wrong key: the same, naming the id needed.
    let wrong = dir.path().join("wrong.key");
    keygen(&wrong, false);
    let out = replay_once(&enc.journal, &dir.path().join("wrong.img"), Some(&wrong));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains(&id), "{}", stderr(&out));

    // A key file others can read is refused, saying how to fix it, before anything runs.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = replay_once(&enc.journal, &dir.path().join("open.img"), Some(&wrong));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    assert!(!dir.path().join("open.img").exists());
}

/// The store files of `journal` whose key starts with `prefix`, sorted.
fn objects(journal: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(journal, &mut files);
    let mut out: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| {
            f.strip_prefix(journal)
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(prefix)
        })
        .collect();
    out.sort();
    out
}

fn flip(file: &Path, at: impl FnOnce(usize) -> usize) {
    let mut data = std::fs::read(file).unwrap();
    let i = at(data.len());
    data[i] ^= 0x01;
    std::fs::write(file, data).unwrap();
}

#[test]
fn a_flipped_byte_in_a_body_an_index_or_an_undo_segment_is_refused_and_the_replica_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    keygen(&key, false);
    let mut w = write_journal(&dir.path().join("j"), Some(&key), 2);
    let replica = dir.path().join("replica.img");
    assert!(replay_once(&w.journal, &replica, Some(&key))
        .status
        .success());
    let before = objects(&w.journal, "journal/");

    // More writes, then damage the new segments: one in a payload, one in its index.
    serve_phases(&mut w, dir.path(), Some(&key), 2..3);
    let new: Vec<PathBuf> = objects(&w.journal, "journal/")
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    // The first new segment holding data: the ones before it hold no write (the writer's
    // EPOCH record), so the replica must not change at all.
    let biggest = new
        .iter()
        .find(|f| std::fs::metadata(f).unwrap().len() > 64 << 10)
        .unwrap()
        .clone();
    let hash = file_hash(&replica);
    for (what, at) in [
        (
            "body",
            Box::new(|_len: usize| 72usize + 100) as Box<dyn Fn(usize) -> usize>,
        ),
        ("index", Box::new(|len: usize| len - 24 - 30)),
    ] {
        let saved = std::fs::read(&biggest).unwrap();
        flip(&biggest, at);
        let out = replay_once(&w.journal, &replica, Some(&key));
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        let seg = biggest.file_name().unwrap().to_str().unwrap();
        assert!(
            stderr(&out).contains(seg),
            "{what}: names {seg}: {}",
            stderr(&out)
        );
        assert_eq!(file_hash(&replica), hash, "{what}: the replica was touched");
        std::fs::write(&biggest, saved).unwrap();
    }
    assert!(replay_once(&w.journal, &replica, Some(&key))
        .status
        .success());
    assert_same_image(&replica, &w.primary);

    // An undo segment: restoring to a mark back through it is refused, naming it.
    let undo_dir = PathBuf::from(format!("{}.undo", replica.display()));
    let undo = objects(&undo_dir, "undo/");
    let last = undo.last().expect("undo segments").clone();
    flip(&last, |len| len / 2);
    let out_img = dir.path().join("p0.restored");
    let args: Vec<String> = [
        "restore",
        "--mark",
        "p0",
        "--replica",
        &s(&replica),
        "--journal",
        &s(&w.journal),
        "--output",
        &s(&out_img),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let out = run(&with_key(args, Some(&key)));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let name = last.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr(&out).contains(name),
        "names {name}: {}",
        stderr(&out)
    );
}

#[test]
fn a_journal_written_across_three_keys_replays_and_restores_with_the_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("ring");
    let mut ids = vec![keygen(&ring, false)];
    let jdir = dir.path().join("j");
    let mut w = write_journal(&jdir, Some(&ring), 1);
    for n in 1..3 {
        ids.push(keygen(&ring, true));
        serve_phases(&mut w, &jdir, Some(&ring), n..n + 1);
    }
    // Each key sealed something: every id is in some segment header.
    let headers: HashSet<u32> = objects(&w.journal, "journal/")
        .iter()
        .map(|f| {
            let d = std::fs::read(f).unwrap();
            u32::from_le_bytes(d[68..72].try_into().unwrap())
        })
        .collect();
    for id in &ids {
        let id = u32::from_str_radix(id, 16).unwrap();
        assert!(
            headers.contains(&id),
            "key {id:08x} sealed no segment: {headers:x?}"
        );
    }
    let replica = dir.path().join("replica.img");
    let out = replay_once(&w.journal, &replica, Some(&ring));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_image(&replica, &w.primary);
    for (n, want) in w.at_mark.iter().enumerate() {
        let out = dir.path().join(format!("p{n}.restored"));
        restore(&w.journal, &replica, &format!("p{n}"), &out, Some(&ring));
        assert_same_image(&out, want);
    }

    // The keyring without its first key: the missing key is named.
    let text = std::fs::read_to_string(&ring).unwrap();
    let partial = dir.path().join("partial");
    std::fs::write(
        &partial,
        text.lines().skip(1).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = replay_once(&w.journal, &dir.path().join("other.img"), Some(&partial));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains(&ids[0]),
        "names {}: {}",
        ids[0],
        stderr(&out)
    );
}

fn verify(journal: &Path, key: Option<&Path>) -> std::process::Output {
    let args: Vec<String> = ["journal", "verify", "--journal", &s(journal)]
        .iter()
        .map(|a| a.to_string())
        .collect();
    run(&with_key(args, key))
}

#[test]
fn journal_info_names_the_key_and_verify_checks_crcs_without_it_and_every_tag_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let id = keygen(&key, false);
    let w = write_journal(&dir.path().join("j"), Some(&key), 1);

    // journal info says the journal is encrypted, naming the key id only with the key,
    // and fails at once, naming it, without.
    let info = |k: Option<&Path>| {
        let args: Vec<String> = ["journal", "info", "--journal", &s(&w.journal)]
            .iter()
            .map(|a| a.to_string())
            .collect();
        run(&with_key(args, k))
    };
    let with = info(Some(&key));
    let text = String::from_utf8_lossy(&with.stdout);
    assert!(
        with.status.success()
            && text.contains(&format!(
                "encryption   on since init (key {id}); the head segment is sealed with key {id}"
            )),
        "{text}{}",
        stderr(&with)
    );
    let without = info(None);
    assert_eq!(without.status.code(), Some(1), "{without:?}");
    assert!(stderr(&without).contains(&id), "{}", stderr(&without));

    let bare = verify(&w.journal, None);
    assert!(bare.status.success(), "{}", stderr(&bare));
    let text = String::from_utf8_lossy(&bare.stdout);
    assert!(text.contains("checked without their key"), "{text}");
    let keyed = verify(&w.journal, Some(&key));
    assert!(keyed.status.success(), "{}", stderr(&keyed));
    let text = String::from_utf8_lossy(&keyed.stdout);
    assert!(
        text.contains("every checksum is good") && !text.contains("without their key"),
        "{text}"
    );

    let data = objects(&w.journal, "journal/")
        .into_iter()
        .find(|f| std::fs::metadata(f).unwrap().len() > 64 << 10)
        .unwrap();
    let name = data.file_name().unwrap().to_str().unwrap().to_string();
    let saved = std::fs::read(&data).unwrap();
    // A flipped byte in the sealed index: its CRC catches it with or without the key.
    flip(&data, |len| len - 24 - 30);
    for k in [None, Some(key.as_path())] {
        let out = verify(&w.journal, k);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stderr(&out).contains(&name),
            "names {name}: {}",
            stderr(&out)
        );
    }
    // A flipped byte in a sealed payload: the body CRC (in the clear before the sealed index)
    // catches it without the key, the tag and the CRCs with it; both name the object.
    std::fs::write(&data, &saved).unwrap();
    flip(&data, |_| 72 + 100);
    for k in [None, Some(key.as_path())] {
        let out = verify(&w.journal, k);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stderr(&out).contains(&name),
            "names {name}: {}",
            stderr(&out)
        );
    }
}

/// `serve` expected to refuse (exit by itself within a minute).
fn serve_refused(primary: &Path, journal: &Path, key: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(tinylag_bin());
    cmd.args(["serve", "--primary", &s(primary), "--journal", &s(journal)])
        .args(key_args(key))
        .env("TINYLAG_LOG", "warn");
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// Encryption is chosen at `init` for the journal's life (its manifest says so): a `serve`
/// without the key on an encrypted journal, or with one on a plaintext journal, is refused
/// before it claims anything, so no epoch mixes sealed and plaintext segments; a reader
/// without the key fails at once, naming the key id.
#[test]
fn encryption_is_chosen_at_init_and_no_writer_mixes_sealed_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let id = keygen(&key, false);
    let sealed = dir.path().join("sealed");
    let plain = dir.path().join("plain");
    let (p1, p2) = (dir.path().join("p1.img"), dir.path().join("p2.img"));
    let with_key_args = key_args(Some(&key));
    let with_key_args: Vec<&str> = with_key_args.iter().map(String::as_str).collect();
    init(&s(&sealed), &p1, "8M", &with_key_args, &[]);
    init(&s(&plain), &p2, "8M", &[], &[]);
    let manifest = std::fs::read_to_string(sealed.join("tinylag.json")).unwrap();
    assert!(
        manifest.contains(&id),
        "the manifest names the key id: {manifest}"
    );
    assert!(
        !std::fs::read_to_string(plain.join("tinylag.json"))
            .unwrap()
            .contains("encryption"),
        "a plaintext manifest stays as it was"
    );

    let out = serve_refused(&p1, &sealed, None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains(&format!("is encrypted (key {id})")),
        "{}",
        stderr(&out)
    );
    let out = serve_refused(&p2, &plain, Some(&key));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("is not encrypted"),
        "{}",
        stderr(&out)
    );
    for journal in [&sealed, &plain] {
        assert!(
            objects(journal, "epochs/").is_empty() && objects(journal, "journal/").is_empty(),
            "a refused serve claimed or wrote something in {}",
            journal.display()
        );
    }

    // Readers without the key: refused at once, naming it, with nothing registered.
    let out = replay_once(&sealed, &dir.path().join("r.img"), None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains(&id), "{}", stderr(&out));
    assert!(objects(&sealed, "consumers/").is_empty());
    let out = run(&[
        "journal".into(),
        "inspect".into(),
        "--journal".into(),
        s(&sealed),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains(&id), "{}", stderr(&out));
}
