#!/usr/bin/env bash
# Builds one image per VibeBox service (vibebox/<service>:<tag>) plus the
# compose PKI init image (vibebox/pki-init:<tag>) from binaries built on this
# machine: no registry, no base image, FROM scratch with exactly the shared
# libraries the binaries need.
#
# Usage: scripts/images.sh [--profile release|debug] [--no-build] [--bin-dir DIR] [--tag TAG] [SERVICE...]
#   --profile  cargo profile whose binaries go into the images (default release)
#   --no-build use the binaries already in target/<profile> (tests do this)
#   --bin-dir  take the binaries from DIR (implies --no-build)
#   --tag      image tag (default dev)
#   SERVICE    any of gateway identity policy orchestrator audit pki-init (default all)
set -euo pipefail

profile=release
build=1
tag=dev
services=()
bin_dir_flag=
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --bin-dir) bin_dir_flag="$2"; build=0; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
    -*) echo "images.sh: unknown flag $1" >&2; exit 2 ;;
    *) services+=("$1"); shift ;;
  esac
done
[ ${#services[@]} -gt 0 ] || services=(gateway identity policy orchestrator audit pki-init)

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin_dir="$target_dir/$profile"
[ "$profile" = dev ] && bin_dir="$target_dir/debug"
[ -n "$bin_dir_flag" ] && bin_dir="$bin_dir_flag"

port_of() {
  case "$1" in
    gateway) echo 7700 ;; identity) echo 7701 ;; policy) echo 7702 ;;
    orchestrator) echo 7703 ;; audit) echo 7704 ;; pki-init) echo 0 ;;
    *) echo "images.sh: unknown service $1" >&2; exit 2 ;;
  esac
}
for s in "${services[@]}"; do port_of "$s" >/dev/null; done

if [ "$build" = 1 ]; then
  packages=(-p vibebox-pki-init --bin vibebox-pki-init --bin vibebox-health-probe)
  for s in "${services[@]}"; do
    [ "$s" = pki-init ] || packages+=(-p "vibebox-$s" --bin "vibebox-$s")
  done
  case "$profile" in
    release) cargo_profile=(--release) ;;
    debug|dev) cargo_profile=(--profile dev) ;;
    *) cargo_profile=(--profile "$profile") ;;
  esac
  (cd "$root" && cargo build "${cargo_profile[@]}" "${packages[@]}")
fi

# Copies a binary and every shared library it loads (as ldd resolves them on
# this host) into the root filesystem $2, at the same paths.
stage_binary() {
  local bin="$1" rootfs="$2"
  [ -x "$bin" ] || { echo "images.sh: $bin is missing (build it or drop --no-build)" >&2; exit 1; }
  install -D -m 0755 "$bin" "$rootfs/usr/local/bin/$(basename "$bin")"
  # Debug information is of no use in the image (and is most of a debug build).
  if command -v strip >/dev/null; then strip --strip-debug "$rootfs/usr/local/bin/$(basename "$bin")"; fi
  local lib
  for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+' || true); do
    [ -e "$lib" ] || continue
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}

for s in "${services[@]}"; do
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  mkdir -p "$ctx/rootfs/etc" "$ctx/state/data" "$ctx/state/tmp" "$ctx/state/pki"
  chmod 0700 "$ctx/state/data" "$ctx/state/pki"
  chmod 1777 "$ctx/state/tmp"
  printf 'root:x:0:0:root:/:/sbin/nologin\nvibebox:x:65532:65532:vibebox:/data:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nvibebox:x:65532:\n' > "$ctx/rootfs/etc/group"
  if [ "$s" = pki-init ]; then
    binary=vibebox-pki-init
    # Mount points of the per-service PKI volumes (--distribute=/out): a
    # fresh named volume takes this ownership and mode.
    for peer in gateway identity policy orchestrator audit; do
      mkdir -p "$ctx/state/out/$peer"
      chmod 0700 "$ctx/state/out/$peer"
    done
  else
    binary="vibebox-$s"
    stage_binary "$bin_dir/vibebox-health-probe" "$ctx/rootfs"
  fi
  stage_binary "$bin_dir/$binary" "$ctx/rootfs"
  sed -e "s/@SERVICE@/$s/g" -e "s/@PORT@/$(port_of "$s")/g" -e "s/@BINARY@/$binary/g" \
    "$root/deploy/images/Dockerfile.in" > "$ctx/Dockerfile"
  if [ "$s" = pki-init ]; then
    # A one-shot tool: no port to listen on.
    sed -i -e '/^EXPOSE/d' -e 's/VIBEBOX_LISTEN=0.0.0.0:0/VIBEBOX_PKI_DIR=\/pki/' "$ctx/Dockerfile"
  fi
  if ! docker build -q -t "vibebox/$s:$tag" "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    exit 1
  fi
  echo "vibebox/$s:$tag"
  rm -rf "$ctx"
  trap - EXIT
done
