#!/usr/bin/env bash
# bench/failover.sh — how long a failover takes, planned and forced, against today's way.
#
#   bench/failover.sh                 release build of this tree, ROUNDS=3 interleaved rounds
#
# Per round, on a 256 MiB disk (site A serves, site B replays it with --undo, fio's nbd
# engine writes for 3 s at A first):
#   planned  `demote` of A issued → first write acknowledged on B (B's agent stopped, then
#            `promote`; the write is a qemu-io 4 KiB write retried until it succeeds)
#   forced   `kill -9` of A under fio → first write acknowledged on B after `promote --force`
#   today    the same crash handled without promote: `serve` on b.img without a marker
#            (forward-full: the whole device resynced, time until mode logging) plus a new
#            consumer's full replay of the journal onto a fresh image for A (`replay --once`)
# Prints one line per round and the medians; notes `uptime` before and after.
#
# Environment: ROUNDS (default 3), SIZE (default 256M), TINYLAG (default: target/release).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-256M}
if [ -z "${TINYLAG:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
    TINYLAG=${CARGO_TARGET_DIR:-$ROOT/target}/release/tinylag
fi
export TINYLAG_LOG=warn
W=$(mktemp -d /var/tmp/tinylag-failover.XXXXXX)
PIDS=()
cleanup() { kill_pids -KILL; rm -rf "$W"; }
trap cleanup EXIT

ms() { echo "($2 - $1) * 1000 / 1" | bc; }
# Retries a 4 KiB write through the NBD socket $1 until it is acknowledged.
first_write() {
    until qemu-io -f raw "nbd+unix:///?socket=$1" -c 'write -P 5 0 4k' 2>/dev/null | grep -q '^wrote'; do
        sleep 0.02
    done
}
fio_at() { # socket seconds
    fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=randwrite --bsrange=4k-64k \
        --iodepth=8 --size=64M --time_based --runtime="$2" --norandommap --output-format=terse \
        >/dev/null 2>&1
}

setup() { # dir lease
    local d=$1
    rm -rf "$d"; mkdir -p "$d"
    "$TINYLAG" init --journal "$d/j" --size "$SIZE" --primary "$d/a.img" >/dev/null
    "$TINYLAG" serve --primary "$d/a.img" --journal "$d/j" --lease-time "$2" >"$d/a.log" 2>&1 &
    A=$!; PIDS+=("$A")
    wait_ctl "$d/a.img.ctl"
    "$TINYLAG" replay --journal "$d/j" --replica "$d/b.img" --name siteb --assume-seeded \
        --control "$d/b.agent.ctl" >"$d/rb.log" 2>&1 &
    RB=$!; PIDS+=("$RB")
}

planned() {
    local d=$W/planned
    setup "$d" 15s
    fio_at "$d/a.img.sock" 3
    sleep 1 # the agent catches up, as a DR replica normally is
    local t0; t0=$(now)
    "$TINYLAG" demote --control "$d/a.img.ctl" >/dev/null
    kill "$RB"; wait "$RB" || true
    "$TINYLAG" promote --replica "$d/b.img" --journal "$d/j" --name siteb >"$d/b.log" 2>&1 &
    local B=$!; PIDS+=("$B")
    first_write "$d/b.img.sock"
    local t1; t1=$(now)
    grep -q '"kind": *"clean"' <("$TINYLAG" status --control "$d/b.img.ctl" --json) || echo "WARNING: B did not start clean" >&2
    kill "$A" "$B"; wait "$A" "$B" || true
    ms "$t0" "$t1"
}

forced() {
    local d=$W/forced
    setup "$d" 3s
    fio_at "$d/a.img.sock" 6 &
    local F=$!
    sleep 3
    kill -9 "$A"; local t0; t0=$(now)
    wait "$F" || true
    kill "$RB"; wait "$RB" || true
    "$TINYLAG" promote --force --replica "$d/b.img" --journal "$d/j" --name siteb >"$d/b.log" 2>&1 &
    local B=$!; PIDS+=("$B")
    first_write "$d/b.img.sock"
    local t1; t1=$(now)
    kill "$B"; wait "$B" || true
    # Today's way on the same crash: forward-full serve on B, and a new consumer's full replay.
    cp --sparse=always "$d/b.img" "$d/b2.img"
    local t2; t2=$(now)
    "$TINYLAG" serve --primary "$d/b2.img" --journal "$d/j" >"$d/b2.log" 2>&1 &
    local S=$!; PIDS+=("$S")
    wait_ctl "$d/b2.img.ctl"
    until "$TINYLAG" status --control "$d/b2.img.ctl" --json | grep -q '"mode": *"logging"'; do sleep 0.1; done
    local t3; t3=$(now)
    local resynced; resynced=$("$TINYLAG" status --control "$d/b2.img.ctl" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["resync"]["bytes_done"])')
    kill "$S"; wait "$S" || true
    "$TINYLAG" replay --journal "$d/j" --replica "$d/a2.img" --name sitea2 --once --no-undo >/dev/null 2>&1
    local t4; t4=$(now)
    echo "$(ms "$t0" "$t1") $(ms "$t2" "$t3") $(ms "$t3" "$t4") $resynced"
}

echo "uptime before: $(uptime)"
results=$W/results
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
    p=$(planned)
    read -r f full replay bytes < <(forced)
    echo "round $round: planned ${p} ms; forced ${f} ms; today: forward-full ${full} ms ($((bytes >> 20)) MiB resynced) + full replay ${replay} ms"
    echo "$p $f $full $replay" >>"$results"
done
echo "uptime after: $(uptime)"
echo "median planned (demote -> first write on B): $(cut -d' ' -f1 "$results" | median) ms"
echo "median forced (kill -9 -> first write on B): $(cut -d' ' -f2 "$results" | median) ms"
echo "median today (forward-full + full replay): $(awk '{print $3 + $4}' "$results" | median) ms"
