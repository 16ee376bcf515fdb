# The project's commands. CI (.ci/run) calls the same ones the README shows.

set shell := ["bash", "-euo", "pipefail", "-c"]

tools := env_var_or_default("VIBEBOX_TOOLS_DIR", env_var("HOME") + "/.vibebox-tools")
export PATH := tools + "/bin:" + env_var("PATH")

# list recipes
default:
    @just --list

# run the whole platform on this machine (embedded defaults)
up *ARGS:
    cargo run --release -p vibebox -- up {{ARGS}}

# every test: unit, service, end-to-end (real Docker; PostgreSQL when VIBEBOX_TEST_POSTGRES_URL is set)
test *ARGS:
    bash tests/run.sh {{ARGS}}

# formatting, clippy, buf lint, chart lint
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    buf lint
    if [ -d helm/vibebox ]; then helm-lite lint helm/vibebox --strict; fi

# breaking-change check of the protos against the previous commit (or REF) and the last release (proto/RELEASE)
breaking *REF:
    bash scripts/breaking.sh {{REF}}

# the client packages' examples (Rust and Python) against a live platform
client-examples:
    bash scripts/client-examples.sh

# regenerate the Python client's code from the protos (--check: fail when it differs)
python-client *ARGS:
    bash clients/python/generate.sh {{ARGS}}

# format the code
fmt:
    cargo fmt --all

# fuzz every parser that sees user input, bounded (VIBEBOX_FUZZ_SECONDS per target, default 20)
fuzz *TARGETS:
    bash scripts/fuzz.sh {{TARGETS}}

# benchmarks through the real platform, each next to a baseline from the same run (flags: `just bench --help`)
[positional-arguments]
bench *ARGS:
    bash scripts/bench.sh "$@"

# install grpcurl, buf, just, helm-lite and kubernetes-validate into a virtualenv
tools:
    bash scripts/install-tools.sh {{tools}}

# build the service images vibebox/<service>:dev from release binaries (no registry needed)
images *ARGS:
    bash scripts/images.sh {{ARGS}}
