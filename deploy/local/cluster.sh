#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, from the installed rabbitmq-server, for tests
# and for trying failover: `cluster.sh start|stop|status|urls`.
#
#   node              AMQP   management  prometheus  distribution
#   hsync1@localhost  5701   15701       15791       25701
#   hsync2@localhost  5702   15702       15792       25702
#   hsync3@localhost  5703   15703       15793       25703
#
# (CLUSTER_PORT_BASE=5700 moves them all; CLUSTER_SIZE=1 starts the first node alone, a throwaway
# broker for tests.) Everything lives under CLUSTER_DIR (default
# /tmp/harbor-rabbitmq-cluster): one Erlang cookie, and per node its config, data and logs;
# `stop` stops the three nodes and removes it. The default broker on 5672 is left untouched.
# `urls` prints the AMQP_URL that lists the three nodes.
set -euo pipefail

DIR=${CLUSTER_DIR:-/tmp/harbor-rabbitmq-cluster}
BASE=${CLUSTER_PORT_BASE:-5700}
SBIN=${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}
mapfile -t NODES < <(seq "${CLUSTER_SIZE:-3}")

node_name() { echo "hsync$1@localhost"; }
amqp_port() { echo $((BASE + $1)); }
mgmt_port() { echo $((BASE + 10000 + $1)); }
prometheus_port() { echo $((BASE + 10090 + $1)); }
dist_port() { echo $((BASE + 20000 + $1)); }

# rabbitmqctl for node $1, with the cluster's cookie.
ctl() {
  local n=$1
  shift
  HOME="$DIR/home" "$SBIN/rabbitmqctl" -n "$(node_name "$n")" "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_node() {
  local n=$1 dir="$DIR/node$1"
  mkdir -p "$dir/data" "$dir/log"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$n")
management.tcp.port = $(mgmt_port "$n")
management.tcp.ip = 127.0.0.1
prometheus.tcp.port = $(prometheus_port "$n")
prometheus.tcp.ip = 127.0.0.1
loopback_users = none
EOF
  echo '[rabbitmq_management,rabbitmq_consistent_hash_exchange,rabbitmq_prometheus].' >"$dir/enabled_plugins"
  : >"$dir/rabbitmq-env.conf"
  HOME="$DIR/home" \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/data" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$SBIN/rabbitmq-server" -detached
}

await_node() {
  local n=$1
  for _ in $(seq 60); do
    if ctl "$n" -q await_startup --timeout 5 >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  echo "cluster: node $(node_name "$n") did not start; its log: $DIR/node$n/log" >&2
  return 1
}

start() {
  if [ -d "$DIR" ]; then
    echo "cluster: $DIR exists (already started?); run '$0 stop' first" >&2
    exit 1
  fi
  for n in "${NODES[@]}"; do
    if port_open "$(amqp_port "$n")"; then
      echo "cluster: port $(amqp_port "$n") is taken" >&2
      exit 1
    fi
  done
  mkdir -p "$DIR/home"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/home/.erlang.cookie"
  chmod 400 "$DIR/home/.erlang.cookie"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in "${NODES[@]:1}"; do
    ctl "$n" -q stop_app
    ctl "$n" -q join_cluster "$(node_name 1)"
    ctl "$n" -q start_app
  done
  for n in "${NODES[@]}"; do await_node "$n"; done
  echo "cluster: started; AMQP_URL=$(urls)"
}

stop() {
  [ -d "$DIR" ] || return 0
  for n in "${NODES[@]}"; do
    ctl "$n" -q stop >/dev/null 2>&1 || true
  done
  rm -rf "$DIR"
  echo "cluster: stopped"
}

status() {
  [ -d "$DIR" ] || { echo "cluster: not running"; exit 1; }
  ctl 1 cluster_status
}

urls() {
  local list=()
  for n in "${NODES[@]}"; do list+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
  (IFS=,; echo "${list[*]}")
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  urls) urls ;;
  # For tests: stop or start one node (1, 2 or 3) of a running cluster.
  stop-node) ctl "$2" -q stop_app ;;
  start-node) ctl "$2" -q start_app && await_node "$2" ;;
  *)
    echo "usage: $0 start|stop|status|urls|stop-node N|start-node N" >&2
    exit 2
    ;;
esac
