#!/usr/bin/env bash
# Runs the whole benchmark suite and writes bench/RESULTS.md and bench/results/*.svg:
# Troupe (telemetry on and off), actix, ractor and kameo on the same workloads, Troupe-only
# workloads and scaling curves, and the peer summary in README.md (RESULTS.md's first line says
# how long the run took).
#   bench/run.sh            full run
#   bench/run.sh --quick    every workload once at tiny sizes (a smoke test, not figures)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p troupe-bench --bins
exec target/release/troupe-suite --out bench "$@"
