#!/usr/bin/env bash
# The compose testbed for real, on a machine without a Docker engine: Podman and podman-compose
# run docker/compose.yml unchanged. Builds the binaries with this machine's cargo, makes the
# Debian bookworm-slim base image with debootstrap (nothing can be pulled here), builds the four
# images, brings the testbed up, waits until the client is connected, then runs a ping at 100/s
# and a paced download through the tunnel, stops the primary DN's container during both, and
# checks that the client moved to the other DN, that at most 10 pings were lost and that the
# download arrived intact. Tears everything down (containers, networks, volume, the images it
# built, the base image if it made it), also on failure and on Ctrl-C.
#
# Needs root. The last line is one summary; exit status 0 only when every check held,
# 77 when the test cannot run here (SKIPPED), 1 otherwise.
#
# Environment: HOLDFAST_ROUTING=bird runs BIRD 2 instead of FRR; HOLDFAST_KEEP_IMAGES=1 keeps
# the images for the next run; HOLDFAST_MAX_LOST (default 10).
set -euo pipefail
case "${1:-}" in
  -h | --help)
    # This file's opening comment.
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *) echo "usage: sudo bash docker/test.sh [--help]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
repo=$(pwd)
started=$(date +%s)
project=holdfast-test
max_lost=${HOLDFAST_MAX_LOST:-10}
download_mib=64
rate=16M                      # the download takes about 4 s; the DN stops 1.5 s into it
ping_count=800                # 8 s at 100/s
venv=/var/cache/holdfast/podman-compose
work=""
summary=""
made_base=no
images=(holdfast/dn holdfast/esr holdfast/en holdfast/server)
base=docker.io/library/debian:bookworm-slim

say() { echo "[docker/test.sh $(($(date +%s) - started)) s] $*"; }
elapsed() { echo "$(($(date +%s) - started)) s"; }
skip() {
  summary="docker/test.sh: SKIPPED: $*"
  echo "$summary"
  exit 77
}
fail() {
  summary="docker/test.sh: FAILED after $(elapsed): $*"
  exit 1
}

[ "$(id -u)" = 0 ] || skip "needs root (podman with static addresses, TUN devices, NET_ADMIN)"
[ -c /dev/net/tun ] || skip "no /dev/net/tun on this machine"
command -v apt-get >/dev/null || command -v podman >/dev/null || skip "neither podman nor apt-get to install it"

compose() { "$venv/bin/podman-compose" -f "$repo/docker/compose.yml" -p "$project" "$@"; }

# The container of a compose service.
container() {
  podman ps -a -q --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" | head -n1
}
in_service() {
  local c
  c=$(container "$1")
  shift
  podman exec "$c" "$@"
}

teardown() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if [ "$status" != 0 ] && [ "$status" != 77 ] && [ "$status" != 130 ] && [ -n "$work" ]; then
    say "failed: the containers' logs (last 40 lines each):"
    for s in init dn1 dn2 esr server client; do
      c=$(container "$s")
      [ -n "$c" ] && { echo "----- $s"; podman logs --tail 40 "$c" 2>&1; }
    done
    say "the state at the failure:"
    for s in client dn1 dn2 esr server; do
      [ -n "$(container "$s")" ] && { echo "----- $s: routes"; in_service "$s" ip -4 route 2>&1; }
    done
    [ -n "$(container client)" ] && { echo "----- client: en status"; in_service client en --config /etc/holdfast/en.toml status 2>&1; }
    for s in dn1 dn2; do
      [ -n "$(container "$s")" ] || continue
      echo "----- $s: dn status"
      in_service "$s" dn status --control "/run/holdfast/dn-$s.sock" 2>&1
      echo "----- $s: ping 10.9.0.254 (the ESR, over the cluster network)"
      in_service "$s" ping -n -q -c 1 -W 1 10.9.0.254 2>&1 | grep transmitted
    done
    if [ -n "$(container esr)" ]; then
      echo "----- esr: ping 10.0.2.10 (the server)"
      in_service esr ping -n -q -c 1 -W 1 10.0.2.10 2>&1 | grep transmitted
    fi
  fi
  if [ -x "$venv/bin/podman-compose" ] && [ -n "$work" ]; then
    say "tearing down"
    compose down -v -t 2 >"$work/down.log" 2>&1
    # Whatever compose left behind (a run interrupted while it was starting containers).
    ids=$(podman ps -a -q --filter "label=com.docker.compose.project=$project")
    [ -n "$ids" ] && podman rm -f $ids >/dev/null 2>&1
    for n in $(podman network ls -q --filter "label=com.docker.compose.project=$project"); do
      podman network rm -f "$n" >/dev/null 2>&1
    done
    podman volume rm -f "${project}_config" >/dev/null 2>&1
    if [ "${HOLDFAST_KEEP_IMAGES:-0}" != 1 ]; then
      for i in "${images[@]}"; do podman rmi -f "$i:latest" >/dev/null 2>&1; done
      [ "$made_base" = yes ] && podman rmi -f "$base" >/dev/null 2>&1
      podman image prune -f >/dev/null 2>&1
    fi
  fi
  rm -rf "$repo/docker/bin"
  [ -n "$work" ] && rm -rf "$work"
  if [ "$status" = 130 ]; then
    summary="docker/test.sh: INTERRUPTED after $(elapsed), everything torn down"
  elif [ -z "$summary" ]; then
    summary="docker/test.sh: FAILED after $(elapsed): exit status $status"
  fi
  echo "$summary"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- what the test needs on this machine -------------------------------------------------
