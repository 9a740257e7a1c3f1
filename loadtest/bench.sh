#!/usr/bin/env bash
# Throughput, latency and CPU per request of Breakwater beside the same upstream reached
# directly, nginx as a plain reverse proxy and a bare Pingora proxy (examples/bare_pingora.rs),
# bare Pingora behind Breakwater's connection front (what the front costs or saves),
# then Breakwater with one feature more per row (JWT HS256/RS256/ES256, a memory-cache hit, a
# local rate limit), with the same wrk load, in one run; then HTTP/2 over TLS (h2load against
# nginx's `http2` listener and Breakwater's TLS listener, a self-signed certificate made per
# run). Prints Markdown tables with ratios against bare Pingora and nginx and writes them to
# loadtest/results/bench-latest.md.
#
#   loadtest/bench.sh [--duration 5s] [--warmup 1s] [--connections 64] [--threads 1]
#                     [--rounds 1] [--only T1,T2,...] [--list] [--scale] [--flamegraphs]
#                     [--flame-duration 4] [--flame-freq 299] [--flame-no-inline]
#                     [--nginx-access-log on|off] [--no-pin] [--h2-connections 16] [--h2-streams 4]
#                     [--client-cpu 1] [--proxy-cpu 0] [--upstream-cpu 0] [--scale-cpus 0,1]
#                     [--baseline PATH] [--pingora-baseline PATH] [--report PATH]
#
# --baseline PATH adds the row breakwater-baseline: the breakwater row's config served by
# another build of the binary (e.g. an earlier commit's target/release/breakwater), run in the
# same rounds as the rest, right after or (every other round) right before the breakwater row,
# so that two builds compare within one noisy run.
# --pingora-baseline PATH adds the row pingora-baseline: bare Pingora from another build (e.g.
# target/release/examples/bare_pingora when LT_BIN points at scripts/build-pgo's output), so that
# a tuned Breakwater compares with bare Pingora as anyone would build it.
# --report PATH writes the report there instead of loadtest/results/bench-latest.md.
# The binaries are target/release's, built first; BUILD=0 LT_BIN=DIR takes them from DIR as
# they are (scripts/build-pgo's output, say).
# --rounds N runs every target N times, round-robin, each round starting one row later than the
# one before, and reports the medians (CPU min-max too) and Breakwater's CPU per request ÷ bare
# Pingora's paired by round (the median of the rounds' ratios).
# --h2-connections C --h2-streams S: the h2 rows' load, h2load -c C -m S (C x S = 64 requests in
# flight by default, as wrk's 64 connections).
# --scale adds nginx, bare Pingora and Breakwater with 1 and then 2 workers on --scale-cpus.
# --flamegraphs records each proxy with perf (DWARF call graphs) during an extra wrk run and
# writes loadtest/results/flame-<target>.svg (needs perf and `cargo install inferno`).
# Everything listens on ephemeral loopback ports and is stopped on exit (also on Ctrl-C).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ALL_TARGETS=(direct nginx pingora pingora-baseline pingora-unwatched pingora-front breakwater breakwater-baseline breakwater-jwt-hs256
  breakwater-jwt-rs256 breakwater-jwt-es256 breakwater-cache-hit breakwater-ratelimit nginx-h2
  breakwater-h2)
DURATION=5s CONNECTIONS=64 THREADS=1 WARMUP=1s NGINX_ACCESS_LOG=on PIN=1 ONLY="" ROUNDS=1
CLIENT_CPU=1 PROXY_CPU=0 UPSTREAM_CPU=0 SCALE=0 SCALE_CPUS=0,1
BASELINE="" PG_BASELINE="" REPORT="" FLAMEGRAPHS=0 FLAME_DURATION=4 FLAME_FREQ=299 FLAME_INLINE=1 H2_CONNECTIONS=16 H2_STREAMS=4
while (($#)); do
  case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --list) printf '%s\n' "${ALL_TARGETS[@]}"; exit 0 ;;
    --scale) SCALE=1; shift ;;
    --scale-cpus) SCALE_CPUS=$2; shift 2 ;;
    --flamegraphs) FLAMEGRAPHS=1; shift ;;
    --flame-duration) FLAME_DURATION=${2%s}; shift 2 ;;
    --flame-freq) FLAME_FREQ=$2; shift 2 ;;
    --flame-no-inline) FLAME_INLINE=0; shift ;;
    --nginx-access-log) NGINX_ACCESS_LOG=$2; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    --h2-connections) H2_CONNECTIONS=$2; shift 2 ;;
    --h2-streams) H2_STREAMS=$2; shift 2 ;;
    --client-cpu) CLIENT_CPU=$2; shift 2 ;;
    --proxy-cpu) PROXY_CPU=$2; shift 2 ;;
    --upstream-cpu) UPSTREAM_CPU=$2; shift 2 ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --pingora-baseline) PG_BASELINE=$2; shift 2 ;;
    --report) REPORT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $NGINX_ACCESS_LOG == on || $NGINX_ACCESS_LOG == off ]] || die "--nginx-access-log on|off"
