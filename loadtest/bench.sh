#!/usr/bin/env bash
# Throughput and latency of Breakwater against the same upstream reached directly and through
# nginx as a plain reverse proxy, with the same wrk load, in one run. Prints a Markdown table
# and writes it to loadtest/results/bench-latest.md.
#
#   loadtest/bench.sh [--duration 10s] [--connections 64] [--threads 1] [--warmup 2s]
#                     [--nginx-access-log on|off] [--no-pin]
#                     [--client-cpu 1] [--proxy-cpu 0] [--upstream-cpu 0]
#
# Everything listens on ephemeral loopback ports and is stopped on exit (also on Ctrl-C).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=10s CONNECTIONS=64 THREADS=1 WARMUP=2s NGINX_ACCESS_LOG=on PIN=1
CLIENT_CPU=1 PROXY_CPU=0 UPSTREAM_CPU=0
while (($#)); do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --nginx-access-log) NGINX_ACCESS_LOG=$2; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    --client-cpu) CLIENT_CPU=$2; shift 2 ;;
    --proxy-cpu) PROXY_CPU=$2; shift 2 ;;
    --upstream-cpu) UPSTREAM_CPU=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $NGINX_ACCESS_LOG == on || $NGINX_ACCESS_LOG == off ]] || die "--nginx-access-log on|off"
command -v wrk >/dev/null || die "wrk is not installed (apt-get install -y wrk)"
NGINX="$(command -v nginx || true)"
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
if ((PIN)) && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
  log "taskset missing or a single CPU: not pinning"
  PIN=0
fi

lt_init
lt_build

# on CPU: sets ON to the command prefix that runs a command on CPU (empty when not pinning).
# A prefix, not a wrapper function: a backgrounded function runs in a subshell, and $! would
# be that subshell's pid instead of the server's.
on() { ON=(); if ((PIN)); then ON=(taskset -c "$1"); fi; }

# Process CPU time (utime + stime, in clock ticks) of a pid.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_HZ=$(getconf CLK_TCK)

# nginx_conf DIR SERVER_BLOCK_BODY [HTTP_EXTRA]: a self-contained nginx config in DIR
# (foreground, one worker process, no master, every path under DIR).
nginx_conf() {
  local dir=$1
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  ${3:-}
  $2
}
EOF
}

start_nginx() { # DIR CPU -> NGINX_PID
  local dir=$1 cpu=$2
  on "$cpu"
  "${ON[@]}" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout" 2>&1 &
  NGINX_PID=$!
  track "$NGINX_PID"
}

BODY='{"id":1,"name":"Ada Lovelace","email":"ada.1@example.com","service":"users"}'

# --- upstream: nginx returning a small static JSON body (or sample-service without nginx) ---
if [[ -n $NGINX ]]; then
  UP_PORT=$(free_port)
  nginx_conf "$LT_TMP/upstream" "server {
    listen 127.0.0.1:$UP_PORT;
    access_log off;
    location / { default_type application/json; return 200 '$BODY'; }
  }"
  start_nginx "$LT_TMP/upstream" "$UPSTREAM_CPU"
  UP_PID=$NGINX_PID
  UPSTREAM="127.0.0.1:$UP_PORT"
  UPSTREAM_DESC="nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), 1 worker, \`return 200\` of a ${#BODY}-byte JSON body, access_log off"
else
  start_sample users 0
  UP_PID=$SAMPLE_PID
  UPSTREAM=$SAMPLE_ADDR
  ((PIN)) && taskset -a -p -c "$UPSTREAM_CPU" "$UP_PID" >/dev/null
  UPSTREAM_DESC="sample-service (nginx not installed): the upstream may be the bottleneck"
fi
wait_http "http://$UPSTREAM/users/1"

# --- Breakwater: routing, circuit breaker, health checks, metrics, access log to a file ---
BW_PORT=$(free_port) BW_ADMIN=$(free_port)
cat >"$LT_TMP/breakwater.yaml" <<EOF
server:
  listen: ["127.0.0.1:$BW_PORT"]
  threads: 1
  upgrade_sock: $LT_TMP/breakwater-upgrade.sock
  pid_file: $LT_TMP/breakwater.pid
  grace_period: 1s
admin: {listen: "127.0.0.1:$BW_ADMIN"}
access_log: true
services:
  users:
    routes: [{path_prefix: /users}]
    upstreams: ["$UPSTREAM"]
    timeouts: {connect: 1s, read: 3s, total: 5s}
    health_check: {path: /health, interval: 5s, timeout: 1s}
    circuit_breaker: {failure_threshold: 5, reset_timeout: 5s}
  orders:
    routes: [{path_prefix: /orders}]
    upstreams: ["$UPSTREAM"]
