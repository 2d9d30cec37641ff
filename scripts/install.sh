#!/usr/bin/env bash
# Installs Holdfast without containers: the binaries, the systemd units and sample
# configuration. Run as root from a checkout; see README.md, "Run a real cluster".
set -euo pipefail
usage() {
  cat <<'USAGE'
Usage: sudo bash scripts/install.sh [--prefix DIR] [--root DIR] [--no-build] [--dn]

Builds en, dn, dn-fd and esr-config with cargo (release) and installs:
  PREFIX/bin/{en,dn,dn-fd,esr-config}                      (PREFIX: /usr/local)
  /etc/systemd/system/holdfast-en.service                  the client
  /etc/systemd/system/holdfast-dn-fd@.service              a DN under dn-fd, one instance per DN name
  /etc/holdfast/{cluster,cluster-ospf,en}.toml.example     every option, commented
  /etc/iproute2/rt_protos.d/holdfast.conf                  `ip route` shows "proto holdfast"
With --dn also /etc/sysctl.d/90-holdfast-dn.conf (IPv4 and IPv6 forwarding), applied at once.
Existing files in /etc/holdfast are never overwritten.

  --prefix DIR   where bin/ goes (default /usr/local); the units' ExecStart follows it
  --root DIR     install under DIR instead of / (for packaging and tests); nothing is started
  --no-build     install what target/release already holds
  --dn           this host runs a DN: turn forwarding on
  -h, --help     this text
USAGE
}
prefix=/usr/local
root=""
build=yes
dn=no
while (($#)); do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --no-build) build=no; shift ;;
    --dn) dn=yes; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh writes to /etc and $prefix: run it as root (sudo)" >&2
  exit 1
fi
bins=(en dn dn-fd esr-config)
if [ "$build" = yes ]; then
  cargo build --release --locked -p holdfast-en -p holdfast-dn -p holdfast-dn-fd -p holdfast-esr-config
fi
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
for b in "${bins[@]}"; do
  [ -x "$target/release/$b" ] || { echo "no $target/release/$b: build first (drop --no-build)" >&2; exit 1; }
done

install -d "$root$prefix/bin" "$root/etc/systemd/system" "$root/etc/holdfast" "$root/etc/iproute2/rt_protos.d"
for b in "${bins[@]}"; do
  install -m 0755 "$target/release/$b" "$root$prefix/bin/$b"
  echo "installed $root$prefix/bin/$b"
done
for unit in packaging/systemd/*.service; do
  sed "s#/usr/local/bin/#$prefix/bin/#g" "$unit" >"$root/etc/systemd/system/$(basename "$unit")"
  chmod 0644 "$root/etc/systemd/system/$(basename "$unit")"
  echo "installed $root/etc/systemd/system/$(basename "$unit")"
done
for sample in cluster cluster-ospf en; do
  install -m 0644 "examples/$sample.toml" "$root/etc/holdfast/$sample.toml.example"
  echo "installed $root/etc/holdfast/$sample.toml.example"
done
# Private keys live in /etc/holdfast: only root reads it.
chmod 0700 "$root/etc/holdfast"
protos="$root/etc/iproute2/rt_protos.d/holdfast.conf"
[ -f "$protos" ] || echo "200 holdfast" >"$protos"
if [ "$dn" = yes ]; then
  install -d "$root/etc/sysctl.d"
  install -m 0644 packaging/sysctl/90-holdfast-dn.conf "$root/etc/sysctl.d/90-holdfast-dn.conf"
  echo "installed $root/etc/sysctl.d/90-holdfast-dn.conf"
  [ -z "$root" ] && sysctl -q -p /etc/sysctl.d/90-holdfast-dn.conf
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
cat <<NEXT

Next:
  DN host:  write /etc/holdfast/cluster.toml (see cluster.toml.example), put its keys beside it
            (dn pki init), then   systemctl enable --now holdfast-dn-fd@<name>
  client:   write /etc/holdfast/en.toml (see en.toml.example), then
            systemctl enable --now holdfast-en
NEXT
