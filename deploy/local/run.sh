#!/usr/bin/env bash
# Runs the whole system on this machine, without containers: RabbitMQ (the system's), then
# harbor-sandbox (a fake Harbor and Port), harbor-ingest and harbor-worker, built from this
# checkout. Ctrl-C stops the three programs it started (RabbitMQ keeps running).
#
# Every setting can be overridden from the environment; the defaults point the worker at the
# sandbox. HARBOR_SYNC_BIN_DIR=target/release runs a release build instead of building one. To use a real Harbor and Port, set HARBOR_URL, HARBOR_USERNAME, HARBOR_PASSWORD,
# PORT_API_URL, PORT_CLIENT_ID and PORT_CLIENT_SECRET (see the README).
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/setup.sh rabbitmq

: "${SANDBOX_LISTEN_ADDR:=127.0.0.1:8090}"
: "${WEBHOOK_SECRET:=change-me-to-a-long-secret}"
: "${HARBOR_URL:=http://${SANDBOX_LISTEN_ADDR}}"
: "${HARBOR_USERNAME:=admin}"
: "${HARBOR_PASSWORD:=Harbor12345}"
: "${PORT_API_URL:=http://${SANDBOX_LISTEN_ADDR}}"
: "${PORT_CLIENT_ID:=sandbox-client}"
: "${PORT_CLIENT_SECRET:=sandbox-secret}"
: "${LOG_FORMAT:=pretty}"
: "${LISTEN_ADDR:=127.0.0.1:8080}"
: "${METRICS_ADDR:=127.0.0.1:9090}"
: "${SANDBOX_WEBHOOK_URL:=http://${LISTEN_ADDR}/webhook}"
export WEBHOOK_SECRET HARBOR_URL HARBOR_USERNAME HARBOR_PASSWORD PORT_API_URL PORT_CLIENT_ID \
  PORT_CLIENT_SECRET LOG_FORMAT LISTEN_ADDR METRICS_ADDR SANDBOX_LISTEN_ADDR SANDBOX_WEBHOOK_URL

# HARBOR_SYNC_BIN_DIR runs binaries built already (target/release, say) instead of building.
bin=${HARBOR_SYNC_BIN_DIR:-}
if [ -z "$bin" ]; then
  cargo build --bins --quiet
  bin=target/debug
fi
mkdir -p target/local
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

"$bin/harbor-sandbox" >target/local/sandbox.log 2>&1 & pids+=($!)
"$bin/harbor-ingest" >target/local/ingest.log 2>&1 & pids+=($!)
"$bin/harbor-worker" >target/local/worker.log 2>&1 & pids+=($!)

ready() {
  for _ in $(seq 60); do
    curl -fsS "http://$1/readyz" >/dev/null 2>&1 && return 0
    curl -fsS "http://$1/healthz" >/dev/null 2>&1 && [ "${2:-}" = health ] && return 0
    sleep 0.5
  done
  echo "run.sh: $1 did not become ready; see target/local/*.log" >&2
  exit 1
}
ready "$SANDBOX_LISTEN_ADDR" health
ready "$LISTEN_ADDR"
ready "$METRICS_ADDR"

cat <<MSG
Running (logs in target/local/):
  harbor-sandbox  http://${SANDBOX_LISTEN_ADDR}   fake Harbor + Port
  harbor-ingest   http://${LISTEN_ADDR}/webhook
  harbor-worker   http://${METRICS_ADDR}/metrics
  RabbitMQ UI     http://127.0.0.1:15672          (guest / guest)

Open http://${SANDBOX_LISTEN_ADDR}/ in a browser to push, pull, scan and delete and watch Port,
or push an image in the sandbox's Harbor with curl (it sends the webhook to the ingest):
  curl -s -XPOST http://${SANDBOX_LISTEN_ADDR}/sandbox/push -d '{"repository":"library/nginx","tag":"1.27"}' -H 'content-type: application/json'
See what Port now holds:
  curl -s http://${SANDBOX_LISTEN_ADDR}/sandbox/port/entities

Ctrl-C stops.
MSG
wait
