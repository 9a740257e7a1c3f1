#!/usr/bin/env bash
# REDbot (the HTTP linter) against a cached route: an origin sending
# `Cache-Control: public, max-age=60`, an `ETag` and a `Last-Modified`, behind Breakwater with
# `cache: {ttl: 1m}`. REDbot asks twice and sends conditional requests (If-None-Match,
# If-Modified-Since) and a Range request; its text report goes to results/redbot-latest.txt.
#
# Usage: loadtest/redbot.sh   (BUILD=0 skips the cargo build). REDbot is installed with pip
# into loadtest/.venv-redbot on first run (REDBOT_VENV=DIR uses another virtualenv).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
lt_init
lt_build

VENV="${REDBOT_VENV:-$LT_DIR/.venv-redbot}"
if [[ ! -x "$VENV/bin/redbot" ]]; then
  log "installing redbot into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q redbot
fi

# The origin: one versioned resource with validators, answering conditionals with 304.
ORIGIN_PORT="$(free_port)"
python3 - "$ORIGIN_PORT" >"$LT_TMP/origin.out" 2>&1 <<'PY' &
import sys, time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b'{"id": 1, "name": "example"}\n'
ETAG = '"v1"'
LAST_MODIFIED = formatdate(1_600_000_000, usegmt=True)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        inm = self.headers.get("If-None-Match")
        ims = self.headers.get("If-Modified-Since")
        fresh = (inm is not None and ETAG in [t.strip().removeprefix("W/") for t in inm.split(",")]) \
            or (inm is None and ims == LAST_MODIFIED)
        self.send_response(304 if fresh else 200)
        self.send_header("Cache-Control", "public, max-age=60")
        self.send_header("ETag", ETAG)
        self.send_header("Last-Modified", LAST_MODIFIED)
        self.send_header("Date", formatdate(time.time(), usegmt=True))
        if not fresh:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if not fresh:
            self.wfile.write(BODY)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
track $!
wait_http "http://127.0.0.1:$ORIGIN_PORT/"

LISTEN_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
cat >"$LT_TMP/gateway.yaml" <<EOF
server: {listen: ["127.0.0.1:$LISTEN_PORT"], threads: 1}
admin: {listen: "127.0.0.1:$ADMIN_PORT"}
access_log: false
cache: {backend: memory}
services:
  items:
    routes: [{path_prefix: /}]
    upstreams: ["127.0.0.1:$ORIGIN_PORT"]
    cache: {ttl: 1m}
EOF
"$LT_BIN/breakwater" -c "$LT_TMP/gateway.yaml" check >/dev/null
"$LT_BIN/breakwater" -c "$LT_TMP/gateway.yaml" >"$LT_TMP/gateway.out" 2>&1 &
track $!
wait_ready "http://127.0.0.1:$ADMIN_PORT/ready"

URL="http://127.0.0.1:$LISTEN_PORT/items/1"
curl -s -o /dev/null "$URL" # stored, so REDbot's requests are answered by the cache
OUT="$LT_DIR/results/redbot-latest.txt"
{
  echo "# REDbot $("$VENV/bin/pip" show redbot 2>/dev/null | sed -n 's/^Version: //p') against Breakwater's cache, $(machine_line)"
  echo "# origin: Cache-Control: public, max-age=60, ETag, Last-Modified; service cache: {ttl: 1m}"
  echo
  "$VENV/bin/redbot" -o text "$URL"
} | tee "$OUT"
log "wrote $OUT"
