#!/usr/bin/env bash
# Chaos: users (2 instances) and orders (1) sample services behind Breakwater under a steady,
# fixed-rate load on /users/1 and /orders/1; orders is SIGKILLed at 1/3 of the run and
# restarted on the same port at 2/3. Prints the per-route success, time to trip, fallback
# latency and time to recover, and writes loadtest/results/chaos-latest.{md,png,csv}.
#
#   loadtest/chaos.sh [--duration 30s] [--rate 200] [--concurrency 200] [--timeout 2s]
#
# The driver and the plot are Python (loadtest/chaos.py); the first run creates
# loadtest/.venv with aiohttp and matplotlib (pip). Every process started here is stopped on
# exit, also on Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=30 RATE=200 CONCURRENCY=200 TIMEOUT=2
secs() { local v=${1%s}; [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad duration $1 (e.g. 30s)"; echo "$v"; }
while (($#)); do
  case $1 in
    --duration) DURATION=$(secs "$2"); shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --timeout) TIMEOUT=$(secs "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

lt_init
lt_build

VENV="$LT_DIR/.venv"
if ! "$VENV/bin/python" -c 'import aiohttp, matplotlib' 2>/dev/null; then
  log "creating $VENV (aiohttp, matplotlib)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$LT_DIR/requirements.txt"
fi

# The driver runs in its own process group so that cleanup stops it and everything it
# started (the gateway and the sample services), even if it cannot clean up itself.
setsid "$VENV/bin/python" "$LT_DIR/chaos.py" --duration "$DURATION" --rate "$RATE" \
  --concurrency "$CONCURRENCY" --timeout "$TIMEOUT" --bin "$LT_BIN" \
  --results "$LT_DIR/results" --machine "$(machine_line)" &
DRIVER=$!
track_group "$DRIVER"
wait "$DRIVER"
