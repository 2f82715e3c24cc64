#!/usr/bin/env bash
# NBD block status benchmark (issue 22): `nbdcopy` of a sparse disk holding a little data
# from `tinylag serve`, with block status (nbdcopy's default: it asks `base:allocation` and
# copies only the data extents) and without (`nbdcopy --no-extents`: every byte is read).
# Reports wall time and the bytes the server read from its primary (the daemon's
# `io.bytes_read`, from `tinylag status --json`, before and after each copy). The copies go
# to `null:` so the destination costs nothing. Runs are interleaved (with, without; again).
#
#   bench/blockstatus.sh
#
# Environment: RUNS (default 5, medians are reported), SIZE (default 1G), DATA_MIB (MiB of
# data written before the copies, as 1 MiB writes spread over the disk; default 10),
# BENCH_DIR (scratch, default target/bench-blockstatus), BENCH_OUT (default BENCHMARKS.md;
# the "blockstatus" section between its markers is replaced), CARGO_PROFILE (default
# release; anything else uses the debug build). Needs nbdcopy, qemu-io and python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
SIZE=${SIZE:-1G}
DATA_MIB=${DATA_MIB:-10}
DIR=${BENCH_DIR:-$PWD/target/bench-blockstatus}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}
PROFILE=${CARGO_PROFILE:-release}

for tool in nbdcopy qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "bench/blockstatus.sh needs $tool" >&2; exit 1; }
done
if [[ $PROFILE == release ]]; then
    cargo build --release --quiet --bin tinylag
    BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/tinylag
else
    cargo build --quiet --bin tinylag
    BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/tinylag
fi

trap kill_pids EXIT

rm -rf "$DIR"
mkdir -p "$DIR"
PRIMARY=$DIR/primary.img
SOCK=$DIR/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
"$BIN" init --journal "$DIR/journal" --size "$SIZE" --primary "$PRIMARY" >/dev/null
"$BIN" serve --journal "$DIR/journal" --primary "$PRIMARY" --listen "unix:$SOCK" \
    >"$DIR/serve.log" 2>&1 &
PIDS+=($!)
wait_socket "$SOCK" || { echo "serve did not start:" >&2; cat "$DIR/serve.log" >&2; exit 1; }

# DATA_MIB writes of 1 MiB, evenly spread over the disk.
size_mib=$(( $(stat -c %s "$PRIMARY") >> 20 ))
args=()
for i in $(seq 0 $((DATA_MIB - 1))); do
    args+=(-c "write -P $((i % 250 + 1)) $((i * size_mib / DATA_MIB))M 1M")
done
qemu-io -f raw "${args[@]}" -c flush "$URI" >/dev/null

read_bytes() {
    "$BIN" status --primary "$PRIMARY" --json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["io"]["bytes_read"])'
}

RESULTS=$DIR/results.tsv
: >"$RESULTS"
for run in $(seq "$RUNS"); do
    for mode in extents no-extents; do
        flags=()
        [[ $mode == no-extents ]] && flags=(--no-extents)
        before=$(read_bytes)
        start=$(now)
        nbdcopy "${flags[@]}" "$URI" null:
        end=$(now)
        after=$(read_bytes)
        echo "$mode $run $start $end $((after - before))" >>"$RESULTS"
    done
done

python3 - "$RESULTS" "$OUT" "$RUNS" "$SIZE" "$DATA_MIB" "$PROFILE" <<'PY' | write_section blockstatus "$OUT"
import os, statistics, sys, time
results, out, runs, size, data_mib, profile = sys.argv[1:7]
rows = {}
for line in open(results):
    mode, run, start, end, read = line.split()
    rows.setdefault(mode, []).append((float(end) - float(start), int(read)))
load = os.getloadavg()[0]
machine = f"{os.cpu_count()} cores, load average {load:.1f} at the end (shared with other builds and tests)"
def med(mode, i):
    return statistics.median(x[i] for x in rows[mode])
mib = 1 << 20
table = []
for mode, name in (("extents", "with block status (`nbdcopy`)"),
                   ("no-extents", "without (`nbdcopy --no-extents`)")):
    table.append(f"| {name} | {med(mode, 0):.3f} s | {med(mode, 1) / mib:,.1f} MiB |")
ratio_s = med("no-extents", 0) / max(med("extents", 0), 1e-9)
ratio_b = med("no-extents", 1) / max(med("extents", 1), 1)
section = f"""<!-- blockstatus:begin -->
## NBD block status

`bench/blockstatus.sh` on {time.strftime('%Y-%m-%d')} ({profile} build): {machine}; medians of
{runs} interleaved runs. `tinylag serve` (journal in a local directory) on a sparse primary of
{size} holding {data_mib} MiB of data (1 MiB writes spread over the disk); `nbdcopy` from it
over a Unix socket to `null:`. Bytes read are the daemon's own count of what it read from the
primary (`io.bytes_read` in `tinylag status --json`), before and after each copy.

| copy | seconds | bytes the server read |
|---|---|---|
""" + "\n".join(table) + f"""

With block status nbdcopy asks `base:allocation` (answered from `SEEK_DATA`/`SEEK_HOLE` on
the primary) and reads only the data extents: {ratio_b:,.0f}x fewer bytes read and
{ratio_s:,.1f}x faster. Without it every byte is read from the primary, though the holes cross the socket as
32-byte hole chunks rather than data (structured replies: a read that is all zeroes is sent
as `NBD_REPLY_TYPE_OFFSET_HOLE`). The machine was loaded (the CI suite and other helpers'
builds ran meanwhile), so the seconds are noisy; the bytes are not.
<!-- blockstatus:end -->
"""
print(section)
PY
