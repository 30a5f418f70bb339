#!/usr/bin/env bash
# The performance benchmarks of issue #7, in one command (README "Performance" explains them).
#
#   scripts/bench.sh               micro-benchmarks (Benchmarks/ package) + load benchmarks
#   scripts/bench.sh --load-only   skip the micro-benchmarks
#   scripts/bench.sh --micro-only  skip the load benchmarks
#   scripts/bench.sh --cluster-only only the Redis Cluster comparison: cached and cold path against a
#                                   6-node Redis Cluster vs against one Redis, same run
#   scripts/bench.sh --hot-only    only the hot-path table: nginx, GET /health/live and the cached
#                                   GET …/token under wrk in one run, ratios, p50/p99
#
# Load benchmarks: a release build of token-gateway with its own Redis, the Forge emulator and
# the gateway on free loopback ports; wrk against the cached GET …/token and against nginx
# serving a static file of the same size, in the same run; the cold path (installations x
# concurrent callers); resident memory with N tokens cached; time to ready. Everything listens
# on 127.0.0.1 only, every loop is bounded, and everything started here is stopped on exit.
#
# Settings (environment): BENCH_DURATION (wrk seconds, 10), BENCH_CONNECTIONS (64),
# BENCH_COLD_INSTALLATIONS (100), BENCH_COLD_CALLERS (10), BENCH_MEMORY_INSTALLATIONS (100000),
# BENCH_TOKEN_BYTES (1500), BENCH_MEMORY_SECONDS (600, a deadline for making the installations),
# BENCH_NGINX_WORKERS (2), BENCH_CLUSTER (1: also run the Redis Cluster comparison at the end),
# BENCH_BIN (a token-gateway binary to use instead of building the release one), BENCH_THREADS
# (wrk threads, 1), BENCH_LOG_LEVEL (the gateway's log level, info: audit records are written as
# in production), BENCH_STRACE (1: also count the gateway's system calls per cached answer),
# BENCH_PERF (1: also print where the gateway's CPU goes on the cached path, from perf samples),
# BENCH_AFFINITY (pinned, the default: the gateway runs with TOKEN_GATEWAY_EVENT_LOOP_AFFINITY=pinned and
# nginx with worker_cpu_affinity auto, so both keep each event loop / worker on one CPU; shared: both
# leave their threads to the scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/lib.sh

RUN_MICRO=1
RUN_LOAD=1
RUN_CLUSTER=${BENCH_CLUSTER:-1}
CLUSTER_ONLY=0
HOT_ONLY=0
case "${1:-}" in
    --load-only) RUN_MICRO=0 ;;
    --micro-only) RUN_LOAD=0 ;;
    --cluster-only) RUN_MICRO=0; CLUSTER_ONLY=1; RUN_CLUSTER=1 ;;
    --hot-only) RUN_MICRO=0; HOT_ONLY=1; RUN_CLUSTER=0 ;;
    "") ;;
    *) echo "usage: scripts/bench.sh [--load-only | --micro-only | --cluster-only | --hot-only]" >&2; exit 2 ;;
esac

DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
COLD_INSTALLATIONS=${BENCH_COLD_INSTALLATIONS:-100}
COLD_CALLERS=${BENCH_COLD_CALLERS:-10}
MEMORY_INSTALLATIONS=${BENCH_MEMORY_INSTALLATIONS:-100000}
TOKEN_BYTES=${BENCH_TOKEN_BYTES:-1500}
MEMORY_SECONDS=${BENCH_MEMORY_SECONDS:-600}
NGINX_WORKERS=${BENCH_NGINX_WORKERS:-2}
THREADS=${BENCH_THREADS:-1}
AFFINITY=${BENCH_AFFINITY:-pinned}
case "$AFFINITY" in
    shared) NGINX_AFFINITY="" ;;
    pinned) NGINX_AFFINITY="worker_cpu_affinity auto;" ;;
    *) echo "BENCH_AFFINITY must be shared or pinned" >&2; exit 2 ;;
esac