[[ $FLAME_DURATION =~ ^[0-9]+$ ]] || die "--flame-duration takes whole seconds"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds takes a number >= 1"
[[ -z $BASELINE || -x $BASELINE ]] || die "--baseline: $BASELINE is not an executable"
[[ -z $PG_BASELINE || -x $PG_BASELINE ]] || die "--pingora-baseline: $PG_BASELINE is not an executable"
if [[ -n $ONLY ]]; then
  for t in ${ONLY//,/ }; do [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target $t (see --list)"; done
fi
selected() { [[ -z $ONLY || $ONLY == *",$1,"* ]]; }
command -v wrk >/dev/null || die "wrk is not installed (apt-get install -y wrk)"
if { selected nginx-h2 || selected breakwater-h2; } && ! command -v h2load >/dev/null; then
  die "h2load is not installed (apt-get install -y nghttp2-client), or leave out the h2 rows with --only"
fi
NGINX="$(find_nginx)"
if ((PIN)) && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
  log "taskset missing or a single CPU: not pinning"
  PIN=0
fi
if ((FLAMEGRAPHS)); then
  command -v perf >/dev/null || die "perf is not installed (apt-get install -y linux-perf)"
  PATH="$PATH:$HOME/.cargo/bin"
  command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null ||
    die "inferno is not installed (cargo install inferno)"
fi

lt_init
lt_build examples
((FLAMEGRAPHS)) && { perf record -q -o "$LT_TMP/perf-check.data" -- true >/dev/null 2>&1 ||
  die "perf record does not work here (perf_event_paranoid? $(cat /proc/sys/kernel/perf_event_paranoid))"; }

# on CPUS: sets ON to the command prefix that runs a command on CPUS (empty when not pinning).
# A prefix, not a wrapper function: a backgrounded function runs in a subshell, and $! would
# be that subshell's pid instead of the server's.
on() { ON=(); if ((PIN)); then ON=(taskset -c "$1"); fi; }
TICK_HZ=$(getconf CLK_TCK)

# --- upstream: nginx returning a small static JSON body (or sample-service without nginx) ---
on "$UPSTREAM_CPU"
start_json_upstream "${ON[@]}"
# sample-service is started without the prefix: pin it (and its threads) once it runs.
[[ -z $NGINX ]] && ((PIN)) && taskset -a -p -c "$UPSTREAM_CPU" "$UP_PID" >/dev/null

# --- JWT keys and tokens (one token per algorithm, reused by every request, exp in 2100) ---
FIX="$LT_ROOT/tests/fixtures"
head -c 48 /dev/urandom | base64 | tr -d '/+=\n' >"$LT_TMP/jwt.secret"
declare -A TOKEN
TOKEN[hs256]=$(python3 "$LT_DIR/mint_jwt.py" HS256 "$LT_TMP/jwt.secret")
TOKEN[rs256]=$(python3 "$LT_DIR/mint_jwt.py" RS256 "$FIX/jwt_rsa_private.pem")
TOKEN[es256]=$(python3 "$LT_DIR/mint_jwt.py" ES256 "$FIX/jwt_ec_private.pem")

# --- a self-signed certificate for the h2 rows (P-256, valid one day) ---
if selected nginx-h2 || selected breakwater-h2; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -keyout "$LT_TMP/tls.key" -out "$LT_TMP/tls.crt" 2>/dev/null || die "openssl could not make a certificate"
fi

# start_target NAME [WORKERS] [CPUS]: starts the server of a target (not `direct`, which is the
# upstream) and sets T_PID, T_URL, T_SIG (its fast-shutdown signal) and T_HDR (wrk/curl headers).
start_target() {
  local name=$1 workers=${2:-1} cpus=${3:-$PROXY_CPU} dir port
  # wrk and perf stop cleanly on Ctrl-C, so bash carries on after them; the upstream, which
  # Ctrl-C ends too, is what tells the run to stop.
  kill -0 "$UP_PID" 2>/dev/null || die "the upstream has exited (interrupted?)"
  dir="$LT_TMP/$name-${workers}w"
  mkdir -p "$dir"
  port=$(free_port)
  T_URL="http://127.0.0.1:$port/users/1" T_HDR=() T_SIG=INT
  on "$cpus"
  case $name in
    nginx)
      nginx_proxy_conf "$dir" "$port" "$UPSTREAM" "$NGINX_ACCESS_LOG" "$workers"
      start_nginx "$dir" "${ON[@]}"
      T_PID=$NGINX_PID T_SIG=TERM
      ;;
    nginx-h2)
      nginx_proxy_conf "$dir" "$port" "$UPSTREAM" "$NGINX_ACCESS_LOG" "$workers" 4096 \
        "ssl http2; ssl_certificate $LT_TMP/tls.crt; ssl_certificate_key $LT_TMP/tls.key"
      start_nginx "$dir" "${ON[@]}"
      T_PID=$NGINX_PID T_SIG=TERM T_URL="https://127.0.0.1:$port/users/1"
      ;;
    pingora|pingora-front|pingora-baseline|pingora-unwatched)
      local front=0 unwatched=0 bin="$LT_BIN/examples/bare_pingora"
      [[ $name == pingora-front ]] && front=1
      [[ $name == pingora-unwatched ]] && unwatched=1
      [[ $name == pingora-baseline ]] && bin=$PG_BASELINE
      BARE_FRONT=$front BARE_UNWATCHED=$unwatched "${ON[@]}" "$bin" "127.0.0.1:$port" "$UPSTREAM" "$workers" \
        >"$dir/stdout" 2>"$dir/stderr" &
      T_PID=$!
      track "$T_PID"
      ;;
    breakwater*)
      local top="" users="" admin server=""
      admin=$(free_port)
      case $name in
        breakwater-jwt-hs256) top="auth: {jwt: {algorithms: [HS256], secret_file: $LT_TMP/jwt.secret}}" ;;
        breakwater-jwt-rs256) top="auth: {jwt: {algorithms: [RS256], public_key_file: $FIX/jwt_rsa_public.pem}}" ;;
        breakwater-jwt-es256) top="auth: {jwt: {algorithms: [ES256], public_key_file: $FIX/jwt_ec_public.pem}}" ;;
        breakwater-cache-hit) top="cache: {backend: memory}" users="    cache: {ttl: 1h}" ;;
        breakwater-ratelimit)
          users="    rate_limit: {requests_per_second: 1000000, burst: 1000000, key: ip, backend: local}" ;;
        breakwater-h2)
          local tls_port
          tls_port=$(free_port)
          server="  tls: [{listen: \"127.0.0.1:$tls_port\", cert: $LT_TMP/tls.crt, key: $LT_TMP/tls.key}]" ;;
      esac
      if [[ $name == breakwater-jwt-* ]]; then
        users="    auth: required"
        T_HDR=(-H "Authorization: Bearer ${TOKEN[${name#breakwater-jwt-}]}")
      fi
      breakwater_conf "$dir/breakwater.yaml" "$port" "$admin" "$UPSTREAM" "$workers" "$top" "$users" "$server"
      local bin="$LT_BIN/breakwater"
      [[ $name == breakwater-baseline ]] && bin=$BASELINE
      "${ON[@]}" "$bin" -c "$dir/breakwater.yaml" \
        >"$dir/access.log" 2>"$dir/breakwater.err" &
      T_PID=$!
      track "$T_PID"
      wait_ready "http://127.0.0.1:$admin/ready"
      [[ -n $server ]] && T_URL="https://127.0.0.1:$tls_port/users/1"
      ;;
    *) die "no server for target $name" ;;
  esac
  wait_http "$T_URL"
  curl -skf -o /dev/null "${T_HDR[@]}" "$T_URL" || die "$name: $T_URL does not answer 2xx"
  if [[ $name == *-h2 ]]; then
    [[ $(curl -sk --http2 -o /dev/null -w '%{http_version}' "$T_URL") == 2 ]] ||
      die "$name: $T_URL does not answer over HTTP/2"
  fi
  if [[ $name == breakwater-cache-hit ]]; then
    local headers
    headers=$(curl -s -D - -o /dev/null "$T_URL")
    [[ ${headers,,} == *$'\nx-cache: hit'* ]] || die "$name: second request is not a cache hit"
  fi
}

