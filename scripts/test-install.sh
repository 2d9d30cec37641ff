#!/usr/bin/env bash
# The install path without containers, checked: scripts/install.sh into a scratch root, then
# `systemd-analyze verify` on the units it installed (pointed at the binaries it installed) and
# on an en instance and a dn-fd instance. Needs the release binaries (cargo build --release).
# Prints one summary line last; exit 0 only when every check held, 77 when it cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "test-install: SKIPPED: no systemd-analyze (apt-get install systemd)"; exit 77; }
scratch=$(mktemp -d /tmp/holdfast-install.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
root="$scratch/root"
bash scripts/install.sh --root "$root" --no-build >"$scratch/install.log"
failed=0
passed=0
check() {
  local what=$1
  shift
  if "$@" >"$scratch/out" 2>&1 && ! grep -q . "$scratch/out"; then
    echo "ok: $what"
    passed=$((passed + 1))
  else
    echo "FAILED: $what"
    sed 's/^/  /' "$scratch/out"
    failed=$((failed + 1))
  fi
}
for f in usr/local/bin/en usr/local/bin/dn usr/local/bin/dn-fd usr/local/bin/esr-config \
  etc/holdfast/cluster.toml.example etc/holdfast/cluster-ospf.toml.example etc/holdfast/en.toml.example \
  etc/systemd/system/holdfast-en.service etc/systemd/system/holdfast-dn-fd@.service; do
  check "install.sh put $f in place" test -s "$root/$f"
done
# systemd-analyze verify checks that ExecStart names an executable on this machine: point the
# installed units at the installed binaries.
units="$scratch/units"
mkdir -p "$units"
for u in "$root"/etc/systemd/system/*.service; do
  sed "s#/usr/local/bin/#$root/usr/local/bin/#g" "$u" >"$units/$(basename "$u")"
done
check "systemd-analyze verify holdfast-en.service" systemd-analyze verify "$units/holdfast-en.service"
check "systemd-analyze verify holdfast-dn-fd@dn1.service" systemd-analyze verify "$units/holdfast-dn-fd@dn1.service"
# And verify is not a formality: a unit whose binary is missing fails it.
sed "s#$root/usr/local/bin/en#$scratch/missing/en#" "$units/holdfast-en.service" >"$scratch/broken.service"
if systemd-analyze verify "$scratch/broken.service" >/dev/null 2>&1; then
  echo "FAILED: systemd-analyze verify accepted a unit whose binary is missing"
  failed=$((failed + 1))
else
  echo "ok: systemd-analyze verify rejects a unit whose binary is missing"
  passed=$((passed + 1))
fi
for b in en dn dn-fd esr-config; do
  check "$b --help" sh -c "'$root/usr/local/bin/$b' --help >/dev/null"
done
check "install.sh --help" sh -c "bash scripts/install.sh --help >/dev/null"
echo "test-install: $passed passed, $failed failed"
[ "$failed" = 0 ]
