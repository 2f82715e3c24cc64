# bench/lib.sh: what the benchmark scripts share, written once. Each script sources it
# (`. "$(dirname "$0")/lib.sh"`) after `set -euo pipefail`: process cleanup by pid, waits for
# a condition (a socket, a port, a path, a control socket), timing, medians, JSON fields, and
# the rewrite of the script's own section of BENCHMARKS.md.
#
# Must never: signal a process the script did not start (only the pids in PIDS, or one it
# names), wait without a bound, or touch BENCHMARKS.md outside the section it is given.

# Pids of the background processes a script started; `kill_pids` ends them.
PIDS=()

# The script's name for messages: bench/NAME.sh.
BENCH_NAME="bench/$(basename "$0")"

# Wall-clock seconds with nanoseconds (for differences: `elapsed START END`).
now() { date +%s.%N; }

# END - START in seconds, to four places.
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.4f}')" "$1" "$2"; }

# Sends SIGTERM (or the signal given, e.g. -KILL) to every pid in PIDS and reaps them (only
# them: other background jobs of the script are left alone).
kill_pids() {
    local sig=${1:--TERM} pid
    for pid in "${PIDS[@]:-}"; do
        if [[ -n $pid ]]; then kill "$sig" "$pid" 2>/dev/null || true; fi
    done
    for pid in "${PIDS[@]:-}"; do
        if [[ -n $pid ]]; then wait "$pid" 2>/dev/null || true; fi
    done
}

# Stops pid $1: SIGTERM, up to 60 s to exit, then SIGKILL.
stop() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
}

