#!/usr/bin/env bash
# Instructions (or heap allocations, or system calls) per proxied request, counted by valgrind
# (or strace): deterministic where wall-clock CPU on a shared machine is not, so that steps of a
# few percent show.
#
#   loadtest/instructions.sh [--requests 10000] [--warmup 500] [--connections 16]
#                            [--only pingora,pingora-front,breakwater,...]
#                            [--tool callgrind|cachegrind|atomics|dhat|strace] [--annotate 25] [--list]
#
# Each target runs twice under valgrind (callgrind: instructions; dhat: heap blocks) or strace
# (`-f -c`: system calls of every thread, which callgrind does not see: the kernel's share of a
# request's CPU), each run started afresh: h2load --h1 sends WARMUP requests, then
# --connections more (the pool of upstream connections is warm, connection set-up is counted
# alike), and in the second run REQUESTS more besides. (count of run 2 - count of run 1) /
# REQUESTS is the cost of one keep-alive request, start-up, shutdown and connection set-up
# cancelled out.
# --tool cachegrind runs callgrind with its cache simulation, sized as this machine's caches
# (32 KiB 8-way level-1 instructions, 48 KiB 12-way level-1 data, 2 MiB 16-way level 2 as the
# last level): level-1 instruction and data misses and level-2 misses per request, beside the
# instructions. Instructions alone do not say what the wall clock sees: a hot path larger than
# the instruction cache refetches its code on every request (loadtest/README.md). No hardware
# counters here, so this simulation is the deterministic view of it. --annotate N writes the
# top N functions by level-1 instruction misses per request to results/icache-<target>.txt.
# --tool atomics counts the atomic read-modify-write instructions executed (lock-prefixed, xchg
# with memory, mfence: reference counts, locks, channels, timers), from callgrind's count per
# instruction and objdump (loadtest/atomics.py; needs python3 and binutils). Callgrind counts each
# as one instruction, yet each waits for the core's stores to drain, some 4 ns on a busy core:
# a cost that instruction counts hide. --annotate N writes the top N functions by them per
# request to results/atomics-<target>.txt. The same run counts the clock reads (calls to
# clock_gettime, another cost callgrind does not see: natively some 20 ns each), by caller in
# results/clocks-<target>.txt.
# --tool dhat builds with `--features heap-profiling` (the system allocator, which dhat sees;
# mimalloc hides the allocations) and restores the normal build afterwards (with BUILD=0 it
# takes the binaries in LT_BIN, default target/release, to be such a build).
# --annotate N writes the top N functions by self instructions per request (inlined code counts
# where it was inlined; the difference of the two runs' callgrind_annotate, divided by REQUESTS)
# per target to results/instructions-<target>.txt (0: none). With --tool strace, the system
# calls per request by name go to results/syscalls-<target>.txt. strace slows every call, so
# where a count depends on timing (how often a read finds no data yet and the thread waits in
# epoll) it is the count of a slowed process: compare targets within one run.
# Upstream: nginx `return 200` (as bench.sh), or sample-service. Loopback only, ephemeral ports;
# everything started is stopped on exit. Writes results/instructions-latest.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ALL_TARGETS=(pingora pingora-unwatched pingora-front breakwater breakwater-no-log breakwater-no-security-headers
  breakwater-preserve-case)
REQUESTS=10000 WARMUP=500 CONNECTIONS=16 ONLY="" TOOL=callgrind ANNOTATE=25
while (($#)); do
  case $1 in
    --requests) REQUESTS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    --tool) TOOL=$2; shift 2 ;;
    --annotate) ANNOTATE=$2; shift 2 ;;
    --list) printf '%s\n' "${ALL_TARGETS[@]}"; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $TOOL == callgrind || $TOOL == cachegrind || $TOOL == atomics || $TOOL == dhat || $TOOL == strace ]] ||
  die "--tool callgrind|cachegrind|atomics|dhat|strace"
