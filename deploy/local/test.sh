#!/usr/bin/env bash
# Runs every test: sets up what they need when it is missing (deploy/local/setup.sh: RabbitMQ with
# its plugins, Chromium, cargo-nextest), then `cargo nextest run --workspace --locked`. Arguments
# go to nextest: `deploy/local/test.sh -E 'binary(worker)'` runs one test file. CI runs exactly
# this, after its lint and validation steps.
#
# The tests run with a temporary directory of their own, which they must leave empty: a test
# that leaves files (or a process that outlives its test) fails the run.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/setup.sh rabbitmq chromium nextest

tests_tmp=$(mktemp -d)
trap 'rm -rf "$tests_tmp"' EXIT
TMPDIR=$tests_tmp cargo nextest run --workspace --locked "$@"
left=$(find "$tests_tmp" -mindepth 1 -maxdepth 1)
if [ -n "$left" ]; then
  printf 'The tests left these behind in their temporary directory:\n%s\n' "$left" >&2
  exit 1
fi