# us_per_request TICKS N: TICKS of CPU time over N requests, in µs per request.
us_per_request() { awk -v t="$1" -v hz="$TICK_HZ" -v n="$2" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}'; }

# measure KEY PID URL [HEADER ARGS...]: warm-up, then the measured wrk run; appends the figures
# to the lists below under KEY (one value per round).
declare -A L_RPS L_P50 L_P99 L_MAXL L_ERRS L_CPU L_USR L_STEAL
measure() {
  local key=$1 pid=$2 url=$3 out="$LT_TMP/wrk-$1.txt" t0 t1 u0 u1 h0 h1 steal cpu=n/a usr=n/a
  shift 3
  on "$CLIENT_CPU"
  log "$key: warm-up $WARMUP, then wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency $url"
  "${ON[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "$@" "$url" >/dev/null
  t0=$(cpu_ticks "$pid") u0=$(cpu_ticks "$pid" user) h0=$(host_clock)
  "${ON[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url" >"$out"
  t1=$(cpu_ticks "$pid") u1=$(cpu_ticks "$pid" user) h1=$(host_clock)
  steal=$(steal_pct "$h0" "$h1")
  L_STEAL[$key]+="$steal "
  parse_wrk "$out"
  L_RPS[$key]+="$WRK_RPS " L_P50[$key]+="$WRK_P50 " L_P99[$key]+="$WRK_P99 "
  L_MAXL[$key]+="$WRK_MAX " L_ERRS[$key]+="$((WRK_SOCKET_ERRORS + WRK_NON2XX)) "
  ((WRK_REQS > 0)) && cpu=$(us_per_request $((t1 - t0)) "$WRK_REQS") &&
    usr=$(us_per_request $((u1 - u0)) "$WRK_REQS")
  L_CPU[$key]+="$cpu " L_USR[$key]+="$usr "
  log "$key: $WRK_RPS req/s, $cpu µs CPU per request ($usr in user space), steal $steal%"
  return 0
}

