//! A consistency group under an md RAID-0 in the kernel: a Debian kernel in a small VM attaches
//! the group's two exports with the kernel's `nbd-client`, builds `mdadm --level=0` over them,
//! makes ext4 on the array and writes files for a while. Back on the host the replica set is
//! restored (`restore --output-dir`) at 12 random instants of that workload; each restored
//! pair is put back together as the array it was — de-striped in this file from md's RAID-0
//! layout (chunk n on member n mod 2 at the data offset `mdadm --examine` printed), not with
//! the product's code — and the project's fs judge must find every one a legal crash state of
//! ext4. One disk replicated apart from the other would not be: the array would mix two times.

mod support;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use support::daemon::{tinylag_ok, Daemon};
use support::procs::{free_port, path};
use support::replay::run_ok;
use support::vm::{vm_available, Guest};

const MEMBER: &str = "64M";
const MEMBER_BYTES: u64 = 64 << 20;

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Attach both exports, build the array (64 KiB chunks, data 1 MiB into each member), make
/// ext4, then write and delete files for about 20 s, printing the guest's clock around the
/// workload so the host can choose instants inside it.
fn guest_script(port: u16) -> String {
    format!(
        r#"set -e
echo "step: connect"
nbd-client 10.0.2.2 {port} /dev/nbd0 -N a -b 4096
nbd-client 10.0.2.2 {port} /dev/nbd1 -N b -b 4096
echo "step: raid0"
mdadm --create /dev/md0 --run --level=0 --raid-devices=2 --chunk=64 --metadata=1.2 \
    --data-offset=1M /dev/nbd0 /dev/nbd1
mdadm --examine /dev/nbd0 | grep -E 'Data Offset|Chunk Size'
/sbin/mkfs.ext4 -q -F -b 4096 /dev/md0
mount -t ext4 /dev/md0 /mnt
sync
sleep 2
echo "fill-start $(date +%s)"
i=0
end=$(( $(date +%s) + 20 ))
while [ "$(date +%s)" -lt "$end" ]; do
    d=/mnt/d$((i % 5))
    mkdir -p $d
    dd if=/dev/urandom of=$d/f$i bs=4096 count=$(( (i % 7) * 9 + 3 )) 2>/tmp/dd.err \
        || {{ echo "dd failed at file $i:"; cat /tmp/dd.err; df -k /mnt; exit 1; }}
    # Delete some recent files and every file older than 60 iterations, so the live set
    # stays under ~14 MiB of the 126 MiB array however fast the machine runs the loop (an
    # unbounded fill hit ENOSPC on a fast CI machine and `set -e` ended the guest).
    if [ $((i % 3)) -eq 0 ]; then rm -f /mnt/d$(((i - 4) % 5))/f$((i - 4)); fi
    rm -f /mnt/d$(((i - 60) % 5))/f$((i - 60))
    if [ $((i % 4)) -eq 0 ]; then sync; fi
    i=$((i + 1))
done
echo "fill-end $(date +%s) files $i"
df -k /mnt | tail -1
sleep 2
umount /mnt
/sbin/e2fsck -fn /dev/md0
mdadm --stop /dev/md0
nbd-client -d /dev/nbd1
nbd-client -d /dev/nbd0
echo "step: done"
"#
    )
}

/// The number after `key` on the console line that holds it.
fn console_number(console: &str, key: &str) -> u64 {
    let line = console
        .lines()
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no {key:?} on the console:\n{console}"));
    let after = &line[line.find(key).unwrap() + key.len()..];
    let digits: String = after
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number in {line:?}"))
}

/// md RAID-0 over two equal members: array chunk n is on member n mod 2, at
/// `data_offset + (n / 2) * chunk`.
fn assemble_raid0(members: [&Path; 2], data_offset: u64, chunk: u64, out: &Path) {
    let data = members.map(|m| std::fs::read(m).unwrap());
    let per_member = (MEMBER_BYTES - data_offset) / chunk;
    let mut array = Vec::with_capacity((2 * per_member * chunk) as usize);
    for n in 0..2 * per_member {
        let member = &data[(n % 2) as usize];
        let at = (data_offset + (n / 2) * chunk) as usize;
        array.extend_from_slice(&member[at..at + chunk as usize]);
    }
    std::fs::write(out, array).unwrap();
}

