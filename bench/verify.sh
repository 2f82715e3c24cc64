#!/usr/bin/env bash
# bench/verify.sh — what in-band verify and writer leases cost.
#
# One `tinylag serve` (journal in a local directory) over a SIZE primary of random data, and
# in one run, interleaved REPS times:
#   read   fio's nbd engine reads the whole primary sequentially (1M, QD4): the baseline
#   verify `tinylag verify --regions all --rate 0` (unpaced): serve reads every region under
#          its range lock, hashes it (SHA-256) and journals a VERIFY record
#   rw     fio 4k randwrite QD32 for RUNTIME s, alone
#   rw+v   the same while `tinylag verify --rate 200M` loops over the whole device
# and once, with the default 15 s lease term: lease renewals per minute, from the daemon's
# status over LEASE_WINDOW s.
# The table in BENCHMARKS.md (section "verify and leases") shows medians and the ratios.
#
# To start in `logging` (verify refuses to run while a resync is pending) the primary is
# filled with random data behind serve's back after a clean stop: for measurement only.
#
# Needs: cargo, fio (with the nbd engine), python3.
# Environment: SIZE (default 1G), REPS (default 3), RUNTIME (default 10), LEASE_WINDOW
# (default 60), BENCH_DIR (default a fresh directory under /var/tmp, removed at the end),
# OUT (default BENCHMARKS.md in the checkout), CARGO_TARGET_DIR (where the build is),
# PROFILE (release, default, or debug: no release build, for a machine without the time),
# BUILD=0 (use the binary already built).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
LEASE_WINDOW=${LEASE_WINDOW:-60}
OUT=${OUT:-$ROOT/BENCHMARKS.md}

for tool in fio python3 cargo; do
    command -v "$tool" >/dev/null || { echo "bench/verify.sh: $tool is not installed" >&2; exit 2; }
done

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/tinylag-verify-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
: >"$RESULTS"
PIDS=()
cleanup() {
    kill_pids
    if [[ -z ${BENCH_DIR:-} ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

PROFILE=${PROFILE:-release}
if [[ ${BUILD:-1} == 0 ]]; then
    : # use the binary as built
elif [[ $PROFILE == release ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
else
    (cd "$ROOT" && cargo build --quiet)
fi
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/tinylag
export TINYLAG_LOG=warn
IMG=$WORK/primary.img
SOCK=$WORK/primary.sock
CTL=$IMG.ctl
URI="nbd+unix:///?socket=$SOCK"

start_serve() {
    "$BIN" serve --primary "$IMG" --journal "$WORK/journal" --listen "unix:$SOCK" "$@" \
        >>"$WORK/serve.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    wait_socket "$SOCK"
}
fio_json() { python3 -c 'import json,sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
print(side[sys.argv[2]])' "$@"; }

"$BIN" init --journal "$WORK/journal" --size "$SIZE" --primary "$IMG" >/dev/null
start_serve
stop "$PID"
python3 - "$IMG" <<'EOF'
import os, sys
path = sys.argv[1]
n = os.path.getsize(path)
block = os.urandom(1 << 20)
with open(path, "r+b") as f:
    for i in range(n >> 20):
        f.write(block[i % 64:] + block[: i % 64])
EOF
start_serve
"$BIN" status --control "$CTL" --json | python3 -c 'import json,sys; m=json.load(sys.stdin)["mode"]; sys.exit(0 if m=="logging" else f"mode {m}, not logging")'

for rep in $(seq "$REPS"); do
    fio --name=read --ioengine=nbd --uri="$URI" --rw=read --bs=1M --iodepth=4 --size="$SIZE" \
        --output-format=json --output="$WORK/fio.json" >/dev/null
    echo -e "read\t$rep\t$(fio_json "$WORK/fio.json" bw_bytes)" >>"$RESULTS"
    rate=$("$BIN" verify --control "$CTL" --regions all --rate 0 --json | field 'd["rate"]')
    echo -e "verify\t$rep\t$rate" >>"$RESULTS"

    fio --name=rw --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
        --output-format=json --output="$WORK/fio.json" >/dev/null
    echo -e "rw\t$rep\t$(fio_json "$WORK/fio.json" iops)" >>"$RESULTS"

    (while :; do "$BIN" verify --control "$CTL" --regions all --rate 200M >/dev/null 2>&1 || sleep 0.2; done) &
    LOOP=$!
    PIDS+=("$LOOP")
    fio --name=rw --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
        --output-format=json --output="$WORK/fio.json" >/dev/null
    kill "$LOOP" 2>/dev/null || true
    wait "$LOOP" 2>/dev/null || true
    echo -e "rw+v\t$rep\t$(fio_json "$WORK/fio.json" iops)" >>"$RESULTS"
    tail -4 "$RESULTS" >&2
done

before=$("$BIN" status --control "$CTL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["lease"]["renewals"])')
sleep "$LEASE_WINDOW"
after=$("$BIN" status --control "$CTL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["lease"]["renewals"])')
echo -e "renewals\t1\t$(python3 -c "print(($after - $before) * 60 / $LEASE_WINDOW)")" >>"$RESULTS"
stop "$PID"

python3 - "$RESULTS" "$OUT" "$SIZE" "$REPS" "$RUNTIME" "$LEASE_WINDOW" "$(nproc)" \
    "$(uptime | sed 's/.*load average: //')" "$(fio --version)" "$PROFILE" <<'EOF' | write_section "## verify and leases" "$OUT"
import statistics, sys
from collections import defaultdict
results, out, size, reps, runtime, window, cores, load, fio, profile = sys.argv[1:11]
vals = defaultdict(list)
for line in open(results):
    k, _, v = line.rstrip("\n").split("\t")
    vals[k].append(float(v))
med = {k: statistics.median(v) for k, v in vals.items()}
lines = ["## verify and leases", "",
         f"`bench/verify.sh` ({fio}, nbd engine, Unix socket; one `serve`, local journal, "
         f"{size} primary of random data, {profile} build). Medians of {reps} interleaved runs. "
         f"Machine: {cores} cores shared with other helpers' builds and tests (load average at "
         f"the end: {load}), so absolute numbers are low and noisy; compare within the table. "
         "Both reads go through the page cache after the first pass.", "",
         "| measurement | median | runs |", "|---|---:|---|",
         f"| fio sequential read of the primary (1M, QD4), MB/s | {med['read'] / 1e6:.0f} | "
         + ", ".join(f"{v / 1e6:.0f}" for v in vals["read"]) + " |",
         f"| `verify --regions all --rate 0` (read + SHA-256 + VERIFY record per 4 MiB region), MB/s | "
         f"{med['verify'] / 1e6:.0f} | " + ", ".join(f"{v / 1e6:.0f}" for v in vals["verify"]) + " |",
         f"| 4k randwrite QD32, IOPS, alone ({runtime} s) | {med['rw']:.0f} | "
         + ", ".join(f"{v:.0f}" for v in vals["rw"]) + " |",
         f"| 4k randwrite QD32, IOPS, during `verify --rate 200M` loops | {med['rw+v']:.0f} | "
         + ", ".join(f"{v:.0f}" for v in vals["rw+v"]) + " |",
         f"| lease renewals per minute (default 15 s term, over {window} s) | "
         f"{med['renewals']:.1f} | one PUT each |",
         "", "| ratio | value |", "|---|---:|",
         f"| verify / fio read throughput | {med['verify'] / med['read']:.2f} |",
         f"| randwrite IOPS during verify / alone | {med['rw+v'] / med['rw']:.2f} |"]
section = "\n".join(lines) + "\n"
print(section)
EOF
