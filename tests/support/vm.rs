//! The kernel VM: runs a guest script under Debian's backports kernel in QEMU (TCG) through
//! `scripts/vm/run-guest.sh`, for tests that need a kernel driver this machine's kernel
//! lacks (nbd, ublk_drv). The guest reaches this machine's 127.0.0.1 as 10.0.2.2.
//!
//! The VM files are fetched by `scripts/vm/fetch.sh` (the test command runs it). A test
//! that needs the VM fails when they are missing, unless `TINYLAG_SKIP_VM=1` says to skip
//! (it then says so on stderr): a missing VM must never look like a pass in CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where `scripts/vm/fetch.sh` keeps the guest kernel and tools.
pub fn vm_cache() -> PathBuf {
    std::env::var_os("TINYLAG_VM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/tinylag/vm")
        })
}

/// Shell functions for guest scripts that drive a tinylag daemon (busybox sh). The script
/// sets `T` (the tinylag binary) and `PID` (the daemon), serves the primary `/tmp/p.img`,
/// and lists the logs `fail` shows in `LOGS`. Deadlines are in guest seconds: TCG on a busy
/// host is slow, so no loop counts.
pub const GUEST_DAEMON_LIB: &str = r#"
fail() { echo "FAILED: $*"; for l in $LOGS; do echo "--- $l"; cat "$l" 2>/dev/null; done; exit 1; }
now() { cut -d. -f1 /proc/uptime; }
alive() { # the daemon runs (an exited one stays a zombie until waited for)
    [ -e /proc/$PID/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$PID/status
}
wait_for() { # wait_for LOG TEXT: until the daemon's log says it
    deadline=$(( $(now) + 90 ))
    until grep -q "$2" "$1" 2>/dev/null; do
        [ $(now) -lt $deadline ] || fail "no '$2' in $1"
        alive || fail "the daemon exited"
        sleep 0.2
    done
}
drained() { # the daemon's journal holds everything it acknowledged
    s=$($T status --primary /tmp/p.img --json) || return 1
    h=$(echo "$s" | grep '"head_lsn"' | tr -dc 0-9)
    d=$(echo "$s" | grep '"durable_lsn"' | tr -dc 0-9)
    [ -n "$h" ] && [ "$h" = "$d" ]
}
wait_drained() {
    deadline=$(( $(now) + 60 ))
    until drained; do
        [ $(now) -lt $deadline ] || fail "the journal did not drain"
        sleep 0.2
    done
}
"#;

/// The tinylag binary without debug info (a debug build is ~300 MB; the guest gets it in its
/// initramfs), in a new directory outside /tmp (the guest mounts a tmpfs there): under the
/// target dir, or under /var/tmp when that is itself under /tmp. The caller removes the
/// directory.
pub fn guest_tinylag() -> PathBuf {
    // The guest mounts a tmpfs over /tmp, hiding a binary copied in under it: a checkout
    // under /tmp (a CI clone, say) has its target dir there too.
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if target_tmp.starts_with("/tmp") {
        Path::new("/var/tmp")
    } else {
        target_tmp
    };
    let dir = tempfile::tempdir_in(base).unwrap().keep();
    let out = dir.join("tinylag");
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(env!("CARGO_BIN_EXE_tinylag"))
        .status()
        .expect("run strip");
    assert!(status.success(), "strip failed");
    out
}

/// `false` (after saying so) when the operator asked to skip VM tests; panics when the VM
/// files are missing otherwise.
pub fn vm_available() -> bool {
    if std::env::var_os("TINYLAG_SKIP_VM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: TINYLAG_SKIP_VM=1, the kernel-VM test did not run");
        return false;
    }
    let cache = vm_cache();
    assert!(
        cache.join("kernel-version").is_file() && cache.join("root/.complete").exists(),
        "no guest kernel in {}: run scripts/vm/fetch.sh (scripts/test does), or set \
         TINYLAG_SKIP_VM=1 to skip the kernel-VM tests",
        cache.display()
    );
    true
}

/// A guest run: the script, host programs to copy in, modules to load.
pub struct Guest {
    script: String,
    bins: Vec<PathBuf>,
    modules: Vec<String>,
    net: bool,
    timeout_secs: u32,
}

impl Guest {
    /// A guest that runs `script` (busybox sh) as root.
    pub fn new(script: impl Into<String>) -> Guest {
        Guest {
            script: script.into(),
            bins: Vec::new(),
            modules: Vec::new(),
            net: false,
            timeout_secs: 300,
        }
    }

    /// Copies a host program (and the libraries it links) into the guest at the same path.
    pub fn bin(mut self, path: impl AsRef<Path>) -> Guest {
        self.bins.push(path.as_ref().to_path_buf());
        self
    }

    /// Loads a kernel module (and what it depends on) before the script runs.
    pub fn module(mut self, name: &str) -> Guest {
        self.modules.push(name.to_string());
        self
    }

    /// A NIC on QEMU's user network.
    pub fn net(mut self) -> Guest {
        self.net = true;
        self
    }

    /// Runs the guest; returns the console output and the script's exit code.
    pub fn run(self, workdir: &Path) -> (i32, String) {
        let script = workdir.join("guest.sh");
        std::fs::write(&script, &self.script).expect("write guest script");
        let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm/run-guest.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(runner).arg("--script").arg(&script);
        for b in &self.bins {
            cmd.arg("--bin").arg(b);
        }
        for m in &self.modules {
            cmd.arg("--module").arg(m);
        }
        if self.net {
            cmd.arg("--net");
        }
        cmd.arg("--timeout").arg(self.timeout_secs.to_string());
        cmd.env("TINYLAG_VM", vm_cache());
        let out: Output = cmd.output().expect("run scripts/vm/run-guest.sh");
        let console = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), console)
    }
}

/// A guest for ublk tests: `ublk_drv` and ext4 loaded, with `tinylag` and the e2fsprogs and
/// util-linux tools the scripts use.
pub fn ublk_ext4_guest(script: String, tinylag: &Path) -> Guest {
    Guest::new(script)
        .module("ublk_drv")
        .module("crc32c_generic")
        .module("ext4")
        .bin(tinylag)
        .bin("/sbin/mkfs.ext4")
        .bin("/sbin/e2fsck")
        .bin("/usr/sbin/blkdiscard")
}

/// The whole of a ublk guest test: skipped (saying so) when the operator asked, otherwise a
/// stripped `tinylag` copied in, `script` (given that binary's guest path) run in a
/// [`ublk_ext4_guest`], the binary's directory removed, and every step checked. Returns the
/// console for further checks (`None` when skipped).
pub fn run_ublk_guest(script: impl FnOnce(&Path) -> String, steps: &[&str]) -> Option<String> {
    if !vm_available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let tinylag = guest_tinylag();
    let (code, console) = ublk_ext4_guest(script(&tinylag), &tinylag).run(dir.path());
    let _ = std::fs::remove_dir_all(tinylag.parent().unwrap());
    assert_steps(code, &console, steps);
    Some(console)
}

/// Checks a guest run: exit code 0 and a `step: NAME` marker for every step, in the console
/// (which is printed, for `--nocapture`).
pub fn assert_steps(code: i32, console: &str, steps: &[&str]) {
    assert_eq!(code, 0, "the guest failed; console:\n{console}");
    eprintln!("{console}");
    for step in steps {
        assert!(console.contains(&format!("step: {step}")), "{console}");
    }
}
