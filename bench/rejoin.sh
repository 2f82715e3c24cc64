#!/usr/bin/env bash
# bench/rejoin.sh — what bringing a killed primary back as a replica moves: `tinylag rejoin`
# against the bytes written since the fork and the device size, and against today's way (a
# new consumer replaying the whole journal from its start onto a blank image).
#
#   A `serve`s a SIZE device (local-directory journal, 4 MiB regions, activity log on) with B
#   following (`replay`). fio (nbd engine, 4k-64k randwrite QD8) writes HOT bytes of A for
#   RUNTIME s and A is killed with SIGKILL under it. B takes over with `promote --force`
#   (applies everything durable, claims the next epoch, serves in `logging`), fio writes HOT bytes of B (a different span) for RUNTIME s, then A runs
#   `tinylag rejoin`: its "will move" line (bytes, regions), the regions B resynced for it,
#   and the journal bytes its agent read from the fork on (segments from the start seq) are
#   recorded; once B stops, A must equal B (cmp). Then a new consumer replays the journal from
#   its start onto a blank image (today's way: every segment) and must equal B too; both
#   timed.
#
# Environment: SIZE (default 1G), HOT (default 128M), RUNTIME (default 10), RATE_B (fio's
# --rate on B after the fork, default 20m: production going on, not a flood), BENCH_DIR (scratch,
# default target/bench-rejoin), BENCH_OUT (default BENCHMARKS.md; the section between
# "<!-- rejoin:begin -->" and "<!-- rejoin:end -->" is replaced). Needs fio (nbd engine),
# python3, cmp.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
HOT=${HOT:-128M}
RUNTIME=${RUNTIME:-10}
RATE_B=${RATE_B:-20m}
DIR=${BENCH_DIR:-$PWD/target/bench-rejoin}
OUT=${BENCH_OUT:-$PWD/BENCHMARKS.md}

for tool in fio python3 cmp; do
    command -v "$tool" >/dev/null || { echo "bench/rejoin.sh needs $tool" >&2; exit 1; }
done

cargo build --release --quiet --bin tinylag
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/tinylag
rm -rf "$DIR"
mkdir -p "$DIR"
PIDS=()
cleanup() {
    kill_pids -KILL
}
trap cleanup EXIT
export TINYLAG_LOG=warn

J=$DIR/journal
A=$DIR/a.img
B=$DIR/b.img
wait_for() { # $1 what, $2 command that succeeds when done
    for _ in $(seq 1200); do eval "$2" && return 0; sleep 0.1; done
    echo "bench/rejoin.sh: timed out waiting for $1" >&2; exit 1
}
fio_bg() { # $1 socket, $2 offset, $3 seconds, $4 json out, $5 extra fio options
    fio --name=load --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw=randwrite \
        --bsrange=4k-64k --iodepth=8 --offset="$2" --size="$HOT" --time_based \
        --runtime="$3" --norandommap --randrepeat=0 --output-format=json ${5:-} >"$4" 2>/dev/null &
}
fio_bytes() { sed -n '/^{/,$p' "$1" | field 'd["jobs"][0]["write"]["io_bytes"]' 2>/dev/null || echo 0; }

"$BIN" init --journal "$J" --size "$SIZE" --primary "$A" >/dev/null
"$BIN" serve --primary "$A" --journal "$J" --lease-time 3s >"$DIR/a.log" 2>&1 &
APID=$!
PIDS+=("$APID")
wait_for "A" "[[ -S $A.ctl ]] && status $A.ctl | grep -q logging"
"$BIN" replay --journal "$J" --replica "$B" --name siteb >"$DIR/b-agent.log" 2>&1 &
BAG=$!
PIDS+=("$BAG")

fio_bg "$A.sock" 0 "$RUNTIME" "$DIR/fio-a.json"
FIOA=$!
sleep "$((RUNTIME / 2))"
kill -9 "$APID"
wait "$FIOA" 2>/dev/null || true
kill "$BAG"; wait "$BAG" 2>/dev/null || true
T0=$(now)
"$BIN" promote --force --replica "$B" --journal "$J" --name siteb --lease-time 3s >"$DIR/b.log" 2>&1 &
BPID=$!
PIDS+=("$BPID")
wait_for "B answering" "[[ -S $B.ctl ]] && status $B.ctl | grep -q mode"
TB=$(now)
B_START=$(status "$B.ctl" | field 'd["mode"]')
wait_for "B logging" "status $B.ctl | field 'd[\"mode\"]' | grep -qx logging"
fio_bg "$B.sock" "$(( $(numfmt --from=iec "$HOT") * 2 ))" "$RUNTIME" "$DIR/fio-b.json" "--rate=$RATE_B"
wait $! || true
B_RESYNCED_BEFORE=$(status "$B.ctl" | field 'd["resync"]["lifetime_regions"]')

