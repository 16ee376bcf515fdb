#!/usr/bin/env bash
# `just bench`: every benchmark, each next to a baseline measured in the same
# run on this machine. Results are appended to bench/results/history.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)
machine="$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
out="bench/results/$stamp.txt"
{
  echo "# VibeBox benchmarks, $stamp, $machine"
  echo
  echo "## policy: decisions per second (in process)"
  cargo bench -p vibebox-policy --bench evaluate -- --noplot 2>/dev/null | grep -E "time:|thrpt:|decisions|^[a-z_/]+ " || true
  echo
  echo "## audit: durable appends per second, chain verification of 1M events"
  cargo bench -p vibebox-audit --bench audit 2>/dev/null | grep -vE "^\s*$|Compiling|Finished|Running" || true
  echo
  echo "## orchestrator: create-to-running next to raw Docker API"
  bash scripts/dev-image.sh vibebox/devbox:1 >/dev/null
  cargo run --release -q -p vibebox-orchestrator --bin vibebox-orchestrator-bench -- 10 2>/dev/null || true
} | tee "$out"
printf '{"time":"%s","machine":"%s","report":"%s"}\n' "$stamp" "$machine" "$out" >> bench/results/history.jsonl
