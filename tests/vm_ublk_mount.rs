//! `mount --frontend ublk`: a past point of a replica served as a local `/dev/ublkbN` by the
//! kernel's own `ublk_drv`, in a small VM (Debian's backports kernel under QEMU). Inside the
//! guest: `serve --frontend ublk` carries an ext4 through two phases with a `mark` between
//! them; `replay --once` (with its undo log) brings a replica to the end; then `mount --mark`
//! serves the disk as it was at the mark. The device must be read-only (the kernel says so,
//! and a write is refused), read byte for byte as the primary was at the mark, and mount as
//! the first phase's filesystem. With `--writable`, the same past disk takes a filesystem's
//! writes into a scratch file and still checks clean. The replica is never written.

mod support;

use std::path::Path;

use support::vm::{run_ublk_guest, GUEST_DAEMON_LIB};

fn guest_script(tinylag: &Path) -> String {
    let t = tinylag.display();
    let lib = GUEST_DAEMON_LIB;
    format!(
        r#"set -e
T={t}
LOGS="/tmp/serve.log /tmp/mount.log"
{lib}
stop() {{ # stop: SIGTERM the daemon, wait, and see its device go
    kill -TERM $PID
    wait $PID || fail "the daemon's clean stop failed"
    deadline=$(( $(now) + 30 ))
    while [ -e /sys/block/$1 ]; do
        [ $(now) -lt $deadline ] || fail "$1 outlived a clean stop"; sleep 0.2
    done
}}
MOUNT="$T mount --journal /tmp/j --replica /tmp/r.img --mark before --frontend ublk --dev-id 1"

echo "step: phase 1 ($(now)s)"
$T init --journal /tmp/j --size 64M --primary /tmp/p.img --segment-size 1M >/dev/null
$T serve --primary /tmp/p.img --journal /tmp/j --frontend ublk --dev-id 0 \
    --pool-size 64M --linger 50ms >/tmp/serve.log 2>&1 &
PID=$!
wait_for /tmp/serve.log "as /dev/ublkb0"
/sbin/mkfs.ext4 -q -F -b 4096 /dev/ublkb0
mount -t ext4 /dev/ublkb0 /mnt
i=0
while [ $i -lt 6 ]; do
    dd if=/dev/urandom of=/tmp/f$i bs=4096 count=$((16 + i * 32)) 2>/dev/null
    cp /tmp/f$i /mnt/f$i
    i=$((i + 1))
done
umount /mnt
wait_drained
$T mark before --primary /tmp/p.img >/dev/null || fail "mark"
cp /tmp/p.img /tmp/before.img

echo "step: phase 2 ($(now)s)"
mount -t ext4 /dev/ublkb0 /mnt
rm /mnt/f0
dd if=/dev/urandom of=/tmp/g1 bs=4096 count=48 2>/dev/null
cp /tmp/g1 /mnt/f1
cp /tmp/f5 /mnt/after
umount /mnt
wait_drained
stop ublkb0
cmp -s /tmp/p.img /tmp/before.img && fail "phase 2 changed nothing"

echo "step: replay ($(now)s)"
$T replay --journal /tmp/j --replica /tmp/r.img --name vm --once >/tmp/replay.log 2>&1 \
    || {{ cat /tmp/replay.log; fail "replay"; }}
cmp /tmp/r.img /tmp/p.img || fail "the replica differs from the primary"
find /tmp/r.img /tmp/r.img.undo -type f | sort | xargs sha256sum > /tmp/replica.sum
[ $(wc -l < /tmp/replica.sum) -gt 1 ] || fail "no undo log beside the replica"

echo "step: read-only past ($(now)s)"
$MOUNT >/tmp/mount.log 2>&1 &
PID=$!
wait_for /tmp/mount.log "as /dev/ublkb1"
grep -q "^read-only" /tmp/mount.log || fail "mount did not say read-only"
[ "$(cat /sys/block/ublkb1/ro)" = 1 ] || fail "the kernel does not see a read-only device"
[ "$(cat /sys/block/ublkb1/size)" = 131072 ] || fail "size"
cmp /dev/ublkb1 /tmp/before.img || fail "the past disk is not the primary at the mark"
if dd if=/tmp/g1 of=/dev/ublkb1 bs=4096 count=1 oflag=direct 2>/dev/null; then
    fail "a write to the read-only past disk succeeded"
fi
mount -t ext4 -o ro,noload /dev/ublkb1 /mnt
i=0
while [ $i -lt 6 ]; do cmp /tmp/f$i /mnt/f$i || fail "f$i at the mark"; i=$((i + 1)); done
[ ! -e /mnt/after ] || fail "a phase-2 file is in the past"
umount /mnt
stop ublkb1

echo "step: writable past ($(now)s)"
$MOUNT --writable /tmp/scratch >/tmp/mount.log 2>&1 &
PID=$!
wait_for /tmp/mount.log "as /dev/ublkb1"
grep -q "^writable" /tmp/mount.log || fail "mount did not say writable"
[ "$(cat /sys/block/ublkb1/ro)" = 0 ] || fail "the writable past disk is read-only"
mount -t ext4 /dev/ublkb1 /mnt
cmp /tmp/f1 /mnt/f1 || fail "f1 at the mark (writable)"
cp /tmp/g1 /mnt/new
rm /mnt/f2
umount /mnt
/sbin/e2fsck -fn /dev/ublkb1 >/tmp/fsck.log 2>&1 || {{ cat /tmp/fsck.log; fail "fsck of the written past"; }}
mount -t ext4 -o ro /dev/ublkb1 /mnt
cmp /tmp/g1 /mnt/new || fail "a write to the writable past was lost"
umount /mnt
stop ublkb1
[ -s /tmp/scratch ] || fail "the writes did not go to the scratch file"
sha256sum -c -s /tmp/replica.sum || fail "the replica or its undo log changed"

echo "step: done ($(now)s)"
"#
    )
}

#[test]
fn mount_ublk_serves_the_disk_at_a_mark_read_only_and_writable_into_scratch() {
    run_ublk_guest(
        guest_script,
        &[
            "phase 1",
            "phase 2",
            "replay",
            "read-only past",
            "writable past",
            "done",
        ],
    );
}
