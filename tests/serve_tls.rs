//! Who may connect to `tinylag serve`: NBD over TLS with real clients (nbdinfo, nbdcopy,
//! qemu-io) whose writes the journal reproduces; the refusals (plaintext under
//! `--tls require`, an untrusted or expired server certificate, a missing or foreign
//! client certificate, plaintext TCP on an address other hosts reach); STARTTLS abuse and
//! slow handshakes, with a bystander connection that keeps working throughout; and the
//! control socket's mode and its refusal of another uid.

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::{init, tinylag, Daemon};
use support::nbd::{pattern, run, run_ok, wire, CLIENT_TIMEOUT};
use support::oracle::{assert_same_image, rebuild_local};
use support::procs::{free_port, path, text};
use support::tls::{client_config, Ca, Wire, REP_ERR_TLS_REQD};

const MIB: usize = 1 << 20;

/// A 64 MiB primary and its journal, made by `tinylag init`.
fn setup(dir: &Path) -> (PathBuf, String) {
    let primary = dir.join("primary.img");
    let journal = dir.join("journal").display().to_string();
    init(&journal, &primary, "64M", &[], &[]);
    (primary, journal)
}

/// `tinylag serve` on 127.0.0.1:`port` with `--tls require` and the credentials in `srv`.
fn serve_tls(primary: &Path, journal: &str, port: u16, srv: &Path, extra: &[&str]) -> Daemon {
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--tls",
        "require",
        "--tls-certificates",
        path(srv),
    ];
    args.extend_from_slice(extra);
    Daemon::start(primary, journal, &args, &[])
}

fn nbds(port: u16, client_dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        client_dir.display()
    )
}

/// `qemu-io` over TLS with qemu's own x509 credentials object; fails the test unless every
/// command succeeds.
fn qemu_io_tls(port: u16, client_dir: &Path, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args([
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            client_dir.display()
        ),
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk0,tls-creds=tls0"
        ),
    ]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run(&mut cmd, CLIENT_TIMEOUT);
    let text = text(&out);
    assert!(
        out.status.success() && !text.contains("failed") && !text.to_lowercase().contains("error"),
        "qemu-io over TLS failed: {text}"
    );
    text
}

/// nbdinfo against `uri` must fail and show nothing of the disk.
fn nbdinfo_refused(uri: &str) -> String {
    let out = run(Command::new("nbdinfo").arg(uri), CLIENT_TIMEOUT);
    let text = text(&out);
    assert!(!out.status.success(), "nbdinfo {uri} should fail: {text}");
    assert!(!text.contains("export-size"), "{text}");
    text
}

#[test]
fn tls_clients_read_and_write_and_the_journal_rebuilds_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let ca = Ca::new(&dir.path().join("pki"), "good");
    let srv = ca.server_dir(&dir.path().join("server"), 2);
    let cli = ca.client_dir(&dir.path().join("client"), None);
    let port = free_port();
    let mut daemon = serve_tls(&primary, &journal, port, &srv, &[]);

    let out = run_ok(Command::new("nbdinfo").args(["--json", &nbds(port, &cli)]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["TLS"], true, "{info:#}");
    assert_eq!(info["exports"][0]["export-size"], 64 * MIB, "{info:#}");

    qemu_io_tls(
        port,
        &cli,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "write -z 4M 4k",
            "flush",
        ],
    );
    qemu_io_tls(port, &cli, &["read -P 0xab 0 1M", "read -P 0 4M 4k"]);
    let out = run_ok(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", cli.display()),
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk0,tls-creds=tls0"
        ),
    ]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB, "{info:#}");

    // nbdcopy in and back out, through nbds:// URIs.
    let source = dir.path().join("source.img");
    std::fs::write(&source, pattern(7, 8 * MIB)).unwrap();
    let uri = nbds(port, &cli);
    run_ok(Command::new("nbdcopy").args(["--flush", path(&source), &uri]));
    let copied = dir.path().join("copied.img");
    run_ok(Command::new("nbdcopy").args([&uri, path(&copied)]));
    let data = std::fs::read(&copied).unwrap();
    assert_eq!(data.len(), 64 * MIB);
    assert!(
        data[..8 * MIB] == pattern(7, 8 * MIB)[..],
        "nbdcopy round trip"
    );

    let status = daemon.wait_status(Duration::from_secs(20), "the journal to catch up", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    assert_eq!(status["mode"], "logging", "{status:#}");
    assert!(status.get("security_warning").is_none(), "{status:#}");
    daemon.stop_ok();
    let rebuilt = dir.path().join("rebuilt.img");
    rebuild_local(Path::new(&journal), &rebuilt, None);
    assert_same_image(&rebuilt, &primary);
    assert_same_image(&copied, &primary);
}