T1=$(now)
"$BIN" rejoin --journal "$J" --replica "$A" --name sitea >"$DIR/rejoin.out" 2>"$DIR/rejoin.log" &
RPID=$!
PIDS+=("$RPID")
wait_for "the rejoin's plan" "grep -q 'will move' $DIR/rejoin.out"
wait_for "the request served" "[[ ! -e $J/requests/resync/sitea ]] && grep -q sitea <(ls $J/consumers)"
B_RESYNCED=$(( $(status "$B.ctl" | field 'd["resync"]["lifetime_regions"]') - B_RESYNCED_BEFORE ))
kill "$BPID"; wait "$BPID" || true
kill "$RPID"; wait "$RPID" || true
"$BIN" replay --journal "$J" --replica "$A" --name sitea --once >/dev/null 2>&1
T2=$(now)
cmp "$A" "$B"
START_SEQ=$(grep -o 'from seq [0-9]*' "$DIR/rejoin.out" | grep -o '[0-9]*$')
read -r MOVE_BYTES MOVE_REGIONS < <(grep -o 'will move [^(]*([0-9]* bytes, [0-9]* regions' "$DIR/rejoin.out" \
    | sed -E 's/.*\(([0-9]+) bytes, ([0-9]+) regions/\1 \2/')
FROM_FORK=$(python3 - "$J" "$START_SEQ" <<'EOF'
import os, sys
j, start = sys.argv[1], int(sys.argv[2])
total = 0
for stripe in os.listdir(f"{j}/journal"):
    for name in os.listdir(f"{j}/journal/{stripe}"):
        if name.isdigit() and int(name) >= start:
            total += os.path.getsize(f"{j}/journal/{stripe}/{name}")
print(total)
EOF
)
JOURNAL_BYTES=$(du -sb "$J/journal" | cut -f1)

# Today's way: a new consumer replays the whole journal onto a blank image.
T3=$(now)
"$BIN" replay --journal "$J" --replica "$DIR/c.img" --name fresh --once >/dev/null 2>&1
T4=$(now)
cmp "$DIR/c.img" "$B"

A_BYTES=$(fio_bytes "$DIR/fio-a.json")
B_BYTES=$(fio_bytes "$DIR/fio-b.json")
DEVICE=$(numfmt --from=iec "$SIZE")
DIVERGED_LINE=$(grep "diverged:" "$DIR/rejoin.log" | sed 's/^tinylag rejoin: //')
UPTIME=$(uptime | sed 's/.*load average/load average/')

python3 - "$OUT" <<EOF | write_section rejoin "$OUT"
import re, sys
out = sys.argv[1]
mib = lambda b: f"{int(b) / 2**20:,.1f} MiB"
move, device, a, b = $MOVE_BYTES, $DEVICE, $A_BYTES, $B_BYTES
regions, resynced = $MOVE_REGIONS, $B_RESYNCED
diverged = regions * 4 * 2**20
section = f"""<!-- rejoin:begin -->
## Rejoin

\`bench/rejoin.sh\` on $(date -u +%Y-%m-%d) (release build; SIZE=$SIZE, HOT=$HOT, RUNTIME=${RUNTIME}s; $UPTIME
at the end; 2 cores shared with other builds). Site A serves, B follows; fio writes A's first
$HOT and A is killed with SIGKILL under it; B takes over with
\`promote --force\` (B started \`$B_START\`; failover {$TB - $T0:.1f} s from the promote to serving);
fio writes $HOT of B elsewhere at $RATE_B/s for ${RUNTIME}s; then \`tinylag rejoin\` on A. A equals B afterwards (cmp), and so
does a new consumer's replay of the whole journal onto a blank image (today's way).
A full replay grows with the journal's retention (here only the seconds A ran before the
fork); the rejoin with what diverged and what B wrote since.

The rejoin's own account: "$DIVERGED_LINE".

| | bytes |
|---|---|
| device | {mib(device)} |
| written on A by fio until it was killed (journaled or not) | {mib(a)} |
| written on B by fio after the fork | {mib(b)} |
| rejoin: diverged regions on A ({regions} × 4 MiB) | {mib(diverged)} |
| rejoin: moved (asked of B, printed before moving) | {mib(move)} ({move / max(diverged, 1):.2f} × the diverged regions; {100 * move / device:.1f}% of the device) |
| rejoin: regions B's writer resynced for the request (the span) | {resynced} ({mib(resynced * 4 * 2**20)}; {resynced * 4 * 2**20 / max(diverged, 1):.2f} × the diverged regions, target ≤ 1.2) |
| rejoin: journal A's agent read from the fork (B's records and the span) | {mib($FROM_FORK)} |
| today: a new consumer's full replay (every segment of the journal) | {mib($JOURNAL_BYTES)} |

| | seconds |
|---|---|
| rejoin, from its start to A equal to B (B stopped once the span was durable) | {$T2 - $T1:.1f} |
| today: full replay from the journal's start | {$T4 - $T3:.1f} |
<!-- rejoin:end -->"""
print(section)
EOF
