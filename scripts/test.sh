#!/usr/bin/env bash
# Runs every test: installs what is missing, starts a Redis on a free loopback port, builds,
# runs the unit and integration tests, and stops Redis again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages redis-server redis-tools redis-sentinel libhiredis-dev python3 curl openssl
# The Python checks below come from PyPI; a Debian python3 has no pip of its own.
python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3-pip
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
    local status=$?
    if [ -f "$workdir/redis.pid" ]; then
        local pid
        pid=$(cat "$workdir/redis.pid")
        kill "$pid" 2>/dev/null || true
        # Redis may still write into its directory while it stops: wait (at most 10 s) until it is gone.
        timeout 10 tail --pid="$pid" -f /dev/null 2>/dev/null || true
    fi
    # Gateway processes the integration tests started, should a crashed test have left one behind.
    pkill -f "$PWD/.build/debug/token-gateway serve" 2>/dev/null || true
    rm -rf "$workdir" 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
wait_for_redis "$port"
export TOKEN_GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
echo "==> test Redis on 127.0.0.1:$port"

echo "==> lint: swift format (.swift-format) and the 80-line function limit"
bash scripts/lint.sh || { echo "lint failed: run 'swift format format --in-place --recursive Sources Tests Package.swift' and split long functions"; exit 1; }

echo "==> building (debug, with tests)"
swift build --build-tests 2>&1 | grep -v -E "_FILE_OFFSET_BITS|unhandled; explicitly declare" | tail -n 40
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }

# run_phase NAME LOG [swift test arguments...]: runs one `swift test` and reads its outcome from the
# runner's own lines (Swift Testing's `✔ Test … passed after`, `✘ Test … failed after` and the
# `Test run with N tests` summary). A phase fails when swift test fails, when it ran zero tests,
# when a test was skipped, or when the run ended without its summary line (a crash).
# Adds the phase's counts to `passed` and `failed`.
passed=0
failed=0
failures=()
allow_empty=0
run_phase() {
    local name=$1 log=$2
    shift 2
    echo "==> $name: swift test $*"
    swift test --skip-build "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local p f s total
    p=$( (grep -E '^✔ Test .* passed after' "$log" | grep -v -E '^✔ Test run with' || true) | wc -l)
    f=$( (grep -E '^✘ Test .* failed after' "$log" | grep -v -E '^✘ Test run with' || true) |
        sed -E 's/ failed after.*//' | sort -u | wc -l)
    # A skip line ends `skipped.` or `skipped: "reason"` (test names may contain the word).
    s=$( (grep -E '^[^ ]+ Test .* skipped(\.|: .*)$' "$log" | grep -v -E ' (started\.|passed after|failed after)' || true) | wc -l)
    total=$( (grep -E '^[^ ]+ Test run with [0-9]+ tests?' "$log" || true) | tail -n 1 |
        sed -E 's/^[^ ]+ Test run with ([0-9]+) tests?.*/\1/')
    passed=$((passed + p))
    failed=$((failed + f))
    if [ -z "$total" ]; then
        echo "==> $name: CRASHED: the test run ended without its summary line (exit $rc; a signal or a crash)"
        failures+=("$name crashed")
        [ "$f" -gt 0 ] || failed=$((failed + 1))
    elif [ "$total" = 0 ] && [ "$allow_empty" = 1 ]; then
        echo "==> $name: the filter selects none of these tests"
    elif [ "$total" = 0 ]; then
        echo "==> $name: ran zero tests: FAILED (a filter that matches nothing, or a renamed target)"
        failures+=("$name ran zero tests")
    elif [ "$s" -gt 0 ]; then
        echo "==> $name: $s test(s) skipped: FAILED (no test may be skipped)"
        failures+=("$name skipped $s")
    elif [ "$rc" != 0 ] || [ "$f" -gt 0 ]; then
        echo "==> $name: $p passed, $f failed (exit $rc)"
        failures+=("$name failed")
        [ "$f" -gt 0 ] || failed=$((failed + 1))
    elif [ "$((p + f))" != "$total" ]; then
        echo "==> $name: the runner announced $total tests but reported $p passed and $f failed: FAILED"
        failures+=("$name miscounted")
    else
        echo "==> $name: $p passed"
    fi
}

set +e
if [ $# -gt 0 ]; then
    # `scripts/test.sh <filter>...` (or `--filter <filter>`): the same two phases, narrowed to the
    # filter; integration tests still run one at a time. One phase may be left empty by the
    # filter; a filter that matches nothing at all fails.
    allow_empty=1
    filters=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --filter) filters+=(--filter "$2"); shift 2 ;;
            --filter=*) filters+=(--filter "${1#--filter=}"); shift ;;
            *) filters+=(--filter "$1"); shift ;;
        esac
    done
    run_phase "unit tests (in parallel)" "$workdir/unit.log" "${filters[@]}" --skip '^Integration\.'
    run_phase "integration tests (one at a time)" "$workdir/integration.log" --no-parallel "${filters[@]}" --skip '^Unit\.'
    if [ "$((passed + failed))" = 0 ]; then failures+=("the filter matches no test"); fi
else
    # Unit tests are pure and fast: run them in parallel. Integration tests start real gateways,
    # emulators, Redis servers and processes: one at a time keeps them independent of each other.
    run_phase "unit tests (in parallel)" "$workdir/unit.log" --filter '^Unit\.'
    run_phase "integration tests (one at a time)" "$workdir/integration.log" --no-parallel --filter '^Integration\.'
fi
set -e
status=0
if [ ${#failures[@]} -gt 0 ]; then
    status=1
    echo "==> FAILED: $(IFS=';'; echo "${failures[*]}")"
    if [ "$failed" = 0 ]; then failed=1; fi
fi
# Totals over every phase, as the last line (CI reads it).
echo "tests: $passed passed, $failed failed"
exit "$status"