[[ $REQUESTS =~ ^[1-9][0-9]*$ && $WARMUP =~ ^[0-9]+$ && $CONNECTIONS =~ ^[1-9][0-9]*$ ]] ||
  die "--requests, --warmup and --connections take numbers"
if [[ -n $ONLY ]]; then
  for t in ${ONLY//,/ }; do [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target $t (see --list)"; done
fi
selected() { [[ -z $ONLY || $ONLY == *",$1,"* ]]; }
if [[ $TOOL == strace ]]; then
  command -v strace >/dev/null || die "strace is not installed (apt-get install -y strace)"
else
  command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install -y valgrind)"
fi
if [[ $TOOL == atomics ]]; then
  command -v python3 >/dev/null || die "python3 is not installed (apt-get install -y python3)"
  command -v objdump >/dev/null || die "objdump is not installed (apt-get install -y binutils)"
fi
command -v h2load >/dev/null || die "h2load is not installed (apt-get install -y nghttp2-client)"

lt_init
BIN="$LT_BIN"
if [[ $TOOL == dhat && ${BUILD:-1} == 0 ]]; then
  log "BUILD=0: taking $LT_BIN to be a heap-profiling build"
  lt_build examples
elif [[ $TOOL == dhat ]]; then
  # The heap-profiling build replaces the binaries in target/release: copy it aside, then
  # put the normal build back (cargo keeps both in deps/, so that is a relink at most).
  log "cargo build --release --bins --examples --features heap-profiling"
  (cd "$LT_ROOT" && cargo build --release --bins --examples --features heap-profiling --quiet) ||
    die "build failed"
  BIN="$LT_TMP/bin"
  mkdir -p "$BIN/examples"
  cp "$LT_BIN/breakwater" "$LT_BIN/sample-service" "$BIN/"
  cp "$LT_BIN/examples/bare_pingora" "$BIN/examples/"
  (cd "$LT_ROOT" && cargo build --release --bins --examples --quiet) || die "build failed"
else
  lt_build examples
fi

start_json_upstream

# h2load_n URL N: N keep-alive HTTP/1.1 requests over CONNECTIONS connections; all must be 2xx.
h2load_n() {
  local out
  out=$(h2load --h1 -n "$2" -c "$CONNECTIONS" -m 1 "$1" 2>&1) || die "h2load failed: $out"
  [[ $out == *"$2 succeeded"* && $out == *"status codes: $2 2xx"* ]] ||
    die "h2load: not all $2 requests succeeded: $(grep -E 'requests:|status codes' <<<"$out")"
}