#[test]
fn an_md_raid0_over_a_group_restores_to_a_clean_ext4_at_any_instant() {
    if !vm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let journal = path(&p("journal")).to_string();
    let a = format!("a={MEMBER}:{}", path(&p("a.img")));
    let b = format!("b={MEMBER}:{}", path(&p("b.img")));
    tinylag_ok(
        &[
            "init",
            "--journal",
            &journal,
            "--device",
            &a,
            "--device",
            &b,
            "--segment-size",
            "1M",
        ],
        &[],
    );
    let port = free_port();
    let args = s(&[
        "serve",
        "--journal",
        &journal,
        "--primary",
        &format!("a={}", path(&p("a.img"))),
        "--primary",
        &format!("b={}", path(&p("b.img"))),
        "--listen",
        &format!("tcp:127.0.0.1:{port}"),
    ]);
    let mut daemon = Daemon::start_args(&p("a.img"), None, &args, &[]);

    let (code, console) = Guest::new(guest_script(port))
        .net()
        .module("nbd")
        .module("raid0")
        .module("crc32c_generic")
        .module("ext4")
        .bin("/sbin/mdadm")
        .bin("/sbin/mkfs.ext4")
        .bin("/sbin/e2fsck")
        .run(dir.path());
    assert_eq!(
        code,
        0,
        "the guest failed; console:\n{console}\ndaemon log:\n{}",
        daemon.log_tail()
    );
    assert!(console.contains("step: done"), "{console}");
    let data_offset = console_number(&console, "Data Offset :") * 512;
    let chunk = console_number(&console, "Chunk Size :") * 1024;
    assert_eq!((data_offset, chunk), (1 << 20, 64 << 10), "{console}");
    let (fill_start, fill_end) = (
        console_number(&console, "fill-start"),
        console_number(&console, "fill-end"),
    );
    assert!(fill_end > fill_start + 10, "{console}");
    daemon.wait_status(
        std::time::Duration::from_secs(60),
        "the journal to drain",
        |s| s["durable_lsn"] == s["head_lsn"],
    );
    daemon.stop_ok();

    // The whole array, as the VM left it, is a clean ext4 (the judge accepts it), and the set
    // a replay agent builds equals the primaries.
    let whole = p("whole-array.img");
    assemble_raid0([&p("a.img"), &p("b.img")], data_offset, chunk, &whole);
    if let Err(verdict) = support::verdict::judge_ext4(&whole) {
        panic!("the array as the VM left it is not a clean ext4:\n{verdict}");
    }
    run_ok(&s(&[
        "replay",
        "--journal",
        &journal,
        "--name",
        "dr",
        "--replica",
        &format!("a={}", path(&p("ra.img"))),
        "--replica",
        &format!("b={}", path(&p("rb.img"))),
        "--once",
    ]));
    for (replica, primary) in [("ra.img", "a.img"), ("rb.img", "b.img")] {
        assert!(
            std::fs::read(p(replica)).unwrap() == std::fs::read(p(primary)).unwrap(),
            "{replica} differs from {primary}"
        );
    }

    // The judge can tell: member a as of early in the workload with member b as of late in
    // it — what two disks replicated apart can give — is not a state the array ever had.
    let restore_at = |at: &str, out: &Path| {
        run_ok(&s(&[
            "restore",
            "--journal",
            &journal,
            "--replica",
            &format!("a={}", path(&p("ra.img"))),
            "--replica",
            &format!("b={}", path(&p("rb.img"))),
            "--at",
            at,
            "--output-dir",
            path(out),
        ]));
    };
    restore_at(&format!("@{}", fill_start + 2), &p("early"));
    restore_at(&format!("@{}", fill_end - 2), &p("late"));
    let mixed = p("mixed-array.img");
    assemble_raid0(
        [&p("early").join("a.img"), &p("late").join("b.img")],
        data_offset,
        chunk,
        &mixed,
    );
    assert!(
        support::verdict::judge_ext4(&mixed).is_err(),
        "the judge accepted an array mixed from two instants: this test could not fail"
    );

    // 12 instants inside the workload (a second of slack each side for the guest's clock).
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for i in 0..12 {
        let at_ms = rng.gen_range((fill_start + 1) * 1000..(fill_end - 1) * 1000);
        let at = format!("@{}", at_ms as f64 / 1000.0);
        let out: PathBuf = p(&format!("at{i}"));
        restore_at(&at, &out);
        let array = out.join("array.img");
        assemble_raid0(
            [&out.join("a.img"), &out.join("b.img")],
            data_offset,
            chunk,
            &array,
        );
        if let Err(verdict) = support::verdict::judge_ext4(&array) {
            panic!("the array restored at {at} (instant {i}) is not a legal crash state of ext4:\n{verdict}");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}
