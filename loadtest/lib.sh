# Shared helpers of the load-test scripts; sourced, not run.
#
# Every process a script starts is registered with `track PID`; `cleanup` (installed as the EXIT
# trap by `lt_init`) stops them all, so a failure or Ctrl-C leaves nothing behind.

LT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LT_DIR="$LT_ROOT/loadtest"
LT_BIN="$LT_ROOT/target/release"
LT_PIDS=()
LT_GROUPS=()
LT_TMP=""
# Extra cleanup a script may set (a function name), run before the processes are stopped.
LT_ON_EXIT=""

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

track() { LT_PIDS+=("$1"); }
# track_group PID: PID leads its own process group (started with setsid); the whole group is
# stopped, children included.
track_group() { LT_GROUPS+=("$1"); }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n "$LT_ON_EXIT" ]] && "$LT_ON_EXIT" || true
  local pid
  for pid in "${LT_GROUPS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${LT_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Give them a moment to exit cleanly, then insist.
  for _ in $(seq 50); do
    local alive=0
    for pid in "${LT_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    for pid in "${LT_GROUPS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${LT_GROUPS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for pid in "${LT_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n "$LT_TMP" && -d "$LT_TMP" && -z "${KEEP_TMP:-}" ]]; then rm -rf "$LT_TMP"; fi
  exit "$rc"
}

lt_init() {
  LT_TMP="$(mktemp -d "${TMPDIR:-/tmp}/breakwater-loadtest.XXXXXX")"
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir -p "$LT_DIR/results"
}

# Builds the gateway and sample-service unless BUILD=0 (cargo waits on the lock if another
# build runs in the same tree).
lt_build() {
  if [[ "${BUILD:-1}" != 0 ]]; then
    log "cargo build --release --bins"
    (cd "$LT_ROOT" && cargo build --release --bins --quiet) || die "build failed"
  fi
  [[ -x "$LT_BIN/breakwater" && -x "$LT_BIN/sample-service" ]] || die "binaries missing in $LT_BIN"
}

# A free loopback TCP port from the kernel's ephemeral range (never 8080/9090/3001-3003).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL [SECONDS]: until URL answers anything over HTTP.
wait_http() {
  local url=$1 deadline=$((SECONDS + ${2:-15}))
  until curl -s -o /dev/null --max-time 1 "$url"; do
    ((SECONDS < deadline)) || die "$url did not answer in ${2:-15}s"
    sleep 0.1
  done
}

# Starts `sample-service --listen 127.0.0.1:PORT --name NAME` (PORT 0 = ephemeral) with its
# output in $LT_TMP/NAME.out; sets SAMPLE_PID and SAMPLE_ADDR.
start_sample() {
  local name=$1 port=${2:-0} out="$LT_TMP/sample-$1-$RANDOM.out"
  "$LT_BIN/sample-service" --listen "127.0.0.1:$port" --name "$name" >"$out" 2>&1 &
  SAMPLE_PID=$!
  track "$SAMPLE_PID"
  local deadline=$((SECONDS + 10))
  until grep -q '^listening on ' "$out" 2>/dev/null; do
    kill -0 "$SAMPLE_PID" 2>/dev/null || die "sample-service $name exited: $(cat "$out")"
    ((SECONDS < deadline)) || die "sample-service $name did not start"
    sleep 0.05
  done
  SAMPLE_ADDR="$(sed -n 's/^listening on //p' "$out" | head -1)"
}

# Parses `wrk --latency` output (file $1) into shell variables:
# WRK_RPS WRK_P50 WRK_P99 WRK_MAX (ms) WRK_REQS WRK_SOCKET_ERRORS WRK_SOCKET_DETAIL WRK_NON2XX.
parse_wrk() {
  eval "$(python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        return float("nan")
    n, unit = float(m.group(1)), m.group(2)
    return n * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]
def find(pattern, default="0"):
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else default
lat = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
vals = {
    "WRK_RPS": f"{float(find(r'^Requests/sec:[ ]+([0-9.]+)')):.0f}",
    "WRK_P50": f"{ms(find(r'^ +50% +(.+)$', 'nan').strip()):.2f}",
    "WRK_P99": f"{ms(find(r'^ +99% +(.+)$', 'nan').strip()):.2f}",
    "WRK_MAX": f"{ms(lat.group(3)) if lat else float('nan'):.2f}",
    "WRK_REQS": find(r'^ +([0-9]+) requests in'),
    "WRK_SOCKET_ERRORS": str(sum(int(x) for x in errs.groups()) if errs else 0),
    "WRK_NON2XX": find(r'Non-2xx or 3xx responses: ([0-9]+)'),
    "WRK_SOCKET_DETAIL": "'" + (", ".join(f"{k} {v}" for k, v in zip(("connect", "read", "write", "timeout"), errs.groups())) if errs else "none") + "'",
}
for k, v in vals.items():
    print(f"{k}={v}")
PY
)"
}

machine_line() {
  local cpu
  cpu="$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
  echo "$(nproc) CPUs ($cpu), $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC')"
}