# run TARGET EXTRA: one valgrind run of TARGET with WARMUP + CONNECTIONS + EXTRA requests; prints
# the count (instructions or heap blocks) of the whole process.
run() {
  local name=$1 extra=$2 dir="$LT_TMP/$1-$2" port admin url ready pid out vg
  mkdir -p "$dir"
  port=$(free_port)
  url="http://127.0.0.1:$port/users/1"
  if [[ $TOOL == callgrind || $TOOL == cachegrind || $TOOL == atomics ]]; then
    out="$dir/callgrind.out"
    vg=(valgrind --tool=callgrind --callgrind-out-file="$out" --log-file="$dir/valgrind.log")
    [[ $TOOL == cachegrind ]] &&
      vg+=(--cache-sim=yes --I1=32768,8,64 --D1=49152,12,64 --LL=2097152,16,64)
    [[ $TOOL == atomics ]] && vg+=(--dump-instr=yes)
  elif [[ $TOOL == dhat ]]; then
    out="$dir/dhat.out"
    vg=(valgrind --tool=dhat --dhat-out-file="$out" --log-file="$dir/valgrind.log")
  else
    out="$dir/strace.out"
    vg=(strace -f -c -U name,calls -o "$out")
  fi
  case $name in
    pingora|pingora-front|pingora-unwatched)
      local front=0 unwatched=0
      [[ $name == pingora-front ]] && front=1
      [[ $name == pingora-unwatched ]] && unwatched=1
      BARE_FRONT=$front BARE_UNWATCHED=$unwatched "${vg[@]}" "$BIN/examples/bare_pingora" "127.0.0.1:$port" "$UPSTREAM" 1 \
        >"$dir/stdout" 2>"$dir/stderr" &
      pid=$!
      ready=$url
      ;;
    breakwater*)
      admin=$(free_port)
      breakwater_conf "$dir/breakwater.yaml" "$port" "$admin" "$UPSTREAM" 1
      # Health checks are background work paced by the clock, and valgrind slows the process
      # some 50 times: at the bench's 5 s they would add a varying share to each request.
      sed -i 's/interval: 5s/interval: 1h/' "$dir/breakwater.yaml"
      # The rows that say what one default costs: the bench's config less it (or, for the
      # header name case, with the other setting).
      case $name in
        breakwater-no-log) sed -i 's/^access_log: true$/access_log: false/' "$dir/breakwater.yaml" ;;
        breakwater-no-security-headers)
          sed -i 's/^access_log: true$/&\nsecurity_headers: {enabled: false}/' "$dir/breakwater.yaml" ;;
        breakwater-preserve-case)
          sed -i 's/^  threads: 1$/&\n  header_name_case: preserve/' "$dir/breakwater.yaml" ;;
      esac
      # A config that no longer reads as expected must not pass for the bench's own.
      case $name in
        breakwater-no-log) grep -q '^access_log: false$' "$dir/breakwater.yaml" ;;
        breakwater-no-security-headers) grep -q '^security_headers: {enabled: false}$' "$dir/breakwater.yaml" ;;
        breakwater-preserve-case) grep -q '^  header_name_case: preserve$' "$dir/breakwater.yaml" ;;
      esac || die "$name: could not derive its config from the bench's (see breakwater_conf in lib.sh)"
      "${vg[@]}" "$BIN/breakwater" -c "$dir/breakwater.yaml" >"$dir/access.log" 2>"$dir/stderr" &
      pid=$!
      ready="http://127.0.0.1:$admin/ready"
      ;;
  esac
  track "$pid"
  # The caller reads run's output through $(...), a subshell whose exit the script's cleanup
  # does not see: if anything below fails, the subshell stops the process itself.
  trap "kill -KILL $pid 2>/dev/null" EXIT
  wait_ready "$ready" 120
  ((WARMUP > 0)) && h2load_n "$url" "$WARMUP"
  h2load_n "$url" $((CONNECTIONS + extra))
  # SIGINT: Pingora's fast shutdown; valgrind writes its output as the process exits. strace
  # runs the process as its child and passes no signal on: the child gets it.
  local target=$pid
  [[ $TOOL == strace ]] && target=$(pgrep -P "$pid" | head -1)
  kill -INT "$target"
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && die "$name did not exit within 60 s of SIGINT"
  wait "$pid" 2>/dev/null || true
  untrack "$pid"
  trap - EXIT
  if [[ $TOOL == atomics ]]; then
    [[ -s $out ]] || die "$name: no callgrind output (see $dir/valgrind.log)"
    python3 "$LT_DIR/atomics.py" "$out" --functions "$LT_TMP/atomics-$name-$extra.txt" \
      --cache "$LT_TMP/atomic-addresses" --clocks "$LT_TMP/clocks-$name-$extra.txt" |
      grep -E '^[0-9]+ [0-9]+$' || die "$name: atomics.py failed on $out"
  elif [[ $TOOL == callgrind || $TOOL == cachegrind ]]; then
    [[ -s $out ]] || die "$name: no callgrind output (see $dir/valgrind.log)"
    local sort=()
    if [[ $TOOL == callgrind ]]; then
      awk '/^(summary|totals):/ {print $2; exit}' "$out"
    else
      # `events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw` and the totals in that order: print
      # instructions, level-1 instruction misses, level-1 data misses, last-level misses.
      awk '/^events:/ {for (i = 2; i <= NF; i++) col[$i] = i - 1}
        /^(summary|totals):/ {
          printf "%s %s %s %s\n", $(col["Ir"] + 1), $(col["I1mr"] + 1),
            $(col["D1mr"] + 1) + $(col["D1mw"] + 1),
            $(col["ILmr"] + 1) + $(col["DLmr"] + 1) + $(col["DLmw"] + 1); exit}' "$out" |
        grep -E '^[0-9]+ [0-9]+ [0-9]+ [0-9]+$' || die "$name: no cache counts in $out"
      sort=(--show=I1mr --sort=I1mr)
    fi
    if ((ANNOTATE > 0)); then
      callgrind_annotate --auto=no --inclusive=no --threshold=100 "${sort[@]}" "$out" \
        >"$LT_TMP/annotate-$name-$extra.txt" 2>/dev/null
    fi
  elif [[ $TOOL == strace ]]; then
    [[ -s $out ]] || die "$name: no strace output"
    # Lines `name calls` between two dashed rules, then `total calls`.
    awk '$1 == "total" {print $2; exit}' "$out" | grep . || die "$name: no strace total in $out"
    awk 'NF == 2 && $1 != "total" && $2 ~ /^[0-9]+$/ {print $1, $2}' "$out" >"$LT_TMP/syscalls-$name-$extra.txt"
  else
    # dhat's summary line: "Total:     1,234 bytes in 56 blocks".
    sed -n 's/.*Total: *[0-9,]* bytes in \([0-9,]*\) blocks.*/\1/p' "$dir/valgrind.log" | tr -d , |
      head -1 | grep . || die "$name: no dhat total (see $dir/valgrind.log)"
  fi
}

