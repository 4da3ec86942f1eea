#!/usr/bin/env bash
# Installs what the load tests drive, when missing: curl, iperf3 and openssl from
# Debian, and rathole 0.5 from crates.io (its default features: TLS through
# native-tls, hence libssl-dev and pkg-config, and WebSocket).
set -euo pipefail

apt_install() {
  local run=()
  [ "$(id -u)" = 0 ] || run=(sudo)
  if [ -z "${APT_UPDATED:-}" ]; then "${run[@]}" apt-get update -qq; APT_UPDATED=1; fi
  # iperf3's postinst asks whether to start a daemon; never ask.
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ! command -v rathole >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/rathole" ]; then
  pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev pkg-config)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

if ! command -v rathole >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/rathole" ]; then
  echo "== installing rathole 0.5.0 (cargo install, a few minutes)"
  # Not --locked: rathole 0.5.0's lock file pins time 0.3.2x, which no longer compiles
  # with current Rust; the semver-compatible updates do.
  cargo install rathole --version 0.5.0 --quiet
fi