ensure_packages wrk nginx redis-server redis-tools libhiredis-dev python3 curl
DRIVER="python3 $ROOT/Benchmarks/load_driver.py"
quiet_build() { # drops SwiftPM's progress lines and two known harmless warnings
    grep -v -E "_FILE_OFFSET_BITS|unhandled; explicitly declare|^(Fetching|Fetched|Computing|Computed|Creating working copy|Working copy|Building for|Build of product|Build complete)|^\[[0-9]+/[0-9]+\]|^ +/" || true
}

if [ "$RUN_MICRO" = 1 ]; then
    echo "==> micro-benchmarks (Benchmarks/ package, release build in .build-bench; the first build takes a while)"
    swift package --package-path Benchmarks --scratch-path "$ROOT/.build-bench" benchmark --no-progress 2>&1 | quiet_build
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "micro-benchmarks failed"; exit 1; }
fi
[ "$RUN_LOAD" = 1 ] || exit 0

if [ -n "${BENCH_BIN:-}" ]; then
    BIN=$BENCH_BIN
else
    echo "==> building token-gateway (release, .build-release)"
    swift build -c release --scratch-path "$ROOT/.build-release" --product token-gateway 2>&1 | quiet_build | tail -n 20
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }
    BIN="$ROOT/.build-release/release/token-gateway"
fi

WORK=$(mktemp -d /tmp/token-gateway-bench.XXXXXX)
chmod 755 "$WORK"
pids=()
REDIS_PORT=$(free_port)
cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
    for p in ${CLUSTER_PORTS:-}; do redis-cli -h 127.0.0.1 -p "$p" shutdown nosave >/dev/null 2>&1; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# cluster_vs_one_redis: an emulator and a gateway per Redis (one Redis, then a 6-node Redis Cluster: 3
