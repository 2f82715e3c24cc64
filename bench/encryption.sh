#!/usr/bin/env bash
# bench/encryption.sh — what encryption at rest costs the primary.
#
# Runs bench/serve.sh's machinery (same servers, fio nbd engine, fresh server and journal
# per run, runs interleaved) on two configs in one run: c (serve, local journal) and k (the
# same with --encryption-key), for 4k randwrite QD32 and 1M seqwrite QD4, and writes the
# medians, the k/c ratios against the targets (IOPS ≥ 0.95, MB/s ≥ 0.9) and the server CPU
# seconds per GB written (and what encryption adds) into BENCHMARKS.md, section
# "Encryption at rest". serve.sh's own table goes to a scratch file, not BENCHMARKS.md.
#
# Then the replay side: journals of REPLAY_SIZE (default 512M) of 4 KiB random and of 1 MiB
# sequential writes, written by examples/replay_bench_journal once in the clear and once
# sealed, each applied by `replay --once` with its undo log onto a prefilled replica, the
# two runs interleaved (order alternating) REPS times: apply MB/s sealed / clear.
#
# Environment: RUNTIME (s per run, default 10), REPS (default 3), SIZE (default 1G),
# REPLAY_SIZE (default 512M), BENCH_DIR (kept when given), OUT (default BENCHMARKS.md in
# the checkout).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/BENCHMARKS.md}
WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/tinylag-enc-bench.XXXXXX)}
KEEP=${BENCH_DIR:-}
cleanup() { if [[ -z $KEEP ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

BENCH_DIR=$WORK OUT=$WORK/serve-table.md CONFIGS="c k" \
    WORKLOADS="randwrite-4k seqwrite-1M" "$ROOT/bench/serve.sh" >/dev/null

# The replay side (serve.sh built the release binary; the generator is an example).
(cd "$ROOT" && cargo build --release --quiet --example replay_bench_journal)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tinylag
GEN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/replay_bench_journal
REPLAY_SIZE=${REPLAY_SIZE:-512M}
KEY=$WORK/replay.key
rm -f "$KEY"
"$BIN" key generate --output "$KEY" >/dev/null
REPLAY=$WORK/replay.tsv
: >"$REPLAY"
replay_load=$(cut -d' ' -f1 /proc/loadavg)
for pattern in rand4k seq1m; do
    TINYLAG_LOG=warn "$GEN" "$WORK/j-clear" "$REPLAY_SIZE" "$pattern" "$REPLAY_SIZE" >/dev/null
    TINYLAG_BENCH_KEY=$KEY TINYLAG_LOG=warn "$GEN" "$WORK/j-sealed" "$REPLAY_SIZE" "$pattern" \
        "$REPLAY_SIZE" >/dev/null
    for run in $(seq 1 "${REPS:-3}"); do
        order=(clear sealed)
        (( run % 2 == 0 )) && order=(sealed clear)
        for mode in "${order[@]}"; do
            replica=$WORK/replica-$mode.img
            rm -rf "$replica" "$replica.undo"
            fio --name=prefill --filename="$replica" --rw=write --bs=1M --size="$REPLAY_SIZE" \
                --end_fsync=1 --output-format=terse >/dev/null
            key_args=()
            [[ $mode == sealed ]] && key_args=(--encryption-key "$KEY")
            sync
            start=$(date +%s.%N)
            TINYLAG_LOG=warn "$BIN" replay --journal "$WORK/j-$mode" --replica "$replica" \
                --name "r$run" --once --assume-seeded "${key_args[@]}" >>"$WORK/replay.log" 2>&1
            end=$(date +%s.%N)
            printf '%s\t%s\t%s\t%s\n' "$pattern" "$mode" "$run" \
                "$(python3 -c "print(f'{$end - $start:.3f}')")" >>"$REPLAY"
        done
    done
    rm -rf "$WORK/j-clear" "$WORK/j-sealed" "$WORK"/replica-*
done
replay_load="$replay_load–$(cut -d' ' -f1 /proc/loadavg)"

python3 - "$WORK/results.tsv" "$OUT" "${RUNTIME:-10}" "${REPS:-3}" "${SIZE:-1G}" \
    "$(cat "$WORK/load.txt" 2>/dev/null || true)" "$(nproc)" "$REPLAY" "$REPLAY_SIZE" \
    "$replay_load" <<'PY' | write_section "## Encryption at rest" "$OUT"
import statistics, sys
from collections import defaultdict
results, out, runtime, reps, size, load, cores, replay, replay_size, replay_load = sys.argv[1:11]
rows = defaultdict(list)
for line in open(results):
    f = line.rstrip("\n").split("\t")
    c, wl, rep, iops, mbps = f[:5]
    cpu_gb = f[9] if len(f) > 9 and f[9] else None
    rows[(c, wl)].append((float(iops), float(mbps), float(cpu_gb) if cpu_gb else None))
def med(c, wl, i):
    vals = [r[i] for r in rows.get((c, wl), []) if r[i] is not None]
    return statistics.median(vals) if vals else None
def num(v, spec):
    return "-" if v is None else format(v, spec)
lines = ["## Encryption at rest", "",
         f"`bench/encryption.sh` (bench/serve.sh configs c and k, interleaved): {reps} runs of "
         f"{runtime} s per server and workload, primary {size}, journal in a local directory, "
         f"{cores} cores; load {load}. Medians.", "",
         "| workload | c: IOPS | k: IOPS | c: MB/s | k: MB/s | k / c | target | c: CPU s/GB | k: CPU s/GB | added |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for wl, i, target in [("randwrite-4k", 0, 0.95), ("seqwrite-1M", 1, 0.9)]:
    c, k = med("c", wl, i), med("k", wl, i)
    ratio = k / c if c and k else None
    cc, kc = med("c", wl, 2), med("k", wl, 2)
    added = kc - cc if cc is not None and kc is not None else None
    verdict = "-" if ratio is None else ("met" if ratio >= target else "NOT met")
    lines.append(f"| {wl} | {num(med('c', wl, 0), '.0f')} | {num(med('k', wl, 0), '.0f')} | "
                 f"{num(med('c', wl, 1), '.1f')} | {num(med('k', wl, 1), '.1f')} | "
                 f"{num(ratio, '.3f')} | ≥ {target} ({verdict}) | {num(cc, '.2f')} | "
                 f"{num(kc, '.2f')} | {num(added, '+.2f')} |")
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
replay_bytes = int(replay_size[:-1]) * units[replay_size[-1].upper()]
secs = defaultdict(list)
for line in open(replay):
    pattern, mode, run, t = line.rstrip("\n").split("\t")
    secs[(pattern, mode)].append(float(t))
lines += ["", f"Replay apply (`replay --once` with its undo log onto a prefilled replica, "
          f"journal of {replay_size} from examples/replay_bench_journal, clear and sealed runs "
          f"interleaved, {reps} each; load {replay_load}). Medians:", "",
          "| journal | clear: MB/s | sealed: MB/s | sealed / clear |", "|---|---|---|---|"]
for pattern, name in [("rand4k", "4 KiB random"), ("seq1m", "1 MiB sequential")]:
    c = statistics.median(secs[(pattern, "clear")]) if secs[(pattern, "clear")] else None
    k = statistics.median(secs[(pattern, "sealed")]) if secs[(pattern, "sealed")] else None
    cm = replay_bytes / c / 1e6 if c else None
    km = replay_bytes / k / 1e6 if k else None
    ratio = km / cm if cm and km else None
    lines.append(f"| {name} | {num(cm, '.1f')} | {num(km, '.1f')} | {num(ratio, '.2f')} |")
section = "\n".join(lines) + "\n"
print(section)
PY
