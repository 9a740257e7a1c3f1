#!/usr/bin/env bash
# CPU per request of Breakwater answering from its cache (a HIT, and a 304 to a conditional
# request) beside a proxied request, with the same wrk load as bench.sh. Prints a Markdown
# table and writes it to loadtest/results/cache-bench-latest.md.
#
#   loadtest/cache_bench.sh [--duration 10s] [--connections 64] [--warmup 2s]
#
# The upstream is nginx returning a small JSON body with `ETag` and
# `Cache-Control: public, max-age=3600`; Breakwater (one worker thread, access log to a file)
# has one service without a cache (`/plain`) and one with (`/cached`). Placement as in
# bench.sh: wrk on CPU 1, Breakwater and the upstream on CPU 0.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=10s CONNECTIONS=64 WARMUP=2s
while (($#)); do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
command -v wrk >/dev/null || die "wrk is not installed (apt-get install -y wrk)"
NGINX="$(command -v nginx || true)"
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
[[ -n $NGINX ]] || die "nginx is not installed (apt-get install -y nginx-light)"
PIN=1
if ! command -v taskset >/dev/null || (($(nproc) < 2)); then PIN=0; fi
on() { ON=(); if ((PIN)); then ON=(taskset -c "$1"); fi; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_HZ=$(getconf CLK_TCK)

lt_init
lt_build

BODY='{"id":1,"name":"Ada Lovelace","email":"ada.1@example.com","service":"users"}'
UP_PORT=$(free_port)
mkdir -p "$LT_TMP/upstream/tmp"
cat >"$LT_TMP/upstream/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $LT_TMP/upstream/nginx.pid;
error_log $LT_TMP/upstream/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $LT_TMP/upstream/tmp/body;
  proxy_temp_path $LT_TMP/upstream/tmp/proxy;
  fastcgi_temp_path $LT_TMP/upstream/tmp/fastcgi;
  uwsgi_temp_path $LT_TMP/upstream/tmp/uwsgi;
  scgi_temp_path $LT_TMP/upstream/tmp/scgi;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$UP_PORT;
    access_log off;
    location / {
      default_type application/json;
      add_header ETag '"v1"';
      add_header Cache-Control 'public, max-age=3600';
      return 200 '$BODY';
    }
  }
}
EOF
on 0
"${ON[@]}" "$NGINX" -p "$LT_TMP/upstream" -c "$LT_TMP/upstream/nginx.conf" >"$LT_TMP/upstream/stdout" 2>&1 &
UP_PID=$!
track "$UP_PID"
wait_http "http://127.0.0.1:$UP_PORT/"

BW_PORT=$(free_port) BW_ADMIN=$(free_port)
cat >"$LT_TMP/breakwater.yaml" <<EOF
server: {listen: ["127.0.0.1:$BW_PORT"], threads: 1, grace_period: 1s}
admin: {listen: "127.0.0.1:$BW_ADMIN"}
access_log: true
cache: {backend: memory}
services:
  plain:
    routes: [{path_prefix: /plain}]
    upstreams: ["127.0.0.1:$UP_PORT"]
  cached:
    routes: [{path_prefix: /cached}]
    upstreams: ["127.0.0.1:$UP_PORT"]
    cache: {ttl: 1h}
EOF
"$LT_BIN/breakwater" -c "$LT_TMP/breakwater.yaml" check >/dev/null
"${ON[@]}" "$LT_BIN/breakwater" -c "$LT_TMP/breakwater.yaml" \
  >"$LT_TMP/breakwater-access.log" 2>"$LT_TMP/breakwater.err" &
BW_PID=$!
track "$BW_PID"
wait_ready "http://127.0.0.1:$BW_ADMIN/ready"

ROWS=()
run() { # NAME PATH [HEADER]
  local name=$1 url="http://127.0.0.1:$BW_PORT$2" out="$LT_TMP/wrk-$1.txt"
  local hdr=()
  [[ -n ${3:-} ]] && hdr=(-H "$3")
  local status
  status=$(curl -s -o /dev/null -w '%{http_code}' "${hdr[@]}" "$url")
  log "$name: $url answers $status"
  on 1
  "${ON[@]}" wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "${hdr[@]}" "$url" >/dev/null
  local t0; t0=$(cpu_ticks "$BW_PID")
  "${ON[@]}" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${hdr[@]}" "$url" >"$out"
  local t1; t1=$(cpu_ticks "$BW_PID")
  parse_wrk "$out"
  local cpu_us="n/a"
  ((WRK_REQS > 0)) && cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$TICK_HZ" -v n="$WRK_REQS" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
  ROWS+=("| $name | $status | $(printf "%'d" "$WRK_RPS") | $WRK_P50 | $WRK_P99 | $((WRK_SOCKET_ERRORS + WRK_NON2XX)) | $cpu_us |")
}

run proxied /plain/1
run "cache HIT" /cached/1
run "cache 304" /cached/1 'If-None-Match: "v1"'

REPORT="$LT_DIR/results/cache-bench-latest.md"
{
  echo "## Breakwater cache benchmark"
  echo
  echo "- machine: $(machine_line)"
  echo "- load: wrk \`-t1 -c$CONNECTIONS -d$DURATION --latency\` after a $WARMUP warm-up, keep-alive; placement: $( ((PIN)) && echo "wrk on CPU 1, Breakwater and the upstream on CPU 0" || echo "not pinned")"
  echo "- upstream: nginx, \`return 200\` of a ${#BODY}-byte JSON body with ETag and Cache-Control"
  echo "- Breakwater: 1 worker thread, JSON access log to a file; memory cache backend"
  echo
  echo "| request | status | req/s | p50 ms | p99 ms | errors | Breakwater CPU µs/req |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "errors = wrk socket errors + responses other than 2xx/3xx. CPU µs/req = Breakwater's CPU time"
  echo "(user + system) per request, not counting the upstream."
} | tee "$REPORT"
log "written to ${REPORT#$LT_ROOT/}"