# primaries, 1 replica each); for each, the cached GET (wrk, BENCH_DURATION) and the cold path (sequential).
cluster_vs_one_redis() {
    local cluster_ports=() port nodes=() lines=()
    for _ in 1 2 3 4 5 6; do
        port=$(free_port)
        CLUSTER_PORTS="${CLUSTER_PORTS:-} $port" # for cleanup, even if a later step fails
        mkdir -p "$WORK/cluster-$port"
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
            --cluster-enabled yes --cluster-port "$(free_port)" --cluster-node-timeout 1000 --dir "$WORK/cluster-$port" \
            --logfile "$WORK/cluster-$port/redis.log" --pidfile "$WORK/cluster-$port/redis.pid"
        wait_for_redis "$port"
        cluster_ports+=("$port")
        nodes+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$WORK/cluster-create.log" 2>&1
    for _ in $(seq 1 300); do
        redis-cli -p "${cluster_ports[0]}" cluster info 2>/dev/null | grep -q "cluster_state:ok" && break
        sleep 0.1
    done
    local name url gw_port em_port gw_pid installation token_url
    for name in one-redis cluster; do
        if [ "$name" = cluster ]; then
            url="redis-cluster://127.0.0.1:${cluster_ports[0]},127.0.0.1:${cluster_ports[1]}"
        else
            url="redis://127.0.0.1:$REDIS_PORT/0"
        fi
        gw_port=$(free_port)
        em_port=$(free_port)
        TOKEN_GATEWAY_PORT=$gw_port TOKEN_GATEWAY_REDIS_URL=$url \
            TOKEN_GATEWAY_FORGE_JWKS_URL="http://127.0.0.1:$em_port/.well-known/jwks.json" \
            TOKEN_GATEWAY_TRIGGER_HOSTS="http://127.0.0.1:$em_port" \
            TOKEN_GATEWAY_FORGE_GRAPHQL_URL="http://127.0.0.1:$em_port/graphql" \
            "$BIN" serve 2>"$WORK/gateway-$name.log" &
        gw_pid=$!
        pids+=($gw_pid)
        "$BIN" emulate --no-install-tokens --port "$em_port" --gateway-url "http://127.0.0.1:$gw_port" \
            --app-id "$TOKEN_GATEWAY_FORGE_APP_ID" --log-level warning 2>"$WORK/emulator-$name.log" &
        pids+=($!)
        wait_for_http "http://127.0.0.1:$gw_port/health/ready"
        wait_for_http "http://127.0.0.1:$em_port/admin/stats"
        installation=$(curl -fsS -X POST "http://127.0.0.1:$em_port/admin/installations" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        token_url="http://127.0.0.1:$gw_port/v1/installations/${installation##*/}/token"
        curl -fsS -o /dev/null -H "Authorization: Bearer $SECRET" "$token_url"
        wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Authorization: Bearer $SECRET" "$token_url" \
            >"$WORK/wrk-$name.txt"
        lines+=("$name $($DRIVER wrk "$WORK/wrk-$name.txt") $($DRIVER cold --gateway "http://127.0.0.1:$gw_port" \
            --emulator "http://127.0.0.1:$em_port" --installations "$COLD_INSTALLATIONS" --callers "$COLD_CALLERS")")
        kill "$gw_pid" 2>/dev/null || true
    done
    RESULTS=$(printf '%s\n' "${lines[@]}") CONNECTIONS="$CONNECTIONS" python3 - <<'PY'
import json, os
print()
print(f"Redis Cluster (3 primaries + 3 replicas) vs one Redis, {os.environ['CONNECTIONS']} connections, same run")
for line in os.environ["RESULTS"].splitlines():
    name, rest = line.split(" ", 1)
    dec = json.JSONDecoder()
    rest = rest.strip()
    wrk, end = dec.raw_decode(rest)
    cold, _ = dec.raw_decode(rest[end:].strip())
    print(f"  {name:<10} cached {wrk['rps']:>9.0f} req/s p50 {wrk['p50_ms']:.2f} ms p99 {wrk['p99_ms']:.2f} ms;"
          f" cold p50 {cold['e2e_p50_ms']:.2f} ms p99 {cold['e2e_p99_ms']:.2f} ms,"
          f" gateway-added p50 {cold['gateway_added_p50_ms']:.2f} ms, trigger calls {cold['trigger_calls']}")
PY
}


# Redis: no persistence, loopback only.
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$WORK" --logfile "$WORK/redis.log" --pidfile "$WORK/redis.pid"
wait_for_redis "$REDIS_PORT"

GATEWAY_PORT=$(free_port)
EMULATOR_PORT=$(free_port)
NGINX_PORT=$(free_port)
SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '\n/+=')
export BENCH_CALLER_SECRET=$SECRET
export TOKEN_GATEWAY_PORT=$GATEWAY_PORT
export TOKEN_GATEWAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export TOKEN_GATEWAY_FORGE_APP_ID="ari:cloud:ecosystem::app/6f1a7b2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
export TOKEN_GATEWAY_FORGE_JWKS_URL="http://127.0.0.1:$EMULATOR_PORT/.well-known/jwks.json"
export TOKEN_GATEWAY_TRIGGER_HOSTS="http://127.0.0.1:$EMULATOR_PORT"
export TOKEN_GATEWAY_FORGE_GRAPHQL_URL="http://127.0.0.1:$EMULATOR_PORT/graphql"
export TOKEN_GATEWAY_ENCRYPTION_KEYS="bench:$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
export TOKEN_GATEWAY_CALLERS="[{\"name\":\"bench\",\"secret\":\"$SECRET\",\"installations\":[\"*\"]}]"
export TOKEN_GATEWAY_LOG_LEVEL=${BENCH_LOG_LEVEL:-info}
export TOKEN_GATEWAY_EVENT_LOOP_AFFINITY=$AFFINITY

if [ "$CLUSTER_ONLY" = 1 ]; then
    cluster_vs_one_redis
    exit 0
fi

"$BIN" emulate --no-install-tokens --port "$EMULATOR_PORT" --gateway-url "http://127.0.0.1:$GATEWAY_PORT" \
    --app-id "$TOKEN_GATEWAY_FORGE_APP_ID" --log-level warning 2>"$WORK/emulator.log" &
pids+=($!)

# Start-up: from the exec until /health/ready answers 200 (polled every 5 ms, at most 60 s).
start_ns=$(date +%s%N)
"$BIN" serve 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
pids+=($GATEWAY_PID)
ready=0
for _ in $(seq 1 12000); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/health/ready" 2>/dev/null; then ready=1; break; fi
    kill -0 "$GATEWAY_PID" 2>/dev/null || break
    sleep 0.005
