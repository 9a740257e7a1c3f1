#!/usr/bin/env bash
# Hot reload under load, Breakwater beside nginx: for each proxy and each kind of load, wrk
# runs a short window around every reload (the reload lands 1 s into the window), and the
# script counts the failed requests (wrk socket errors + non-2xx; the bar is 0) and takes the
# p99 latency of each window. Two loads: 64 keep-alive connections, and 64 connections that
# each send one request (`Connection: close`), the churn that used to lose requests.
# Breakwater reloads with `breakwater reload` after its config file is rewritten (each change
# adds a route); nginx with `nginx -s reload` after its config file is rewritten. Writes
# loadtest/results/reload-latest.md.
#
#   loadtest/reload.sh [--reloads 20] [--window 3] [--connections 64] [--only breakwater|nginx]
#
# Every process is stopped on exit, the reloaded gateways included.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RELOADS=20 WINDOW=3 CONNECTIONS=64 ONLY=""
while (($#)); do
  case $1 in
    --reloads) RELOADS=$2; shift 2 ;;
    --window) WINDOW=${2%s}; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $WINDOW =~ ^[0-9]+$ ]] && ((WINDOW >= 2)) || die "--window takes whole seconds, at least 2"
command -v wrk >/dev/null || die "wrk is not installed (apt-get install -y wrk)"
NGINX="$(find_nginx)"

lt_init
lt_build

# Breakwater processes are not our children after a reload: stop whatever the pid file names.
BW_PID_FILES=()
stop_gateways() {
  local f
  for f in "${BW_PID_FILES[@]}"; do
    [[ -s $f ]] && kill -TERM "$(tr -d '[:space:]' <"$f")" 2>/dev/null || true
  done
  return 0
}
LT_ON_EXIT=stop_gateways

# --- the upstream: nginx returning a small JSON body, else sample-service ---
BODY='{"id":1,"name":"Ada Lovelace","service":"users"}'
if [[ -n $NGINX ]]; then
  UP_PORT=$(free_port)
  nginx_conf "$LT_TMP/upstream" "server {
    listen 127.0.0.1:$UP_PORT backlog=4096;
    access_log off;
    location / { default_type application/json; return 200 '$BODY'; }
  }" "" 1 8192
  start_nginx "$LT_TMP/upstream"
  UPSTREAM="127.0.0.1:$UP_PORT"
else
  start_sample users 0
  UPSTREAM=$SAMPLE_ADDR
fi
wait_http "http://$UPSTREAM/users/1"

# --- Breakwater ---
# bw_config FILE PORT ADMIN N: the proxy with N extra routes (each reload adds one).
bw_config() {
  local file=$1 tmp="$1.tmp"
  {
    cat <<EOF
server:
  listen: ["127.0.0.1:$2"]
  threads: 1
  upgrade_sock: $file.upgrade.sock
  pid_file: $file.pid
  grace_period: 2s
admin: {listen: "127.0.0.1:$3"}
access_log: false
services:
  users:
    routes: [{path_prefix: /users}]
    upstreams: ["$UPSTREAM"]
EOF
    for i in $(seq 1 "$4"); do
      printf '  v%d:\n    routes: [{path_prefix: /v%d}]\n    upstreams: ["%s"]\n' "$i" "$i" "$UPSTREAM"
    done
  } >"$tmp"
  mv "$tmp" "$file"
}

bw_start() { # DIR PORT ADMIN
  local dir=$1
  mkdir -p "$dir"
  bw_config "$dir/gateway.yaml" "$2" "$3" 0
  BW_PID_FILES+=("$dir/gateway.yaml.pid")
  "$LT_BIN/breakwater" -c "$dir/gateway.yaml" >"$dir/stdout" 2>"$dir/stderr" &
  track $!
  wait_ready "http://127.0.0.1:$3/ready"
}

bw_reload() { # DIR PORT ADMIN N
  bw_config "$1/gateway.yaml" "$2" "$3" "$4"
  "$LT_BIN/breakwater" -c "$1/gateway.yaml" reload >>"$1/reloads.log" 2>&1 ||
    die "breakwater reload $4 failed: $(tail -1 "$1/reloads.log")"
}