bash scripts/install-deps.sh podman runc debootstrap python3-venv
# Debian's podman-compose (1.0.3) rejects valid files ("missing networks"); 1.5 from PyPI works.
if ! "$venv/bin/podman-compose" --version 2>/dev/null | grep -q "podman-compose version 1\.5"; then
  say "installing podman-compose 1.5 in $venv"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'podman-compose>=1.5,<1.6'
fi
work=$(mktemp -d /tmp/holdfast-compose.XXXXXX)
# Podman's defaults fail here: crun does not run on hybrid cgroups, and the default ulimits
# cannot be set inside this machine's sandbox. runc with cgroupfs and no default ulimits work.
cat >"$work/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
export CONTAINERS_CONF="$work/containers.conf"
export HOLDFAST_BINARIES=prebuilt HOLDFAST_DOWNLOAD_MIB=$download_mib
# A run that was killed before it could tear down.
if [ -n "$(podman ps -a -q --filter "label=com.docker.compose.project=$project")" ]; then
  say "removing the containers of an earlier run"
  compose down -v -t 1 >/dev/null 2>&1 || true
fi

# --- images -------------------------------------------------------------------------------
if ! podman image exists "$base"; then
  # The mirror this machine's apt uses; the images' own apt-get uses it too.
  mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '{print $2}' | grep -v security | head -n1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  say "making $base with debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log"; fail "debootstrap failed"; }
  tar -C "$work/rootfs" -c . | podman import - "$base" >"$work/import.log" 2>&1 \
    || { tail -n 20 "$work/import.log"; fail "podman import of the base image failed"; }
  rm -rf "$work/rootfs"
  made_base=yes
fi
say "building en, dn, dn-fd and esr-config with cargo"
nice -n 10 cargo build --release --locked -q -p holdfast-en -p holdfast-dn -p holdfast-dn-fd -p holdfast-esr-config
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p docker/bin
for b in en dn dn-fd esr-config; do
  # Without debug information: a quarter of the size.
  strip -o "docker/bin/$b" "$target_dir/release/$b" 2>/dev/null || cp "$target_dir/release/$b" docker/bin/
done
for role in dn esr en server; do
  say "building image holdfast/$role"
  nice -n 10 podman build --pull=never --network host -f docker/Dockerfile --target "$role" \
    --build-arg HOLDFAST_BINARIES=prebuilt -t "holdfast/$role:latest" . >"$work/build-$role.log" 2>&1 \
    || { tail -n 30 "$work/build-$role.log"; fail "podman build --target $role failed"; }
done

# --- the testbed --------------------------------------------------------------------------
say "docker/compose.yml up (podman-compose, routing ${HOLDFAST_ROUTING:-frr})"
# podman-compose waits for the services the client depends on to run; one that exits at once
# would keep it waiting for ever.
timeout 180 "$venv/bin/podman-compose" -f docker/compose.yml -p "$project" up -d --no-build >"$work/up.log" 2>&1 \
  || { tail -n 30 "$work/up.log"; fail "podman-compose up failed or did not finish within 180 s"; }

# "primary secondary address" from `en status --json` ("-" for what it does not have).
sessions() {
  in_service client en --config /etc/holdfast/en.toml status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
up = [x for x in s.get("sessions", []) if x.get("state") == "up"]
role = lambda r: next((x["dn"] for x in up if x.get("role") == r), "-")
print(role("primary"), role("secondary"), s.get("address") or "-")
' 2>/dev/null || echo "- - -"
}
# The ESR's next hop to an address.
esr_via() { in_service esr ip -4 route get "$1" 2>/dev/null | grep -o 'via [0-9.]*' | cut -d' ' -f2; }
cluster_address() { echo "10.9.0.${1#dn}"; }