done
ready_ns=$(date +%s%N)
[ "$ready" = 1 ] || { echo "the gateway did not become ready:"; tail -n 20 "$WORK/gateway.log"; exit 1; }
STARTUP_MS=$(( (ready_ns - start_ns) / 1000000 ))
wait_for_http "http://127.0.0.1:$EMULATOR_PORT/admin/stats"

# One installation, its token fetched once (cold) so the measured GETs are hits.
INSTALLATION=$(curl -fsS -X POST "http://127.0.0.1:$EMULATOR_PORT/admin/installations" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
TOKEN_URL="http://127.0.0.1:$GATEWAY_PORT/v1/installations/${INSTALLATION##*/}/token"
AUTH="Authorization: Bearer $SECRET"
curl -fsS -o /dev/null -H "$AUTH" "$TOKEN_URL"
source=$(curl -fsS -H "$AUTH" "$TOKEN_URL" | python3 -c 'import json,sys; print(json.load(sys.stdin)["source"])')
[ "$source" = cache ] || { echo "the warmed token did not come from the cache ($source)"; exit 1; }
BODY_BYTES=$(curl -fsS -o /dev/null -w '%{size_download}' -H "$AUTH" "$TOKEN_URL")

# nginx: a static file of the same size, its own config, loopback, no access log.
mkdir -p "$WORK/www" "$WORK/nginx"
head -c "$BODY_BYTES" /dev/zero | tr '\0' 'x' >"$WORK/www/token.json"
chmod -R a+rX "$WORK/www"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes $NGINX_WORKERS;
$NGINX_AFFINITY
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    default_type application/json;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $WORK/www;
    }
}
NGINX
nginx -e "$WORK/nginx-error.log" -p "$WORK" -c "$WORK/nginx.conf"
NGINX_URL="http://127.0.0.1:$NGINX_PORT/token.json"
wait_for_http "$NGINX_URL"
NGINX_BYTES=$(curl -fsS -o /dev/null -w '%{size_download}' "$NGINX_URL")

run_wrk() { # name url [header]
    local name=$1 url=$2
    shift 2
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "$@" "$url" >/dev/null # warm-up
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" "$url" >"$WORK/wrk-$name.txt"
    $DRIVER wrk "$WORK/wrk-$name.txt"
}
echo "==> wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s: nginx static file ($NGINX_BYTES bytes), GET /health/live, cached GET …/token ($BODY_BYTES bytes)"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
NG=$(run_wrk nginx "$NGINX_URL")
HL=$(run_wrk health "http://127.0.0.1:$GATEWAY_PORT/health/live")
GW=$(run_wrk gateway "$TOKEN_URL" -H "$AUTH")
GW="$GW" NG="$NG" HL="$HL" CONNECTIONS="$CONNECTIONS" THREADS="$THREADS" LEVEL="$TOKEN_GATEWAY_LOG_LEVEL" AFFINITY="$AFFINITY" \
    LOAD="$LOAD_BEFORE -> $(cut -d' ' -f1-3 /proc/loadavg)" \
    AUDIT_LINES="$(grep -c token_handed_out "$WORK/gateway.log" || true)" python3 - <<'PY'
import json, os, time
gw, ng, hl = (json.loads(os.environ[k]) for k in ("GW", "NG", "HL"))
def verdict(ok): return "met" if ok else "NOT MET"
print()
print(f"hot path: wrk -t{os.environ['THREADS']} -c{os.environ['CONNECTIONS']}, gateway at log level {os.environ['LEVEL']},"
      f" event loops and nginx workers {os.environ['AFFINITY']}")
print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average (1, 5, 15 min) before -> after: {os.environ['LOAD']}")
print(f"| what | req/s | ratio to nginx | p50 | p99 | non-2xx |")
print(f"|---|---|---|---|---|---|")
for name, r in (("nginx, same bytes", ng), ("gateway `GET /health/live`", hl), ("gateway cached `GET …/token`", gw)):
    print(f"| {name} | {r['rps']:.0f} | {r['rps'] / ng['rps']:.2f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['non2xx']} |")
