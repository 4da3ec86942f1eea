#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests drive (curl, the
# Python `websockets` package, headless Chromium, redis-server, HAProxy, slapd,
# systemd-analyze, proxychains4, node with the pac-resolver package; iperf3 and
# rathole for the load-test smoke run), then runs fmt, clippy, a tiny load test and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v curl >/dev/null 2>&1; then
  echo "== installing curl"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq curl; else sudo apt-get update -qq && sudo apt-get install -y -qq curl; fi
fi
if ! command -v openssl >/dev/null 2>&1; then
  # tests/pinning.rs makes certificates the way users do, with `openssl req -x509`.
  echo "== installing openssl"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq openssl; else sudo apt-get update -qq && sudo apt-get install -y -qq openssl; fi
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  # tests/metrics.rs renders the admin status page in headless Chromium.
  echo "== installing chromium"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi
fi
if ! command -v redis-server >/dev/null 2>&1; then
  # tests/cluster.rs shares state between gateways through a real Redis, which each
  # test starts itself on a loopback port (never the system service).
  echo "== installing redis-server"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; fi
fi
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  # tests/proxy_protocol.rs puts a real HAProxy (send-proxy, send-proxy-v2) in front
  # of the gateway.
  echo "== installing haproxy"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; fi
fi
if [ ! -x /usr/sbin/slapd ] || ! command -v ldapsearch >/dev/null 2>&1; then
  # tests/auth_ldap.rs authenticates against a real OpenLDAP slapd, which the test
  # starts itself with its own config and database on a loopback port (never the
  # system service; noninteractive, so debconf asks nothing).
  echo "== installing slapd and ldap-utils"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd ldap-utils; else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd ldap-utils; fi
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  # tests/systemd.rs runs `systemd-analyze verify` and `security --offline` on the
  # units in contrib/systemd (offline: no running systemd needed).
  echo "== installing systemd (for systemd-analyze)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; fi
fi
if ! command -v proxychains4 >/dev/null 2>&1; then
  # tests/export.rs runs curl under proxychains4 with an exported configuration.
  echo "== installing proxychains4"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq proxychains4; else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq proxychains4; fi
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "== installing node and npm"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; fi
fi
if [ ! -d target/test-deps/npm/node_modules/pac-resolver ] || [ ! -d target/test-deps/npm/node_modules/quickjs-emscripten ]; then
  # tests/export.rs evaluates the exported PAC file with the pac-resolver package (and
  # its QuickJS engine) under node, from this directory only.
  echo "== installing pac-resolver for node"
  mkdir -p target/test-deps/npm
  (cd target/test-deps/npm && npm install --no-audit --no-fund --silent pac-resolver@7.0.1 quickjs-emscripten@0.31)
fi
if ! python3 -c 'import websockets' >/dev/null 2>&1; then
  echo "== installing the Python websockets package"
  python3 -m pip install --quiet 'websockets>=13'
fi

# A CI run builds once from clean: incremental state would only take disk (it was
# nearly half of target/ before), and a machine's disk is not guaranteed to be large.
export CARGO_INCREMENTAL=0

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The load tests are not CI tests, but a tiny run of every scenario (seconds, a few
# connections, rathole included) keeps the harness from rotting. Before cargo test so
# that the test summary stays the closing lines.
echo "== loadtest all --tiny"
bash loadtest/install-deps.sh
cargo build --workspace --bins
PATH="$HOME/.cargo/bin:$PATH" target/debug/loadtest all --tiny --anyproxy target/debug/anyproxy
# gateway.cluster on vs off on new connections, against its own redis-server (installed
# above); not part of `all`, which needs no Redis.
echo "== loadtest cluster --tiny"
target/debug/loadtest cluster --tiny --anyproxy target/debug/anyproxy
# A one-minute soak: mixed curl sessions, downloads, held connections, an agent and a
# gateway restart; fails on any unexpected failure or on descriptor or memory growth.
echo "== loadtest soak --minutes 1"
target/debug/loadtest soak --minutes 1 --anyproxy target/debug/anyproxy
echo "== cargo test"
cargo test --workspace
