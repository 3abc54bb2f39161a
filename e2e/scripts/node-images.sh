#!/usr/bin/env bash
# Builds the two images the real node of the e2e harness (e2e/src/node.rs) needs into nanogate's
# podman store (~/.cache/nanogate/containers, through e2e/scripts/podman.sh), once:
#   - localhost/nanogate-e2e/pause:3.2: the pod sandbox, FROM scratch + the static `pause` binary
#     that e2e/scripts/k8s-assets.sh compiles from the Kubernetes source;
#   - localhost/nanogate-e2e/busybox:1: the tests' workload image, FROM scratch + Debian's
#     busybox-static with its applets as symlinks + `usock` (e2e/images/usock.c, a Unix-socket
#     client and server: busybox's nc has no -U), compiled with `gcc -static`.
# Each image carries a label with the checksum of its inputs and is rebuilt only when they
# change; a second run does nothing. Usage: node-images.sh [K8S_ASSETS_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE_ROOT="${NANOGATE_CACHE:-$HOME/.cache/nanogate}"
WORK="$CACHE_ROOT/node-images"
PAUSE_REF=localhost/nanogate-e2e/pause:3.2
BUSYBOX_REF=localhost/nanogate-e2e/busybox:1
log() { printf '[node-images] %s\n' "$*" >&2; }
podman() { bash "$here/podman.sh" "$@"; }
assets=${1:-$(bash "$here/k8s-assets.sh" | tail -1)}

# built REF SUM: true if REF is in the store with label nanogate.inputs=SUM
built() {
  [ "$(podman image inspect --format '{{index .Labels "nanogate.inputs"}}' "$1" 2>/dev/null)" = "$2" ]
}
# build REF SUM CONTEXT: FROM scratch + CONTEXT/rootfs, with the Containerfile in CONTEXT
build() {
  local started; started=$(date +%s)
  podman build -q --network=none --label "nanogate.inputs=$2" -t "$1" "$3" >/dev/null
  log "built $1 in $(( $(date +%s) - started ))s"
}

sum=$(cat "$assets/pause" | sha256sum | cut -c1-16)
if built "$PAUSE_REF" "$sum"; then
  log "$PAUSE_REF ready"
else
  ctx="$WORK/pause"; rm -rf "$ctx"; mkdir -p "$ctx/rootfs"
  cp "$assets/pause" "$ctx/rootfs/pause"
  printf 'FROM scratch\nCOPY rootfs/ /\nENTRYPOINT ["/pause"]\n' >"$ctx/Containerfile"
  build "$PAUSE_REF" "$sum" "$ctx"
fi

[ -x /bin/busybox ] || { log "/bin/busybox missing: install busybox-static (e2e/scripts/setup.sh does)"; exit 1; }
sum=$(cat /bin/busybox "$here/../images/usock.c" "$0" | sha256sum | cut -c1-16)
if built "$BUSYBOX_REF" "$sum"; then
  log "$BUSYBOX_REF ready"
else
  ctx="$WORK/busybox"; rm -rf "$ctx"; mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/etc" "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  cp /bin/busybox "$ctx/rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
  done
  gcc -Os -static -o "$ctx/rootfs/bin/usock" "$here/../images/usock.c"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
  printf 'FROM scratch\nCOPY rootfs/ /\nCMD ["/bin/sh"]\n' >"$ctx/Containerfile"
  build "$BUSYBOX_REF" "$sum" "$ctx"
fi
