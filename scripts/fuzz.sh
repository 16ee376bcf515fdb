#!/usr/bin/env bash
# Fuzzing, bounded: builds every cargo-fuzz target in fuzz/ on stable Rust
# (libFuzzer, no sanitizer) and runs each for a fixed time over its corpus,
# fuzz/corpus/<target>/. Fails if a target crashes (a panic, a broken
# invariant, a timeout or running out of memory); the input that did it is
# kept in fuzz/artifacts/<target>/ and its log is printed.
#
#   bash scripts/fuzz.sh [TARGET...]        (default: every target)
#   VIBEBOX_FUZZ_SECONDS=20    time per target
#   VIBEBOX_FUZZ_JOBS=<nproc>  targets fuzzed at once
#   VIBEBOX_FUZZ_MERGE=1       add the small inputs this run found that reach
#                              new edges to fuzz/corpus/<target>/ (libFuzzer
#                              -merge=1 -use_counters=0: the corpus stays small)
#   VIBEBOX_FUZZ_SANITIZER=address  build with AddressSanitizer instead
#                              (rebuilds everything, runs about 2x slower)
#
# Reproduce a crash: fuzz/target/x86_64-unknown-linux-gnu/release/<target> <artifact>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${VIBEBOX_FUZZ_SECONDS:-20}
jobs=${VIBEBOX_FUZZ_JOBS:-$(nproc)}
sanitizer=${VIBEBOX_FUZZ_SANITIZER:-none}
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="fuzz/target/$triple/release"
started=$SECONDS

# libfuzzer-sys compiles libFuzzer (C++).
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz: installing a C++ compiler"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi

# Only the sanitizers need nightly flags (-Zsanitizer); stable takes them
# with RUSTC_BOOTSTRAP.
if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi

# 16 codegen units: cargo-fuzz defaults to 1, which serializes each crate's
# code generation on a small machine.
build_flags=(--sanitizer "$sanitizer" --codegen-units 16)
echo "fuzz: building the targets (sanitizer: $sanitizer)"
cargo fuzz build "${build_flags[@]}"
built=$SECONDS

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
touch "$work/.start"

# One target: the repository corpus is read-only input; what the run finds
# goes to a scratch directory (merged back only with VIBEBOX_FUZZ_MERGE=1).
fuzz_one() {
    local target=$1 corpus="fuzz/corpus/$1" found="$work/$1" artifacts="fuzz/artifacts/$1/"
    mkdir -p "$corpus" "$found" "$artifacts"
    local status=0
    timeout --kill-after=10 $((seconds + 300)) "$bin_dir/$target" "$found" "$corpus" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts" -print_final_stats=1 \
        >"$work/$target.log" 2>&1 || status=$?
    echo "$status" >"$work/$target.status"
}

running=0
for target in "${targets[@]}"; do
    if [ ! -x "$bin_dir/$target" ]; then
        echo "fuzz: no such target: $target" >&2
        exit 2
    fi
    fuzz_one "$target" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

failed=()
for target in "${targets[@]}"; do
    status=$(cat "$work/$target.status")
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$work/$target.log" | tail -1 | cut -d' ' -f2 || true)
    new=$(find "$work/$target" -type f | wc -l)
    if [ "$status" = 0 ]; then
        printf 'fuzz: %-16s ok    %9s runs in %ss, coverage %s, %s new inputs\n' \
            "$target" "${runs:-?}" "$seconds" "${cov:-?}" "$new"
    else
        failed+=("$target")
        printf 'fuzz: %-16s FAILED (exit %s)\n' "$target" "$status"
        { grep -v -E '^(#[0-9]+|INFO:|MS:|\s*$)' "$work/$target.log" || true; } | tail -60 | sed "s/^/  $target: /"
        echo "  $target: artifacts: $(find "fuzz/artifacts/$target" -type f -newer "$work/.start" | tr '\n' ' ')"
    fi
    if [ "${VIBEBOX_FUZZ_MERGE:-0}" = 1 ] && [ "$status" = 0 ] && [ "$new" -gt 0 ]; then
        # Small inputs only, judged by edge coverage alone (not hit counts):
        # the repository corpus stays a few hundred KB.
        mkdir -p "$work/$target.small"
        find "$work/$target" -type f -size -1025c -exec cp {} "$work/$target.small/" \;
        "$bin_dir/$target" -merge=1 -use_counters=0 "fuzz/corpus/$target" "$work/$target.small" \
            >"$work/$target.merge.log" 2>&1
        echo "fuzz: $target corpus now $(find "fuzz/corpus/$target" -type f | wc -l) inputs"
    fi
done

echo "fuzz: ${#targets[@]} targets, ${#failed[@]} failed; install+build $((built - started))s, total $((SECONDS - started))s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashing inputs are in fuzz/artifacts/<target>/ (reproduce: $bin_dir/<target> <file>)" >&2
    exit 1
fi
