#!/usr/bin/env bash
# A normal load with and without a crowd of idle keep-alive clients on the same gateway: wrk
# runs against Breakwater alone, then while N idle clients (loadtest/idle_clients.py) hold their
# connections open, then alone again. Throughput and p99 of the middle run are compared with the
# mean of the two runs alone (which also shows how noisy the machine is), and the gateway's RSS
# is read with the crowd connected. Written as a Markdown table to
# loadtest/results/idle-load-latest.md.
#
#   loadtest/idle_load.sh [--idle 19000] [--duration 10] [--connections 32] [--threads 1]
#
# N is capped by the open-file hard limit (`ulimit -Hn`) minus 500, as in idle.sh: 19,500 on a
# machine whose limit is 20,000. Loopback only, ephemeral ports; bounded in time (each wrk run
# lasts --duration seconds, the crowd gets 180 s to connect); every process is stopped on exit.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=19000 DURATION=10 CONNS=32 THREADS=1
while (($#)); do
  case $1 in
    --idle) N=$2; shift 2 ;;
    --duration) DURATION=${2%s}; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $N =~ ^[0-9]+$ ]] && ((N >= 1)) || die "--idle takes a positive number"
HARD=$(ulimit -Hn)
if [[ $HARD != unlimited ]]; then
  ((N <= HARD - 500)) || die "--idle $N is over the cap of $((HARD - 500)) (open-file hard limit $HARD)"
  ulimit -n "$HARD"
fi
command -v wrk >/dev/null || die "wrk is missing (apt-get install -y wrk)"
NGINX="$(find_nginx)"
[[ -n $NGINX ]] || die "nginx is missing (apt-get install -y nginx): it is the upstream"

lt_init
lt_build

start_json_upstream

PORT=$(free_port) ADMIN=$(free_port)
CONF="$LT_TMP/breakwater.yaml"
breakwater_conf "$CONF" "$PORT" "$ADMIN" "$UPSTREAM" "$THREADS"
# The crowd must stay connected through all runs, and fit under the connection cap.
sed -i "/^server:/a\\  keepalive_timeout: 900s\\n  max_connections: $((N + CONNS + 100))" "$CONF"
"$LT_BIN/breakwater" -c "$CONF" check >/dev/null 2>"$CONF.check" || die "config: $(cat "$CONF.check")"
"$LT_BIN/breakwater" -c "$CONF" >"$LT_TMP/access.log" 2>"$LT_TMP/breakwater.err" &
BW_PID=$!
track "$BW_PID"
wait_ready "http://127.0.0.1:$ADMIN/ready"
wait_http "http://127.0.0.1:$PORT/users/1"

active() {
  curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^breakwater_connections_active /{print int($2)}'
}
rss_mib() { awk '/^VmRSS:/{printf "%.1f", $2 / 1024}' "/proc/$BW_PID/status"; }

ROWS=()
# load LABEL: one wrk run; appends a table row and sets RPS and P99 for the caller.
load() {
  local out="$LT_TMP/wrk-$1.txt"
  log "wrk -t1 -c$CONNS -d${DURATION}s ($1)"
  wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$PORT/users/1" >"$out" 2>&1 ||
    die "wrk failed: $(tail -3 "$out")"
  parse_wrk "$out"
  RPS=$WRK_RPS P99=$WRK_P99
  ROWS+=("| $1 | $(active) | $(rss_mib) | $WRK_RPS | $WRK_P50 | $WRK_P99 | $WRK_MAX | $WRK_SOCKET_ERRORS | $WRK_NON2XX |")
}

load "alone (before)"
RPS_A=$RPS P99_A=$P99

log "opening $N idle keep-alive connections"
python3 "$LT_DIR/idle_clients.py" --port "$PORT" --pid "$BW_PID" --connections "$N" \
  --checkpoints "$N" --hold 3600 --timeout 3600 >"$LT_TMP/idle.json" 2>"$LT_TMP/idle.err" &
IDLE_PID=$!
track "$IDLE_PID"
deadline=$((SECONDS + 180))
until (($(active) >= N)); do
  kill -0 "$IDLE_PID" 2>/dev/null || die "idle clients exited: $(tail -3 "$LT_TMP/idle.err")"
  ((SECONDS < deadline)) || die "only $(active) of $N idle connections after 180 s"
  sleep 0.5
done
sleep 2 # the last answers read, the client settled into waiting
load "with $N idle"
RPS_B=$RPS P99_B=$P99
CROWD=$(active)

stop_pid "$IDLE_PID" TERM
deadline=$((SECONDS + 60))
until (($(active) < 100)); do
  ((SECONDS < deadline)) || die "the idle connections did not close"
  sleep 0.5
done
load "alone (after)"
RPS_C=$RPS P99_C=$P99

ratio() { awk -v b="$1" -v a="$2" -v c="$3" 'BEGIN{ printf "%.2f", b / ((a + c) / 2) }'; }
REPORT="$LT_DIR/results/idle-load-latest.md"
{
  echo "## A normal load beside $N idle keep-alive clients"
  echo
  echo "- machine: $(machine_line)"
  echo "- tree: $(git -C "$LT_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), release build"
  echo "- gateway: Breakwater, $THREADS worker thread(s), routing, breaker, health checks, metrics, access log; upstream $UPSTREAM_DESC"
  echo "- load: wrk \`-t1 -c$CONNS -d${DURATION}s\` keep-alive on \`GET /users/1\`; idle crowd: loadtest/idle_clients.py, one request each, then idle"
  echo
  echo "| run | open after the run (gauge) | gateway RSS MiB | req/s | p50 ms | p99 ms | max ms | socket errors | non-2xx |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "With the crowd ($CROWD connections open): throughput **$(ratio "$RPS_B" "$RPS_A" "$RPS_C")x** and p99 **$(ratio "$P99_B" "$P99_A" "$P99_C")x** the mean of the two runs alone."
} >"$LT_TMP/report.md"
cp "$LT_TMP/report.md" "$REPORT"
cat "$REPORT"
log "written to ${REPORT#"$LT_ROOT"/}"
