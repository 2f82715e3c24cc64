#!/usr/bin/env bash
# bench/tls.sh — what NBD over TLS costs, against plaintext and against nbdkit's TLS.
#
# fio's nbd engine (libnbd) drives 4k randwrite QD32, 4k randread QD32 and 1M seqwrite QD4
# over TCP on 127.0.0.1 against five servers in one run, interleaved (every repetition runs
# each server once, in turn, with a fresh server and journal):
#   a  nbdkit --tls=require file        (the reference NBD server with TLS)
#   b  tinylag serve --no-journal       (plaintext)
#   c  tinylag serve --no-journal --tls require
#   d  tinylag serve, local journal     (plaintext)
#   e  tinylag serve, local journal, --tls require
# fio's engine takes only a URI, and libnbd ignores `tls-certificates=` in URIs unless the
# program allows it, so the CA certificate goes where libnbd looks by default
# ($HOME/.pki/libnbd/ca-cert.pem) with HOME pointing into the work directory.
# The table in BENCHMARKS.md (section "TLS") shows medians and the ratios c/b, e/d, c/a.
#
# Needs: cargo, fio (with the nbd engine, libnbd built with gnutls), nbdkit, openssl, python3.
# Environment: RUNTIME (s per run, default 10), REPS (default 3), SIZE (primary, default 1G),
# BENCH_DIR (work directory; default a fresh one under /var/tmp, removed at the end),
# CONFIGS (default "a b c d e"), WORKLOADS (default "randwrite-4k randread-4k seqwrite-1M"),
# OUT (default BENCHMARKS.md in the checkout),
# TABLE_ONLY=1 (with BENCH_DIR: only rewrite the table from that directory's results.tsv),
# TINYLAG_BIN (an already built release binary: skips the cargo build).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-3}
SIZE=${SIZE:-1G}
CONFIGS=${CONFIGS:-"a b c d e"}
OUT=${OUT:-$ROOT/BENCHMARKS.md}
WORKLOADS=${WORKLOADS:-"randwrite-4k randread-4k seqwrite-1M"}

for tool in fio nbdkit openssl python3 cargo; do
    command -v "$tool" >/dev/null || { echo "bench/tls.sh: $tool is not installed" >&2; exit 2; }
done

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/tinylag-bench-tls.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
if [[ -z ${TABLE_ONLY:-} ]]; then : >"$RESULTS"; fi
PIDS=()
cleanup() {
    kill_pids
    if [[ -z ${BENCH_DIR:-} ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

measure() {
if [[ -n ${TINYLAG_BIN:-} ]]; then
    BIN=$TINYLAG_BIN
else
    (cd "$ROOT" && cargo build --release --quiet)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tinylag
fi
export TINYLAG_LOG=warn

# A CA, a server certificate for 127.0.0.1 (nbdkit/qemu layout) and the client's CA file.
PKI=$WORK/pki SRV=$WORK/pki/server CLIENT_HOME=$WORK/client-home
mkdir -p "$SRV" "$CLIENT_HOME/.pki/libnbd"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$PKI/ca.key" \
    -out "$PKI/ca.pem" -subj "/CN=tinylag bench CA" -days 2 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$SRV/server-key.pem" \
    -out "$PKI/server.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$PKI/server.ext"
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 2 -extfile "$PKI/server.ext" -out "$SRV/server-cert.pem" 2>/dev/null
cp "$PKI/ca.pem" "$SRV/ca-cert.pem"
cp "$PKI/ca.pem" "$CLIENT_HOME/.pki/libnbd/ca-cert.pem"

SEED=$WORK/seed.img
python3 - "$SEED" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], sys.argv[2]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * units[size[-1].upper()] if size[-1].isalpha() else int(size)
block = os.urandom(1 << 20)
with open(path, "wb") as f:
    for i in range(n >> 20):
        f.write(block[i % 64:] + block[: i % 64])
EOF
for c in $CONFIGS; do cp --sparse=never "$SEED" "$WORK/$c.img"; done
rm -f "$SEED"


# Starts server $1; sets URI and PID.
start_server() {
    local c=$1 img=$WORK/$1.img port
    port=$(free_port)
    rm -rf "$WORK/journal-$c"
    local tls=(--tls require --tls-certificates "$SRV")
    case $c in
    a)
        nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p "$port" --tls=require \
            --tls-certificates="$SRV" file "$img" &
        ;;
    b | c)
        local extra=()
        if [[ $c == c ]]; then extra=("${tls[@]}"); fi
        "$BIN" serve --primary "$img" --no-journal --listen "tcp:127.0.0.1:$port" \
            --control "$WORK/$c.ctl" "${extra[@]}" >"$WORK/$c.log" 2>&1 &
        ;;
    d | e)
        local extra=()
        if [[ $c == e ]]; then extra=("${tls[@]}"); fi
        "$BIN" init --journal "$WORK/journal-$c" --size "$SIZE" --primary "$img" >/dev/null
        "$BIN" serve --primary "$img" --journal "$WORK/journal-$c" \
            --listen "tcp:127.0.0.1:$port" --control "$WORK/$c.ctl" "${extra[@]}" \
            >"$WORK/$c.log" 2>&1 &
        ;;
    esac
    PID=$!
    PIDS+=("$PID")
    wait_port "$port"
    case $c in
    a | c | e) URI="nbds://127.0.0.1:$port/" ;;
    *) URI="nbd://127.0.0.1:$port/" ;;
    esac
}

