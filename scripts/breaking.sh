#!/usr/bin/env bash
# buf breaking against the previous commit: a change to the public or
# internal contracts that breaks wire or source compatibility fails.
# A shallow clone without the previous commit cannot be compared: say so.
set -euo pipefail
cd "$(dirname "$0")/.."
against=${1:-HEAD~1}
if ! git rev-parse --verify --quiet "$against^{commit}" >/dev/null; then
  echo "breaking: $against is not in this clone (shallow?); fetch more history to compare" >&2
  exit 0
fi
buf breaking --against ".git#ref=$against"
echo "breaking: no breaking change against $(git rev-parse --short "$against")"
