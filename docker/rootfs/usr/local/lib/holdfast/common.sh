# Shared by the images' entrypoints (sourced, not run).
#
# /config is the volume the init service fills (docker/compose.yml): cluster.toml, pki/,
# routing/frr/<node>/ and routing/bird/<node>/ from esr-config, and a `ready` marker written last.

CONFIG=${HOLDFAST_CONFIG_DIR:-/config}

log() { echo "[$(date +%H:%M:%S.%3N)] $*"; }

# Compose starts services in dependency order, but not every engine honours
# `condition: service_completed_successfully`: wait for the init service's marker ourselves.
wait_for_config() {
  local waited=0
  while [ ! -f "$CONFIG/ready" ]; do
    if [ "$waited" -ge 600 ]; then
      log "no $CONFIG/ready after 60 s: did the init service run?"
      exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# HOLDFAST_ROUTES: static routes, comma-separated, in `ip route` syntax, e.g.
# "10.0.2.0/24 via 10.9.0.254". Compose can only give a container a default route through the
# host's bridge; the routes through the testbed's own routers are added here.
add_routes() {
  local routes route
  IFS=, read -ra routes <<<"${HOLDFAST_ROUTES:-}"
  for route in "${routes[@]}"; do
    # shellcheck disable=SC2086 # the route is words on purpose
    ip route replace $route
    log "route $route"
  done
}

# Runs "$@" detached: its parent exits at once, so it is re-parented to tini (PID 1), which reaps
# it; its output still goes to the container's log.
detach() { ("$@" &); }

# The interface that carries IPv4 address $1.
interface_with() {
  ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }'
}

# start_routing DAEMON NODE FOREGROUND: starts FRR (zebra, bfdd, ospfd) or BIRD 2 with the
# configuration esr-config wrote for NODE. With FOREGROUND=yes the last daemon replaces this
# shell; otherwise every daemon is detached and this returns.
#
# esr-config names each node's cluster-network interface as cluster.toml does (ospf_interface,
# default eth0), but container engines number a container's interfaces in their own order. The
# configuration is copied and that name replaced by the interface that really has the node's
# router id, so the same cluster.toml works under Docker and Podman.
start_routing() {
  local daemon=$1 node=$2 foreground=$3
  local src="$CONFIG/routing/$daemon/$node"
  [ -d "$src" ] || { log "no $src: HOLDFAST_ROUTING must be frr or bird, and $node a node of cluster.toml"; exit 1; }
  case "$daemon" in
    frr)
      local id iface want
      id=$(awk '/ospf router-id/ { print $3 }' "$src/ospfd.conf")
      iface=$(interface_with "$id")
      want=$(awk '/^interface / { print $2; exit }' "$src/ospfd.conf")
      [ -n "$iface" ] || { log "no interface has $node's router id $id"; exit 1; }
      install -d -o frr -g frr /run/frr /etc/frr
      for f in "$src"/*.conf; do
        sed "s/^interface $want\$/interface $iface/" "$f" > "/etc/frr/$(basename "$f")"
      done
      chown frr:frr /etc/frr/*.conf
      log "FRR for $node: OSPF on $iface ($id)"
      detach /usr/lib/frr/zebra -f /etc/frr/zebra.conf --log stdout
      local i
      for i in $(seq 100); do [ -S /run/frr/zserv.api ] && break; sleep 0.1; done
      if [ -f /etc/frr/bfdd.conf ]; then
        detach /usr/lib/frr/bfdd -f /etc/frr/bfdd.conf --log stdout
      fi
      if [ "$foreground" = yes ]; then
        exec /usr/lib/frr/ospfd -f /etc/frr/ospfd.conf --log stdout
      fi
      detach /usr/lib/frr/ospfd -f /etc/frr/ospfd.conf --log stdout
      ;;
    bird)
      local id iface want
      id=$(awk '/^router id/ { sub(";", "", $3); print $3 }' "$src/bird.conf")
      iface=$(interface_with "$id")
      want=$(grep -o 'interface "[^"]*"' "$src/bird.conf" | head -n1 | cut -d'"' -f2)
      [ -n "$iface" ] || { log "no interface has $node's router id $id"; exit 1; }
      mkdir -p /run/bird /etc/bird
      sed "s/interface \"$want\"/interface \"$iface\"/" "$src/bird.conf" > /etc/bird/bird.conf
      log "BIRD for $node: OSPF on $iface ($id)"
      if [ "$foreground" = yes ]; then
        exec bird -f -c /etc/bird/bird.conf -s /run/bird/bird.ctl
      fi
      detach bird -f -c /etc/bird/bird.conf -s /run/bird/bird.ctl
      ;;
    *)
      log "HOLDFAST_ROUTING=$daemon: must be frr or bird"
      exit 1
      ;;
  esac
}