declare -A PER
TARGETS=()
for t in "${ALL_TARGETS[@]}"; do
  selected "$t" || continue
  TARGETS+=("$t")
  log "$t: $TOOL, $WARMUP + $CONNECTIONS requests"
  base=$(run "$t" 0)
  log "$t: $TOOL, $WARMUP + $CONNECTIONS + $REQUESTS requests"
  more=$(run "$t" "$REQUESTS")
  # Per request, each count of the run (cachegrind's are four: instructions, L1i misses, L1d
  # misses, last-level misses).
  PER[$t]=$(awk -v a="$base" -v b="$more" -v n="$REQUESTS" -v f="$([[ $TOOL == strace || $TOOL == atomics ]] && echo %.2f || echo %.1f)" \
    'BEGIN{k = split(a, x, " "); split(b, y, " "); for (i = 1; i <= k; i++) printf (i > 1 ? " " : "") f, (y[i] - x[i]) / n}')
  if [[ $TOOL == strace ]]; then
    # Per request by name: (calls in the longer run - calls in the shorter) / REQUESTS.
    awk -v n="$REQUESTS" 'FNR == NR {a[$1] = $2; next} {d = ($2 - a[$1]) / n; if (d >= 0.005 || d <= -0.005) printf "%-24s %8.2f\n", $1, d}' \
      "$LT_TMP/syscalls-$t-0.txt" "$LT_TMP/syscalls-$t-$REQUESTS.txt" | sort -k2 -rn >"$LT_DIR/results/syscalls-$t.txt"
  fi
  if [[ $TOOL == atomics ]] && ((ANNOTATE > 0)); then
    # Per request by function: (count in the longer run - count in the shorter) / REQUESTS.
    awk -F'\t' -v n="$REQUESTS" 'FNR == NR {a[$2] = $1; next}
      {d = ($1 - a[$2]) / n; if (d >= 0.05) printf "%8.2f  %s\n", d, $2}' \
      "$LT_TMP/atomics-$t-0.txt" "$LT_TMP/atomics-$t-$REQUESTS.txt" | sort -rn | head -n "$ANNOTATE" \
      >"$LT_DIR/results/atomics-$t.txt"
    awk -F'\t' -v n="$REQUESTS" 'FNR == NR {a[$2] = $1; next}
      {d = ($1 - a[$2]) / n; if (d >= 0.05) printf "%8.2f  %s\n", d, $2}' \
      "$LT_TMP/clocks-$t-0.txt" "$LT_TMP/clocks-$t-$REQUESTS.txt" | sort -rn >"$LT_DIR/results/clocks-$t.txt"
  fi
  if [[ $TOOL == callgrind || $TOOL == cachegrind ]] && ((ANNOTATE > 0)); then
    listing="$LT_DIR/results/instructions-$t.txt"
    [[ $TOOL == cachegrind ]] && listing="$LT_DIR/results/icache-$t.txt"
    python3 "$LT_DIR/callgrind_diff.py" --top "$ANNOTATE" --unit "$([[ $TOOL == cachegrind ]] &&
      echo 'level-1 instruction misses' || echo instructions)" "$LT_TMP/annotate-$t-0.txt" \
      "$LT_TMP/annotate-$t-$REQUESTS.txt" "$REQUESTS" >"$listing"
  fi
  log "$t: $base -> $more: ${PER[$t]} per request"
