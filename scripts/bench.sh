#!/usr/bin/env bash
# `just bench`: builds the platform and the bench binary in one cargo
# invocation (profile `bench-build`: release code in target/bench-build),
# then runs vibebox-bench, which starts the real `vibebox up` and measures
# every figure next to a baseline from the same run. Results: a table and
# JSON on stdout, bench/results/<time>.{json,txt} and a line appended to
# bench/results/history.jsonl. Arguments go to vibebox-bench (`--help`),
# e.g. `just bench --density 300` or `just bench --only rpc,exec`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# The environments' image (busybox, `docker import`; no registry needed).
bash scripts/dev-image.sh vibebox/devbox:1 >/dev/null
cargo build --profile bench-build -p vibebox -p vibebox-bench
built=$(date +%s)
echo "bench.sh: build took $((built - start)) s" >&2
"${CARGO_TARGET_DIR:-target}/bench-build/vibebox-bench" "$@"
echo "bench.sh: build $((built - start)) s, benchmarks $(($(date +%s) - built)) s, total $(($(date +%s) - start)) s" >&2
