#!/usr/bin/env bash
# Memory per idle keep-alive client connection: N clients (loadtest/idle_clients.py) each send
# one request through the proxy under test, read the answer and stay connected doing nothing.
# The proxy's resident memory (VmRSS) is read before the first client, at N/4 and at N; the
# growth per connection and the slope between N/4 and N (fixed costs excluded) are printed as a
# Markdown table and written to loadtest/results/idle-latest.md. One server at a time:
# Breakwater, bare Pingora (examples/bare_pingora.rs), nginx, and HAProxy when installed, each
# with one worker, in front of the same upstream.
#
#   loadtest/idle.sh [--connections 8000] [--targets breakwater,pingora,nginx,haproxy]
#                    [--concurrency 100] [--settle 1] [--hold 2] [--h2c]
#
# --h2c: the clients speak HTTP/2 with prior knowledge (one GET each, then idle), and every
# server listens for it (Breakwater `server.h2c`, bare Pingora's h2c option, nginx `http2`,
# HAProxy `proto h2`); results go to loadtest/results/idle-h2c-latest.md.
#
# N is capped by the per-process open-file hard limit (`ulimit -Hn`, 20000 on the machine this
# was written on): the client holds N sockets and the proxy N plus its upstream connections, so
# N may be at most that limit minus 500. Near the cap nginx holds fewer (it keeps 1/16 of its
# connections free, about 18,700 of 20,000) and HAProxy is skipped above (limit - 100) / 2 - 50
# (9,900): it reserves two files per connection. The `connections` column shows what each held.
# Loopback only, ephemeral ports; every process is stopped on exit, Ctrl-C or failure included.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=8000 TARGETS="breakwater,pingora,nginx,haproxy" CONCURRENCY=100 SETTLE=1 HOLD=2 H2C=0
while (($#)); do
  case $1 in
    --connections) N=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --settle) SETTLE=${2%s}; shift 2 ;;
    --hold) HOLD=${2%s}; shift 2 ;;
    --h2c) H2C=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $N =~ ^[0-9]+$ ]] && ((N >= 4)) || die "--connections takes a number >= 4"
HARD=$(ulimit -Hn)
if [[ $HARD != unlimited ]]; then
  MAX=$((HARD - 500))
  ((N <= MAX)) || die "--connections $N is over the cap of $MAX: the open-file hard limit is $HARD per process (ulimit -Hn)"
  ulimit -n "$HARD" # the servers started below inherit it
fi
for t in ${TARGETS//,/ }; do
  [[ $t =~ ^(breakwater|pingora|nginx|haproxy)$ ]] || die "unknown target $t (breakwater, pingora, nginx, haproxy)"
done
NGINX="$(find_nginx)"
HAPROXY="$(command -v haproxy || true)"
[[ -z $HAPROXY && -x /usr/sbin/haproxy ]] && HAPROXY=/usr/sbin/haproxy

lt_init
lt_build examples

# --- upstream: nginx returning a small JSON body (or sample-service without nginx) ---
start_json_upstream

# wait_target PORT: until the server under test answers, in the protocol the clients speak.
wait_target() {
  local deadline=$((SECONDS + 15)) proto=()
  ((H2C)) && proto=(--http2-prior-knowledge)
  until curl -s -o /dev/null --max-time 1 "${proto[@]}" "http://127.0.0.1:$1/users/1"; do
    ((SECONDS < deadline)) || die "127.0.0.1:$1 did not answer in 15s"
    sleep 0.1
  done
}

# start_target NAME: sets T_PID, T_PORT, T_SIG (the fast-shutdown signal) and T_VERSION.
start_target() {
  local name=$1 dir="$LT_TMP/$1"
  mkdir -p "$dir"
  T_PORT=$(free_port) T_SIG=INT
  case $name in
    breakwater)
      local admin
      admin=$(free_port)
      breakwater_conf "$dir/breakwater.yaml" "$T_PORT" "$admin" "$UPSTREAM" 1
      ((H2C)) && sed -i '/^server:/a\  h2c: true' "$dir/breakwater.yaml"
      "$LT_BIN/breakwater" -c "$dir/breakwater.yaml" >"$dir/access.log" 2>"$dir/breakwater.err" &
      T_PID=$!
      track "$T_PID"
      wait_ready "http://127.0.0.1:$admin/ready"
      T_VERSION="1 worker thread; routing, breaker, health checks, metrics, access log"
      ;;
    pingora)
      BARE_H2C=$H2C "$LT_BIN/examples/bare_pingora" "127.0.0.1:$T_PORT" "$UPSTREAM" 1 >"$dir/stdout" 2>"$dir/stderr" &
      T_PID=$!
      track "$T_PID"
      T_VERSION="examples/bare_pingora.rs, Pingora $(awk '/^name = "pingora"$/{getline; gsub(/"/, "", $3); print $3; exit}' "$LT_ROOT/Cargo.lock"), 1 worker thread"
      ;;
    nginx)
      # nginx starts closing idle keep-alive connections once fewer than 1/16 of its
      # worker_connections are free; under the file limit it holds about 15/16 of it at most.
      local wc=$((N * 17 / 16 + 1000))
      [[ $HARD != unlimited ]] && ((wc > HARD)) && wc=$HARD
      NGINX_KEEPALIVE_TIMEOUT=300s nginx_proxy_conf "$dir" "$T_PORT" "$UPSTREAM" off 1 "$wc"
      # nginx 1.22 spells h2c on a plain listener `listen ... http2`; its idle h2 connections
      # are bounded by http2_idle_timeout (default 3m), longer than a run.
      ((H2C)) && sed -i "s/listen 127.0.0.1:$T_PORT;/listen 127.0.0.1:$T_PORT http2;/" "$dir/nginx.conf"
      start_nginx "$dir"
      T_PID=$NGINX_PID T_SIG=TERM
      T_VERSION="nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), 1 process, keepalive_timeout 300s"
      ;;
    haproxy)
      cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $((N + 50))
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
  http-reuse always