print(f"cached token >= 0.6 x nginx and p99 <= 2 ms: {verdict(gw['rps'] / ng['rps'] >= 0.6 and gw['p99_ms'] <= 2)};"
      f" /health/live >= 0.8 x nginx: {verdict(hl['rps'] / ng['rps'] >= 0.8)}")
print(f"audit records written so far: {os.environ['AUDIT_LINES']}")
PY
if [ "${BENCH_STRACE:-0}" = 1 ]; then
    # System calls per cached answer, counted by strace (which slows the gateway down a lot, so
    # after the measured runs): 3 s of wrk with strace attached to the gateway.
    ensure_packages strace
    strace -f -c -e trace=write,writev,sendmsg,futex,epoll_wait -o "$WORK/strace.txt" -p "$GATEWAY_PID" 2>/dev/null &
    STRACE_PID=$!
    sleep 1
    wrk -t"$THREADS" -c"$CONNECTIONS" -d3s -H "$AUTH" "$TOKEN_URL" >"$WORK/wrk-strace.txt"
    kill -INT "$STRACE_PID"; wait "$STRACE_PID" 2>/dev/null || true
    requests=$(grep -Eo '^ *[0-9]+ requests' "$WORK/wrk-strace.txt" | grep -Eo '[0-9]+')
    echo "system calls per cached answer under strace ($requests answers):"
    awk -v n="$requests" '$NF ~ /^(write|writev|sendmsg|futex|epoll_wait)$/ { printf "  %-10s %.2f\n", $NF, $4 / n }' "$WORK/strace.txt"
fi
if [ "${BENCH_PERF:-0}" = 1 ]; then
    # Where the gateway's CPU goes on the cached path: perf samples (99 Hz per CPU) over 5 s of wrk,
    # after the measured runs; the 25 hottest symbols, self time.
    ensure_packages linux-perf
    perf record -q -F 99 -g -p "$GATEWAY_PID" -o "$WORK/perf.data" -- sleep 6 >/dev/null 2>&1 &
    PERF_PID=$!
    sleep 0.5
    wrk -t"$THREADS" -c"$CONNECTIONS" -d5s -H "$AUTH" "$TOKEN_URL" >/dev/null
    wait "$PERF_PID" 2>/dev/null || true
    echo "gateway CPU by symbol under wrk (perf, self time, top 25):"
    perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -n 25 | cut -c1-160
fi
[ "$HOT_ONLY" = 1 ] && exit 0

echo "==> cold path: $COLD_INSTALLATIONS installations x $COLD_CALLERS concurrent callers"
COLD_SEQ=$($DRIVER cold --gateway "http://127.0.0.1:$GATEWAY_PORT" --emulator "http://127.0.0.1:$EMULATOR_PORT" \
    --installations "$COLD_INSTALLATIONS" --callers "$COLD_CALLERS" --pid "$GATEWAY_PID")
# The same with kept-alive connections (each caller's connection carries one untimed GET /health/live
# first), as a caller with a connection pool would: what accepting and setting up a new connection adds.
COLD_KEPT=$($DRIVER cold --gateway "http://127.0.0.1:$GATEWAY_PORT" --emulator "http://127.0.0.1:$EMULATOR_PORT" \
    --installations "$COLD_INSTALLATIONS" --callers "$COLD_CALLERS" --pid "$GATEWAY_PID" --kept-alive)
COLD_BURST=$($DRIVER cold --gateway "http://127.0.0.1:$GATEWAY_PORT" --emulator "http://127.0.0.1:$EMULATOR_PORT" \
    --installations "$COLD_INSTALLATIONS" --callers "$COLD_CALLERS" --burst)

echo "==> memory: $MEMORY_INSTALLATIONS installations, tokens of ~$TOKEN_BYTES bytes (deadline ${MEMORY_SECONDS}s)"
MEMORY=$($DRIVER memory --gateway "http://127.0.0.1:$GATEWAY_PORT" --emulator "http://127.0.0.1:$EMULATOR_PORT" \
    --installations "$MEMORY_INSTALLATIONS" --token-bytes "$TOKEN_BYTES" --pid "$GATEWAY_PID" \
    --max-seconds "$MEMORY_SECONDS")

