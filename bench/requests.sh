#!/usr/bin/env bash
# Request bill benchmark (issue 18): what 1 GiB of 1 MiB writes plus one agent catching up
# costs the journal store, and what an idle `serve` plus one idle agent cost an hour, by
# request kind (PUT, GET, HEAD, LIST, DELETE). Measured in-process with the counting store
# (`examples/request_bill.rs`, the measurements `tests/requests.rs` asserts; one counted
# call is one request on S3), on this tree and, with BEFORE=<commit>, on that commit (a
# detached `git worktree` in BENCH_DIR with the measurement files copied in).
#
#   bench/requests.sh                 # this tree
#   BEFORE=fbcc865 bench/requests.sh  # and the build before, side by side
#
# Counts, not timings: the debug build is the default (CARGO_PROFILE=release for the
# release build). Timing still moves a few: the catch-up's last polls, and renewals during
# the run. Environment: BENCH_DIR (scratch, default target/bench-requests). Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${BENCH_DIR:-$PWD/target/bench-requests}
PROFILE=${CARGO_PROFILE:-dev}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p "$DIR"
command -v python3 >/dev/null || { echo "bench/requests.sh needs python3" >&2; exit 1; }

# measure TREE NAME: builds the example in TREE and writes DIR/NAME.json.
measure() {
    local tree=$1 name=$2 sub=debug
    [[ $PROFILE == release ]] && sub=release
    (cd "$tree" && cargo build --quiet --profile "$PROFILE" --example request_bill)
    "$TARGET/$sub/examples/request_bill" >"$DIR/$name.json"
}

runs=()
if [[ -n ${BEFORE:-} ]]; then
    tree=$DIR/before
    git worktree remove --force "$tree" 2>/dev/null || true
    git worktree add --detach "$tree" "$BEFORE" >/dev/null
    cp tests/support/request_bill.rs "$tree/tests/support/"
    grep -q '^pub mod request_bill;' "$tree/tests/support/mod.rs" ||
        echo 'pub mod request_bill;' >>"$tree/tests/support/mod.rs"
    cp examples/request_bill.rs "$tree/examples/"
    measure "$tree" before
    git worktree remove --force "$tree"
    runs+=(before)
fi
measure "$PWD" after
runs+=(after)
echo "load: $(uptime)"
python3 - "$DIR" "${runs[@]}" <<'PY'
import json, sys
d, runs = sys.argv[1], sys.argv[2:]
bills = {r: json.load(open(f"{d}/{r}.json")) for r in runs}
print("| per GiB of 1 MiB writes | " + " | ".join(runs) + " |")
print("|---|" + "---|" * len(runs))
for part in ("write", "replay"):
    for kind in ("put", "get", "head", "list", "delete"):
        print(f"| {part} {kind.upper()} | " + " | ".join(str(bills[r]["gib"][part][kind]) for r in runs) + " |")
print("| total (write + replay + renewals meanwhile) | " + " | ".join(str(bills[r]["gib"]["total"]) for r in runs) + " |")
print("| per 8 MiB segment | " + " | ".join(f'{bills[r]["gib"]["per_8mib_segment"]:.2f}' for r in runs) + " |")
print()
print("| idle hour (serve + one agent) | " + " | ".join(runs) + " |")
print("|---|" + "---|" * len(runs))
for key, label in (("agent_get", "agent GET"), ("agent_head", "agent HEAD"), ("agent_list", "agent LIST"),
                   ("agent_put_commits", "agent PUT (commits)"), ("lease_head", "lease HEAD"),
                   ("lease_put", "lease PUT"), ("total", "total"), ("per_second", "requests/s")):
    print(f"| {label} | " + " | ".join(f'{bills[r]["idle_hour"][key]:.4g}' for r in runs) + " |")
PY