# Polls (every 0.1 s, up to $2 seconds, default 30) until the command "${@:3}" succeeds;
# $1 says what is awaited in the failure message.
wait_until() {
    local what=$1 limit=${2:-30} i
    shift 2
    for ((i = 0; i < limit * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "$BENCH_NAME: timed out after ${limit}s waiting for $what" >&2
    return 1
}

unix_accepts() { python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$1"; }
tcp_accepts() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',int(sys.argv[1])),1)" "$1"; }

# Waits until the Unix socket $1 accepts connections (up to 30 s).
wait_socket() { wait_until "a listener on $1" 30 unix_accepts "$1"; }

# Waits until 127.0.0.1:$1 accepts connections (up to 30 s).
wait_port() { wait_until "a listener on 127.0.0.1:$1" 30 tcp_accepts "$1"; }

# Waits until path $1 exists (up to 60 s).
wait_path() { wait_until "$1 to appear" 60 test -e "$1"; }

# Waits until a tinylag daemon answers `status` on control socket $1 (up to 60 s). The binary
# is $BIN, or $TINYLAG in the scripts that call it that.
wait_ctl() { wait_until "tinylag status on $1" 60 "${BIN:-$TINYLAG}" status --control "$1"; }

# A TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# What tinylag is given to reach a local s3s-fs: its test credentials (not secrets), and no
# AWS configuration read from the machine.
S3_ENV=(AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret-not-real
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null
    AWS_SHARED_CREDENTIALS_FILE=/dev/null)

# Starts s3s-fs ($S3FS) serving directory $1 on 127.0.0.1 (port $3, default a free one; its
# output appended to $2, default $1.log) and waits until it accepts connections. Sets S3PID
# (also added to PIDS), S3PORT and S3ENV (S3_ENV plus the endpoint).
start_s3fs() {
    S3PORT=${3:-$(free_port)}
    "$S3FS" --host 127.0.0.1 --port "$S3PORT" --access-key bench-access \
        --secret-key bench-secret-not-real "$1" >>"${2:-$1.log}" 2>&1 &
    S3PID=$!
    PIDS+=("$S3PID")
    wait_port "$S3PORT"
    S3ENV=("${S3_ENV[@]}" AWS_ENDPOINT_URL="http://127.0.0.1:$S3PORT")
}

# The JSON status of the daemon on control socket $1, or {} while it does not answer.
status() { "${BIN:-$TINYLAG}" status --control "$1" --json 2>/dev/null || echo '{}'; }

# Evaluates the python expression $1 on the JSON document on stdin, bound to `d`:
# `status CTL | field 'd["mode"]'`.
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }

# The median of the numbers given as arguments (or in one argument, separated by spaces), or
# one per line on stdin without arguments.
median() {
    if (($#)); then printf '%s\n' "$@"; else cat; fi |
        tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

# CPU seconds (user + system) pid $1 has used so far.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat"
}

# Context switches (voluntary + involuntary) pid $1 has had so far, summed over its threads.
ctx_switches() {
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n}'
}

# Samples pid $1 with call graphs (perf, 499 Hz) while the command after the first four
# arguments runs (a fio run that prints "IOS IOPS"); prints "perf run: IOPS IOPS" and the
# top $4 functions by self time, and writes the flame graph $3.svg and its stacks $3.folded
# (bench/flamegraph.py) titled $2.
perf_flamegraph() {
    local pid=$1 title=$2 out=$3 top=$4 data perf_pid ios iops
    shift 4
    data=$(mktemp /var/tmp/tinylag-perf.XXXXXX)
    perf record -q -F 499 --call-graph dwarf,16384 -o "$data" -p "$pid" \
        -- sleep "$RUNTIME" 2>/dev/null &
    perf_pid=$!
    read -r ios iops < <("$@")
    wait "$perf_pid" || true
    echo "perf run: $iops IOPS"
    perf script -i "$data" 2>/dev/null |
        python3 "$(dirname "${BASH_SOURCE[0]}")/flamegraph.py" --title "$title" \
            --folded "$out.folded" --top "$top" >"$out.svg" 2>"$data.top"
    cat "$data.top"
    rm -f "$data" "$data.top"
}

# Counts pid $1's system calls (strace -c -f) while the command after the first two
# arguments runs (a fio run that prints "IOS IOPS"); prints them per I/O, $2 naming the unit
# (request, read): the total, then the 12 most frequent.
strace_per_io() {
    local pid=$1 unit=$2 counts strace_pid ios iops
    shift 2
    counts=$(mktemp /var/tmp/tinylag-strace.XXXXXX)
    strace -c -f -o "$counts" -p "$pid" &
    strace_pid=$!
    sleep 0.5
    read -r ios iops < <("$@")
    kill -INT "$strace_pid" 2>/dev/null || true
    wait "$strace_pid" || true
    echo "strace run: $iops IOPS (traced), $ios ${unit}s; system calls per $unit:"
    python3 - "$counts" "$ios" <<'PY'
import sys
ios = float(sys.argv[2])
rows = []
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        rows.append((int(f[3]), f[-1]))
rows.sort(reverse=True)
print(f"  total {sum(c for c, _ in rows)/ios:.2f}")
for calls, name in rows[:12]:
    print(f"  {calls/ios:6.3f}  {name}")
PY
    rm -f "$counts"
}

# Replaces a section of the markdown file $2 with the section read from stdin, or appends it
# when the file has none; prints the section. $1 names the section: NAME for the text
# between `<!-- NAME:begin -->` and `<!-- NAME:end -->` (markers included; added when the
# new text lacks them), or a heading (`## serve`) for the text from that heading line to
# the next `## ` heading.
write_section() {
    python3 -c '
import os, sys
name, out = sys.argv[1], sys.argv[2]
section = sys.stdin.read().strip("\n")
text = open(out).read() if os.path.exists(out) else "# tinylag benchmarks\n"
if name.startswith("## "):
    start = text.find(name + "\n")
    if start >= 0:
        stop = text.find("\n## ", start + 1)
        rest = text[stop + 1:] if stop >= 0 else ""
        text = text[:start] + section + "\n" + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
else:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not section.startswith(begin):
        section = begin + "\n" + section
    if not section.endswith(end):
        section = section + "\n" + end
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    if stop >= 0:
        text = text[:start] + section + text[stop + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
open(out, "w").write(text)
print(section)
' "$1" "$2"
}
