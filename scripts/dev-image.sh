#!/usr/bin/env bash
# Builds a tiny development image from the host's busybox-static, with no
# registry: `docker import` of a root filesystem. Usage: dev-image.sh [TAG]
# (default vibebox/devbox:1). Idempotent: an existing tag is kept.
set -euo pipefail
tag="${1:-vibebox/devbox:1}"
# Parallel test binaries build the same tag: serialize them.
exec 9>"${TMPDIR:-/tmp}/vibebox-dev-image.lock"
flock 9
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
if [ -z "$busybox" ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
    busybox=/bin/busybox
  else
    echo "dev-image.sh: needs busybox-static (sudo apt-get install busybox-static)" >&2
    exit 1
  fi
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,tmp,home/dev,workspace,proc,sys,dev}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000:dev:/home/dev:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\ndev:x:1000:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
chown 1000:1000 "$root/home/dev" "$root/workspace"
tar -C "$root" -c . | docker import \
  --change 'CMD ["/bin/sh", "-c", "echo devbox ready; exec sleep 2147483647"]' \
  --change 'ENV PATH=/bin' \
  --change 'WORKDIR /workspace' \
  --change 'LABEL org.vibebox.image=devbox' \
  - "$tag" >/dev/null
echo "$tag"
