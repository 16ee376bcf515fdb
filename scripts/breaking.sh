#!/usr/bin/env bash
# buf breaking of the protos (buf module buf.build/vibebox/api) against the
# previous commit (or REF) and against the last release named in
# proto/RELEASE: a change to the public or internal contracts that breaks
# wire or source compatibility fails. A clone without one of those commits
# (shallow) cannot be compared with it: say so.
# Usage: breaking.sh [REF]   (default HEAD~1)
set -euo pipefail
cd "$(dirname "$0")/.."
release=$(sed -n 's/^commit *= *\([0-9a-f]\{40\}\) *$/\1/p' proto/RELEASE)
version=$(sed -n 's/^version *= *\([^ ]*\) *$/\1/p' proto/RELEASE)
[ -n "$release" ] || { echo "breaking: proto/RELEASE names no commit (a full 40-hex hash)" >&2; exit 1; }
check() {
  local against=$1 what=$2
  if ! git rev-parse --verify --quiet "$against^{commit}" >/dev/null; then
    echo "breaking: $what $against is not in this clone (shallow?); fetch more history to compare" >&2
    return 0
  fi
  buf breaking --against ".git#ref=$(git rev-parse "$against^{commit}")"
  echo "breaking: no breaking change against $what $(git rev-parse --short "$against^{commit}")"
}
check "${1:-HEAD~1}" "commit"
check "$release" "release $version"