up_at=$(date +%s)
read -r primary secondary address < <(
  for _ in $(seq 600); do
    s=$(sessions)
    [[ " $s " != *" - "* ]] && { echo "$s"; break; }
    sleep 0.2
  done
  echo
) || true
[ -n "${primary:-}" ] && [ "$primary" != - ] || fail "the client did not connect to two DNs within 120 s"
say "client connected in $(($(date +%s) - up_at)) s: address $address, primary $primary, secondary $secondary"
for _ in $(seq 300); do
  [ "$(esr_via "$address")" = "$(cluster_address "$primary")" ] && break
  sleep 0.2
done
[ "$(esr_via "$address")" = "$(cluster_address "$primary")" ] \
  || fail "the ESR does not route $address via $primary ($(cluster_address "$primary")) after 60 s: $(in_service esr ip -4 route)"
say "the ESR routes $address via $primary"
# OSPF may still be settling a few seconds after the containers start (adjacencies forming,
# routes from the DNs' first moments withdrawn), so the first ping may be lost: one must get
# through within 30 s. The ESR's routes at the first loss are printed, to tell why.
ping_from=$(date +%s)
until in_service client ping -n -q -c 1 -W 1 10.0.2.10 >/dev/null; do
  [ -n "${esr_routes:-}" ] || esr_routes=$(in_service esr ip -4 route | tr '\n' ';')
  (($(date +%s) - ping_from < 30)) \
    || fail "no ping through the tunnel before the failover within 30 s; the ESR's routes at the first loss: $esr_routes"
done
settled="a ping went through the tunnel after $(($(date +%s) - ping_from)) s"
[ -z "${esr_routes:-}" ] || settled+="; the ESR's routes at the first loss: $esr_routes"
say "$settled"

# --- the failover -------------------------------------------------------------------------
want=$(in_service server cat /srv/www/download.bin.sha256 | cut -d' ' -f1)
say "ping at 100/s and a ${download_mib} MiB download at $rate/s; stopping $primary's container 1.5 s in"
in_service client ping -n -q -i 0.01 -W 1 -c "$ping_count" 10.0.2.10 >"$work/ping.txt" 2>&1 &
ping_pid=$!
in_service client curl -sS --limit-rate "$rate" -o /tmp/download.bin -w '%{size_download} %{time_total}\n' \
  http://10.0.2.10:8080/download.bin >"$work/curl.txt" 2>&1 &
curl_pid=$!
sleep 1.5
stop_at=$(date +%s.%N)
podman stop -t 10 "$(container "$primary")" >/dev/null
say "$primary's container stopped in $(python3 -c "import time; print(f'{time.time() - $stop_at:.2f}')") s"
wait "$curl_pid" || true
wait "$ping_pid" || true

# --- the checks -----------------------------------------------------------------------------
failures=()
read -r sent received < <(python3 - "$work/ping.txt" <<'PY'
import re, sys
m = re.search(r"(\d+) packets transmitted, (\d+) received", open(sys.argv[1]).read())
print(*(m.groups() if m else ("0", "0")))
PY
)
lost=$((sent - received))
[ "$sent" -gt 0 ] || failures+=("ping printed no summary: $(cat "$work/ping.txt")")
[ "$lost" -le "$max_lost" ] || failures+=("$lost pings lost (at most $max_lost)")
got=$(in_service client sha256sum /tmp/download.bin | cut -d' ' -f1)
read -r bytes seconds < "$work/curl.txt" || true
if [ "$got" = "$want" ]; then
  download="download ${download_mib} MiB intact in ${seconds} s (SHA-256 matches)"
else
  download="download broken: ${bytes:-0} bytes, SHA-256 $got, expected $want ($(cat "$work/curl.txt"))"
  failures+=("$download")
fi
read -r now_primary _ _ < <(sessions)
[ "$now_primary" = "$secondary" ] || failures+=("the client's primary is '${now_primary:-none}', not $secondary")
via=$(esr_via "$address")
[ "$via" = "$(cluster_address "$secondary")" ] || failures+=("the ESR routes $address via '${via:-nothing}', not $secondary")
say "ping: $sent sent, $received received, $lost lost; $download; client primary now ${now_primary:-none}; ESR via ${via:-none}"
in_service client en --config /etc/holdfast/en.toml status || true

result="client moved $primary -> ${now_primary:-none}, $lost of $sent pings lost at 100/s, $download"
if ((${#failures[@]})); then
  fail "$(IFS=';'; echo "${failures[*]}") ($result)"
fi
summary="docker/test.sh: PASSED in $(elapsed) (routing ${HOLDFAST_ROUTING:-frr}): $result"
