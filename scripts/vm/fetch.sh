#!/usr/bin/env bash
# Fetches what the kernel-VM tests need, into a per-user cache, idempotently:
#   - qemu-system-x86 (installed from bookworm-backports, the same version as the
#     backports qemu-utils, so apt never has to remove one for the other);
#   - Debian's backports kernel (it has nbd and ublk_drv as modules; bookworm's 6.1 has no
#     ublk), busybox-static, nbd-client and its libnl-genl library, extracted with
#     dpkg-deb into $TINYLAG_VM/root without installing a kernel on this machine;
#   - modules.dep for that tree (depmod from kmod).
#
#   scripts/vm/fetch.sh              fetch what is missing
#   TINYLAG_VM=/opt/vm scripts/vm/fetch.sh
#
# The backports suite is a suite of Debian's own archive; it is read through a private apt
# configuration under $TINYLAG_VM/apt, so the machine's own sources are left as they are.
set -euo pipefail

TINYLAG_VM="${TINYLAG_VM:-$HOME/.cache/tinylag/vm}"
say() { printf 'vm-fetch: %s\n' "$*"; }
die() { printf 'vm-fetch: error: %s\n' "$*" >&2; exit 1; }

# The packages whose files go into the guest (the kernel is resolved from
# linux-image-amd64 in backports at fetch time and recorded in $TINYLAG_VM/kernel-version).
GUEST_DEBS=(busybox-static nbd-client libnl-genl-3-200)

apt_private() {
    local apt_dir="$TINYLAG_VM/apt"
    apt-get -o Dir::Etc::SourceList="$apt_dir/sources.list" \
        -o Dir::Etc::SourceParts=/nonexistent \
        -o Dir::State::Lists="$apt_dir/lists" \
        -o Dir::Cache="$apt_dir/cache" \
        -o APT::Sandbox::User=root \
        -o Debug::NoLocking=1 "$@"
}

setup_private_apt() {
    local apt_dir="$TINYLAG_VM/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    cat >"$apt_dir/sources.list" <<'SOURCES'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
SOURCES
    if [ ! -e "$apt_dir/lists/updated" ] || [ -n "$(find "$apt_dir/lists/updated" -mtime +7)" ]; then
        say "apt-get update (private lists with bookworm-backports)"
        apt_private update -qq
        touch "$apt_dir/lists/updated"
    fi
}

install_host_packages() {
    local missing=()
    command -v depmod >/dev/null 2>&1 || missing+=(kmod)
    command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
    if [ "${#missing[@]}" -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

install_qemu() {
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "qemu-system-x86_64 missing (install qemu-system-x86 from bookworm-backports)"
        say "installing qemu-system-x86 from bookworm-backports"
        DEBIAN_FRONTEND=noninteractive apt_private install -y -qq -t bookworm-backports \
            --no-install-recommends qemu-system-x86
    fi
}

fetch_guest() {
    local root="$TINYLAG_VM/root" debs="$TINYLAG_VM/debs"
    if [ -s "$TINYLAG_VM/kernel-version" ] && [ -e "$TINYLAG_VM/root/.complete" ]; then
        say "guest files present (kernel $(cat "$TINYLAG_VM/kernel-version"))"
        return
    fi
    local kpkg
    kpkg=$(apt_private -qq -t bookworm-backports install -s linux-image-amd64 2>/dev/null |
        awk '/^Inst linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kpkg" ] || kpkg=$(apt-cache -o Dir::State::Lists="$TINYLAG_VM/apt/lists" \
        -o Dir::Etc::SourceList="$TINYLAG_VM/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
        depends -t bookworm-backports linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kpkg" ] || die "could not resolve linux-image-amd64 in bookworm-backports"
    rm -rf "$debs" "$root"
    mkdir -p "$debs" "$root"
    say "downloading $kpkg ${GUEST_DEBS[*]}"
    (cd "$debs" && apt_private download -qq -t bookworm-backports "$kpkg" &&
        apt_private download -qq "${GUEST_DEBS[@]}")
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
    local kver
    kver=$(basename "$(ls -d "$root"/lib/modules/*/ | head -1)")
    [ -f "$root/boot/vmlinuz-$kver" ] || die "no kernel image in $kpkg"
    depmod -b "$root" "$kver"
    echo "$kver" >"$TINYLAG_VM/kernel-version"
    rm -rf "$debs"
    touch "$root/.complete"
    say "guest files in $root (kernel $kver)"
}

main() {
    mkdir -p "$TINYLAG_VM"
    install_host_packages
    setup_private_apt
    install_qemu
    fetch_guest
    say "done"
}

main "$@"
