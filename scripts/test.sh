#!/usr/bin/env bash
# Runs every test: installs what is missing, starts a Redis on a free loopback port, builds,
# runs the unit and integration tests, and stops Redis again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages redis-server redis-tools redis-sentinel libhiredis-dev python3 curl

workdir=$(mktemp -d)
port=$(free_port)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$workdir" \
    --daemonize yes --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log"
cleanup() {
    if [ -f "$workdir/redis.pid" ]; then kill "$(cat "$workdir/redis.pid")" 2>/dev/null || true; fi
    rm -rf "$workdir"
}
trap cleanup EXIT
wait_for_redis "$port"
export TOKEN_GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
echo "==> test Redis on 127.0.0.1:$port"

echo "==> building (debug, with tests)"
swift build --build-tests 2>&1 | grep -v -E "_FILE_OFFSET_BITS|unhandled; explicitly declare" | tail -n 40
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }

echo "==> running tests"
set +e
swift test --skip-build "$@" 2>&1 | tee "$workdir/test.log"
status=${PIPESTATUS[0]}
set -e
# Swift Testing's closing line carries the totals; repeat it last so it is what a reader sees.
summary=$(grep -E "Test run with [0-9]+ tests?" "$workdir/test.log" | tail -n 1 || true)
[ -n "$summary" ] && echo "$summary"
exit "$status"
