#!/usr/bin/env bash
# The full load test: installs what is missing, builds release, runs every scenario
# (or the one named: curl, bulk, scale, latency, peers, all, soak, cluster) and writes the results
# as JSON beside the printed tables. Extra arguments go to the loadtest binary.
#   bash loadtest/run.sh                 # everything, ~20 minutes on 2 cores
#   bash loadtest/run.sh bulk --duration 10
#   bash loadtest/run.sh all --tiny      # seconds per scenario, what CI runs
#   bash loadtest/run.sh soak --minutes 30   # restarts, leaks, stray failures
#   bash loadtest/run.sh cluster         # gateway.cluster on vs off (needs redis-server)
set -euo pipefail
cd "$(dirname "$0")/.."
bash loadtest/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p anyproxy -p anyproxy-loadtest
scenario="${1:-all}"
[ $# -gt 0 ] && shift
out="loadtest-results-$(date +%Y%m%d-%H%M%S).json"
exec target/release/loadtest "$scenario" --anyproxy target/release/anyproxy --json "$out" "$@"