bw_stop() { # DIR
  local pid
  pid=$(tr -d '[:space:]' <"$1/gateway.yaml.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# --- nginx: a master and one worker, so that `nginx -s reload` replaces the worker ---
nx_config() { # DIR PORT N
  local routes="" i
  for i in $(seq 1 "$3"); do routes+="location /v$i { proxy_pass http://backend; } "; done
  nginx_proxy_conf "$1" "$2" "$UPSTREAM" off 1 8192
  # One worker under a master (nginx_proxy_conf leaves out the master for one worker).
  sed -i 's/^master_process off;/master_process on;/' "$1/nginx.conf"
  sed -i "s|location / {|$routes location / {|" "$1/nginx.conf"
}

nx_start() { # DIR PORT
  mkdir -p "$1"
  nx_config "$1" "$2" 0
  start_nginx "$1"
  wait_http "http://127.0.0.1:$2/users/1"
}

nx_reload() { # DIR PORT N
  nx_config "$1" "$2" "$3"
  "$NGINX" -p "$1" -c "$1/nginx.conf" -e "$1/error.log" -s reload
}

nx_stop() { # DIR
  "$NGINX" -p "$1" -c "$1/nginx.conf" -e "$1/error.log" -s quit 2>/dev/null || true
  sleep 1
}

# --- the runs ---
ROWS=()
run() { # TARGET LOAD
  local target=$1 load=$2 dir="$LT_TMP/$1-$2" port admin i reqs=0 failed=0 p99s=() maxes=()
  local header=()
  [[ $load == close ]] && header=(-H "Connection: close")
  port=$(free_port) admin=$(free_port)
  if [[ $target == breakwater ]]; then bw_start "$dir" "$port" "$admin"; else nx_start "$dir" "$port"; fi
  log "$target, $load load: $RELOADS reloads, wrk -t1 -c$CONNECTIONS for ${WINDOW}s around each"
  for i in $(seq 1 "$RELOADS"); do
    local out="$dir/wrk-$i.txt"
    wrk -t1 -c"$CONNECTIONS" -d"${WINDOW}s" --latency "${header[@]}" \
      "http://127.0.0.1:$port/users/1" >"$out" 2>&1 &
    local wrk_pid=$!
    sleep 1
    if [[ $target == breakwater ]]; then bw_reload "$dir" "$port" "$admin" "$i"; else nx_reload "$dir" "$port" "$i"; fi
    wait "$wrk_pid" || true
    parse_wrk "$out"
    reqs=$((reqs + WRK_REQS))
    failed=$((failed + WRK_SOCKET_ERRORS + WRK_NON2XX))
    p99s+=("$WRK_P99")
    maxes+=("$WRK_MAX")
    ((WRK_SOCKET_ERRORS + WRK_NON2XX > 0)) && log "  reload $i: $WRK_SOCKET_ERRORS socket errors ($WRK_SOCKET_DETAIL), $WRK_NON2XX non-2xx"
  done
  # The new config is in force: the last added route answers.
  local applied="yes"
  curl -sf -o /dev/null "http://127.0.0.1:$port/v$RELOADS/x" || applied="NO"
  if [[ $target == breakwater ]]; then bw_stop "$dir"; else nx_stop "$dir"; fi
  local stats
  stats=$(printf '%s\n' "${p99s[@]}" | sort -n | awk '{a[NR]=$1} END{printf "%.2f | %.2f", a[int((NR+1)/2)], a[NR]}')
  local worst_max
  worst_max=$(printf '%s\n' "${maxes[@]}" | sort -n | tail -1)
  ROWS+=("| $target | $load | $RELOADS | $reqs | **$failed** | $stats | $worst_max | $applied |")
  TOTAL_FAILED[$target]=$((${TOTAL_FAILED[$target]:-0} + failed))
}

declare -A TOTAL_FAILED
for target in breakwater nginx; do
  [[ -n $ONLY && $ONLY != "$target" ]] && continue
  [[ $target == nginx && -z $NGINX ]] && { log "nginx is not installed: no nginx rows"; continue; }
  run "$target" keepalive
  run "$target" close
done

REPORT="$LT_DIR/results/reload-latest.md"
{
  echo "## Hot reload under load: Breakwater and nginx"
  echo
  echo "- machine: $(machine_line)"
  echo "- load: wrk \`-t1 -c$CONNECTIONS --latency\` for ${WINDOW}s around each reload (the reload starts 1 s in), \`GET /users/1\`; keepalive = 64 kept-alive connections, close = \`Connection: close\` on every request (a new connection each)"
  echo "- upstream: $( [[ -n $NGINX ]] && echo "nginx \`return 200\` of a ${#BODY}-byte JSON body" || echo "sample-service")"
  echo "- Breakwater: 1 worker thread, \`breakwater reload\` after each config change (adds a route), which returns once the new process accepts; nginx: master + 1 worker, \`nginx -s reload\` after each config change (adds a location)"
  echo
  echo "| proxy | load | reloads | requests | failed | p99 ms (median window) | p99 ms (worst window) | max ms | last config in force |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "failed = wrk socket errors + non-2xx responses, summed over every window."
} | tee "$REPORT"
log "written to ${REPORT#$LT_ROOT/}"
[[ ${TOTAL_FAILED[breakwater]:-0} == 0 ]]