#[test]
fn mutual_tls_over_a_unix_socket_wants_a_client_certificate_from_our_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let ca = Ca::new(&dir.path().join("pki"), "good");
    let other = Ca::new(&dir.path().join("pki"), "other");
    let srv = ca.server_dir(&dir.path().join("server"), 2);
    let socket = dir.path().join("nbd.sock");
    let listen = format!("unix:{}", socket.display());
    let _daemon = Daemon::start(
        &primary,
        &journal,
        &[
            "--listen",
            &listen,
            "--tls",
            "require",
            "--tls-certificates",
            path(&srv),
            "--tls-verify-peer",
        ],
        &[],
    );
    let uri = |client: &Path| {
        format!(
            "nbds+unix:///disk0?socket={}&tls-certificates={}",
            socket.display(),
            client.display()
        )
    };

    let with_cert = ca.client_dir(&dir.path().join("client-good"), Some(&ca));
    let source = dir.path().join("source.img");
    std::fs::write(&source, pattern(3, 2 * MIB)).unwrap();
    run_ok(Command::new("nbdcopy").args([path(&source), &uri(&with_cert)]));
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri(&with_cert)]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["TLS"], true, "{info:#}");

    let without = ca.client_dir(&dir.path().join("client-none"), None);
    nbdinfo_refused(&uri(&without));
    let foreign = ca.client_dir(&dir.path().join("client-foreign"), Some(&other));
    nbdinfo_refused(&uri(&foreign));

    // What the certified client wrote is on the primary.
    let primary_data = std::fs::read(&primary).unwrap();
    assert!(primary_data[..2 * MIB] == pattern(3, 2 * MIB)[..]);
}

#[test]
fn tls_on_lets_each_client_choose() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let ca = Ca::new(&dir.path().join("pki"), "good");
    let srv = ca.server_dir(&dir.path().join("server"), 2);
    let cli = ca.client_dir(&dir.path().join("client"), None);
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let mut daemon = Daemon::start(
        &primary,
        &journal,
        &[
            "--listen",
            &listen,
            "--tls",
            "on",
            "--tls-certificates",
            path(&srv),
        ],
        &[],
    );
    for (uri, tls) in [
        (format!("nbd://127.0.0.1:{port}/"), false),
        (nbds(port, &cli), true),
    ] {
        let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["TLS"], tls, "{uri}: {info:#}");
    }
    // STARTTLS once TLS is active is refused, and the session goes on.
    let mut client = Wire::greet(port).start_tls(client_config(&cli)).unwrap();
    client.send_option(wire::OPT_STARTTLS, &[]);
    assert_eq!(client.option_reply().1, wire::REP_ERR_INVALID);
    client.go_to("disk0").unwrap();
    client.write(0, &pattern(1, 4096));
    assert_eq!(client.read(0, 4096), pattern(1, 4096));
    daemon.stop_ok();

    // With TLS off, STARTTLS is unsupported and plaintext goes on.
    let mut daemon = Daemon::start(&primary, &journal, &["--listen", &listen], &[]);
    let mut plain = Wire::greet(port);
    plain.send_option(wire::OPT_STARTTLS, &[]);
    assert_eq!(plain.option_reply().1, wire::REP_ERR_UNSUP);
    plain.go_to("disk0").unwrap();
    assert_eq!(plain.read(0, 4096), pattern(1, 4096));
    daemon.stop_ok();
}

