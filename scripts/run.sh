#!/usr/bin/env bash
# Runs the gateway for real on this machine: a local Redis with AOF on, the Forge emulator
# playing Atlassian's side, and the gateway, with one installation ready for curl.
#
#   scripts/run.sh                 # gateway on :8080, emulator on :8081, Redis on :6390
#   GATEWAY_PORT=9090 scripts/run.sh
#
# Local settings (a generated encryption key and caller secret) live in var/dev.env; Redis
# data in var/redis. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

GATEWAY_PORT=${GATEWAY_PORT:-8080}
EMULATOR_PORT=${EMULATOR_PORT:-8081}
REDIS_PORT=${REDIS_PORT:-6390}
CONFIG=${CONFIG:-release}

ensure_packages redis-server redis-tools libhiredis-dev python3 curl

# Release builds go to their own folder (shared with scripts/bench.sh) so they never wait on,
# or invalidate, the debug build the tests use.
SCRATCH=${SCRATCH:-.build-release}
echo "==> building token-gateway ($CONFIG; the first build takes several minutes)"
swift build -c "$CONFIG" --scratch-path "$SCRATCH" --product token-gateway 2>&1 | grep -v -E "_FILE_OFFSET_BITS|unhandled; explicitly declare" | tail -n 20
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }
bin="$(swift build -c "$CONFIG" --scratch-path "$SCRATCH" --show-bin-path)/token-gateway"

mkdir -p var/redis
if [ ! -f var/dev.env ] || ! grep -q "^TOKEN_GATEWAY_CALLERS='" var/dev.env; then
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
set -a
. var/dev.env
set +a

pids=()
started_redis=no
cleanup() {
    echo
    echo "==> stopping"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # Only a Redis this run started: one that was already there (another run's, another
    # project's) keeps running.
    if [ "$started_redis" = yes ]; then
        redis-cli -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT INT TERM

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "==> a Redis already answers on 127.0.0.1:$REDIS_PORT: using it (and leaving it running)"
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

"$bin" emulate --port "$EMULATOR_PORT" --gateway-url "http://127.0.0.1:$GATEWAY_PORT" --app-id "$TOKEN_GATEWAY_FORGE_APP_ID" &
pids+=($!)
"$bin" serve &
gateway_pid=$!
pids+=($gateway_pid)
for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/health/ready" 2>/dev/null && break
    kill -0 "$gateway_pid" 2>/dev/null || { echo "the gateway exited; see the line above"; exit 1; }
    sleep 0.1
done
wait_for_http "http://127.0.0.1:$GATEWAY_PORT/health/ready"
wait_for_http "http://127.0.0.1:$EMULATOR_PORT/admin/stats"

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
wait "${pids[@]}"
