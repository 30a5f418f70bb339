#!/usr/bin/env bash
# Runs the gateway for real on this machine: a local Redis with AOF on, the Forge emulator
# playing Atlassian's side, and the gateway, with one installation ready for curl.
#
#   scripts/run.sh                 # gateway on :8080, emulator on :8081, Redis on :6390
#   GATEWAY_PORT=9090 scripts/run.sh
#
# Local settings (a generated encryption key and caller secret) live in var/dev.env; Redis
# data in var/redis (moved aside when var/dev.env is made anew); the build's, the gateway's and
# the emulator's output in var/*.log. The ports must be free. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

GATEWAY_PORT=${GATEWAY_PORT:-8080}
EMULATOR_PORT=${EMULATOR_PORT:-8081}
REDIS_PORT=${REDIS_PORT:-6390}
CONFIG=${CONFIG:-release}

if ! command -v swift >/dev/null 2>&1; then
    echo "swift is not on the PATH: install Swift 6.1 or later (https://www.swift.org/install/linux/) and add its usr/bin to PATH" >&2
    exit 1
fi

ensure_packages redis-server redis-tools libhiredis-dev python3 curl

# The ports must be free (Redis's may hold a Redis, which is then used): the readiness checks below
# must not take another program's answer for ours.
require_free_port() {
    local setting=$1 port=$2 example=$3
    port_free "$port" && return 0
    echo "port $port ($setting) is in use by another program: stop it, or choose another port, e.g. $setting=$example scripts/run.sh" >&2
    exit 1
}
require_free_port GATEWAY_PORT "$GATEWAY_PORT" 9090
require_free_port EMULATOR_PORT "$EMULATOR_PORT" 9091
if ! port_free "$REDIS_PORT" && ! timeout 5 redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    echo "port $REDIS_PORT (REDIS_PORT) is in use by a program that is not a Redis: stop it, or choose another port, e.g. REDIS_PORT=6391 scripts/run.sh" >&2
    exit 1
fi

# Release builds go to their own folder (shared with scripts/bench.sh) so they never wait on,
# or invalidate, the debug build the tests use.
SCRATCH=${SCRATCH:-.build-release}
build_noise="_FILE_OFFSET_BITS|unhandled; explicitly declare"
mkdir -p var
echo "==> building token-gateway ($CONFIG; the first build takes several minutes)"
if ! swift build -c "$CONFIG" --scratch-path "$SCRATCH" --product token-gateway > var/build.log 2>&1; then
    echo "==> build errors:"
    grep -E 'error:' var/build.log | head -n 50 || true
    echo "==> the end of the build output (all of it: var/build.log):"
    grep -v -E "$build_noise" var/build.log | tail -n 40 || true
    echo "build failed"
    exit 1
fi
grep -v -E "$build_noise" var/build.log | tail -n 20 || true
bin="$(swift build -c "$CONFIG" --scratch-path "$SCRATCH" --show-bin-path)/token-gateway"

