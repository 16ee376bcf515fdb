#!/usr/bin/env bash
# The client packages against a live platform, as their users would run them:
#   0. the programs README's API section shows are the examples run here;
#   1. the Python package installs with pip into a virtualenv of its own and
#      its tests pass (CI checks its generated code against the protos
#      first: clients/python/generate.sh --check);
#   2. `vibebox up` on loopback (ephemeral ports, a fresh data directory),
#      a team with a developer in it (set up through the Python package's
#      generated identity stubs), the dev image;
#   3. the README's programs, `cargo run -p vibebox-client --example
#      quickstart` and `python clients/python/examples/quickstart.py`, as
#      that developer: each must create its environment, wait for it, print
#      `hello` from a command run in it and delete it; meanwhile both watch
#      examples (`--example watch`, `examples/watch.py`) must see each of
#      those environments run and then be deleted.
# Every Docker object the platform made is removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}

# 0. README shows the examples as they are (what runs here is what it shows).
python3 - README.md crates/client/examples/quickstart.rs clients/python/examples/quickstart.py <<'PY'
import re, sys
readme, rust, python = (open(p).read() for p in sys.argv[1:])
section = readme.split("## Use it from code", 1)[1].split("\n## ", 1)[0]
for lang, source in (("rust", rust), ("python", python)):
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"README's API section shows {len(blocks)} {lang} programs, not 1"
    assert source.endswith(blocks[0]), f"README's {lang} program is not the example's code"
PY

# 1. The Python package.
venv="$target/python/client-examples"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# setuptools builds in the tree: no stale module of an earlier build.
rm -rf clients/python/build clients/python/vibebox.egg-info
"$venv/bin/pip" install -q --disable-pip-version-check ./clients/python
"$venv/bin/python" -m unittest discover -s clients/python/tests
python="$venv/bin/python"

# 2. The platform.
if [ -z "${VIBEBOX_BIN:-}" ]; then
  cargo build -q -p vibebox
  bin="$target/debug/vibebox"
else
  bin=$VIBEBOX_BIN
fi
cargo build -q -p vibebox-client --example quickstart --example watch
work=$(mktemp -d)
log="$work/up.log"
"$bin" up --data-dir "$work/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -f "$work/data/installation-id" ]; then
    id=$(cat "$work/data/installation-id")
    docker ps -aq --filter "label=vibebox.installation=$id" | xargs -r docker rm -f -v >/dev/null
    docker network ls -q --filter "label=vibebox.installation=$id" | xargs -r docker network rm >/dev/null
    docker volume ls -q --filter "label=vibebox.installation=$id" | xargs -r docker volume rm -f >/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 120); do
  grep -q "VibeBox is up" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "client-examples: vibebox up exited" >&2; exit 1; }
  sleep 1
done
grep -q "VibeBox is up" "$log" || { cat "$log"; echo "client-examples: vibebox up did not come up" >&2; exit 1; }
addr=$(sed -n 's/.*gateway listening on \([0-9.]*:[0-9]*\).*/\1/p' "$log" | head -1)
[ -n "$addr" ] || { cat "$log"; echo "client-examples: no gateway address in the log" >&2; exit 1; }
export VIBEBOX_URL="http://$addr"

# A team and a developer in it (not the platform admin): the examples run
# as an ordinary member would. The token goes through a file, never a log.
VIBEBOX_ADMIN_TOKEN_FILE="$work/data/admin.token" "$python" - "$work" <<'PY'
import os, secrets, sys
import vibebox
from vibebox import identity_pb2 as idp

work = sys.argv[1]
admin = vibebox.Client(os.environ["VIBEBOX_URL"], open(os.environ["VIBEBOX_ADMIN_TOKEN_FILE"]).read())
call = lambda rpc, request: admin.retry(lambda: rpc(request, metadata=admin.metadata, timeout=30))
team = call(admin.identity.CreateTeam, idp.CreateTeamRequest(
    name="client-examples", request_id="client-examples-team")).team
