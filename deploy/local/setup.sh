#!/usr/bin/env bash
# Installs and starts what running or testing this project needs, when it is missing:
#
#   setup.sh rabbitmq [chromium] [nextest]
#
#   rabbitmq  RabbitMQ answering on 127.0.0.1:5672, with the management (UI and API, :15672),
#             consistent-hash exchange and Prometheus (:15692) plugins: installed with apt-get
#             when absent, started when stopped, the missing plugins enabled
#   chromium  Debian's Chromium, for the sandbox page's browser test
#   nextest   cargo-nextest, the test runner
#
# Each step it takes is one line on stderr; when everything is in place it takes none and says so
# in one line. A step it cannot take (not root, no package mirror) stops it at once with one line
# naming what is missing and the command that would fix it.
#
# Another broker than the default (a test's throwaway node): RABBITMQ_NODENAME, RABBITMQ_SBIN
# (the folder of its CLI tools, which then keep HOME and its .erlang.cookie, and take the node's
# RABBITMQ_ENABLED_PLUGINS_FILE from the environment), RABBITMQ_AMQP_PORT,
# RABBITMQ_MANAGEMENT_PORT, RABBITMQ_PROMETHEUS_PORT. CHROMIUM names the browser's command.
set -euo pipefail

AMQP_PORT=${RABBITMQ_AMQP_PORT:-5672}
MANAGEMENT_PORT=${RABBITMQ_MANAGEMENT_PORT:-15672}
PROMETHEUS_PORT=${RABBITMQ_PROMETHEUS_PORT:-15692}
PLUGINS=(rabbitmq_management rabbitmq_consistent_hash_exchange rabbitmq_prometheus)
CHROMIUM=${CHROMIUM:-chromium}
took_a_step=false

say() {
  printf 'setup: %s\n' "$*" >&2
  took_a_step=true
}
fail() {
  printf 'setup: %s\n' "$*" >&2
  exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 seconds=$2 what=$3
  for _ in $(seq "$seconds"); do
    port_open "$port" && return 0
    sleep 1
  done
  fail "$what does not answer on 127.0.0.1:$port after ${seconds}s; its log is in /var/log/rabbitmq/"
}

# One of RabbitMQ's command-line tools, aimed at RABBITMQ_NODENAME when set.
rabbit() {
  local tool=$1
  shift
  local node=()
  [ -n "${RABBITMQ_NODENAME:-}" ] && node=(-n "$RABBITMQ_NODENAME")
  "${RABBITMQ_SBIN:+$RABBITMQ_SBIN/}$tool" "${node[@]}" "$@"
}

is_root() { [ "$(id -u)" = 0 ]; }

# apt_install PACKAGE WHAT: installs a Debian package, or stops saying how to.
apt_install() {
  local package=$1 what=$2 output
  is_root || fail "$what is missing, and installing it needs root: sudo apt-get install -y $package"
  command -v apt-get >/dev/null 2>&1 ||
    fail "$what is missing and this machine has no apt-get: install $package with its package manager"
  say "installing $what (apt-get install -y $package)"
  export DEBIAN_FRONTEND=noninteractive
  if ! output=$( (apt-get update -qq && apt-get install -y -qq "$package") 2>&1); then
    fail "apt-get could not install $package ($(printf '%s' "$output" | tail -n 1)); is Debian's package mirror reachable? Then: apt-get install -y $package"
  fi
}

step_rabbitmq() {
  if ! port_open "$AMQP_PORT"; then
    if ! command -v "${RABBITMQ_SBIN:+$RABBITMQ_SBIN/}rabbitmq-server" >/dev/null 2>&1; then
      apt_install rabbitmq-server RabbitMQ
    fi
    if ! port_open "$AMQP_PORT"; then
      is_root ||
        fail "RabbitMQ is installed but nothing answers on 127.0.0.1:$AMQP_PORT; start it: sudo rabbitmq-server -detached"
      say "starting RabbitMQ (rabbitmq-server -detached)"
      rabbit rabbitmq-server -detached
    fi
    wait_for_port "$AMQP_PORT" 120 RabbitMQ
    rabbit rabbitmqctl -q await_startup >/dev/null 2>&1 || true
  fi

  if ! command -v "${RABBITMQ_SBIN:+$RABBITMQ_SBIN/}rabbitmq-plugins" >/dev/null 2>&1; then
    # A broker run elsewhere (a container): its plugins are its own business, but say so
    # before a test finds out.
    port_open "$MANAGEMENT_PORT" ||
      fail "RabbitMQ on :$AMQP_PORT has no management API on :$MANAGEMENT_PORT; on its host: rabbitmq-plugins enable ${PLUGINS[*]}"
    return 0
  fi
  local enabled missing=()
  enabled=$(rabbit rabbitmq-plugins -q list -e -m 2>/dev/null) ||
    fail "rabbitmq-plugins cannot reach the broker on :$AMQP_PORT; as root: rabbitmq-plugins enable ${PLUGINS[*]}"
  for plugin in "${PLUGINS[@]}"; do
    grep -qx "$plugin" <<<"$enabled" || missing+=("$plugin")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "enabling RabbitMQ's plugins ${missing[*]} (rabbitmq-plugins enable)"
    rabbit rabbitmq-plugins -q enable "${missing[@]}" >/dev/null 2>&1 ||
      fail "could not enable RabbitMQ's plugins ${missing[*]}; as root: rabbitmq-plugins enable ${missing[*]}"
  fi
  wait_for_port "$MANAGEMENT_PORT" 60 "RabbitMQ's management API"
  wait_for_port "$PROMETHEUS_PORT" 60 "RabbitMQ's Prometheus endpoint"
}

step_chromium() {
  # `type -P`: a path on PATH, never a shell function or alias of that name.
  type -P "$CHROMIUM" >/dev/null 2>&1 || apt_install chromium Chromium
}

step_nextest() {
  cargo nextest --version >/dev/null 2>&1 && return 0
  command -v cargo >/dev/null 2>&1 ||
    fail "cargo is missing: install a Rust toolchain (1.88 or later) with rustup"
  say "installing cargo-nextest (cargo install cargo-nextest --locked)"
  cargo install cargo-nextest --locked --quiet ||
    fail "cargo could not install cargo-nextest; is crates.io reachable? Then: cargo install cargo-nextest --locked"
}

[ $# -gt 0 ] || fail "usage: $0 rabbitmq|chromium|nextest ..."
for step in "$@"; do
  case "$step" in
    rabbitmq | chromium | nextest) "step_$step" ;;
    *) fail "no such step: $step (rabbitmq, chromium, nextest)" ;;
  esac
done
$took_a_step || printf 'setup: nothing to do (%s in place)\n' "$*" >&2
