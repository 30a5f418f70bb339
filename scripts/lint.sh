#!/usr/bin/env bash
# Checks the code base against the repository's .swift-format (lint only, nothing is rewritten) and
# that no function in Sources or Tests is longer than 80 lines. Exits non-zero on any finding.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v swift >/dev/null 2>&1; then
    echo "lint: swift is not on the PATH: install Swift 6.1 or later (https://www.swift.org/install/linux/)" >&2
    exit 1
fi
if ! swift format --version >/dev/null 2>&1; then
    echo "lint: 'swift format' does not run with $(command -v swift); it comes with Swift 6 toolchains" >&2
    exit 1
fi

status=0
if ! swift format lint --recursive --strict Sources Tests Package.swift; then
    status=1
fi
long=$(python3 scripts/function_length.py Sources; python3 scripts/function_length.py Tests)
if [ -n "$long" ]; then
    echo "functions longer than 80 lines:"
    echo "$long"
    status=1
fi
exit $status