# measure_h2 KEY PID URL: as `measure`, with h2load over TLS (h2, ALPN); the mean time per
# request goes into the p50 column's list (h2load reports no percentiles).
measure_h2() {
  local key=$1 pid=$2 url=$3 out="$LT_TMP/h2load-$1.txt" t0 t1 h0 h1 done ok
  on "$CLIENT_CPU"
  log "$key: warm-up $WARMUP, then h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS -D $DURATION $url"
  "${ON[@]}" h2load -t1 -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -D "$WARMUP" "$url" >/dev/null 2>&1 || true
  t0=$(cpu_ticks "$pid") h0=$(host_clock)
  "${ON[@]}" h2load -t1 -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -D "$DURATION" "$url" >"$out" 2>&1 || true
  t1=$(cpu_ticks "$pid") h1=$(host_clock)
  L_STEAL[$key]+="$(steal_pct "$h0" "$h1") "
  grep -q "Application protocol: h2" "$out" || die "$key: h2load did not speak h2: $(tail -3 "$out")"
  H2_TLS=$(awk '/^TLS Protocol:/ {print $3; exit}' "$out")
  done=$(awk '/^requests:/ {print $8; exit}' "$out")
  ok=$(awk '/^status codes:/ {print $3; exit}' "$out")
  L_RPS[$key]+="$(awk '/^finished in/ {print $4; exit}' "$out") "
  L_P50[$key]+="$(awk '/^time for request:/ {v=$6; u=v; sub(/[a-z]+$/, "", v); gsub(/[0-9.]/, "", u); if (u == "us") v /= 1000; if (u == "s") v *= 1000; print v; exit}' "$out") "
  L_ERRS[$key]+="$((${done:-0} - ${ok:-0})) " L_P99[$key]+="- " L_MAXL[$key]+="- "
  ((${ok:-0} > 0)) && L_CPU[$key]+="$(us_per_request $((t1 - t0)) "$ok") "
  return 0
}

# stat FUNC FORMAT LIST: the median (med), smallest (min), largest (max) or sum of the numbers
# in LIST, or n/a when it has none.
stat() {
  tr ' ' '\n' <<<"$3" | awk '$1 ~ /^[0-9.]+$/' | sort -g | awk -v f="$1" -v fmt="$2" '
    { a[NR] = $1; s += $1 }
    END {
      if (NR == 0) { print "n/a"; exit }
      if (f == "min") v = a[1]; else if (f == "max") v = a[NR]; else if (f == "sum") v = s
      else v = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
      printf fmt "\n", v
    }'
}

# flamegraph NAME PID URL [HEADER ARGS...]: perf records PID during an extra wrk run (not the
# measured one: perf's own cost would skew it); writes results/flame-NAME.{svg,folded}.
FLAMES=()
flamegraph() {
  local name=$1 pid=$2 url=$3 data="$LT_TMP/perf-$1.data" wpid ppid
  local folded="$LT_DIR/results/flame-$1.folded" svg="$LT_DIR/results/flame-$1.svg"
  shift 3
  on "$CLIENT_CPU"
  log "$name: perf record ${FLAME_DURATION}s (DWARF call graphs, ${FLAME_FREQ} Hz) under wrk"
  "${ON[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$((FLAME_DURATION + 2))s" "$@" "$url" >/dev/null &
  wpid=$!
  track "$wpid"
  sleep 1
  # In the background and waited for: perf stops cleanly on Ctrl-C, and bash would then carry on
  # after a foreground child that survived SIGINT; `wait` lets the INT trap run at once.
  "${ON[@]}" perf record -q --call-graph dwarf,65528 -F "$FLAME_FREQ" -p "$pid" -o "$data" \
    -- sleep "$FLAME_DURATION" >/dev/null 2>"$LT_TMP/perf-$name.err" &
  ppid=$!
  track "$ppid"
  wait "$ppid" || die "perf record failed: $(tail -3 "$LT_TMP/perf-$name.err")"
  untrack "$ppid"
  wait "$wpid" || true
  untrack "$wpid"
  local inline=(--no-inline)
  ((FLAME_INLINE)) && inline=(--inline)
  perf script "${inline[@]}" -i "$data" 2>/dev/null | inferno-collapse-perf --all >"$folded"
  inferno-flamegraph --title "$name: $(describe "$name")" \
    --subtitle "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, wrk -c$CONNECTIONS, perf ${FLAME_FREQ} Hz x ${FLAME_DURATION}s" \
    <"$folded" >"$svg"
  rm -f "$data"
  FLAMES+=("$name")
}