password = secrets.token_urlsafe(24)
user = call(admin.identity.CreateUser, idp.CreateUserRequest(
    username="examples", password=password, request_id="client-examples-user")).user
call(admin.identity.AddTeamMember, idp.AddTeamMemberRequest(
    team_id=team.id, user_id=user.id, role=idp.TEAM_ROLE_DEVELOPER))
login = admin.identity.Login(idp.LoginRequest(username="examples", password=password), timeout=30)
with open(os.path.join(work, "team"), "w") as f:
    f.write(team.id)
with open(os.path.join(work, "token"), "w") as f:
    f.write(login.token)
print(f"client-examples: team {team.name} ({team.id}), developer {user.username}")
PY
export VIBEBOX_TEAM VIBEBOX_TOKEN
VIBEBOX_TEAM=$(cat "$work/team")
VIBEBOX_TOKEN=$(cat "$work/token")
bash scripts/dev-image.sh vibebox/devbox:1 >/dev/null

# 3. The examples. The watchers first: they print "<name> <STATE> <n>%" per change.
"$target/debug/examples/watch" >"$work/watch-rust.log" 2>&1 &
watchers=$!
"$python" clients/python/examples/watch.py >"$work/watch-python.log" 2>&1 &
watchers="$watchers $!"
trap 'kill $watchers 2>/dev/null || true; cleanup' EXIT
for watcher in rust python; do
  for _ in $(seq 1 120); do
    grep -q "^-- caught up" "$work/watch-$watcher.log" && break
    sleep 0.5
  done
  grep -q "^-- caught up" "$work/watch-$watcher.log" || {
    cat "$work/watch-$watcher.log"
    echo "client-examples: the $watcher watch did not catch up" >&2
    exit 1
  }
done
# Each quickstart prints "<name> is RUNNING" and "exit 0: hello".
check() {
  local what=$1 name=$2 out=$3
  echo "$out" | sed "s/^/  $what: /"
  grep -qx "$name is RUNNING" <<<"$out" || { echo "client-examples: $what did not see its environment running" >&2; exit 1; }
  grep -qx "exit 0: hello" <<<"$out" || { echo "client-examples: $what did not print hello" >&2; exit 1; }
}
out=$(timeout 600 cargo run -q -p vibebox-client --example quickstart) \
  || { echo "$out"; echo "client-examples: the Rust example failed" >&2; exit 1; }
check rust quickstart-rust "$out"
out=$(timeout 600 "$python" clients/python/examples/quickstart.py) \
  || { echo "$out"; echo "client-examples: the Python example failed" >&2; exit 1; }
check python quickstart-python "$out"

# Each watcher saw both environments run, then their deletion.
for watcher in rust python; do
  for name in quickstart-rust quickstart-python; do
    for event in RUNNING DELETED; do
      for _ in $(seq 1 120); do
        grep -q "^$name $event " "$work/watch-$watcher.log" && break
        sleep 0.5
      done
      grep -q "^$name $event " "$work/watch-$watcher.log" || {
        cat "$work/watch-$watcher.log"
        echo "client-examples: the $watcher watch never saw $name $event" >&2
        exit 1
      }
    done
  done
  echo "  $watcher watch: $(grep -vc '^--' "$work/watch-$watcher.log") changes, both environments running, then deleted"
done

# Both deleted what they created: nothing of the team's is left but what is
# on its way out.
"$python" - <<'PY'
import os
import vibebox
client = vibebox.Client(os.environ["VIBEBOX_URL"], os.environ["VIBEBOX_TOKEN"])
team = os.environ["VIBEBOX_TEAM"]
names = [e.name for e in client.list_environments(team, filter="") if e.state != vibebox.environment_pb2.ENVIRONMENT_STATE_DELETING]
assert not names, f"left behind: {names}"
PY
echo "client-examples: 4 passed, 0 failed"
