#!/usr/bin/env bash
# podman on nanogate's own image store: `bash e2e/scripts/podman.sh <podman arguments>`.
#
# e2e/scripts/base-images.sh and e2e/tests/shipping.rs run every podman command through this
# file, and so can you (`bash e2e/scripts/podman.sh images`), so that they all see the same
# store and settings:
#   - images, layers and BuildKit-style cache mounts (`RUN --mount=type=cache`, which buildah
#     keeps under $TMPDIR) live under ~/.cache/nanogate/containers: nothing touches the
#     machine's default store, and the cache survives between CI runs on the same machine;
#   - runtime runc: crun fails on these machines ("cgroups in hybrid mode not supported");
#   - ulimits no higher than this shell's hard limits: podman's defaults for root
#     (nofile=1048576) exceed what the sandbox allows, and then every container fails to start.
set -euo pipefail
CACHE_ROOT="${NANOGATE_CACHE:-$HOME/.cache/nanogate}"
STORE="$CACHE_ROOT/containers"
RUNROOT="${NANOGATE_PODMAN_RUNROOT:-/tmp/nanogate-podman-run-$(id -u)}"
mkdir -p "$STORE/storage" "$STORE/tmp" "$RUNROOT"

limit() { # limit HARD CAP: the hard limit, at most CAP
  case $1 in unlimited) echo "$2" ;; *) [ "$1" -lt "$2" ] && echo "$1" || echo "$2" ;; esac
}
nofile=$(limit "$(ulimit -Hn)" 65536)
nproc=$(limit "$(ulimit -Hu)" 32768)
conf="$STORE/containers.conf"
want=$(printf '%s\n' \
  '# Written by e2e/scripts/podman.sh; read through CONTAINERS_CONF.' \
  '[containers]' \
  "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]" \
  '[engine]' \
  'runtime = "runc"' \
  'cgroup_manager = "cgroupfs"' \
  'events_logger = "file"')
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
  tmp=$(mktemp "$conf.XXXXXX")
  printf '%s\n' "$want" >"$tmp"
  mv -f "$tmp" "$conf"
fi

export CONTAINERS_CONF="$conf"
export TMPDIR="$STORE/tmp"
exec podman --root "$STORE/storage" --runroot "$RUNROOT" --runtime runc \
  --cgroup-manager cgroupfs --events-backend file "$@"