describe() {
  case $1 in
    direct) echo "the upstream itself (nginx \`return 200\`)" ;;
    nginx) echo "nginx reverse proxy, keep-alive upstream block, access_log $NGINX_ACCESS_LOG" ;;
    pingora) echo "bare Pingora: examples/bare_pingora.rs (only \`upstream_peer\`, mimalloc)" ;;
    pingora-baseline) echo "the same bare Pingora from the --pingora-baseline build (\`$PG_BASELINE\`)" ;;
    pingora-unwatched) echo "the same bare Pingora with \`BARE_UNWATCHED=1\`: pooled upstream connections checked when taken, not watched by a task each while idle (the pingora-core patch Breakwater turns on)" ;;
    pingora-front) echo "the same bare Pingora behind Breakwater's connection front (\`BARE_FRONT=1\`: whole-header deadline, idle wait without a buffer after 100 ms, connection count, the request future awaited in place rather than boxed per request)" ;;
    nginx-h2) echo "nginx \`listen ... ssl http2\`, same proxy settings as nginx (self-signed P-256 certificate)" ;;
    breakwater-h2) echo "Breakwater's \`server.tls\` listener (h2 by ALPN), the breakwater row's config" ;;
    breakwater) echo "routing (2 services), breaker, health checks, metrics, JSON access log to a file" ;;
    breakwater-jwt-hs256) echo "+ \`auth: required\`, JWT HS256 (secret_file), the same token on every request" ;;
    breakwater-jwt-rs256) echo "+ \`auth: required\`, JWT RS256 (2048-bit public_key_file), the same token on every request" ;;
    breakwater-jwt-es256) echo "+ \`auth: required\`, JWT ES256 (P-256 public_key_file), the same token on every request" ;;
    breakwater-cache-hit) echo "+ memory cache (ttl 1h); every measured request is a hit, the upstream is not contacted" ;;
    breakwater-ratelimit) echo "+ local rate limit by client IP, 1,000,000/s (never refuses)" ;;
    breakwater-baseline) echo "the breakwater row's config served by the --baseline build (\`$BASELINE\`)" ;;
  esac
}

# --- the runs: one target at a time, each proxy started just before its run; with --rounds,
# round-robin (every target once, then again) so that a noisy minute hits every target ---
RUN_TARGETS=()
for t in "${ALL_TARGETS[@]}"; do
  selected "$t" || continue
  [[ $t == nginx && -z $NGINX ]] && { log "nginx is not installed: no nginx row"; continue; }
  [[ $t == breakwater-baseline && -z $BASELINE ]] && continue
  [[ $t == pingora-baseline && -z $PG_BASELINE ]] && continue
  RUN_TARGETS+=("$t")
done
# This host slows down during a round more often than not: each round starts one row later
# than the one before, so that no row always runs late; --baseline's two builds stay next to
# each other, in turn first.
UNITS=()
for t in "${RUN_TARGETS[@]}"; do
  if [[ $t == breakwater && " ${RUN_TARGETS[*]} " == *" breakwater-baseline "* ]]; then
    UNITS+=(breakwater+breakwater-baseline)
  elif [[ $t != breakwater-baseline || " ${RUN_TARGETS[*]} " != *" breakwater "* ]]; then
    UNITS+=("$t")
  fi
