#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672 with its management UI on :15672:
# starts the installed server if it is stopped, installs it with apt (as root) if it is absent,
# enables the management and consistent-hash exchange plugins, and waits until both ports answer.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 seconds=$2
  for _ in $(seq "$seconds"); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "ensure-rabbitmq: nothing answers on 127.0.0.1:$port after ${seconds}s" >&2
  return 1
}

if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "ensure-rabbitmq: installing rabbitmq-server with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if ! port_open 5672; then
    echo "ensure-rabbitmq: starting RabbitMQ" >&2
    rabbitmq-server -detached
  fi
fi
wait_for_port 5672 120
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  # The management UI shows the backlog and parked events; the tests use its API too. The
  # consistent-hash exchange routes each event to the work queue of its project.
  rabbitmq-plugins -q enable rabbitmq_management rabbitmq_consistent_hash_exchange rabbitmq_prometheus >/dev/null
fi
wait_for_port 15672 60
