#!/usr/bin/env bash
# The micro-benchmarks (Benchmarks/, ordo-one/benchmark) checked against the baseline stored in
# the repository (Benchmarks/.benchmarkBaselines/TokenGatewayBenchmarks/<name>/results.json).
#
#   scripts/bench-micro.sh            run every benchmark and compare with the stored baseline; exit 2
#                                      when a metric regressed beyond the tolerance its benchmark states
#   scripts/bench-micro.sh --update   run every benchmark and store the results as the baseline
#   scripts/bench-micro.sh --run      run and print only
#
# Settings (environment): BENCH_BASELINE (the baseline's name, "main"), BENCH_FILTER (a regular
# expression: only the benchmarks whose names match). Builds in release into .build-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
. scripts/lib.sh

# hiredis for the gateway's Redis client. The benchmark package counts allocations with its malloc
# interposer, which needs no system package on Swift 6.3 (jemalloc only for Swift 6.2 and older).
ensure_packages libhiredis-dev pkg-config
if swift --version 2>/dev/null | grep -Eq 'Swift version 6\.[0-2]([^0-9]|$)|Swift version 5\.'; then
    ensure_packages libjemalloc-dev
fi

BASELINE=${BENCH_BASELINE:-main}
FILTER=()
[ -n "${BENCH_FILTER:-}" ] && FILTER=(--filter "$BENCH_FILTER")
bench() { swift package --package-path Benchmarks --scratch-path "$ROOT/.build-bench" "$@"; }

case "${1:-}" in
    --update)
        bench --allow-writing-to-package-directory benchmark baseline update "$BASELINE" --no-progress "${FILTER[@]}"
        ;;
    --run)
        bench benchmark --no-progress "${FILTER[@]}"
        ;;
    "")
        if [ ! -f "Benchmarks/.benchmarkBaselines/TokenGatewayBenchmarks/$BASELINE/results.json" ]; then
            echo "==> no stored baseline \"$BASELINE\" yet: storing this run's results as it (nothing to compare with)"
            bench --allow-writing-to-package-directory benchmark baseline update "$BASELINE" --no-progress "${FILTER[@]}"
            exit 0
        fi
        # Exit status: 0 within tolerance, 2 regressed, 4 improved only (treated as success here).
        # Through `swift package` the plugin's outcome arrives as a thrown error (exit status 1 and
        # "error: benchmarkThreshold…" on stderr), so it is read from the output too.
        out=$(mktemp)
        set +e
        bench benchmark baseline check "$BASELINE" --no-progress "${FILTER[@]}" 2>&1 | tee "$out"
        status=${PIPESTATUS[0]}
        set -e
        if grep -q 'error: benchmarkThresholdRegression' "$out"; then
            status=2
        elif grep -q 'error: benchmarkThresholdImprovement' "$out"; then
            status=4
        fi
        rm -f "$out"
        if [ "$status" = 4 ]; then
            echo "micro-benchmarks: improvements only; 'scripts/bench-micro.sh --update' stores them as the baseline"
            exit 0
        fi
        [ "$status" = 0 ] && echo "micro-benchmarks: within the stored baseline's tolerances"
        [ "$status" = 2 ] && echo "micro-benchmarks: REGRESSION against baseline \"$BASELINE\" (see the table above)"
        exit "$status"
        ;;
    *) echo "usage: scripts/bench-micro.sh [--update | --run]" >&2; exit 2 ;;
esac
