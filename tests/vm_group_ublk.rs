//! A consistency group over ublk: one `serve --frontend ublk` with two `--primary NAME=PATH`
//! gives the kernel's `ublk_drv` one `/dev/ublkbN` per device (in a small VM: Debian's
//! backports kernel under QEMU). The guest writes a distinct pattern to each disk, marks the
//! group, overwrites part of the first disk and marks again; one replay agent keeps the pair,
//! and `restore --output-dir` writes the pair as of each mark. The guest prints the
//! restored images' SHA-256 on the console and the host checks them against the images this
//! file builds itself from the writes it asked for (not with the product's code): both disks
//! at both marks, so a restore that left one device behind, or mixed the two points, fails.

mod support;

use std::path::Path;

use support::procs::path;
use support::vm::{run_ublk_guest, GUEST_DAEMON_LIB};

const MIB: usize = 1 << 20;
/// The two devices: `a` 16 MiB, `b` 8 MiB (the group's address space has no padding at the
/// default 4 MiB region; the sizes differ, so a swapped pair fails).
const A_SIZE: usize = 16 * MIB;
const B_SIZE: usize = 8 * MIB;

/// The writes, in order: (device, pattern byte, offset, length). The mark `mid` follows the
/// first two, `end` the third, which overwrites the tail of the first.
const WRITES: [(&str, u8, usize, usize); 3] = [
    ("a", b'A', MIB, MIB),
    ("b", b'B', 2 * MIB, MIB),
    ("a", b'C', MIB + 3 * MIB / 4, MIB / 4),
];

fn guest_script(tinylag: &Path) -> String {
    let t = tinylag.display();
    let lib = GUEST_DAEMON_LIB;
    // dd in 64 KiB blocks: `seek` and `count` count those.
    let write = |(dev, byte, offset, len): (&str, u8, usize, usize)| {
        let var = dev.to_uppercase();
        format!(
            "yes {c} | tr -d '\\n' | head -c {len} > /tmp/w\n\
             dd if=/tmp/w of=${var} bs=65536 seek={seek} count={count} oflag=direct 2>/dev/null \
             || fail \"write {c}\"",
            c = byte as char,
            seek = offset / 65536,
            count = len / 65536,
        )
    };
    let [w1, w2, w3] = WRITES.map(write);
    let restore = |mark: &str| {
        format!(
            "$T restore --journal /tmp/j --replica a=/tmp/ra.img --replica b=/tmp/rb.img \
             --mark {mark} --output-dir /tmp/{mark} >/tmp/restore.log 2>&1 || fail \"restore {mark}\"\n\
             echo \"sum {mark} a $(sha256sum < /tmp/{mark}/a.img | cut -d' ' -f1)\"\n\
             echo \"sum {mark} b $(sha256sum < /tmp/{mark}/b.img | cut -d' ' -f1)\""
        )
    };
    let (mid, end) = (restore("mid"), restore("end"));
    format!(
        r#"set -e
T={t}
LOGS="/tmp/serve.log /tmp/replay.log /tmp/restore.log"
{lib}
echo "step: serve ($(now)s)"
$T init --journal /tmp/j --device a={A_SIZE}:/tmp/p.img --device b={B_SIZE}:/tmp/q.img \
    --segment-size 1M >/dev/null
$T serve --primary a=/tmp/p.img --primary b=/tmp/q.img --journal /tmp/j --frontend ublk \
    --pool-size 64M --linger 50ms >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb"
set -- $(grep -o '/dev/ublkb[0-9]*' /tmp/serve.log)
A=$1
B=$2
[ -n "$B" ] || fail "one ublk device for a group of two"
[ "$(cat /sys/block/${{A#/dev/}}/size)" = $(({A_SIZE} / 512)) ] || fail "$A is not device a's size"
[ "$(cat /sys/block/${{B#/dev/}}/size)" = $(({B_SIZE} / 512)) ] || fail "$B is not device b's size"

echo "step: write ($(now)s)"
{w1}
{w2}
wait_drained
$T mark mid --primary /tmp/p.img >/dev/null || fail "mark mid"
{w3}
wait_drained
$T mark end --primary /tmp/p.img >/dev/null || fail "mark end"
kill -TERM $PID
wait $PID || fail "the daemon's clean stop failed"

echo "step: replay ($(now)s)"
$T replay --journal /tmp/j --replica a=/tmp/ra.img --replica b=/tmp/rb.img --name vm --once \
    >/tmp/replay.log 2>&1 || fail "replay"
cmp /tmp/ra.img /tmp/p.img || fail "replica a differs from its primary"
cmp /tmp/rb.img /tmp/q.img || fail "replica b differs from its primary"

echo "step: restore ($(now)s)"
{mid}
{end}
cmp /tmp/end/a.img /tmp/p.img || fail "a at the end mark is not the primary"
cmp /tmp/end/b.img /tmp/q.img || fail "b at the end mark is not the primary"
echo "step: done ($(now)s)"
"#
    )
}

/// The SHA-256 the console gives for `device` restored at `mark`.
fn console_sum<'a>(console: &'a str, mark: &str, device: &str) -> &'a str {
    let key = format!("sum {mark} {device} ");
    let line = console
        .lines()
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("no {key:?} on the console:\n{console}"));
    line[line.find(&key).unwrap() + key.len()..].trim()
}

/// The images the first `n` writes leave, and their SHA-256 (by the host's `sha256sum`).
fn expected_sums(dir: &Path, n: usize) -> [String; 2] {
    ["a", "b"].map(|device| {
        let size = if device == "a" { A_SIZE } else { B_SIZE };
        let mut image = vec![0u8; size];
        for (dev, byte, offset, len) in &WRITES[..n] {
            if *dev == device {
                image[*offset..offset + len].fill(*byte);
            }
        }
        let file = dir.join(format!("expected-{device}-{n}.img"));
        std::fs::write(&file, &image).unwrap();
        let out = support::nbd::run_ok(std::process::Command::new("sha256sum").arg(path(&file)));
        String::from_utf8_lossy(&out.stdout)
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    })
}

#[test]
fn a_group_over_ublk_restores_both_disks_as_of_each_mark() {
    let Some(console) = run_ublk_guest(
        guest_script,
        &["serve", "write", "replay", "restore", "done"],
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (mark, n) in [("mid", 2), ("end", 3)] {
        let [a, b] = expected_sums(dir.path(), n);
        assert_eq!(
            console_sum(&console, mark, "a"),
            a,
            "device a at mark {mark}"
        );
        assert_eq!(
            console_sum(&console, mark, "b"),
            b,
            "device b at mark {mark}"
        );
    }
}
