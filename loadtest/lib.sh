# Shared helpers of the load-test scripts; sourced, not run.
#
# Every process a script starts is registered with `track PID`; `cleanup` (installed as the EXIT
# trap by `lt_init`) stops them all, so a failure or Ctrl-C leaves nothing behind.

LT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LT_DIR="$LT_ROOT/loadtest"
LT_BIN="${LT_BIN:-$LT_ROOT/target/release}"
LT_PIDS=()
LT_GROUPS=()
LT_TMP=""
# Extra cleanup a script may set (a function name), run before the processes are stopped.
LT_ON_EXIT=""

die() { echo "error: $*" >&2; exit 1; }
# usage: prints the calling script's header, the comment block under its shebang, as its
# --help (all of it, however long it grows).
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
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
# build runs in the same tree). `lt_build examples` also builds examples/ (bare_pingora).
lt_build() {
  local what=(--bins)
  [[ ${1:-} == examples ]] && what+=(--examples)
  if [[ "${BUILD:-1}" != 0 ]]; then
    log "cargo build --release ${what[*]}"
    (cd "$LT_ROOT" && cargo build --release "${what[@]}" --quiet) || die "build failed"
  fi
  [[ -x "$LT_BIN/breakwater" && -x "$LT_BIN/sample-service" ]] || die "binaries missing in $LT_BIN"
  if [[ ${1:-} == examples && ! -x "$LT_BIN/examples/bare_pingora" ]]; then
    die "bare_pingora missing in $LT_BIN/examples"
  fi
  return 0
}

# untrack PID: forget a process stopped by hand, so that cleanup never signals a reused pid.
untrack() {
  local pid keep=()
  for pid in "${LT_PIDS[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
  LT_PIDS=("${keep[@]}")
}

# stop_pid PID [SIGNAL]: signals PID (TERM by default), waits up to 5 s, then SIGKILL; reaps and
# untracks it. Pingora's (and Breakwater's) fast shutdown is SIGINT; nginx's is TERM.
stop_pid() {
  local pid=$1 sig=${2:-TERM}
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  untrack "$pid"
}

# pid_tree PID: PID and its child processes (nginx's workers under its master).
pid_tree() {
  echo "$1"
  ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true
}

# cpu_ticks PID [user]: CPU time (utime + stime, in clock ticks) of PID and its children,
# summed; with `user`, the user-space part alone (utime), which tells the proxy's own code
# from the kernel's work for it (sockets, wake-ups).
cpu_ticks() {
  local p t=0 v fields='$14 + $15'
  [[ ${2:-} == user ]] && fields='$14'
  for p in $(pid_tree "$1"); do
    v=$(awk "{print $fields}" "/proc/$p/stat" 2>/dev/null || true)
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# host_clock: "STEAL_TICKS UPTIME_SECONDS", the steal time of all this machine's CPUs (the time a
# hypervisor ran something else while a virtual CPU wanted to run; /proc/stat) and the clock.
# steal_pct BEFORE AFTER: that steal as a share of the CPU time between two readings (0 on bare
# metal): bench.sh's gauge of a busy host (see its report's note on steal).
host_clock() {
  awk '/^cpu / {printf "%d ", $9}' /proc/stat
  awk '{print $1}' /proc/uptime
}
steal_pct() {
  awk -v a="$1" -v b="$2" -v hz="${TICK_HZ:-$(getconf CLK_TCK)}" -v cpus="$(nproc)" 'BEGIN {
    split(a, x, " "); split(b, y, " "); wall = y[2] - x[2]
    if (wall <= 0) { print "n/a"; exit }
    printf "%.0f", 100 * (y[1] - x[1]) / hz / (wall * cpus)
  }'
}

# The nginx binary, or nothing when it is not installed.
find_nginx() {
  local n
  n="$(command -v nginx || true)"
  [[ -z $n && -x /usr/sbin/nginx ]] && n=/usr/sbin/nginx
  echo "$n"
}

# nginx_conf DIR SERVER_BLOCK_BODY [HTTP_EXTRA] [WORKERS] [WORKER_CONNECTIONS]: a self-contained
# nginx config in DIR: foreground, one process when WORKERS is 1 (no master), else a master and
# WORKERS workers; every path under DIR.
nginx_conf() {
  local dir=$1 workers=${4:-1} master=off
  ((workers > 1)) && master=on
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process $master;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections ${5:-4096}; }
http {
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout ${NGINX_KEEPALIVE_TIMEOUT:-60s};
  ${3:-}
  $2
}
EOF
}

# nginx_proxy_conf DIR PORT UPSTREAM ACCESS_LOG(on|off) [WORKERS] [WORKER_CONNECTIONS] [LISTEN_EXTRA]: nginx as
# a plain reverse proxy to UPSTREAM with keep-alive to it (an upstream block, HTTP/1.1).
nginx_proxy_conf() {
  local dir=$1 port=$2 upstream=$3 alog="access_log off;"
  [[ $4 == on ]] && alog="access_log $dir/access.log;"
  nginx_conf "$dir" "server {
    listen 127.0.0.1:$port ${7:-};
    $alog
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }" "upstream backend { server $upstream; keepalive 64; keepalive_requests 10000000; }" \
    "${5:-1}" "${6:-4096}"
}

