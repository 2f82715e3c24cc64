#!/usr/bin/env bash
# bench/groups.sh — what a consistency group costs against one device, journal on.
#
#   bench/groups.sh                   release build of this tree, ROUNDS=3 interleaved rounds
#
# Per round, for N = 1, 2 and 4 devices (one journal, one `serve`), the same load: fio's nbd
# engine, 4k randwrite, QD32 in total for SECONDS — on one device one job at iodepth 32, on a
# group one job per export at iodepth 32/N. Reported per N: aggregate IOPS, segment PUTs per
# GiB written (segments in the journal / GiB fio wrote), and the replay apply rate (MiB/s of
# journal applied by a new agent with `replay --once` onto a fresh replica set). Prints one
# line per round and N, then the medians and the ratios to N = 1; notes `uptime` before and
# after.
#
# Environment: ROUNDS (default 3), SIZE per device (default 256M), SECONDS (default 10),
# TINYLAG (default: target/release).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-256M}
SECS=${SECONDS_PER_RUN:-10}
if [ -z "${TINYLAG:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
    TINYLAG=${CARGO_TARGET_DIR:-$ROOT/target}/release/tinylag
fi
export TINYLAG_LOG=warn
W=$(mktemp -d /var/tmp/tinylag-groups.XXXXXX)
PIDS=()
cleanup() { kill_pids -KILL; rm -rf "$W"; }
trap cleanup EXIT


# One run with $1 devices: prints "iops puts_per_gib apply_mib_s".
run() {
    local n=$1 d=$W/n$1
    rm -rf "$d"; mkdir -p "$d"
    local init=(init --journal "$d/j") serve=(serve --journal "$d/j") replay=(replay --journal "$d/j" --name b --once) jobs=()
    local depth=$((32 / n))
    if [ "$n" = 1 ]; then
        init+=(--size "$SIZE" --primary "$d/p0.img")
        serve+=(--primary "$d/p0.img")
        replay+=(--replica "$d/r0.img")
        jobs+=(--name=d0 "--uri=nbd+unix:///?socket=$d/p0.img.sock" --iodepth=32)
    else
        for i in $(seq 0 $((n - 1))); do
            init+=(--device "d$i=$SIZE:$d/p$i.img")
            serve+=(--primary "d$i=$d/p$i.img")
            replay+=(--replica "d$i=$d/r$i.img")
            jobs+=(--name="d$i" "--uri=nbd+unix:///d$i?socket=$d/p0.img.sock" --iodepth="$depth")
        done
    fi
    "$TINYLAG" "${init[@]}" >/dev/null
    "$TINYLAG" "${serve[@]}" >"$d/serve.log" 2>&1 &
    local s=$!; PIDS+=("$s")
    wait_ctl "$d/p0.img.ctl"
    local out
    out=$(fio --ioengine=nbd --rw=randwrite --bs=4k --size="$SIZE" --time_based --runtime="$SECS" \
        --norandommap --randrepeat=0 --group_reporting --output-format=json "${jobs[@]}" 2>/dev/null |
        sed -n '/^{/,$p') # the nbd engine prints a line of its own before the JSON
    kill "$s"; wait "$s" || true
    local iops bytes segs
    iops=$(jq '.jobs[0].write.iops' <<<"$out")
    bytes=$(jq '.jobs[0].write.io_bytes' <<<"$out")
    segs=$(find "$d/j/journal" -type f | wc -l)
    local journal_bytes; journal_bytes=$(du -sb "$d/j/journal" | cut -f1)
    local t0 t1; t0=$(now)
    "$TINYLAG" "${replay[@]}" --no-undo >"$d/replay.log" 2>&1
    t1=$(now)
    echo "$iops $(echo "$segs * 1073741824 / $bytes" | bc -l) $(echo "$journal_bytes / 1048576 / ($t1 - $t0)" | bc -l)"
    rm -rf "$d"
}

echo "load before: $(uptime)"
declare -A IOPS PUTS APPLY
for r in $(seq 1 "$ROUNDS"); do
    for n in 1 2 4; do
        read -r iops puts apply < <(run "$n")
        printf 'round %d  N=%d  IOPS %.0f  PUTs/GiB %.1f  apply %.1f MiB/s\n' "$r" "$n" "$iops" "$puts" "$apply"
        IOPS[$n]+="$iops "; PUTS[$n]+="$puts "; APPLY[$n]+="$apply "
    done
done
for n in 1 2 4; do
    printf 'median N=%d  IOPS %.0f (%.2fx of N=1)  PUTs/GiB %.1f (%.2fx)  apply %.1f MiB/s (%.2fx)\n' "$n" \
        "$(median "${IOPS[$n]}")" "$(echo "$(median "${IOPS[$n]}") / $(median "${IOPS[1]}")" | bc -l)" \
        "$(median "${PUTS[$n]}")" "$(echo "$(median "${PUTS[$n]}") / $(median "${PUTS[1]}")" | bc -l)" \
        "$(median "${APPLY[$n]}")" "$(echo "$(median "${APPLY[$n]}") / $(median "${APPLY[1]}")" | bc -l)"
done
echo "load after: $(uptime)"
