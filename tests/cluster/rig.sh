#!/usr/bin/env bash
# The failover rig: two nodes, a client and a witness in network namespaces.
#
#   client network 198.18.1.0/24 (bridge tsbr0 in namespace ts-net):
#     node a 198.18.1.1 (a-cli), node b 198.18.1.2 (b-cli), client 198.18.1.10,
#     witness 198.18.1.50, VIP 198.18.1.100
#   dedicated link 198.18.2.0/30 (veth a-link <-> b-link): a .1, b .2
#
# Only addresses from 198.18.0.0/15 (RFC 2544 benchmarking), only inside these namespaces.
# Source it: rig_up, rig_down (idempotent; also run on EXIT by rig_trap), start_node,
# kill_node, cut/heal helpers. Needs root, iproute2, libiscsi-bin for the client.
set -euo pipefail

RIG_NS="ts-a ts-b ts-c ts-w ts-net"
RIG_VIP=198.18.1.100
RIG_TARGET=iqn.2026-12.io.twinsan:rig
RIG_PSK=rig-pair-psk-0123456789abcdef
: "${TWINSAN_BIN:?TWINSAN_BIN must name the twinsan binary}"
: "${RIG_DIR:=$(mktemp -d /tmp/twinsan-rig.XXXXXX)}"

rig_down() {
  for ns in ts-a ts-b ts-c ts-w; do
    # Every process in the namespace goes (daemons, guards, witness, bench).
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  for ns in $RIG_NS; do ip netns del "$ns" 2>/dev/null || true; done
}

rig_trap() { trap 'rig_down' EXIT INT TERM; }

# veth NAME in NS (address ADDR/24) <-> NAME-br in ts-net, enslaved to the bridge.
rig_port() {
  local ns=$1 dev=$2 addr=$3
  ip link add "$dev" type veth peer name "$dev-br"
  ip link set "$dev" netns "$ns"
  ip link set "$dev-br" netns ts-net
  ip -n ts-net link set "$dev-br" master tsbr0 up
  ip -n "$ns" addr add "$addr/24" dev "$dev"
  ip -n "$ns" link set "$dev" up
  ip -n "$ns" link set lo up
}

rig_up() {
  rig_down
  for ns in $RIG_NS; do ip netns add "$ns"; done
  ip -n ts-net link add tsbr0 type bridge
  ip -n ts-net link set tsbr0 up
  rig_port ts-a a-cli 198.18.1.1
  rig_port ts-b b-cli 198.18.1.2
  rig_port ts-c c-cli 198.18.1.10
  rig_port ts-w w-cli 198.18.1.50
  ip link add a-link type veth peer name b-link
  ip link set a-link netns ts-a
  ip link set b-link netns ts-b
  ip -n ts-a addr add 198.18.2.1/30 dev a-link
  ip -n ts-b addr add 198.18.2.2/30 dev b-link
  ip -n ts-a link set a-link up
  ip -n ts-b link set b-link up
  # The client takes gratuitous ARPs for addresses it knows (the default), and for new
  # ones too, so the VIP's move is seen at once.
  ip netns exec ts-c sysctl -qw net.ipv4.conf.all.arp_accept=1
  mkdir -p "$RIG_DIR"
  cat > "$RIG_DIR/witness.toml" <<W
state_dir = "witness-state"
[[pair]]
id = "rig"
key = "$RIG_PSK"
W
}