EOF
"$LT_BIN/breakwater" -c "$LT_TMP/breakwater.yaml" check >/dev/null
on "$PROXY_CPU"
"${ON[@]}" "$LT_BIN/breakwater" -c "$LT_TMP/breakwater.yaml" \
  >"$LT_TMP/breakwater-access.log" 2>"$LT_TMP/breakwater.err" &
BW_PID=$!
track "$BW_PID"
wait_http "http://127.0.0.1:$BW_ADMIN/ready"

# --- nginx as a plain reverse proxy with upstream keep-alive ---
if [[ -n $NGINX ]]; then
  NX_PORT=$(free_port)
  if [[ $NGINX_ACCESS_LOG == on ]]; then NX_LOG="access_log $LT_TMP/proxy/access.log;"; else NX_LOG="access_log off;"; fi
  nginx_conf "$LT_TMP/proxy" "server {
    listen 127.0.0.1:$NX_PORT;
    $NX_LOG
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }" "upstream backend { server $UPSTREAM; keepalive 64; keepalive_requests 10000000; }"
  start_nginx "$LT_TMP/proxy" "$PROXY_CPU"
  NX_PID=$NGINX_PID
  wait_http "http://127.0.0.1:$NX_PORT/users/1"
fi

# --- the runs ---
ROWS=()
declare -A RPS
run() { # NAME URL PID
  local name=$1 url=$2 pid=$3 out="$LT_TMP/wrk-$1.txt"
  curl -sf -o /dev/null "$url" || die "$name: $url does not answer 2xx"
  log "$name: warm-up $WARMUP"
  on "$CLIENT_CPU"
  "${ON[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "$url" >/dev/null
  log "$name: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency $url"
  local t0; t0=$(cpu_ticks "$pid")
  "${ON[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url" >"$out"
  local t1; t1=$(cpu_ticks "$pid")
  parse_wrk "$out"
  local cpu_us="n/a"
  ((WRK_REQS > 0)) && cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$TICK_HZ" -v n="$WRK_REQS" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
  RPS[$name]=$WRK_RPS
  ROWS+=("| $name | $(printf "%'d" "$WRK_RPS") | $WRK_P50 | $WRK_P99 | $WRK_MAX | $((WRK_SOCKET_ERRORS + WRK_NON2XX)) | $cpu_us |")
}

run direct "http://$UPSTREAM/users/1" "$UP_PID"
run breakwater "http://127.0.0.1:$BW_PORT/users/1" "$BW_PID"
[[ -n $NGINX ]] && run nginx "http://127.0.0.1:$NX_PORT/users/1" "$NX_PID"

ACCESS_LINES=$(wc -l <"$LT_TMP/breakwater-access.log")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.0f%%", 100 * a / b; else print "n/a" }'; }
BW=${RPS[breakwater]} DIRECT=${RPS[direct]} NX=${RPS[nginx]:-0}
verdict() { awk -v bw="$BW" -v nx="$NX" 'BEGIN{
  a = (nx > 0 && bw >= 0.6 * nx) ? "met" : "NOT met"; b = (bw >= 20000) ? "met" : "NOT met";
  printf "target Breakwater >= 60%% of nginx: %s; >= 20,000 req/s: %s", a, b }'; }

if ((PIN)); then
  PINNING="wrk on CPU $CLIENT_CPU; the proxy under test (Breakwater or nginx) on CPU $PROXY_CPU; the upstream on CPU $UPSTREAM_CPU (taskset)"
else
  PINNING="not pinned"
fi
REPORT="$LT_DIR/results/bench-latest.md"
{
  echo "## Breakwater benchmark"
  echo
  echo "- machine: $(machine_line)"
  echo "- load: wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}') \`-t$THREADS -c$CONNECTIONS -d$DURATION --latency\`, after a $WARMUP warm-up, \`GET /users/1\`, keep-alive"
  echo "- upstream: $UPSTREAM_DESC"
  echo "- Breakwater: 1 worker thread, routing (2 services), circuit breaker, health checks, Prometheus metrics, JSON access log to a file ($ACCESS_LINES lines written)"
  [[ -n $NGINX ]] && echo "- nginx proxy: worker_processes 1, \`proxy_pass\` to an upstream block with \`keepalive 64\`, HTTP/1.1 to the upstream, access_log $NGINX_ACCESS_LOG"
  echo "- placement: $PINNING"
  echo
  echo "| target | req/s | p50 ms | p99 ms | max ms | errors | server CPU µs/req |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Breakwater/direct: $(ratio "$BW" "$DIRECT"); Breakwater/nginx: $(ratio "$BW" "$NX"); $(verdict)."
  echo
  echo "errors = wrk socket errors + non-2xx responses. server CPU µs/req = CPU time of the process"
  echo "answering wrk (the upstream for \`direct\`, else the proxy, not counting the upstream) per request."
} | tee "$REPORT"
log "written to ${REPORT#$LT_ROOT/}"
