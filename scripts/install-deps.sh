#!/usr/bin/env bash
# Installs every Debian package the lab, the tests and the benchmarks use. Idempotent; safe to run twice.
# With arguments, installs those packages instead (docker/test.sh: podman, runc, debootstrap, ...).
set -euo pipefail
# systemd for systemd-analyze (scripts/test-install.sh); docker/test.sh installs what it needs itself.
# dnsmasq-base: the DNS server of the lab's DNS case, without the package that would start one
# on the host; nftables and conntrack: the NAT of the lab's mobile cases.
packages=(iproute2 iputils-ping iperf3 wireguard-go wireguard-tools curl python3 procps frr bird2 keepalived systemd dnsmasq-base nftables conntrack)
(($#)) && packages=("$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Name our route protocol number so `ip route` shows "proto holdfast" (DNs install their routes
# with protocol 200; see docs/architecture.md).
if [ -d /etc/iproute2 ] && [ ! -f /etc/iproute2/rt_protos.d/holdfast.conf ]; then
  mkdir -p /etc/iproute2/rt_protos.d
  echo "200 holdfast" > /etc/iproute2/rt_protos.d/holdfast.conf
fi
# The Rust toolchain is the machine's own (rustup); nextest is optional.
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
# boringtun, the second userspace WireGuard peer `lab bench` compares with (wireguard-go is the
# first): built from the Rust crate registry, as Debian has no package of it.
if (($# == 0)) && ! command -v boringtun-cli >/dev/null; then
  echo "installing: boringtun-cli (cargo install)"
  # Optional: without it `lab bench` reports boringtun as skipped, with this reason.
  cargo install boringtun-cli --version 0.7.1 --locked --root /usr/local --quiet ||
    echo "boringtun-cli could not be built: lab bench will skip boringtun" >&2
fi