# node_config NAME (a|b): the node's TOML in $RIG_DIR/NAME/node.toml.
node_config() {
  local me=$1 other ip peer_ip link_ip peer_link_ip role
  if [ "$me" = a ]; then other=b; ip=198.18.1.1; peer_ip=198.18.1.2; link_ip=198.18.2.1; peer_link_ip=198.18.2.2; role=primary
  else other=a; ip=198.18.1.2; peer_ip=198.18.1.1; link_ip=198.18.2.2; peer_link_ip=198.18.2.1; role=secondary; fi
  mkdir -p "$RIG_DIR/$me"
  cat > "$RIG_DIR/$me/node.toml" <<C
[server]
listen = "0.0.0.0:3260"
data_dir = "data"
role = "$role"
admin_socket = "twinsan.sock"
[peer]
name = "$other"
address = "$peer_link_ip:7789"
listen = "$link_ip:7789"
psk = "$RIG_PSK"
replica_timeout_ms = ${RIG_REPLICA_TIMEOUT_MS:-500}
[failover]
pair_id = "rig"
vip = "$RIG_VIP/24"
interface = "$me-cli"
witness = "198.18.1.50:7791"
${RIG_FAILOVER_EXTRA:-}
[[failover.path]]
listen = "$link_ip:7790"
peer = "$peer_link_ip:7790"
[[failover.path]]
listen = "$ip:7790"
peer = "$peer_ip:7790"
[[target]]
name = "$RIG_TARGET"
[[target.lun]]
id = 0
path = "lun0.img"
size = "${RIG_LUN_SIZE:-256MiB}"
C
}

start_witness() {
  ip netns exec ts-w "$TWINSAN_BIN" witness --listen 198.18.1.50:7791 \
    --config "$RIG_DIR/witness.toml" >>"$RIG_DIR/witness.log" 2>&1 &
  echo $! > "$RIG_DIR/witness.pid"
}

start_node() {
  local n=$1
  [ -f "$RIG_DIR/$n/node.toml" ] || node_config "$n"
  ip netns exec "ts-$n" "$TWINSAN_BIN" serve --config "$RIG_DIR/$n/node.toml" \
    >>"$RIG_DIR/$n/out.log" 2>>"$RIG_DIR/$n/daemon.log" &
  echo $! > "$RIG_DIR/$n/pid"
}

node_pid() { cat "$RIG_DIR/$1/pid"; }
kill_node() { kill -9 "$(node_pid "$1")" 2>/dev/null || true; wait "$(node_pid "$1")" 2>/dev/null || true; }
# A stopped (SIGSTOP) daemon accepts on its admin socket but never answers: bounded wait.
status_of() { timeout "${RIG_STATUS_TIMEOUT:-5}" ip netns exec "ts-$1" "$TWINSAN_BIN" status --config "$RIG_DIR/$1/node.toml" 2>/dev/null || true; }
role_of() { status_of "$1" | sed -n 's/^role: //p'; }
# No `| grep -q` here: under pipefail, grep leaving early can fail the pipeline (SIGPIPE).
has_vip() { local out; out=$(ip -n "ts-$1" -4 addr show dev "$1-cli" 2>/dev/null) || return 1; [[ $out == *" $RIG_VIP/"* ]]; }

# Link state changes (a cut keeps the addresses: a cable pulled, not a reconfiguration).
cut_link() { ip -n ts-a link set a-link down; ip -n ts-b link set b-link down; }
heal_link() { ip -n ts-a link set a-link up; ip -n ts-b link set b-link up; }
cut_client() { ip -n ts-net link set "$1-cli-br" down; }
heal_client() { ip -n ts-net link set "$1-cli-br" up; }

# wait_until SECONDS COMMAND...: polls every 100 ms.
wait_until() {
  local t=$1; shift
  local end=$(( $(date +%s%N) + t * 1000000000 ))
  while [ "$(date +%s%N)" -lt "$end" ]; do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  return 1
}

primary_is() { [ "$(role_of "$1")" = primary ] && has_vip "$1"; }
# Every replica line UpToDate (the "lun ...:" line says UpToDate whatever the pair's state,
# so it must not count) and the peer connected, from one status snapshot.
in_sync() {
  local s states
  s=$(status_of "$1")
  states=$(sed -n 's/^replica lun [^:]*: \([A-Za-z]*\).*/\1/p' <<<"$s")
  [ -n "$states" ] && [ -z "$(grep -v '^UpToDate$' <<<"$states")" ] &&
    grep -q '^peer: .*(connected, mirroring)$\|^peer: .*(primary connected, receiving its writes)$' <<<"$s"
}