# leftover_redis_pid: prints the pid of a Redis an earlier run started on var/redis and left
# running (its pid file names it, and it works in that folder); fails when there is none.
leftover_redis_pid() {
    local pid
    pid=$(cat var/redis/redis.pid 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$PWD/var/redis" ] &&
        grep -q '^redis' "/proc/$pid/comm" 2>/dev/null || return 1
    echo "$pid"
}

if [ ! -f var/dev.env ] || ! grep -q "^TOKEN_GATEWAY_CALLERS='" var/dev.env; then
    # A new encryption key: the Redis data written under the old one could no longer be read.
    if [ -d var/redis ] && [ -n "$(ls -A var/redis)" ]; then
        if old_redis=$(leftover_redis_pid); then
            echo "==> stopping the Redis an earlier run left running on var/redis (pid $old_redis)"
            kill "$old_redis" 2>/dev/null || true
            timeout 30 tail --pid="$old_redis" -f /dev/null 2>/dev/null ||
                { echo "the Redis (pid $old_redis) did not stop; stop it and run again" >&2; exit 1; }
        fi
        aside="var/redis.old-$(date +%Y%m%d-%H%M%S)"
        mv var/redis "$aside"
        echo "==> new var/dev.env (a new encryption key): moved the Redis data of the old key to $aside"
    fi
    key=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
    secret=$(head -c 24 /dev/urandom | base64 | tr -d '\n/+=')
    umask 077
    cat > var/dev.env <<ENV
# Local development settings written by scripts/run.sh. Keep this file private.
DEV_CALLER_SECRET=$secret
TOKEN_GATEWAY_ENCRYPTION_KEYS=dev1:$key
TOKEN_GATEWAY_CALLERS='[{"name":"dev","secret":"$secret","installations":["*"],"clientKeys":["*"],"operator":true}]'
ENV
elif ! grep -q '"operator":true' var/dev.env; then
    # Settings from an earlier run: let the dev caller open the status page too.
    sed -i 's/"clientKeys":\["\*"\]}\]'"'"'$/"clientKeys":["*"],"operator":true}]'"'"'/' var/dev.env
fi
mkdir -p var/redis
set -a
. var/dev.env
set +a

pids=()
names=()
started_redis=no
# cleanup [STATUS]: stops what this run started, once (Ctrl-C, SIGTERM or any exit), and exits.
cleanup() {
    local status=${1:-$?} p deadline=$((SECONDS + 40))
    trap - EXIT INT TERM
    echo
    echo "==> stopping"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # The gateway finishes requests in flight for up to 35 s: wait at most 40 s, then SIGKILL.
    for p in "${pids[@]}"; do
        while kill -0 "$p" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then
            echo "==> pid $p did not stop within 40 s: killing it"
            kill -9 "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || true
    done
    # Only a Redis this run started (or took over from an earlier run): one that was already
    # there (another run's, another project's) keeps running.
    if [ "$started_redis" = yes ]; then
        timeout 30 redis-cli -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'cleanup 130' INT
trap 'cleanup 143' TERM

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    # A Redis an earlier run left running on var/redis, with nobody else connected: take it over.
    leftover=$(leftover_redis_pid || true)
    if [ -n "$leftover" ] &&
        [ "$(redis-cli -p "$REDIS_PORT" info server | tr -d '\r' | sed -n 's/^process_id://p')" = "$leftover" ] &&
        [ "$(redis-cli -p "$REDIS_PORT" client list | wc -l)" -le 1 ]; then
        started_redis=yes
        echo "==> the Redis on 127.0.0.1:$REDIS_PORT is one an earlier run left running: using it, and stopping it at the end"
    else
        echo "==> a Redis already answers on 127.0.0.1:$REDIS_PORT: using it (and leaving it running)"
    fi
elif old_redis=$(leftover_redis_pid); then
    # Two servers must not share var/redis.
    echo "a Redis an earlier run started (pid $old_redis) still works on var/redis, on another port than $REDIS_PORT: stop it (kill $old_redis) or set REDIS_PORT to its port" >&2
    exit 1
else
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --appendonly yes --dir "$PWD/var/redis" \
        --daemonize yes --logfile "$PWD/var/redis/redis.log" --pidfile "$PWD/var/redis/redis.pid"
    started_redis=yes
fi
wait_for_redis "$REDIS_PORT"
echo "==> Redis on 127.0.0.1:$REDIS_PORT (AOF on, data in var/redis)"

export TOKEN_GATEWAY_PORT=$GATEWAY_PORT
export TOKEN_GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export TOKEN_GATEWAY_FORGE_APP_ID="ari:cloud:ecosystem::app/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
export TOKEN_GATEWAY_FORGE_JWKS_URL="http://127.0.0.1:$EMULATOR_PORT/.well-known/jwks.json"
export TOKEN_GATEWAY_TRIGGER_HOSTS="http://127.0.0.1:$EMULATOR_PORT"
export TOKEN_GATEWAY_FORGE_GRAPHQL_URL="http://127.0.0.1:$EMULATOR_PORT/graphql"

# Both print here and into var/emulator.log and var/gateway.log (tee -i: Ctrl-C must not stop
# tee while they shut down and still write).
"$bin" emulate --port "$EMULATOR_PORT" --gateway-url "http://127.0.0.1:$GATEWAY_PORT" --app-id "$TOKEN_GATEWAY_FORGE_APP_ID" \
    > >(tee -i var/emulator.log) 2>&1 &
pids+=("$!")
names+=(emulator)
"$bin" serve > >(tee -i var/gateway.log) 2>&1 &
pids+=("$!")
names+=(gateway)

# exit_if_one_exited WHEN: when a process this run started has exited, says which (with the end of
# its log) and exits (cleanup stops the others).
exit_if_one_exited() {
    local i gone=no
    for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null && continue
        gone=yes
        sleep 0.2
        echo "==> the ${names[$i]} (pid ${pids[$i]}) exited $1; the end of var/${names[$i]}.log:"
        tail -n 30 "var/${names[$i]}.log"
    done
    [ "$gone" = no ] || exit 1
}

# Ready when both answer, asked only while both processes this run started still run (their ports
# were free before), so that no other program's answer counts. At most 60 s.
ready=no
for _ in $(seq 1 600); do
    exit_if_one_exited "during startup"
    if curl -fsS -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/health/ready" 2>/dev/null &&
        curl -fsS -o /dev/null "http://127.0.0.1:$EMULATOR_PORT/admin/stats" 2>/dev/null; then
        ready=yes
        break
    fi
    sleep 0.1
done
if [ "$ready" != yes ]; then
    echo "the gateway or the emulator did not become ready within 60 s; see var/gateway.log and var/emulator.log" >&2
    exit 1
fi

installation=$(curl -fsS -X POST "http://127.0.0.1:$EMULATOR_PORT/admin/installations" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
short=${installation##*/}

cat <<MSG

==> ready. The emulator installed $installation
    (lifecycle + registration: the gateway issued it an Ed25519 trigger key and stored the system
    token Forge sends with them).

Fetch a token (from the cache: the one delivered at install), then force a fresh one (one signed
trigger round trip):

  source var/dev.env
  curl -s -H "Authorization: Bearer \$DEV_CALLER_SECRET" http://127.0.0.1:$GATEWAY_PORT/v1/installations/$short/token
  curl -s -X POST -H "Authorization: Bearer \$DEV_CALLER_SECRET" http://127.0.0.1:$GATEWAY_PORT/v1/installations/$short/token/refresh

More:
  curl -s -H "Authorization: Bearer \$DEV_CALLER_SECRET" http://127.0.0.1:$GATEWAY_PORT/v1/installations
  curl -s -H "Authorization: Bearer \$DEV_CALLER_SECRET" "http://127.0.0.1:$GATEWAY_PORT/v1/installations/$short/token?asUser=5b10ac8d82e05b22cc7d4ef5"
  curl -s -X POST http://127.0.0.1:$EMULATOR_PORT/admin/installations      # another installation
  curl -s -X POST -d '{"path":"/forge/lifecycle","body":{}}' http://127.0.0.1:$EMULATOR_PORT/admin/installations/$short/ui-invoke   # a UI module's FIT: 403
  curl -s -X POST http://127.0.0.1:$EMULATOR_PORT/admin/installations/$short/upgrade     # avi:forge:upgraded:app, then registers again
  curl -s -X POST http://127.0.0.1:$EMULATOR_PORT/admin/installations/$short/uninstall   # preUninstall → POST /forge/pre-uninstall
  curl -s http://127.0.0.1:$GATEWAY_PORT/metrics | grep token_gateway_

The status page: http://127.0.0.1:$GATEWAY_PORT/status (user "dev", password: \$DEV_CALLER_SECRET from var/dev.env)

Ctrl-C stops the gateway, the emulator and Redis.
MSG
# Until Ctrl-C (cleanup), or until the gateway or the emulator exits on its own: then stop the
# other. (Checked every second rather than with `wait -n`, which misses a child that died of a
# signal before it was called.)
while :; do
    exit_if_one_exited "on its own"
    sleep 1
done