for wl in $WORKLOADS; do
    case $wl in
    randwrite-4k) args=(--rw=randwrite --bs=4k --iodepth=32) ;;
    randread-4k) args=(--rw=randread --bs=4k --iodepth=32) ;;
    seqwrite-1M) args=(--rw=write --bs=1M --iodepth=4) ;;
    esac
    for rep in $(seq "$REPS"); do
        for c in $CONFIGS; do
            start_server "$c"
            HOME=$CLIENT_HOME fio --name="$wl" --ioengine=nbd --uri="$URI" "${args[@]}" \
                --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap \
                --randrepeat=0 --output-format=json --output="$WORK/fio.json" >/dev/null
            stop "$PID"
            rm -rf "$WORK/journal-$c"
            python3 - "$WORK/fio.json" "$c" "$wl" "$rep" >>"$RESULTS" <<'EOF'
import json, sys
fio, config, wl, rep = sys.argv[1:5]
job = json.load(open(fio))["jobs"][0]
side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
pct = side["clat_ns"]["percentile"]
print("\t".join(str(v) for v in [config, wl, rep, side["iops"], side["bw_bytes"] / 1e6,
      pct["50.000000"] / 1e3, pct["99.000000"] / 1e3]))
EOF
            tail -1 "$RESULTS" >&2
        done
    done
done
}

if [[ -z ${TABLE_ONLY:-} ]]; then measure; fi

python3 - "$RESULTS" "$OUT" "$RUNTIME" "$REPS" "$SIZE" "$(nproc)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)" \
    "$(uname -r)" "$(fio --version)" "$(nbdkit --version | head -1)" <<'EOF' | write_section "## TLS" "$OUT"
import statistics, sys
from collections import defaultdict
results, out, runtime, reps, size, cores, cpu, kernel, fio, nbdkit = sys.argv[1:11]
rows = defaultdict(list)
for line in open(results):
    c, wl, rep, iops, mbps, p50, p99 = line.rstrip("\n").split("\t")
    rows[(c, wl)].append((float(iops), float(mbps), float(p50), float(p99)))
names = {"a": "a: nbdkit --tls=require file", "b": "b: serve --no-journal, plaintext",
         "c": "c: serve --no-journal, --tls require", "d": "d: serve, local journal, plaintext",
         "e": "e: serve, local journal, --tls require"}
def med(c, wl, i):
    vals = [r[i] for r in rows.get((c, wl), [])]
    return statistics.median(vals) if vals else None
def fmt(v, spec):
    return "–" if v is None else format(v, spec)
wls = ["randwrite-4k", "randread-4k", "seqwrite-1M"]
lines = ["## TLS", "",
         f"`bench/tls.sh` (fio {fio}, nbd engine over TCP on 127.0.0.1, libnbd's TLS with the "
         f"CA in `$HOME/.pki/libnbd`; {nbdkit}). Each cell is the median of {reps} interleaved "
         f"runs of {runtime} s (after 1 s of ramp-up) on a {size} primary file with random "
         f"content, every run with a fresh server (and journal). Machine: {cores} cores ({cpu}), "
         f"loaded by other builds and tests during the run, so absolute numbers are noisy; the "
         f"ratios within one run are what to read. Linux {kernel}. TLS 1.3, ECDSA P-256, "
         "rustls with aws-lc-rs (tinylag) and GnuTLS (nbdkit, libnbd).", "",
         "| workload | server | IOPS | MB/s | p50 µs | p99 µs |",
         "|---|---|---:|---:|---:|---:|"]
for wl in wls:
    for c in "abcde":
        if (c, wl) not in rows:
            continue
        lines.append(f"| {wl} | {names[c]} | {fmt(med(c, wl, 0), '.0f')} | "
                     f"{fmt(med(c, wl, 1), '.1f')} | {fmt(med(c, wl, 2), '.0f')} | "
                     f"{fmt(med(c, wl, 3), '.0f')} |")
lines += ["", "| ratio | workload | value | target |", "|---|---|---:|---|"]
def ratio(x, y, wl, i):
    a, b = med(x, wl, i), med(y, wl, i)
    return None if a is None or b is None or b == 0 else a / b
for (x, y, i, what, target) in [("c", "b", 0, "IOPS c/b (TLS/plain, no journal)", "≥ 0.8 (4k)"),
                                ("e", "d", 0, "IOPS e/d (TLS/plain, journal)", "≥ 0.8 (4k)"),
                                ("c", "a", 0, "IOPS c/a (tinylag/nbdkit, both TLS)", "≥ 1.0"),
                                ("c", "b", 1, "MB/s c/b", ""),
                                ("c", "a", 1, "MB/s c/a", "")]:
    for wl in wls:
        r = ratio(x, y, wl, i)
        if r is None:
            continue
        shown = target if (wl.endswith("4k") or "nbdkit" in what) else ""
        lines.append(f"| {what} | {wl} | {r:.2f} | {shown} |")
section = "\n".join(lines) + "\n"
print(section)
EOF
