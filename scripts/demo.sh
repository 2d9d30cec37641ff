#!/usr/bin/env bash
# The demo on the default lab: builds everything, brings up EN, DN and server in network
# namespaces, sends real traffic through the tunnel, prints what happened, tears down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --workspace --release --bins
exec target/release/lab demo "$@"
