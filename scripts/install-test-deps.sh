#!/usr/bin/env bash
# Installs the external programs the test suite starts, into per-user caches, idempotently.
#
#   scripts/install-test-deps.sh            install whatever is missing
#   TINYLAG_TOOLS=/opt/t TINYLAG_MOTO_VENV=/opt/moto scripts/install-test-deps.sh
#
# One function per tool; each checks what is there first and does nothing when it is
# already right, so running the script again is cheap. Works on a fresh Debian 12 as root
# (python3-venv is installed with apt when missing); as another user, missing system
# packages are named instead.
#
# Caches (the tests read the same variables and defaults):
#   TINYLAG_TOOLS      default ~/.cache/tinylag/tools      (s3s-fs in $TINYLAG_TOOLS/bin)
#   TINYLAG_MOTO_VENV  default ~/.cache/tinylag/moto-venv  (moto_server in its bin/)
set -euo pipefail

TINYLAG_TOOLS="${TINYLAG_TOOLS:-$HOME/.cache/tinylag/tools}"
TINYLAG_MOTO_VENV="${TINYLAG_MOTO_VENV:-$HOME/.cache/tinylag/moto-venv}"

S3S_FS_VERSION="0.14.1"
MOTO_VERSION="5.2.5"

say() { printf 'install-test-deps: %s\n' "$*"; }
die() { printf 'install-test-deps: error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages when running as root with apt; otherwise says what is needed.
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "apt-get install $*"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    else
        die "missing system packages: $* (install them, e.g. sudo apt-get install $*)"
    fi
}

# s3s-fs: a file-system-backed S3 server (Rust), built with cargo into $TINYLAG_TOOLS.
install_s3s_fs() {
    local bin="$TINYLAG_TOOLS/bin/s3s-fs"
    if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "s3s-fs $S3S_FS_VERSION" ]; then
        say "s3s-fs $S3S_FS_VERSION already in $bin"
        return
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust (https://rustup.rs) first"
    command -v cc >/dev/null 2>&1 || apt_install build-essential
    say "building s3s-fs $S3S_FS_VERSION into $TINYLAG_TOOLS (a few minutes)"
    mkdir -p "$TINYLAG_TOOLS"
    # --force replaces another version already installed there.
    cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --force \
        --root "$TINYLAG_TOOLS"
    [ "$("$bin" --version)" = "s3s-fs $S3S_FS_VERSION" ] ||
        die "$bin does not report version $S3S_FS_VERSION"
    say "s3s-fs $S3S_FS_VERSION installed in $bin"
}

# moto: AWS service mocks with a standalone S3 server (Python), in its own virtualenv.
install_moto() {
    local python="$TINYLAG_MOTO_VENV/bin/python"
    if [ -x "$TINYLAG_MOTO_VENV/bin/moto_server" ] &&
        [ "$("$python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" = "$MOTO_VERSION" ]; then
        say "moto $MOTO_VERSION already in $TINYLAG_MOTO_VENV"
        return
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    # Debian ships `venv` without ensurepip unless python3-venv is installed.
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3-venv
    if [ ! -x "$python" ]; then
        say "creating virtualenv $TINYLAG_MOTO_VENV"
        mkdir -p "$(dirname "$TINYLAG_MOTO_VENV")"
        python3 -m venv "$TINYLAG_MOTO_VENV"
    fi
    say "installing moto[server]==$MOTO_VERSION into $TINYLAG_MOTO_VENV"
    "$python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
    [ -x "$TINYLAG_MOTO_VENV/bin/moto_server" ] ||
        die "moto_server missing from $TINYLAG_MOTO_VENV/bin after installing"
    say "moto $MOTO_VERSION installed in $TINYLAG_MOTO_VENV"
}

# What the build itself needs beyond Rust: libublk's -sys crate generates the kernel's ublk
# bindings with bindgen, which loads libclang (and finds headers through clang).
install_build_deps() {
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(build-essential)
    command -v clang >/dev/null 2>&1 || missing+=(clang)
    local lib found=0
    for lib in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*-linux-gnu/libclang-*.so*; do
        [ -e "$lib" ] && found=1 && break
    done
    [ "$found" = 1 ] || missing+=(libclang-dev)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "build tools present (cc, clang, libclang for libublk's bindgen)"
    else
        apt_install "${missing[@]}"
    fi
}

# The real clients and tools the tests drive: NBD clients, fio, a FUSE/loop/ext4 toolchain,
# openssl (test certificates for NBD over TLS), setpriv (a client under another uid),
# systemd-analyze (the unit files are verified), man (the generated man pages render) and
# prometheus + promtool (a real Prometheus scrapes --metrics-listen; Debian's package),
# fsfreeze (mark --freeze) and curl (the README's S3 walkthrough creates its bucket with it).
install_system_tools() {
    local missing=()
    local tool pkg
    for pair in qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin \
        nbdfuse:nbdfuse nbdkit:nbdkit fio:fio mkfs.ext4:e2fsprogs e2fsck:e2fsprogs \
        debugfs:e2fsprogs fusermount3:fuse3 losetup:mount python3:python3 openssl:openssl \
        setpriv:util-linux systemd-analyze:systemd man:man-db prometheus:prometheus \
        promtool:prometheus dumpe2fs:e2fsprogs fsfreeze:util-linux curl:curl mdadm:mdadm; do
        tool="${pair%%:*}"
        pkg="${pair##*:}"
        if ! command -v "$tool" >/dev/null 2>&1; then
            case " ${missing[*]:-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "system tools present (qemu-io, nbdinfo, nbdcopy, nbdfuse, nbdkit, fio, e2fsprogs, fuse3, openssl, setpriv, systemd-analyze, man, prometheus, mdadm)"
    else
        apt_install "${missing[@]}"
    fi
}

main() {
    install_build_deps
    install_system_tools
    install_s3s_fs
    install_moto
    say "done"
}

main "$@"
