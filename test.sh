#!/usr/bin/env bash
# Runs every test of cairn: Rust unit, property and end-to-end tests (real `cairn`
# processes on loopback driven by aws-sdk-s3), then the Python tests (newest boto3,
# installed into .venv). Needs only cargo and python3 on the machine.
set -euo pipefail
cd "$(dirname "$0")"

# The power-cut test traces a real server's system calls.
if ! command -v strace >/dev/null 2>&1; then
  echo "== installing strace (for the power-cut test)"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq strace) >/dev/null 2>&1 || echo "could not install strace"
  else
    echo "strace is missing and this is not root: the power-cut test will be skipped"
  fi
fi

echo "== cargo test (unit, property, end-to-end)"
cargo build --bin cairn
cargo test --workspace

echo "== python tests (boto3)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet --upgrade boto3 pytest
CAIRN_BIN="$PWD/target/debug/cairn" .venv/bin/python -m pytest -q tests/python
