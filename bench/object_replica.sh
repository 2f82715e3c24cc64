#!/usr/bin/env bash
# Object replica request bill (issue 24): PUTs and GETs per GiB of 4 KiB random writes and
# of 1 MiB sequential writes, against the journal's own segment PUTs per GiB (target: the
# replica and its consumer position at most 1.5x those), and the idle agent's requests per
# hour (target <= 60). Measured in-process with the counting store
# (`examples/objrep_bill.rs`: a real `ObjectAgent` with the default 30 s checkpoint interval
# follows a journal written at RATE, segments cut at 8 MiB as the writer cuts them).
#
#   bench/object_replica.sh                   # 1 GiB each at 64 MiB/s, 60 s idle (= 1 h)
#   TOTAL=256M RATE=16M IDLE=30 bench/object_replica.sh
#
# Counts, not timings: the debug build is the default (CARGO_PROFILE=release for release).
# Environment: BENCH_DIR (scratch, default target/bench-objrep), IDLE_SCALE (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${BENCH_DIR:-$PWD/target/bench-objrep}
PROFILE=${CARGO_PROFILE:-dev}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
TOTAL=${TOTAL:-1G}
RATE=${RATE:-64M}
IDLE=${IDLE:-60}
sub=debug
[[ $PROFILE == release ]] && sub=release
mkdir -p "$DIR"
command -v python3 >/dev/null || { echo "bench/object_replica.sh needs python3" >&2; exit 1; }

cargo build --quiet --profile "$PROFILE" --example objrep_bill
bin=$TARGET/$sub/examples/objrep_bill
echo "load before: $(uptime)" >&2
"$bin" rand4k "$TOTAL" "$RATE" >"$DIR/rand4k.json"
"$bin" seq1m "$TOTAL" "$RATE" >"$DIR/seq1m.json"
"$bin" idle "$IDLE" >"$DIR/idle.json"
echo "load after: $(uptime)" >&2

python3 - "$DIR" <<'PY'
import json, sys
d = sys.argv[1]
print("| pattern | journal segment PUTs/GiB | replica PUTs/GiB | + position PUTs/GiB | ratio | replica GETs/GiB | agent journal GETs/GiB | layers | checkpoints | layer bytes / data |")
print("|---|---|---|---|---|---|---|---|---|---|")
for p in ("rand4k", "seq1m"):
    r = json.load(open(f"{d}/{p}.json"))
    print(f"| {p} | {r['journal_segment_puts_per_gib']:.1f} | {r['replica_puts_per_gib']:.1f} | "
          f"{r['replica_plus_position_puts_per_gib']:.1f} | {r['ratio_to_journal_puts']:.3f} | "
          f"{r['replica_gets_per_gib']:.1f} | {r['agent_journal_gets_per_gib']:.1f} | {r['layers']} | "
          f"{r['checkpoints']} | {r['layer_bytes_per_data_byte']:.4f} |")
i = json.load(open(f"{d}/idle.json"))
print()
print(f"idle: replica store {i['replica_requests_per_hour']:.1f} requests/hour, journal "
      f"{i['journal_requests_per_hour']:.1f} requests/hour ({i['seconds']} s at timer scale {i['timer_scale']})")
PY
