#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, checks formatting and lints,
# builds, then runs unit, property and network-namespace integration tests (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo build --workspace --release --bins
# Lab tests build network namespaces and share two cores: one test at a time.
cargo test --workspace --release -- --test-threads=1
