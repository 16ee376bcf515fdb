#!/usr/bin/env bash
# Runs the README's grpcurl examples verbatim against `vibebox up` (default
# ports, a fresh data directory), as an operator would. Fails on the first
# example that does not do what README says.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin="${VIBEBOX_BIN:-$repo/target/debug/vibebox}"
[ -x "$bin" ] || cargo build -p vibebox --manifest-path "$repo/Cargo.toml"
work=$(mktemp -d)
cd "$work"
log="$work/up.log"
"$bin" up >"$log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -f "$work/.vibebox/installation-id" ]; then
    id=$(cat "$work/.vibebox/installation-id")
    docker ps -aq --filter "label=vibebox.installation=$id" | xargs -r docker rm -f -v >/dev/null
    docker network ls -q --filter "label=vibebox.installation=$id" | xargs -r docker network rm >/dev/null
    docker volume ls -q --filter "label=vibebox.installation=$id" | xargs -r docker volume rm -f >/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 120); do
  grep -q "VibeBox is up" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "vibebox up exited" >&2; exit 1; }
  sleep 1
done
grep -q "VibeBox is up" "$log" || { cat "$log"; echo "vibebox up did not come up" >&2; exit 1; }

# The README's examples, in order, from its "Use it with grpcurl" section.
python3 - "$repo/README.md" > "$work/examples.sh" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
section = text.split("## Use it with grpcurl", 1)[1].split("\n## ", 1)[0]
# Then the service-account examples (they reuse TOKEN and TEAM).
accounts = text.split("### Service accounts and API tokens", 1)[1].split("\n## ", 1)[0]
for block in re.findall(r"```sh\n(.*?)```", section + accounts, re.S):
    print(block)
PY
export PATH="$repo/scripts:$PATH"
cd "$work"
n=0; refused=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  n=$((n+1))
  line=${line//scripts\/dev-image.sh/$repo/scripts/dev-image.sh}
  if [[ "$line" == *"docker:24-dind"* ]]; then
    out=$(eval "$line" 2>&1) && { echo "expected a refusal: $line" >&2; exit 1; }
    grep -q "FailedPrecondition" <<<"$out" || { echo "$out" >&2; exit 1; }
    grep -q "mount.docker_socket" <<<"$out" || { echo "$out" >&2; exit 1; }
    refused=$((refused+1))
  elif [[ "$line" == export* || "$line" == *=\$\(* ]]; then
    eval "$line"
  elif [[ "$line" == *"EnvironmentService/WaitEnvironment"* ]]; then
    # Create answers CREATING; WaitEnvironment returns once it has settled,
    # and the README's next steps need it running.
    out=$(eval "$line" 2>&1) || { echo "README example failed: $line" >&2; echo "$out" >&2; exit 1; }
    grep -q "ENVIRONMENT_STATE_RUNNING" <<<"$out" || { echo "not running after WaitEnvironment: $out" >&2; exit 1; }
    echo "$out" | head -5
  elif [[ "$line" == *"EnvironmentService/WatchEnvironments"* ]]; then
    # A watch runs until -max-time ends it (grpcurl then exits non-zero):
    # it must have listed the running environment and said it caught up.
    out=$(eval "$line" 2>&1) || true
    grep -q '"caughtUp": true' <<<"$out" || { echo "README example failed: $line" >&2; echo "$out" >&2; exit 1; }
    grep -q '"purpose": "demo"' <<<"$out" || { echo "the watch did not list the environment: $out" >&2; exit 1; }
    echo "$out" | head -5
  elif [[ "$line" == *"EnvironmentService/UpdateEnvironment"* ]]; then
    out=$(eval "$line" 2>&1) || { echo "README example failed: $line" >&2; echo "$out" >&2; exit 1; }
    grep -q '"memoryLimitMb": "512"' <<<"$out" || { echo "the update did not apply: $out" >&2; exit 1; }
    echo "$out" | head -5
  elif [[ "$line" == *"filter"*"EnvironmentService/ListEnvironments"* ]]; then
    out=$(eval "$line" 2>&1) || { echo "README example failed: $line" >&2; echo "$out" >&2; exit 1; }
    grep -q "\"id\": \"$ENV\"" <<<"$out" || { echo "the filter did not find the environment: $out" >&2; exit 1; }
    echo "$out" | head -5
  else
    out=$(eval "$line" 2>&1) || { echo "README example failed: $line" >&2; echo "$out" >&2; exit 1; }
    echo "$out" | head -5
  fi
done < "$work/examples.sh"
echo "grpcurl smoke: $n README examples ran, $refused refused as documented"