#[test]
fn refusals_and_starttls_abuse_leave_a_bystander_working() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let ca = Ca::new(&dir.path().join("pki"), "good");
    let other = Ca::new(&dir.path().join("pki"), "other");
    let srv = ca.server_dir(&dir.path().join("server"), 2);
    let cli = ca.client_dir(&dir.path().join("client"), None);
    let port = free_port();
    let mut daemon = serve_tls(&primary, &journal, port, &srv, &[]);

    let mut bystander = Wire::greet(port).start_tls(client_config(&cli)).unwrap();
    assert_eq!(bystander.go_to("").unwrap(), 64 << 20);
    let data = pattern(11, 64 << 10);
    bystander.write(1 << 20, &data);

    // A plaintext client: real and raw. It learns nothing, not even the export names.
    nbdinfo_refused(&format!("nbd://127.0.0.1:{port}/"));
    let mut plain = Wire::greet(port);
    plain.send_option(wire::OPT_LIST, &[]);
    let (_, reply, message) = plain.option_reply();
    assert_eq!(
        reply,
        REP_ERR_TLS_REQD,
        "{}",
        String::from_utf8_lossy(&message)
    );
    assert_eq!(plain.go_to("disk0"), Err(REP_ERR_TLS_REQD));
    plain.send_option(wire::OPT_EXPORT_NAME, b"disk0");
    assert!(
        plain.closed_by_server(),
        "EXPORT_NAME over plaintext must close"
    );
    let mut quitter = Wire::greet(port);
    quitter.send_option(wire::OPT_ABORT, &[]);
    assert_eq!(quitter.option_reply().1, wire::REP_ACK);
    assert!(quitter.closed_by_server());

    // A server certificate from another CA.
    let wrong = other.client_dir(&dir.path().join("client-wrong-ca"), None);
    nbdinfo_refused(&nbds(port, &wrong));
    assert!(Wire::greet(port).start_tls(client_config(&wrong)).is_err());

    // STARTTLS with data is invalid; the client may go on.
    let mut odd = Wire::greet(port);
    odd.send_option(wire::OPT_STARTTLS, b"x");
    assert_eq!(odd.option_reply().1, wire::REP_ERR_INVALID);

    // Garbage where the TLS handshake should be.
    let mut garbage = Wire::greet(port);
    garbage.send_option(wire::OPT_STARTTLS, &[]);
    assert_eq!(garbage.option_reply().1, wire::REP_ACK);
    garbage.send(&pattern(5, 4096));
    // At most a TLS alert record (content type 21), never anything in plaintext.
    let said = garbage.until_closed();
    assert!(said.is_empty() || said[0] == 21, "{said:?}");

    // Plaintext sent right behind STARTTLS, before the reply, must not be taken as if it
    // had come over TLS (the nbdkit CVE-2021-3716 pattern).
    let mut injector = Wire::greet(port);
    let mut burst = Vec::new();
    for (option, data) in [
        (wire::OPT_STARTTLS, &b""[..]),
        (wire::OPT_GO, &[0u8; 6][..]),
    ] {
        burst.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        burst.extend_from_slice(&option.to_be_bytes());
        burst.extend_from_slice(&(data.len() as u32).to_be_bytes());
        burst.extend_from_slice(data);
    }
    injector.send(&burst);
    assert_eq!(injector.option_reply().1, wire::REP_ACK);
    assert!(injector.closed_by_server());

    // A client looping on options never gets past the negotiation byte bound (1 MiB).
    let mut flood = Wire::greet(port);
    let big = vec![0u8; 64 << 10];
    let mut closed = false;
    let mut option = Vec::new();
    option.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&wire::OPT_LIST.to_be_bytes());
    option.extend_from_slice(&(big.len() as u32).to_be_bytes());
    option.extend_from_slice(&big);
    for _ in 0..32 {
        // The server may hang up while the option is still on its way.
        if flood.stream.write_all(&option).is_err() || flood.closed_by_server_or_reply() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the option flood was never cut off");

    // The bystander saw none of it.
    assert_eq!(bystander.read(1 << 20, data.len() as u32), data);
    bystander.write(2 << 20, &data);
    assert_eq!(bystander.read(2 << 20, data.len() as u32), data);
    let log = daemon.stop_ok();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[test]
fn slow_handshakes_are_dropped_at_the_deadline_while_a_bystander_works() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let ca = Ca::new(&dir.path().join("pki"), "good");
    let srv = ca.server_dir(&dir.path().join("server"), 2);
    let cli = ca.client_dir(&dir.path().join("client"), None);
    let port = free_port();
    let mut daemon = serve_tls(
        &primary,
        &journal,
        port,
        &srv,
        &["--handshake-timeout", "2s"],
    );

    let mut bystander = Wire::greet(port).start_tls(client_config(&cli)).unwrap();
    bystander.go_to("disk0").unwrap();

    let started = Instant::now();
    // Says nothing after the greeting.
    let mut silent = Wire::greet(port);
    // Half an option header.
    let mut half = Wire::greet(port);
    half.send(&wire::IHAVEOPT.to_be_bytes());
    // Stops in the middle of the TLS handshake.
    let mut stalled = Wire::greet(port);
    stalled.send_option(wire::OPT_STARTTLS, &[]);
    assert_eq!(stalled.option_reply().1, wire::REP_ACK);
    stalled.send(&[0x16, 0x03, 0x01, 0x02, 0x00]);
    // Garbage after STARTTLS: raw, or inside well-formed TLS record headers (which may
    // leave the server waiting for more: then the deadline ends it).
    let mut fuzzed: Vec<_> = (0..12u64)
        .map(|seed| {
            let mut client = Wire::greet(port);
            client.send_option(wire::OPT_STARTTLS, &[]);
            assert_eq!(client.option_reply().1, wire::REP_ACK);
            let body = pattern(seed, 1 + (seed as usize * 997) % 3000);
            let mut bytes = Vec::new();
            if seed % 2 == 0 {
                bytes.extend_from_slice(&[0x16, 0x03, 0x01]);
                bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
            }
            bytes.extend_from_slice(&body);
            client.send(&bytes);
            client
        })
        .collect();
    for client in [&mut silent, &mut half, &mut stalled] {
        assert!(client.closed_by_server(), "a slow client was not dropped");
    }
    for client in &mut fuzzed {
        // At most a TLS alert record (content type 21), never anything in plaintext.
        let said = client.until_closed();
        assert!(said.is_empty() || said[0] == 21, "{said:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "dropped after {waited:?}, expected about 2s"
    );

    // The deadline covers only the handshake: the bystander, connected for longer than
    // that, still works.
    let data = pattern(9, 4096);
    bystander.write(0, &data);
    assert_eq!(bystander.read(0, 4096), data);
    let log = daemon.stop_ok();
    assert!(log.contains("deadline"), "{log}");
}

#[test]
fn plaintext_tcp_for_other_hosts_and_bad_credentials_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let epochs = || std::fs::read_dir(Path::new(&journal).join("epochs")).map_or(0, |d| d.count());
    let before = epochs();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--primary", path(&primary), "--journal", &journal];
        args.extend_from_slice(extra);
        tinylag(&args, &[])
    };
    for extra in [
        &["--listen", "tcp:0.0.0.0:10899"][..],
        &["--listen", "tcp:[::]:10899", "--tls", "off"][..],
        // TLS offered but not required still lets plaintext clients in.
        &[
            "--listen",
            "tcp:0.0.0.0:10899",
            "--tls",
            "on",
            "--tls-certificates",
            "/nonexistent",
        ][..],
    ] {
        let out = serve(extra);
        let text = text(&out);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {text}");
        if !extra.contains(&"on") {
            assert!(text.contains("--insecure-no-tls"), "{text}");
            assert!(text.contains("refusing to serve"), "{text}");
        }
    }
    let up_dir = dir.path().join("up");
    let out = tinylag(
        &[
            "up",
            "--dir",
            path(&up_dir),
            "--listen",
            "tcp:0.0.0.0:10899",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!up_dir.exists(), "up created its directory before refusing");
    let out = tinylag(&["up", "--dir", path(&up_dir), "--tls", "require"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--tls-certificates DIR"),
        "{}",
        text(&out)
    );
    assert!(!up_dir.exists(), "up created its directory before refusing");

    // Bad values name the flag.
    let out = serve(&["--tls", "maybe"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--tls"), "{}", text(&out));
    let out = serve(&["--tls", "require"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("--tls-certificates DIR"),
        "{}",
        text(&out)
    );
    let out = serve(&["--tls", "require", "--tls-certificates", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("server-cert.pem"), "{}", text(&out));

    // Nothing was claimed or left behind.
    assert_eq!(epochs(), before);
    assert!(!dir.path().join("primary.img.ctl").exists());
    assert!(!dir.path().join("primary.img.sock").exists());

    // An expired server certificate: the server starts, clients refuse it.
    let ca = Ca::new(&dir.path().join("pki"), "good");
    let expired = ca.server_dir(&dir.path().join("expired"), -1);
    let cli = ca.client_dir(&dir.path().join("client"), None);
    let port = free_port();
    let mut daemon = serve_tls(&primary, &journal, port, &expired, &[]);
    let message = nbdinfo_refused(&nbds(port, &cli));
    assert!(
        message.to_lowercase().contains("expired") || message.contains("certificate"),
        "{message}"
    );
    daemon.stop_ok();
}

/// Sends one JSON request line to `socket` as uid/gid 65534 (nobody) and returns the
/// answer, or the client's error.
fn control_as_nobody(socket: &Path, request: &str) -> String {
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("python3 in /usr/bin or /usr/local/bin (nobody cannot run a per-user one)");
    let script = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(sys.argv[2].encode()+b'\\n')\n\
                  print(s.makefile().readline())";
    let out = run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args([python, "-c", script, path(socket), request]),
        CLIENT_TIMEOUT,
    );
    text(&out)
}

fn control_as_me(socket: &Path, request: &str) -> String {
    use std::io::{BufRead, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn control_socket_is_owner_only_and_other_uids_cannot_change_state() {
    if unsafe_geteuid() != 0 {
        eprintln!("skipped: running a client as another uid needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    std::fs::File::create(&primary)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut daemon = Daemon::start(&primary, "", &["--no-journal"], &[]);
    let control = daemon.control.clone();
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    // Let nobody reach the socket at all: the mode alone keeps it out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let answer = control_as_nobody(&control, r#"{"cmd":"status"}"#);
    assert!(answer.contains("PermissionError"), "{answer}");

    // Loosen the socket by hand (as for monitoring): status is readable, but nothing that
    // changes state, including commands this daemon does not know yet.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let answer = control_as_nobody(&control, r#"{"cmd":"status"}"#);
    assert!(answer.contains(r#""ok":true"#), "{answer}");
    for cmd in ["mark", "resync", "verify"] {
        let answer = control_as_nobody(&control, &format!(r#"{{"cmd":"{cmd}"}}"#));
        assert!(answer.contains("permission denied"), "{cmd}: {answer}");
        // The owner gets past the check (to the command itself).
        let answer = control_as_me(&control, &format!(r#"{{"cmd":"{cmd}"}}"#));
        assert!(!answer.contains("permission denied"), "{cmd}: {answer}");
    }
    let log = daemon.stop_ok();
    assert!(log.contains("control request refused"), "{log}");

    // With --control-group, the group may connect (0660) and change state.
    let mut daemon = Daemon::start(
        &primary,
        "",
        &["--no-journal", "--control-group", "65534"],
        &[],
    );
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    // Past the check: the command itself answers (here, that its arguments are missing).
    let answer = control_as_nobody(&control, r#"{"cmd":"mark"}"#);
    assert!(
        !answer.contains("permission denied") && answer.contains("mark"),
        "{answer}"
    );
    daemon.stop_ok();
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}