done

UNIT="instructions (Ir)"
[[ $TOOL == dhat ]] && UNIT="heap allocations (blocks)"
[[ $TOOL == strace ]] && UNIT="system calls"
[[ $TOOL == cachegrind ]] && UNIT="cache misses (simulated)"
[[ $TOOL == atomics ]] && UNIT="atomic read-modify-write instructions and clock reads"
REV="$(git -C "$LT_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$LT_ROOT" status --porcelain -- src Cargo.toml Cargo.lock examples patches 2>/dev/null)" ]] &&
  REV+=" (with uncommitted changes)"
REPORT="$LT_DIR/results/instructions-latest.md"
[[ $TOOL == dhat ]] && REPORT="$LT_DIR/results/allocations-latest.md"
[[ $TOOL == strace ]] && REPORT="$LT_DIR/results/syscalls-latest.md"
[[ $TOOL == cachegrind ]] && REPORT="$LT_DIR/results/icache-latest.md"
[[ $TOOL == atomics ]] && REPORT="$LT_DIR/results/atomics-latest.md"
{
  echo "## $UNIT per request"
  echo
  echo "- machine: $(machine_line)"
  echo "- tree: $REV, $( [[ $TOOL == dhat ]] && echo 'release build with the system allocator (heap-profiling)' || build_desc)"
  if [[ $TOOL == strace ]]; then echo -n "- strace -f -c (every thread)"
  elif [[ $TOOL == cachegrind ]]; then echo -n "- valgrind --tool=callgrind --cache-sim=yes (L1i 32 KiB 8-way, L1d 48 KiB 12-way, last level 2 MiB 16-way, 64-byte lines)"
  elif [[ $TOOL == atomics ]]; then echo -n "- valgrind --tool=callgrind --dump-instr=yes; atomic instructions (lock prefix, xchg with memory, mfence) found by objdump (loadtest/atomics.py)"
  else echo -n "- valgrind --tool=$TOOL"; fi
  echo "; h2load --h1 -c$CONNECTIONS, $WARMUP warm-up requests; per request = (run with $REQUESTS more requests - run without) / $REQUESTS"
  echo "- upstream: $UPSTREAM_DESC; GET /users/1, keep-alive; 1 worker thread"
  echo
  if [[ $TOOL == cachegrind ]]; then
    echo "| target | instructions | L1i misses | L1d misses | last-level misses | estimated cycles | instructions ÷ pingora | L1i misses ÷ pingora | estimated cycles ÷ pingora |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in "${TARGETS[@]}"; do
      awk -v t="$t" -v a="${PER[$t]}" -v b="${PER[pingora]:-}" 'BEGIN{
        split(a, x, " "); split(b, y, " ");
        c = x[1] + 10 * (x[2] + x[3]) + 100 * x[4]; cb = y[1] + 10 * (y[2] + y[3]) + 100 * y[4];
        r1 = y[1] > 0 ? sprintf("%.3fx", x[1] / y[1]) : "n/a";
        r2 = y[2] > 0 ? sprintf("%.3fx", x[2] / y[2]) : "n/a";
        r3 = cb > 0 ? sprintf("%.3fx", c / cb) : "n/a";
        printf "| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %s | %s | %s |\n", t, x[1], x[2], x[3], x[4], c, r1, r2, r3}'
    done
    echo
    echo "Estimated cycles: instructions + 10 x level-1 misses + 100 x last-level misses, KCachegrind's"
    echo "estimate (branch mispredictions not simulated). The simulation sees only this process: the"
    echo "upstream and the load generator sharing the CPU's caches are not in it."
  elif [[ $TOOL == atomics ]]; then
    echo "| target | atomic RMW per request | ÷ pingora | clock reads per request | ÷ pingora |"
    echo "|---|---:|---:|---:|---:|"
    for t in "${TARGETS[@]}"; do
      awk -v t="$t" -v a="${PER[$t]}" -v b="${PER[pingora]:-}" 'BEGIN{
        split(a, x, " "); split(b, y, " ");
        r1 = y[1] > 0 ? sprintf("%.3fx", x[1] / y[1]) : "n/a";
        r2 = y[2] > 0 ? sprintf("%.3fx", x[2] / y[2]) : "n/a";
        printf "| %s | %.1f | %s | %.2f | %s |\n", t, x[1], r1, x[2], r2}'
    done
    echo
    echo "Clock reads: calls to \`clock_gettime\` (std's \`Instant::now\` and \`SystemTime::now\`, and the"
    echo "coarse clocks); by caller in results/clocks-<target>.txt. Under valgrind each is a system"
    echo "call that callgrind does not count; natively a precise one reads the timestamp counter (about"
    echo "20 ns on the Intel Xeon host), a coarse one (\`CLOCK_MONOTONIC_COARSE\`) a shared page (4 ns)."
  else
    echo "| target | $UNIT per request | ÷ pingora |"
    echo "|---|---:|---:|"
    for t in "${TARGETS[@]}"; do
      r=$(awk -v a="${PER[$t]}" -v b="${PER[pingora]:-}" 'BEGIN{ if (b+0 > 0) printf "%.3fx", a / b; else print "n/a" }')
      echo "| $t | ${PER[$t]} | $r |"
    done
  fi
  echo
  echo "- **pingora**: examples/bare_pingora.rs (only \`upstream_peer\`)"
  echo "- **pingora-unwatched**: the same with \`BARE_UNWATCHED=1\`: pooled upstream connections checked when taken instead of watched by a task each while idle (the pingora-core patch Breakwater turns on)"
  echo "- **pingora-front**: the same behind Breakwater's connection front (server::front: whole-header deadline, idle wait without a buffer after 100 ms, connection count, and the request future awaited in place instead of boxed per request: the pingora-proxy patch)"
  echo "- **breakwater**: the bench's config: routing (2 services), breaker, health checks (every hour here, not 5 s: valgrind's slowdown would make them a varying share of each request), metrics, JSON access log"
  echo "- **breakwater-no-log**, **breakwater-no-security-headers**: the same with \`access_log: false\`, or with \`security_headers: {enabled: false}\` (the four headers added to and the two removed from every answer): the difference to **breakwater** is what that default costs"
  echo "- **breakwater-preserve-case**: the same with \`server.header_name_case: preserve\` (each header name kept as sent, in a second map, instead of normalized)"
} >"$LT_TMP/report.md"
cp "$LT_TMP/report.md" "$REPORT"
cat "$REPORT"
log "written to ${REPORT#"$LT_ROOT"/}"
