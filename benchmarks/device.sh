#!/usr/bin/env bash
# The device run of benchmarks/bench_device.py: at most 5 minutes; the results to $OUT (the
# device machine's output folder) when it is set, else to benchmarks/results_device.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}"
timeout 300 python benchmarks/bench_device.py --json "$out/results_device.json" "$@"
