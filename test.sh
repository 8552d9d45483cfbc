#!/usr/bin/env bash
# Runs every test of cairn: Rust unit, property and end-to-end tests (real `cairn`
# processes on loopback driven by aws-sdk-s3), then the Python tests (newest boto3,
# installed into .venv). Needs only cargo and python3 on the machine.
set -euo pipefail
cd "$(dirname "$0")"

# strace for the power-cut test, rclone for the client tests, libfaketime for the
# chaos run's clock faults (Debian packages).
missing=""
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v rclone >/dev/null 2>&1 || missing="$missing rclone"
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$missing faketime"
if [ -n "$missing" ]; then
  echo "== installing$missing"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq $missing) >/dev/null 2>&1 || echo "could not install$missing"
  else
    echo "not root: tests that need$missing will be skipped"
  fi
fi

echo "== cargo test (unit, property, end-to-end)"
# Builds target/debug/cairn too (the end-to-end tests run it; so do the Python
# tests below), with the same features as the tests: the S3 SDK is built once.
cargo test --workspace

echo "== python tests (newest boto3; the AWS CLI; rclone)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet --upgrade boto3 pytest
# The AWS CLI pins its own botocore: it gets a venv of its own.
[ -x .venv-cli/bin/python ] || python3 -m venv .venv-cli
.venv-cli/bin/pip install --quiet --upgrade awscli
PATH="$PWD/.venv-cli/bin:$PATH" CAIRN_BIN="$PWD/target/debug/cairn" .venv/bin/python -m pytest -q tests/python