# start_nginx DIR [CPU_PREFIX...]: runs the nginx of DIR/nginx.conf, prefixed by the given
# command (e.g. taskset -c 0); sets NGINX_PID.
start_nginx() {
  local dir=$1
  shift
  "$@" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout" 2>&1 &
  NGINX_PID=$!
  track "$NGINX_PID"
}

# The load tests' upstream body: a small JSON document, as an API answers.
UPSTREAM_BODY='{"id":1,"name":"Ada Lovelace","email":"ada.1@example.com","service":"users"}'

# start_json_upstream [PREFIX...]: the load tests' upstream, nginx with one worker answering
# `return 200` with UPSTREAM_BODY (access_log off), or sample-service when nginx is not
# installed. PREFIX (e.g. `taskset -c 0`) runs before nginx. Sets NGINX (when unset), UPSTREAM
# (host:port), UP_PID and UPSTREAM_DESC, and returns once it answers.
start_json_upstream() {
  local port
  NGINX="${NGINX:-$(find_nginx)}"
  if [[ -n $NGINX ]]; then
    port=$(free_port)
    nginx_conf "$LT_TMP/upstream" "server {
    listen 127.0.0.1:$port;
    access_log off;
    location / { default_type application/json; return 200 '$UPSTREAM_BODY'; }
  }"
    start_nginx "$LT_TMP/upstream" "$@"
    UP_PID=$NGINX_PID UPSTREAM="127.0.0.1:$port"
    UPSTREAM_DESC="nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), 1 worker, \`return 200\` of a ${#UPSTREAM_BODY}-byte JSON body, access_log off"
  else
    start_sample users 0
    UP_PID=$SAMPLE_PID UPSTREAM=$SAMPLE_ADDR
    UPSTREAM_DESC="sample-service (nginx not installed): the upstream may be the bottleneck"
  fi
  wait_http "http://$UPSTREAM/users/1"
}

# breakwater_conf FILE PORT ADMIN UPSTREAM [THREADS] [TOP_EXTRA] [USERS_EXTRA] [SERVER_EXTRA]: the
# load tests' Breakwater: routing over two services (users, orders), circuit breaker, health
# checks, Prometheus metrics and the JSON access log (stdout; the scripts send it to a file).
# TOP_EXTRA is YAML added at the top level; USERS_EXTRA, lines indented by 4, to the users
# service; SERVER_EXTRA, lines indented by 2, to `server`.
breakwater_conf() {
  local file=$1 port=$2 admin=$3 upstream=$4 threads=${5:-1}
  cat >"$file" <<EOF
server:
  listen: ["127.0.0.1:$port"]
  threads: $threads
  upgrade_sock: $file.upgrade.sock
  pid_file: $file.pid
  grace_period: 1s
${8:-}
admin: {listen: "127.0.0.1:$admin"}
access_log: true
${6:-}
services:
  users:
    routes: [{path_prefix: /users}]
    upstreams: ["$upstream"]
    timeouts: {connect: 1s, read: 3s, total: 5s}
    health_check: {path: /health, interval: 5s, timeout: 1s}
    circuit_breaker: {failure_threshold: 5, reset_timeout: 5s}
${7:-}
  orders:
    routes: [{path_prefix: /orders}]
    upstreams: ["$upstream"]
EOF
  "$LT_BIN/breakwater" -c "$file" check >/dev/null 2>"$file.check" ||
    die "invalid Breakwater config $file: $(cat "$file.check")"
}

# A free loopback TCP port from the kernel's ephemeral range (never 8080/9090/3001-3003).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL [SECONDS]: until URL answers anything over HTTP.
wait_http() { wait_curl -sk "answer" "$@"; }

# wait_ready URL [SECONDS]: until URL answers 2xx. For a gateway's /ready, which answers 503
# from the moment the admin port listens until every proxy listener accepts (slow under
# valgrind): anything-over-HTTP would send traffic to a port not yet listening.
wait_ready() { wait_curl -skf "answer 2xx" "$@"; }

# wait_curl CURL_FLAGS WHAT URL [SECONDS]: until `curl CURL_FLAGS URL` succeeds.
wait_curl() {
  local flags=$1 what=$2 url=$3 secs=${4:-15}
  local deadline=$((SECONDS + secs))
  until curl "$flags" -o /dev/null --max-time 1 "$url"; do
    ((SECONDS < deadline)) || die "$url did not $what in ${secs}s"
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

# build_desc: which binaries a report measured: the release build, or LT_BIN's, with
# scripts/build-pgo's description when it made them.
build_desc() {
  local d="release build"
  [[ $LT_BIN != "$LT_ROOT/target/release" ]] && d="binaries from \`${LT_BIN#"$LT_ROOT"/}\`"
  [[ -f $LT_BIN/pgo-info.txt ]] && d+=" ($(head -1 "$LT_BIN/pgo-info.txt"))"
  echo "$d"
}

machine_line() {
  local cpu
  cpu="$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
  echo "$(nproc) CPUs ($cpu), $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC')"
}