GW="$GW" NG="$NG" COLD_SEQ="$COLD_SEQ" COLD_KEPT="$COLD_KEPT" COLD_BURST="$COLD_BURST" MEMORY="$MEMORY" STARTUP_MS="$STARTUP_MS" \
    CONNECTIONS="$CONNECTIONS" python3 - <<'PY'
import json, os
gw, ng = json.loads(os.environ["GW"]), json.loads(os.environ["NG"])
seq, burst = json.loads(os.environ["COLD_SEQ"]), json.loads(os.environ["COLD_BURST"])
kept = json.loads(os.environ["COLD_KEPT"])
mem = json.loads(os.environ["MEMORY"])
startup = int(os.environ["STARTUP_MS"])
c = os.environ["CONNECTIONS"]
def verdict(ok): return "met" if ok else "NOT MET"
ratio = gw["rps"] / ng["rps"]
print()
print(f"cached GET …/token, {c} connections")
print(f"  gateway   {gw['rps']:>10.0f} req/s   p50 {gw['p50_ms']:.2f} ms   p99 {gw['p99_ms']:.2f} ms   non-2xx {gw['non2xx']}, socket errors {gw['socket_errors']}")
print(f"  nginx     {ng['rps']:>10.0f} req/s   p50 {ng['p50_ms']:.2f} ms   p99 {ng['p99_ms']:.2f} ms")
print(f"  ratio     {ratio:.2f} x nginx           target >= 0.6 and p99 <= 2 ms: {verdict(ratio >= 0.6 and gw['p99_ms'] <= 2)}")
for name, r in (("sequential", seq), ("sequential, kept-alive connections", kept), ("burst", burst)):
    print(f"cold path ({name}: {r['installations']} installations x {r['callers_per_installation']} callers"
          + (", all at once" if name == "burst" else ", one installation at a time") + ")")
    print(f"  answers {r['answers']}, sources {r['sources']}")
    print(f"  trigger calls {r['trigger_calls']} (target exactly {r['installations']}: {verdict(r['trigger_calls'] == r['installations'])})")
    print(f"  end to end p50 {r['e2e_p50_ms']:.2f} ms, p99 {r['e2e_p99_ms']:.2f} ms; emulator's own time p50 {r['emulator_own_p50_ms']:.2f} ms")
    print(f"  gateway-added p50 {r['gateway_added_p50_ms']:.2f} ms, p99 {r['gateway_added_p99_ms']:.2f} ms"
          + (f" (target p50 <= 1 ms: {verdict(r['gateway_added_p50_ms'] <= 1)})" if name == "sequential" else "")
          + f"; this client's own cached GET p50 {r['client_cached_get_p50_ms']:.2f} ms,"
          + f" {r['callers_per_installation']} concurrent cached GETs p50 {r['client_concurrent_cached_p50_ms']:.2f} ms")
    if r.get("gateway_cpu_ms_per_installation") is not None:
        print(f"  gateway CPU time per installation served cold (all {r['callers_per_installation']} callers, the"
              f" trigger round trip and the delivery): {r['gateway_cpu_ms_per_installation']:.2f} ms")
print(f"memory ({mem['installations']} installations, {mem['fetched_from_cache']} served from the cache, mean token {mem['mean_token_bytes']:.0f} bytes)")
print(f"  token bytes held {mem['token_bytes_held'] / 1e6:.1f} MB; RSS {mem['rss_start_kib'] / 1024:.1f} -> {mem['rss_end_kib'] / 1024:.1f} MiB")
print(f"  RSS growth / token bytes {mem['delta_per_token_byte']:.2f}; whole RSS / token bytes {mem['rss_per_token_byte']:.2f}"
      + f" (target <= 2 at 100k installations; extrapolated whole RSS / token bytes at 100k: "
      + f"{(mem['rss_start_kib'] * 1024 + mem['rss_delta_bytes'] * 100000 / max(mem['installations'], 1)) / (mem['token_bytes_held'] * 100000 / max(mem['installations'], 1)):.2f})")
print(f"start-up: ready {startup} ms after exec (target <= 1000 ms: {verdict(startup <= 1000)})")
PY
if [ "$RUN_CLUSTER" = 1 ]; then
    echo "==> Redis Cluster vs one Redis"
    cluster_vs_one_redis
fi