done
round_order() { # round_order ROUND: the targets in the order that round runs them, one a line
  local round=$1 i u
  for ((i = 0; i < ${#UNITS[@]}; i++)); do
    u=${UNITS[(i + round - 1) % ${#UNITS[@]}]}
    if [[ $u != *+* ]]; then
      echo "$u"
    elif ((round % 2)); then
      printf '%s\n' "${u%+*}" "${u#*+}"
    else
      printf '%s\n' "${u#*+}" "${u%+*}"
    fi
  done
}
for round in $(seq "$ROUNDS"); do
  ((ROUNDS > 1)) && log "round $round of $ROUNDS"
  mapfile -t ORDER < <(round_order "$round")
  for t in "${ORDER[@]}"; do
    if [[ $t == direct ]]; then
      measure direct "$UP_PID" "http://$UPSTREAM/users/1"
      continue
    fi
    start_target "$t" 1
    if [[ $t == *-h2 ]]; then
      measure_h2 "$t" "$T_PID" "$T_URL"
      stop_pid "$T_PID" "$T_SIG"
      continue
    fi
    measure "$t" "$T_PID" "$T_URL" "${T_HDR[@]}"
    ((FLAMEGRAPHS && round == 1)) && flamegraph "$t" "$T_PID" "$T_URL" "${T_HDR[@]}"
    [[ $t == breakwater ]] && ACCESS_LINES=$(wc -l <"$LT_TMP/breakwater-1w/access.log")
    stop_pid "$T_PID" "$T_SIG"
  done
done

# --- scale: 1 and 2 workers on SCALE_CPUS; wrk and the upstream may run on any CPU ---
SCALE_TARGETS=()
if ((SCALE)); then
  ((PIN)) && taskset -a -p -c "0-$(($(nproc) - 1))" "$UP_PID" >/dev/null
  SAVED_CLIENT_CPU=$CLIENT_CPU CLIENT_CPU="0-$(($(nproc) - 1))"
  for t in nginx pingora breakwater; do
    [[ $t == nginx && -z $NGINX ]] || SCALE_TARGETS+=("$t")
  done
  for round in $(seq "$ROUNDS"); do
    for t in "${SCALE_TARGETS[@]}"; do
      for w in 1 2; do
        start_target "$t" "$w" "$SCALE_CPUS"
        measure "$t@${w}w" "$T_PID" "$T_URL"
        stop_pid "$T_PID" "$T_SIG"
      done
    done
  done
  CLIENT_CPU=$SAVED_CLIENT_CPU
fi

# --- the report: medians over the rounds ---
declare -A RPS P50 P99 MAXL ERRS CPU CPUR USR STEAL
for k in "${!L_RPS[@]}"; do
  USR[$k]=$(stat med "%.1f" "${L_USR[$k]:-}")
  RPS[$k]=$(stat med "%.0f" "${L_RPS[$k]}") P50[$k]=$(stat med "%.2f" "${L_P50[$k]}")
  P99[$k]=$(stat med "%.2f" "${L_P99[$k]}") MAXL[$k]=$(stat max "%.2f" "${L_MAXL[$k]}")
  ERRS[$k]=$(stat sum "%d" "${L_ERRS[$k]}") CPU[$k]=$(stat med "%.1f" "${L_CPU[$k]:-}") CPUR[$k]=""
  ((ROUNDS > 1)) && CPUR[$k]=" ($(stat min "%.1f" "${L_CPU[$k]:-}")–$(stat max "%.1f" "${L_CPU[$k]:-}"))"
  STEAL[$k]=$(stat max "%.0f" "${L_STEAL[$k]:-}")
done
# ratio A B: A/B as "0.62x" (n/a when either is missing).
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%.2fx", a / b; else print "n/a" }'; }
pct() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%+.0f%%", 100 * (a / b - 1); else print "n/a" }'; }
# paired A B: the median over rounds of A's CPU per request ÷ B's in the same round, with the
# smallest and largest, as "1.12x (1.03–1.25x over 5 rounds)" (n/a without two rounds of both).
# The two rows of a round run within a minute of each other, so a host that is slower for a
# while slows both: steadier than the ratio of the two medians when the host's speed drifts.
paired() {
  local ratios n
  ratios=$(paste -d' ' <(tr ' ' '\n' <<<"${L_CPU[$1]:-}" | sed '/^$/d') \
    <(tr ' ' '\n' <<<"${L_CPU[$2]:-}" | sed '/^$/d') |
    awk '$1 ~ /^[0-9.]+$/ && $2 ~ /^[0-9.]+$/ && $2 > 0 {printf "%.4f ", $1 / $2}')
  n=$(wc -w <<<"$ratios")
  ((n >= 2)) || { echo n/a; return 0; }
  echo "$(stat med "%.2f" "$ratios")x ($(stat min "%.2f" "$ratios")–$(stat max "%.2f" "$ratios")x over $n rounds)"
}
diff_us() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%+.1f µs", a - b; else print "n/a" }'; }
NX_RPS=${RPS[nginx]:-} PG_RPS=${RPS[pingora]:-} PG_CPU=${CPU[pingora]:-} NX_CPU=${CPU[nginx]:-}
BW_RPS=${RPS[breakwater]:-} BW_CPU=${CPU[breakwater]:-}

if ((PIN)); then
  PINNING="wrk on CPU $CLIENT_CPU; the server under test on CPU $PROXY_CPU; the upstream on CPU $UPSTREAM_CPU (taskset)"
else
  PINNING="not pinned"
fi
REV="$(git -C "$LT_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$LT_ROOT" status --porcelain -- src Cargo.toml Cargo.lock examples 2>/dev/null)" ]] && REV+=" (with uncommitted changes)"
PINGORA_VERSION="$(awk '/^name = "pingora"$/{getline; gsub(/"/, "", $3); print $3; exit}' "$LT_ROOT/Cargo.lock")"
REPORT=${REPORT:-$LT_DIR/results/bench-latest.md}
{
  echo "## Breakwater benchmark"
  echo
  echo "- machine: $(machine_line)"
  echo "- tree: $REV, $(build_desc); Pingora $PINGORA_VERSION"
  echo "- load: wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}') \`-t$THREADS -c$CONNECTIONS -d$DURATION --latency\` per target, after a $WARMUP warm-up, \`GET /users/1\`, keep-alive; one target at a time"
  ((ROUNDS > 1)) && echo "- $ROUNDS rounds, round-robin over the targets; each figure is the median of the rounds (max ms: the largest; errors: the sum; CPU: median (min–max))"
  echo "- upstream: $UPSTREAM_DESC"
  echo "- every server under test: 1 worker (thread or process); placement: $PINNING"
  echo
  echo "| target | req/s | p50 ms | p99 ms | max ms | errors | CPU µs/req | user µs/req | req/s ÷ nginx | req/s ÷ pingora | CPU ÷ pingora | steal % |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${RUN_TARGETS[@]}"; do
    [[ $t == *-h2 ]] && continue
    if [[ $t == direct ]]; then r1="—" r2="—" r3="—"; else
      r1=$(ratio "${RPS[$t]}" "$NX_RPS") r2=$(ratio "${RPS[$t]}" "$PG_RPS") r3=$(ratio "${CPU[$t]}" "$PG_CPU")
    fi
    echo "| $t | ${RPS[$t]} | ${P50[$t]} | ${P99[$t]} | ${MAXL[$t]} | ${ERRS[$t]} | ${CPU[$t]}${CPUR[$t]} | ${USR[$t]} | $r1 | $r2 | $r3 | ${STEAL[$t]} |"
  done
  echo
  for t in "${RUN_TARGETS[@]}"; do [[ $t == *-h2 ]] || echo "- **$t**: $(describe "$t")"; done
  echo
  echo "errors = wrk socket errors + non-2xx responses. CPU µs/req = CPU time (user + system) of the"
  echo "process answering wrk (the upstream for \`direct\`, else the proxy, not counting the upstream)"
  echo "divided by the requests wrk completed; user µs/req = its user-space part (median), the rest is"
  echo "the kernel's work for it. \`÷ pingora\` and \`÷ nginx\` divide by those rows of this"
  echo "run: req/s above 1 is faster, CPU above 1 costs more per request. steal % = the share of the"
  echo "machine's CPU time its hypervisor gave to other guests while the row ran (/proc/stat; the"
  echo "largest of the rounds; 0 on bare metal). A busy host also slows what does run, so a run with"
  echo "steal measures more CPU per request than a quiet one: compare rows of one run, not runs."
  BUSY=$(stat max "%.0f" "${STEAL[*]}")
  if [[ $BUSY != n/a ]] && ((BUSY >= 10)); then
    echo
    echo "**A busy host:** up to $BUSY% of the machine's CPU time went to other guests during this run;"
    echo "its µs per request are higher than a quiet host's, and only its ratios compare with other runs."
  fi
  if [[ -n $BW_RPS ]]; then
    echo
    echo "Breakwater: $(ratio "$BW_RPS" "$NX_RPS") nginx's req/s and $(ratio "$BW_RPS" "$PG_RPS") bare Pingora's;" \
      "CPU per request $(pct "$BW_CPU" "$PG_CPU") over bare Pingora (issue 13 aims at <= +15%)" \
      "and $(ratio "$BW_CPU" "$NX_CPU") nginx's. Bare Pingora: $(ratio "$PG_RPS" "$NX_RPS") nginx's req/s," \
      "$(ratio "$PG_CPU" "$NX_CPU") its CPU per request."
    ((ROUNDS > 1)) && [[ -n $PG_CPU ]] &&
      echo "Breakwater's CPU per request ÷ bare Pingora's, paired by round: $(paired breakwater pingora)."
    [[ -n $PG_CPU ]] &&
      echo "Of that, user space: Breakwater $(ratio "${USR[breakwater]}" "${USR[pingora]}") bare Pingora's" \
        "($(diff_us "${USR[breakwater]}" "${USR[pingora]}")), the kernel's share" \
        "$(diff_us "$(awk -v a="$BW_CPU" -v b="${USR[breakwater]}" 'BEGIN{print a - b}')" \
          "$(awk -v a="$PG_CPU" -v b="${USR[pingora]}" 'BEGIN{print a - b}')")."
    feats=()
    for t in jwt-hs256 jwt-rs256 jwt-es256 ratelimit; do
      [[ -n ${CPU[breakwater-$t]:-} ]] && feats+=("$t $(diff_us "${CPU[breakwater-$t]}" "$BW_CPU") ($(pct "${CPU[breakwater-$t]}" "$BW_CPU"))")
    done
    [[ -n ${CPU[breakwater-cache-hit]:-} ]] &&
      feats+=("a cache hit costs $(ratio "${CPU[breakwater-cache-hit]}" "$PG_CPU") a bare-Pingora proxied request (issue 13 aims at <= 0.6x)")
    ((${#feats[@]})) && echo "CPU per request over plain Breakwater: $(IFS=';'; echo "${feats[*]}" | sed 's/;/; /g')."
    [[ -n ${ACCESS_LINES:-} ]] && echo "Breakwater's access log: $ACCESS_LINES lines written in its run."
    [[ -n ${CPU[breakwater-baseline]:-} ]] &&
      echo "This build against the --baseline build: CPU per request $(diff_us "$BW_CPU" "${CPU[breakwater-baseline]}") ($(pct "$BW_CPU" "${CPU[breakwater-baseline]}")), req/s $(ratio "$BW_RPS" "${RPS[breakwater-baseline]}")$( ((ROUNDS > 1)) && echo "; CPU per request paired by round: $(paired breakwater breakwater-baseline)")."
    [[ -n ${CPU[pingora-baseline]:-} ]] &&
      echo "Breakwater against bare Pingora from the --pingora-baseline build: CPU per request $(ratio "$BW_CPU" "${CPU[pingora-baseline]}") ($(pct "$BW_CPU" "${CPU[pingora-baseline]}")), req/s $(ratio "$BW_RPS" "${RPS[pingora-baseline]}")$( ((ROUNDS > 1)) && echo "; paired by round: $(paired breakwater pingora-baseline)")."
  fi
  if [[ -n ${CPU[pingora-front]:-} && -n $PG_CPU ]]; then
    echo
    echo "The connection front (whole-header deadline, server::front) in front of bare Pingora:" \
      "$(diff_us "${CPU[pingora-front]}" "$PG_CPU") ($(pct "${CPU[pingora-front]}" "$PG_CPU")) CPU per request," \
      "$(ratio "${RPS[pingora-front]}" "$PG_RPS") its req/s (\`loadtest/instructions.sh\` counts it in instructions)."
  fi
  H2_TARGETS=()
  for t in "${RUN_TARGETS[@]}"; do [[ $t == *-h2 ]] && H2_TARGETS+=("$t"); done
  if ((${#H2_TARGETS[@]})); then
    echo
    echo "### HTTP/2 over TLS (h2load)"
    echo
    echo "h2load $(h2load --version 2>&1 | awk '{print $2; exit}') \`-t1 -c$H2_CONNECTIONS -m$H2_STREAMS -D $DURATION\` (h2 by ALPN, ${H2_TLS:-TLS}, a self-signed"
    echo "P-256 certificate), after a $WARMUP warm-up, same upstream and placement as above."
    echo
    echo "| target | req/s | mean ms | errors | CPU µs/req | req/s ÷ nginx-h2 | CPU ÷ nginx-h2 | steal % |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for t in "${H2_TARGETS[@]}"; do
      echo "| $t | ${RPS[$t]} | ${P50[$t]} | ${ERRS[$t]} | ${CPU[$t]}${CPUR[$t]} | $(ratio "${RPS[$t]}" "${RPS[nginx-h2]:-}") | $(ratio "${CPU[$t]}" "${CPU[nginx-h2]:-}") | ${STEAL[$t]} |"
    done
    echo
    for t in "${H2_TARGETS[@]}"; do echo "- **$t**: $(describe "$t")"; done
    echo
    echo "errors = requests h2load finished without a 2xx status."
  fi
  if ((${#SCALE_TARGETS[@]})); then
    echo
    echo "### Scale: 1 and 2 workers on CPUs $SCALE_CPUS"
    echo
    echo "Each proxy with 1, then 2 workers (nginx: worker processes under a master; Pingora and Breakwater:"
    echo "\`threads\`), pinned to CPUs $SCALE_CPUS; wrk and the upstream are not pinned. On a 2-CPU machine the"
    echo "load generator and the upstream share those CPUs with the proxy, so the machine, not the proxy,"
    echo "caps the 2-worker figures; the CPU per request still shows the cost of the second worker."
    echo
    echo "| target | workers | req/s | p50 ms | p99 ms | errors | CPU µs/req | req/s ÷ 1 worker | steal % |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in "${SCALE_TARGETS[@]}"; do
      for w in 1 2; do
        k="$t@${w}w"
        echo "| $t | $w | ${RPS[$k]} | ${P50[$k]} | ${P99[$k]} | ${ERRS[$k]} | ${CPU[$k]}${CPUR[$k]} | $(ratio "${RPS[$k]}" "${RPS[$t@1w]}") | ${STEAL[$k]} |"
      done
    done
  fi
  if ((${#FLAMES[@]})); then
    echo
    echo "### Flamegraphs"
    echo
    echo "perf record --call-graph dwarf at $FLAME_FREQ Hz for ${FLAME_DURATION}s of a separate wrk run per"
    echo "target (same load), folded with inferno: \`results/flame-<target>.svg\` (and \`.folded\`, for"
    echo "\`inferno-diff-folded\`). Kernel frames end in \`_[k]\`. Top frames by self time:"
    echo
    folded=()
    for t in "${FLAMES[@]}"; do folded+=("$LT_DIR/results/flame-$t.folded"); done
    us=()
    for t in "${FLAMES[@]}"; do [[ ${CPU[$t]} != n/a ]] && us+=(--us "$t=${CPU[$t]}"); done
    python3 "$LT_DIR/flame_top.py" --top 12 "${us[@]}" "${folded[@]}"
    if [[ " ${FLAMES[*]} " == *" pingora "* && " ${FLAMES[*]} " == *" breakwater "* ]]; then
      inferno-diff-folded --normalize "$LT_DIR/results/flame-pingora.folded" "$LT_DIR/results/flame-breakwater.folded" |
        inferno-flamegraph --title "breakwater against bare Pingora (red: more in breakwater, normalised)" \
          >"$LT_DIR/results/flame-diff-pingora-breakwater.svg"
      echo "Differential flamegraph (Breakwater's stacks, red where it spends a larger share than bare"
      echo "Pingora): \`results/flame-diff-pingora-breakwater.svg\`."
    fi
  fi
} >"$LT_TMP/report.md"
cp "$LT_TMP/report.md" "$REPORT"
cat "$REPORT"
log "written to ${REPORT#"$LT_ROOT"/}"
