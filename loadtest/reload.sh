#!/usr/bin/env bash
# Hot reload under load: wrk keeps a steady keep-alive load on Breakwater while its config file
# is replaced 10 times (write a temp file, then `mv` it over the config, as config management
# does; each change adds a route). Every change makes a new process take over the listening
# sockets. Reports the failed requests (wrk socket errors + non-2xx; must be 0) and the pids
# that served; writes loadtest/results/reload-latest.md.
#
#   loadtest/reload.sh [--duration 20s] [--changes 10] [--connections 16]
#
# Every gateway process (the first and each reload's) and the upstream are stopped on exit.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=20 CHANGES=10 CONNECTIONS=16
while (($#)); do
  case $1 in
    --duration) DURATION=${2%s}; shift 2 ;;
    --changes) CHANGES=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $DURATION =~ ^[0-9]+$ ]] || die "--duration takes whole seconds (e.g. 20s)"
command -v wrk >/dev/null || die "wrk is not installed (apt-get install -y wrk)"

lt_init
lt_build

PIDS=() # every gateway pid seen serving, oldest first
# On any exit: the gateways are not our children (each reload's process is started by the
# previous one), so stop every pid seen, and the one in the pid file, by pid.
stop_gateways() {
  local pid
  [[ -s "$LT_TMP/breakwater.pid" ]] && PIDS+=("$(tr -d '[:space:]' <"$LT_TMP/breakwater.pid")")
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null && track "$pid"; done
  return 0
}
LT_ON_EXIT=stop_gateways

start_sample users 0
UPSTREAM=$SAMPLE_ADDR
PORT=$(free_port) ADMIN=$(free_port)
CONFIG="$LT_TMP/gateway.yaml"

# write_config N: the base config plus N extra services with their own routes.
write_config() {
  local n=$1 tmp="$CONFIG.tmp.$1"
  {
    cat <<EOF
server:
  listen: ["127.0.0.1:$PORT"]
  threads: 1
  upgrade_sock: $LT_TMP/upgrade.sock
  pid_file: $LT_TMP/breakwater.pid
  grace_period: 1s
admin: {listen: "127.0.0.1:$ADMIN"}
access_log: true
services:
  users:
    routes: [{path_prefix: /users}]
    upstreams: ["$UPSTREAM"]
EOF
    for i in $(seq 1 "$n"); do
      printf '  v%d:\n    routes: [{path_prefix: /v%d}]\n    upstreams: ["%s"]\n' "$i" "$i" "$UPSTREAM"
    done
  } >"$tmp"
  "$LT_BIN/breakwater" -c "$tmp" check >/dev/null || die "config $n is invalid"
  mv "$tmp" "$CONFIG"
}

served_pid() { tr -d '[:space:]' <"$LT_TMP/breakwater.pid" 2>/dev/null || true; }

write_config 0
"$LT_BIN/breakwater" -c "$CONFIG" >"$LT_TMP/access.log" 2>"$LT_TMP/breakwater.err" &
track $!
wait_http "http://127.0.0.1:$ADMIN/ready"
deadline=$((SECONDS + 10))
until [[ -n $(served_pid) ]]; do ((SECONDS < deadline)) || die "no pid file"; sleep 0.1; done
PIDS=("$(served_pid)")
log "gateway pid ${PIDS[0]} on 127.0.0.1:$PORT, upstream $UPSTREAM"

# wrk runs until the run's duration has passed AND every replaced process has drained and
# exited, so that every handover happens under load; then it is stopped with SIGINT (it prints
# its summary). Its own -d is only a bound.
log "wrk -t1 -c$CONNECTIONS --latency http://127.0.0.1:$PORT/users/1 for >= ${DURATION}s; $CHANGES config changes"
wrk -t1 -c"$CONNECTIONS" -d"$((DURATION + 120))s" --latency "http://127.0.0.1:$PORT/users/1" >"$LT_TMP/wrk.txt" &
WRK=$!
track "$WRK"

