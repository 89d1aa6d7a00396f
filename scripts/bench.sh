#!/usr/bin/env bash
# Benchmarks on the test bed, vtun beside the OpenSSH tools in the same run. Each bench prints its
# setup, the commands compared and the ratios. Pass bench names to run a subset.
#   scripts/bench.sh                      # all
#   VTUN_BENCH_MB=256 scripts/bench.sh proxy_throughput
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
VTUN_BENCH_DEPS=1 ensure_test_deps
benches=("$@")
if [ "${#benches[@]}" -eq 0 ]; then
    mapfile -t benches < <(ls benches/*.rs | xargs -n1 basename | sed 's/\.rs$//')
fi
for b in "${benches[@]}"; do
    echo "== $b"
    cargo bench -q --bench "$b"
    echo
done
