#!/usr/bin/env bash
# Checks the code base against the repository's .swift-format (lint only, nothing is rewritten) and
# that no function in Sources or Tests is longer than 80 lines. Exits non-zero on any finding.
set -uo pipefail
cd "$(dirname "$0")/.."

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