# Spread the changes over the run, leaving a quiet interval at both ends.
START=$(date +%s.%N)
ROWS=()
for i in $(seq 1 "$CHANGES"); do
  at=$(awk -v d="$DURATION" -v n="$CHANGES" -v i="$i" -v s="$START" 'BEGIN{print s + d * i / (n + 2)}')
  sleep "$(awk -v at="$at" -v now="$(date +%s.%N)" 'BEGIN{d = at - now; print (d > 0 ? d : 0)}')"
  before=$(served_pid)
  t_change=$(date +%s.%N)
  write_config "$i"
  new=""
  for _ in $(seq 100); do # up to 10 s for the new process to take over
    now=$(served_pid)
    if [[ -n $now && $now != "$before" ]]; then new=$now; break; fi
    sleep 0.1
  done
  took=$(awk -v a="$t_change" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
  if [[ -n $new ]]; then
    PIDS+=("$new")
    ROWS+=("| $i | added route /v$i | $before → $new | ${took}s |")
    log "change $i: pid $before → $new (${took}s)"
  else
    ROWS+=("| $i | added route /v$i | $before (no new process) | - |")
    log "change $i: no new pid after ${took}s"
  fi
done
log "all changes made; waiting for the replaced processes to drain and exit under load"
deadline=$((SECONDS + 30))
while :; do
  old=0
  for pid in "${PIDS[@]}"; do [[ $pid != "$(served_pid)" ]] && kill -0 "$pid" 2>/dev/null && old=1; done
  elapsed=$(awk -v s="$START" -v now="$(date +%s.%N)" 'BEGIN{print int(now - s)}')
  ((old == 0 && elapsed >= DURATION)) && break
  ((SECONDS < deadline)) || { log "replaced processes still running after 30 s"; break; }
  sleep 0.2
done
LOAD_SECS=$(awk -v s="$START" -v now="$(date +%s.%N)" 'BEGIN{printf "%.1f", now - s}')
kill -INT "$WRK" 2>/dev/null || true
wait "$WRK" || true
parse_wrk "$LT_TMP/wrk.txt"
FAILED=$((WRK_SOCKET_ERRORS + WRK_NON2XX))

# Stop the newest gateway (the older ones have exited by themselves after draining).
NEWEST=$(served_pid)
log "stopping the newest gateway (pid $NEWEST) and waiting for every gateway to exit"
kill -TERM "$NEWEST" 2>/dev/null || true
t_stop=$SECONDS
left=()
for _ in $(seq 200); do # 20 s
  left=()
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
  ((${#left[@]} == 0)) && break
  sleep 0.1
done
EXITED="all $(printf '%s\n' "${PIDS[@]}" | sort -u | wc -l) gateway processes exited within $((SECONDS - t_stop + 1))s of stopping the newest"
((${#left[@]})) && EXITED="still running after 20 s: ${left[*]} (killed)"

DISTINCT=$(printf '%s\n' "${PIDS[@]}" | sort -u | wc -l)
REPORT="$LT_DIR/results/reload-latest.md"
{
  echo "## Hot reload under load"
  echo
  echo "- machine: $(machine_line)"
  echo "- load: wrk \`-t1 -c$CONNECTIONS\` for ${LOAD_SECS}s (until every replaced process had exited), keep-alive on \`GET /users/1\` (sample-service upstream), Breakwater 1 thread, grace_period 1s"
  echo "- $CHANGES config changes (temp file + \`mv\` over the config), one every $(awk -v d="$DURATION" -v n="$CHANGES" 'BEGIN{printf "%.1f", d / (n + 2)}')s or, if later, once the previous change has taken over"
  echo
  echo "| change | what | pid serving (pid file) | takeover |"
  echo "|---:|---|---|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "| requests | req/s | p50 ms | p99 ms | max ms | socket errors | non-2xx | **failed** |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
  echo "| $WRK_REQS | $WRK_RPS | $WRK_P50 | $WRK_P99 | $WRK_MAX | $WRK_SOCKET_ERRORS ($WRK_SOCKET_DETAIL) | $WRK_NON2XX | **$FAILED** |"
  echo
  echo "$DISTINCT distinct pids served ($(printf '%s ' "${PIDS[@]}")); $EXITED."
  if ((FAILED == 0 && DISTINCT == CHANGES + 1)); then
    echo "Result: PASS (0 failed requests, a new process for every change)."
  else
    echo "Result: FAIL ($FAILED failed requests, $DISTINCT processes for $CHANGES changes)."
  fi
} | tee "$REPORT"
log "written to ${REPORT#$LT_ROOT/}"
((FAILED == 0 && DISTINCT == CHANGES + 1))
