#!/usr/bin/env bash
# Boots Debian's backports kernel under QEMU (TCG) with a busybox initramfs, runs one guest
# script as root inside it, and exits with that script's exit code.
#
#   scripts/vm/run-guest.sh --script GUEST.sh [--bin HOST_BINARY]... [--file SRC:DEST]...
#                           [--module NAME]... [--net] [--timeout SECONDS] [--mem MiB]
#
#   --bin PATH       copies a host program into the guest at the same path, with every
#                    library `ldd` names (so host tools like mkfs.ext4 run in the guest)
#   --file SRC:DEST  copies one file into the guest
#   --module NAME    loads a kernel module (and, first, what modules.dep says it needs)
#   --net            a virtio NIC on QEMU's user network: the guest is 10.0.2.15 and reaches
#                    this machine's 127.0.0.1 as 10.0.2.2 (nothing leaves the machine)
#
# The guest script's output goes to this script's stdout (the serial console); its exit
# code comes back as a marker line, since QEMU itself exits 0 whatever the guest did.
# Run scripts/vm/fetch.sh first (the test command does).
set -euo pipefail

TINYLAG_VM="${TINYLAG_VM:-$HOME/.cache/tinylag/vm}"
die() { printf 'vm-run: error: %s\n' "$*" >&2; exit 2; }

script="" net=0 timeout=300 mem=1024
bins=() files=() modules=()
while [ $# -gt 0 ]; do
    case "$1" in
    --script) script="$2"; shift 2 ;;
    --bin) bins+=("$2"); shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --module) modules+=("$2"); shift 2 ;;
    --net) net=1; shift ;;
    --timeout) timeout="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
    esac
done
[ -n "$script" ] && [ -f "$script" ] || die "--script GUEST.sh is required"
[ -s "$TINYLAG_VM/kernel-version" ] || die "no guest kernel in $TINYLAG_VM: run scripts/vm/fetch.sh"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run scripts/vm/fetch.sh"
# The guest mounts a tmpfs over /tmp: whatever is copied in under it would be hidden.
for dest in ${bins[@]+"${bins[@]}"} ${files[@]+"${files[@]#*:}"}; do
    case "$dest" in /tmp/*) die "$dest is under /tmp in the guest, which its tmpfs hides: use another path" ;; esac
done

root="$TINYLAG_VM/root"
kver=$(cat "$TINYLAG_VM/kernel-version")
busybox="$root/bin/busybox"
work=$(mktemp -d "${TMPDIR:-/tmp}/tinylag-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
initrd_root="$work/root"
mkdir -p "$initrd_root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,lib/modules,etc}

copy_with_libs() { # copy_with_libs SRC DEST [LD_LIBRARY_PATH]
    local src="$1" dest="$2" libpath="${3:-}"
    mkdir -p "$initrd_root/$(dirname "$dest")"
    cp -L "$src" "$initrd_root/$dest"
    LD_LIBRARY_PATH="$libpath" ldd "$src" 2>/dev/null | awk '
        /=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}' | while read -r lib; do
        [ -e "$initrd_root$lib" ] && continue
        mkdir -p "$initrd_root$(dirname "$lib")"
        cp -L "$lib" "$initrd_root$lib"
    done
}

cp "$busybox" "$initrd_root/bin/busybox"
nbd_libs="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu"
copy_with_libs "$root/sbin/nbd-client" /sbin/nbd-client "$nbd_libs"
# libnl-genl comes from the extracted package: put it where the loader looks.
for lib in "$root"/usr/lib/x86_64-linux-gnu/libnl-genl-3.so.200* "$root"/lib/x86_64-linux-gnu/libnl-genl-3.so.200*; do
    [ -e "$lib" ] && mkdir -p "$initrd_root/lib/x86_64-linux-gnu" && cp -L "$lib" "$initrd_root/lib/x86_64-linux-gnu/"
done
for b in "${bins[@]}"; do
    [ -x "$b" ] || die "--bin $b is not an executable"
    copy_with_libs "$b" "$b"
done
for f in "${files[@]}"; do
    src="${f%%:*}" dest="${f#*:}"
    mkdir -p "$initrd_root/$(dirname "$dest")"
    cp -L "$src" "$initrd_root/$dest"
done
cp "$script" "$initrd_root/guest.sh"

# Modules in dependency order (post-order over modules.dep), decompressed for busybox insmod.
moddir="$root/lib/modules/$kver"
declare -A seen=()
order=()
add_module() {
    local name="$1" path dep
    path=$(awk -F: -v n="$name" '{
        f=$1; sub(/.*\//, "", f); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", f); gsub(/-/, "_", f)
        m=n; gsub(/-/, "_", m); if (f == m) {print $1; exit}}' "$moddir/modules.dep")
    [ -n "$path" ] || die "module $name not found in $moddir"
    [ -n "${seen[$path]:-}" ] && return
    seen[$path]=1
    for dep in $(awk -F: -v p="$path" '$1 == p {print $2}' "$moddir/modules.dep"); do
        dep=$(basename "$dep"); dep="${dep%%.ko*}"
        add_module "$dep"
    done
    order+=("$path")
}
net_modules=()
[ "$net" = 1 ] && net_modules=(virtio_net)
for m in "${modules[@]}" "${net_modules[@]}"; do add_module "$m"; done
: >"$initrd_root/modules.list"
for path in "${order[@]}"; do
    out="$initrd_root/lib/modules/$(basename "${path%%.ko*}").ko"
    case "$path" in
    *.xz) xz -dc "$moddir/$path" >"$out" ;;
    *.zst) zstd -qdc "$moddir/$path" >"$out" ;;
    *.gz) gzip -dc "$moddir/$path" >"$out" ;;
    *) cp "$moddir/$path" "$out" ;;
    esac
    echo "/lib/modules/$(basename "$out")" >>"$initrd_root/modules.list"
done

cat >"$initrd_root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
while read -r m; do insmod "\$m" || echo "tinylag-vm: insmod \$m failed"; done </modules.list
if [ "$net" = 1 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
sh /guest.sh
echo "TINYLAG_VM_EXIT=\$?"
sync
poweroff -f
INIT
chmod +x "$initrd_root/init"

(cd "$initrd_root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"

netargs=(-nic none)
[ "$net" = 1 ] && netargs=(-netdev user,id=n0 -device virtio-net-pci,netdev=n0)
# no_timer_check: on a busy host TCG can miss the kernel's early IO-APIC timer check, which
# then panics ("IO-APIC + timer doesn't work"); the timer works, the check is what is flaky.
log="$work/console.log"
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 -accel tcg -m "$mem" -smp 2 \
    -nographic -no-reboot -monitor none -serial stdio \
    -kernel "$root/boot/vmlinuz-$kver" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init no_timer_check" \
    "${netargs[@]}" </dev/null | tee "$log"
qemu_rc=${PIPESTATUS[0]}
set -e
code=$(grep -a -o 'TINYLAG_VM_EXIT=[0-9]*' "$log" | tail -1 | cut -d= -f2)
if [ -z "$code" ]; then
    echo "vm-run: the guest gave no exit code (qemu exit $qemu_rc; timeout ${timeout}s?)" >&2
    exit 3
fi
exit "$code"