frontend fe
  bind 127.0.0.1:$T_PORT $( ((H2C)) && echo "proto h2")
  default_backend be
backend be
  server up $UPSTREAM
EOF
      "$HAPROXY" -c -q -f "$dir/haproxy.cfg" >"$dir/check.out" 2>&1 || die "haproxy config: $(cat "$dir/check.out")"
      "$HAPROXY" -db -f "$dir/haproxy.cfg" >"$dir/stdout" 2>"$dir/stderr" &
      T_PID=$! T_SIG=TERM
      track "$T_PID"
      T_VERSION="HAProxy $("$HAPROXY" -v 2>&1 | awk 'NR == 1 {print $3}'), nbthread 1, timeout http-keep-alive 300s"
      ;;
  esac
  wait_target "$T_PORT"
}

ROWS=() NOTES=()
kib() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN{ if (n > 0) printf "%.1f", (b - a) / n; else print "n/a" }'; }
mib() { awk -v k="$1" 'BEGIN{ printf "%.1f", k / 1024 }'; }
for t in ${TARGETS//,/ }; do
  if [[ $t == nginx && -z $NGINX ]]; then NOTES+=("nginx: not installed, skipped"); continue; fi
  if [[ $t == haproxy && -z $HAPROXY ]]; then NOTES+=("HAProxy: not installed (apt-get install -y haproxy), skipped"); continue; fi
  # HAProxy reserves two files per connection (client and server side) and will not start when
  # the hard limit is below that, although idle clients need one each.
  if [[ $t == haproxy && $HARD != unlimited ]] && ((2 * (N + 50) + 100 > HARD)); then
    NOTES+=("HAProxy: skipped, it reserves 2 files per connection: at most $(((HARD - 100) / 2 - 50)) connections under the hard limit of $HARD")
    continue
  fi
  kill -0 "$UP_PID" 2>/dev/null || die "the upstream has exited (interrupted?)"
  start_target "$t"
  log "$t: $N idle keep-alive clients (checkpoints $((N / 4)), $N)"
  out="$LT_TMP/$t/idle.json"
  timeout --foreground --signal=TERM --kill-after=5 180 python3 "$LT_DIR/idle_clients.py" --port "$T_PORT" --pid "$T_PID" \
    --connections "$N" --checkpoints "$((N / 4)),$N" --concurrency "$CONCURRENCY" \
    --settle "$SETTLE" --hold "$HOLD" --timeout 150 $( ((H2C)) && echo --h2c) >"$out" 2>"$LT_TMP/$t/idle.err" ||
    die "$t: idle clients failed: $(tail -5 "$LT_TMP/$t/idle.err")"
  eval "$(python3 - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
a, b = d["checkpoints"][0], d["checkpoints"][-1]
print(f'R0={d["before"]["rss_kib"]} RA={a["rss_kib"]} RB={b["rss_kib"]} CA={a["connections"]} CB={b["connections"]}')
print(f'OPEN_END={d["open_at_end"]} ERRORS={sum(d["errors"].values())} NON2XX={d["non_2xx"]} SECS={b["seconds"]}')
print("ERR_DETAIL='" + (", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "none") + "'")
PY
)"
  stop_pid "$T_PID" "$T_SIG"
  ROWS+=("| $t | $CB | $OPEN_END | $(mib "$R0") | $(mib "$RA") | $(mib "$RB") | +$(mib $((RB - R0))) | $(kib "$R0" "$RB" "$CB") | **$(kib "$RA" "$RB" $((CB - CA)))** |")
  NOTES+=("$t: $T_VERSION; $CB connections opened in ${SECS}s; errors: $ERR_DETAIL; non-2xx: $NON2XX")
done

REPORT="$LT_DIR/results/idle-latest.md" PROTOCOL="HTTP/1.1, keep-alive"
((H2C)) && REPORT="$LT_DIR/results/idle-h2c-latest.md" PROTOCOL="HTTP/2 with prior knowledge (h2c)"
{
  echo "## Idle keep-alive connections ($PROTOCOL)"
  echo
  echo "- machine: $(machine_line)"
  echo "- tree: $(git -C "$LT_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), release build"
  echo "- clients: $N connections from loadtest/idle_clients.py (Python asyncio, loopback), each sends one \`GET /users/1\` ($PROTOCOL), reads the answer and stays idle; RSS read $SETTLE s after the last connection of each checkpoint; held ${HOLD}s more before closing"
  echo "- upstream: $UPSTREAM_DESC"
  echo
  echo "| server | connections | still open after ${HOLD}s | RSS before MiB | RSS at $((N / 4)) MiB | RSS at $N MiB | growth MiB | KiB/conn (before → $N) | KiB/conn ($((N / 4)) → $N) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  printf -- '- %s\n' "${NOTES[@]}"
  echo
  echo "RSS is the server process's VmRSS (/proc/PID/status): user-space memory only; the kernel's"
  echo "socket buffers are not in it. The last column, the slope between the two checkpoints, leaves"
  echo "out fixed costs (the first connection's buffers, pools, allocator arenas) and is the figure to"
  echo "quote; \`before → $N\` includes them."
} >"$LT_TMP/report.md"
cp "$LT_TMP/report.md" "$REPORT"
cat "$REPORT"
log "written to ${REPORT#"$LT_ROOT"/}"
