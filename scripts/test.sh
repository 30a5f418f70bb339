#!/usr/bin/env bash
# Runs every test: installs what is missing, starts a Redis on a free loopback port, builds,
# runs the unit and integration tests, and stops Redis again.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

if ! command -v swift >/dev/null 2>&1; then
    echo "swift is not on the PATH: install Swift 6.1 or later (https://www.swift.org/install/linux/) and add its usr/bin to PATH" >&2
    exit 1
fi

# Everything this run makes lives in one folder, removed at the end: the test Redis, the logs and,
# through TMPDIR, every temporary folder the tests create.
workdir=$(mktemp -d)
cleanup() {
    local status=$?
    if [ -f "$workdir/redis.pid" ]; then
        local pid
        pid=$(cat "$workdir/redis.pid")
        kill "$pid" 2>/dev/null || true
        # Redis may still write into its directory while it stops: wait (at most 10 s) until it is gone.
        timeout 10 tail --pid="$pid" -f /dev/null 2>/dev/null || true
    fi
    # Anything else the tests left behind: processes whose command line names the work folder
    # (python, Chromium's profile) and processes working in it (a Redis rewrites its command line
    # but works in its --dir).
    if stop_leftovers TERM; then
        sleep 1
        stop_leftovers KILL || true
    fi
    rm -rf "$workdir" 2>/dev/null || true
    exit "$status"
}
# stop_leftovers SIGNAL: sends SIGNAL to the processes cleanup looks for, this run's only (another
# run in the same checkout keeps its own): a test process a stopped `swift test` left running, the
# gateways, Redis servers, emulators and browsers the tests started. They all inherited
# TMPDIR=$workdir, or name the work folder, or work in it. Fails when there were none.
stop_leftovers() {
    local found=1 proc pid
    pkill "-$1" -f -- "$workdir/" 2>/dev/null && found=0
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        [ "$pid" != "$$" ] || continue
        if case "$(readlink "$proc/cwd" 2>/dev/null)" in "$workdir"/*) true ;; *) false ;; esac ||
            { tr '\0' '\n' < "$proc/environ"; } 2>/dev/null | grep -qxF "TMPDIR=$workdir"; then
            kill "-$1" "$pid" 2>/dev/null && found=0
        fi
    done
    return "$found"
}
trap cleanup EXIT
export TMPDIR="$workdir"

ensure_packages redis-server redis-tools redis-sentinel libhiredis-dev python3 curl openssl procps
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

# The test Redis, on a free port: another process may take the port first, so up to five tries.
port=""
for attempt in 1 2 3 4 5; do
    candidate=$(free_port)
    rm -f "$workdir/redis.pid"
    if redis-server --port "$candidate" --bind 127.0.0.1 --save "" --appendonly no --dir "$workdir" \
        --daemonize yes --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log" &&
        wait_for_redis "$candidate" 2>/dev/null &&
        [ -s "$workdir/redis.pid" ] && kill -0 "$(cat "$workdir/redis.pid")" 2>/dev/null; then
        port=$candidate
        break
    fi
    echo "==> the test Redis did not start on 127.0.0.1:$candidate (try $attempt of 5)"
    if [ -s "$workdir/redis.pid" ]; then
        kill "$(cat "$workdir/redis.pid")" 2>/dev/null || true
        timeout 10 tail --pid="$(cat "$workdir/redis.pid")" -f /dev/null 2>/dev/null || true
    fi
done
if [ -z "$port" ]; then
    echo "==> the test Redis failed to start; its log ($workdir/redis.log):"
    tail -n 60 "$workdir/redis.log" 2>/dev/null || echo "(no log)"
    exit 1
fi
export TOKEN_GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
echo "==> test Redis on 127.0.0.1:$port"

echo "==> lint: swift format (.swift-format) and the 80-line function limit"
bash scripts/lint.sh || { echo "lint failed: run 'swift format format --in-place --recursive Sources Tests Package.swift' and split long functions"; exit 1; }

echo "==> building (debug, with tests)"
build_noise="_FILE_OFFSET_BITS|unhandled; explicitly declare"
if ! swift build --build-tests > "$workdir/build.log" 2>&1; then
    echo "==> build errors:"
    grep -E 'error:' "$workdir/build.log" | head -n 50 || true
    echo "==> the end of the build output:"
    grep -v -E "$build_noise" "$workdir/build.log" | tail -n 40 || true
    echo "build failed"
    exit 1
fi
grep -v -E "$build_noise" "$workdir/build.log" | tail -n 40 || true

# run_phase NAME MINUTES LOG [swift test arguments...]: runs one `swift test`, stopped after MINUTES,
# and reads its outcome from the runner's own lines (Swift Testing's `✔ Test … passed after`,
# `✘ Test … failed after` and the `Test run with N tests` summary). A phase fails when it runs out
# of time, when swift test fails, when it ran zero tests, when a test was skipped, or when the run
# ended without its summary line (a crash). Adds the phase's counts to `passed` and `failed`.
# The time limit is SIGINT (swift test then stops the test process it started), SIGKILL 60 s later.
passed=0
failed=0
failures=()
allow_empty=0
phase_pid=""
run_phase() {
    local name=$1 minutes=$2 log=$3
    shift 3
    echo "==> $name: swift test $* (time limit: $minutes minutes)"
    # swift test runs in the background (timeout puts it in a process group of its own, which
    # Ctrl-C does not reach: stop_phase passes it on); tail shows its output as it comes.
    : > "$log"
    local start=$SECONDS rc=0 shown
    timeout -s INT -k 60 "$((minutes * 60))" swift test --skip-build "$@" >> "$log" 2>&1 &
    phase_pid=$!
    tail -n +1 -f --pid="$phase_pid" "$log" &
    shown=$!
    wait "$phase_pid" || rc=$?
    phase_pid=""
    wait "$shown" 2>/dev/null || true
    local p f s total timed_out=0
    if [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ "$((SECONDS - start))" -ge "$((minutes * 60))" ]; }; then
        timed_out=1
    fi
    p=$( (grep -E '^✔ Test .* passed after' "$log" | grep -v -E '^✔ Test run with' || true) | wc -l)
    f=$( (grep -E '^✘ Test .* failed after' "$log" | grep -v -E '^✘ Test run with' || true) |
        sed -E 's/ failed after.*//' | sort -u | wc -l)
    # A skip line ends `skipped.` or `skipped: "reason"` (test names may contain the word).
    s=$( (grep -E '^[^ ]+ Test .* skipped(\.|: .*)$' "$log" | grep -v -E ' (started\.|passed after|failed after)' || true) | wc -l)
    total=$( (grep -E '^[^ ]+ Test run with [0-9]+ tests?' "$log" || true) | tail -n 1 |
        sed -E 's/^[^ ]+ Test run with ([0-9]+) tests?.*/\1/')
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$timed_out" = 1 ]; then
        echo "==> $name: TIMED OUT: the ${name%% *} phase timed out after $minutes minutes (exit $rc); its last 30 lines:"
        tail -n 30 "$log"
        local unfinished
        unfinished=$(comm -23 <(sed -nE '/^[^ ]+ Test run started\.$/d; s/^[^ ]+ Test (.*) started\.$/\1/p' "$log" | sort -u) \
            <(sed -nE -e 's/^[^ ]+ Test (.*) (passed|failed) after .*/\1/p' \
                -e 's/^[^ ]+ Test (.*) skipped(\.|: .*)$/\1/p' "$log" | sort -u))
        [ -z "$unfinished" ] || printf '==> %s: started but never finished:\n%s\n' "$name" "$unfinished"
        failures+=("$name timed out after $minutes minutes")
        failed=$((failed + 1))
    elif [ -z "$total" ]; then
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

# stop_phase STATUS: Ctrl-C or SIGTERM while a phase runs: pass SIGINT on to the phase's process
# group, wait (at most 40 s) for it to stop, then stop the run (cleanup runs on exit).
stop_phase() {
    if [ -n "$phase_pid" ]; then
        echo "==> interrupted: stopping swift test"
        kill -INT -- "-$phase_pid" 2>/dev/null || kill -INT "$phase_pid" 2>/dev/null || true
        timeout 40 tail --pid="$phase_pid" -f /dev/null 2>/dev/null || kill -KILL -- "-$phase_pid" 2>/dev/null || true
    fi
    exit "$1"
}
trap 'stop_phase 130' INT
trap 'stop_phase 143' TERM

# Time limits: CI allows 90 minutes for everything, the build included.
unit_minutes=20
integration_minutes=50
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
    run_phase "unit tests (in parallel)" "$unit_minutes" "$workdir/unit.log" "${filters[@]}" --skip '^Integration\.'
    run_phase "integration tests (one at a time)" "$integration_minutes" "$workdir/integration.log" --no-parallel "${filters[@]}" --skip '^Unit\.'
    if [ "$((passed + failed))" = 0 ]; then failures+=("the filter matches no test"); fi
else
    # Unit tests are pure and fast: run them in parallel. Integration tests start real gateways,
    # emulators, Redis servers and processes: one at a time keeps them independent of each other.
    run_phase "unit tests (in parallel)" "$unit_minutes" "$workdir/unit.log" --filter '^Unit\.'
    run_phase "integration tests (one at a time)" "$integration_minutes" "$workdir/integration.log" --no-parallel --filter '^Integration\.'
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
