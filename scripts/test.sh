#!/usr/bin/env bash
# Runs every test: installs what is missing, starts a Redis on a free loopback port, builds,
# runs the unit and integration tests, and stops Redis again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages redis-server redis-tools redis-sentinel libhiredis-dev python3 curl
# The status-page test drives headless Chromium with Selenium (Tests/Integration/status_page_check.py).
ensure_packages chromium chromium-driver
python3 -c 'import selenium' 2>/dev/null || python3 -m pip install --quiet 'selenium==4.48.0' ||
    python3 -m pip install --quiet --break-system-packages 'selenium==4.48.0'
# The OAuth tests drive the gateway with a stock client (authlib's OAuth2Session, from PyPI).
python3 -c 'import authlib, requests' 2>/dev/null || python3 -m pip install --quiet 'authlib==1.9.9' 'requests==2.34.2' ||
    python3 -m pip install --quiet --break-system-packages 'authlib==1.9.9' 'requests==2.34.2'
# The documentation checks (Tests/Integration/openapi_check.py) validate Docs/openapi.yaml and real answers.
docs_check_packages=('openapi-spec-validator==0.9.0' 'openapi-schema-validator==0.9.0' 'jsonschema==4.26.0' 'PyYAML==6.0.3')
python3 -c 'import openapi_spec_validator, openapi_schema_validator, jsonschema, yaml' 2>/dev/null ||
    python3 -m pip install --quiet "${docs_check_packages[@]}" ||
    python3 -m pip install --quiet --break-system-packages "${docs_check_packages[@]}"

workdir=$(mktemp -d)
port=$(free_port)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$workdir" \
    --daemonize yes --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log"
cleanup() {
    if [ -f "$workdir/redis.pid" ]; then kill "$(cat "$workdir/redis.pid")" 2>/dev/null || true; fi
    # Gateway processes the integration tests started, should a crashed test have left one behind.
    pkill -f "$PWD/.build/debug/token-gateway serve" 2>/dev/null || true
    rm -rf "$workdir"
}
trap cleanup EXIT
wait_for_redis "$port"
export TOKEN_GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
echo "==> test Redis on 127.0.0.1:$port"

echo "==> building (debug, with tests)"
swift build --build-tests 2>&1 | grep -v -E "_FILE_OFFSET_BITS|unhandled; explicitly declare" | tail -n 40
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }

set +e
status=0
if [ $# -gt 0 ]; then
    echo "==> running tests: $*"
    swift test --skip-build "$@" 2>&1 | tee "$workdir/test.log"
    status=${PIPESTATUS[0]}
else
    # Unit tests are pure and fast: run them in parallel. Integration tests start real gateways,
    # emulators, Redis servers and processes: one at a time keeps them independent of the
    # machine's load (2 cores) and their timings honest.
    echo "==> unit tests (in parallel)"
    swift test --skip-build --filter '^Unit\.' 2>&1 | tee "$workdir/unit.log"
    s1=${PIPESTATUS[0]}
    echo "==> integration tests (one at a time)"
    swift test --skip-build --no-parallel --filter '^Integration\.' 2>&1 | tee "$workdir/integration.log"
    s2=${PIPESTATUS[0]}
    cat "$workdir/unit.log" "$workdir/integration.log" > "$workdir/test.log"
    [ "$s1" = 0 ] && [ "$s2" = 0 ] || status=1
fi
set -e
# Totals over every run, as the last line.
total=$( (grep -E "Test run with [0-9]+ tests?" "$workdir/test.log" || true) | sed -E 's/.*Test run with ([0-9]+) tests?.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$( (grep -E "^✘ Test .* failed after" "$workdir/test.log" | grep -v "^✘ Test run with" || true) | sed -E 's/ failed after.*//' | sort -u | wc -l)
total=${total:-0}
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "tests: $((total - failed)) passed, $failed failed"
exit "$status"
