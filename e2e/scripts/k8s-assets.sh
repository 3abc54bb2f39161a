#!/usr/bin/env bash
# Provides a directory with the Kubernetes binaries of the e2e harness and prints its path on the
# last line of stdout: the control plane (etcd, kube-apiserver, kube-controller-manager) and a real
# node (kubelet, kube-scheduler, kube-proxy, and `pause`, the static sandbox binary of the pause
# image, compiled from the same source's build/pause/linux/pause.c). Order of preference:
#   1. $NANOGATE_K8S_ASSETS or $KUBEBUILDER_ASSETS (used as is);
#   2. the cache under ~/.cache/nanogate/k8s-<version> (a second run never rebuilds);
#   3. a build from Debian's `kubernetes` source package (about 5 minutes on 2 cores).
# Progress goes to stderr so callers can capture the path from stdout.
set -euo pipefail

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_GIT_VERSION="v1.20.2"
CACHE_ROOT="${NANOGATE_CACHE:-$HOME/.cache/nanogate}"
ASSETS="$CACHE_ROOT/k8s-$K8S_GIT_VERSION"

log() { printf '[k8s-assets] %s\n' "$*" >&2; }
BINARIES="etcd kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy pause"
have_all() { local b; for b in $BINARIES; do [ -x "$1/$b" ] || return 1; done; }

for dir in "${NANOGATE_K8S_ASSETS:-}" "${KUBEBUILDER_ASSETS:-}"; do
  if [ -n "$dir" ]; then
    if have_all "$dir"; then log "using binaries from $dir (environment)"; echo "$dir"; exit 0; fi
    log "$dir lacks one of $BINARIES; ignoring it"
  fi
done

if have_all "$ASSETS"; then
  log "using cached binaries from $ASSETS"
  echo "$ASSETS"
  exit 0
fi

# The build below works in one fixed directory: one build at a time, and whoever waited uses
# the cache the other one filled.
mkdir -p "$CACHE_ROOT"
exec 8>"$CACHE_ROOT/k8s-build.lock"
if ! flock -n 8; then
  log "another build of the Kubernetes binaries is running; waiting for it"
  flock 8
  if have_all "$ASSETS"; then log "using cached binaries from $ASSETS"; echo "$ASSETS"; exit 0; fi
fi

start=$(date +%s)
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# 1. deb-src for bookworm main, copied from the machine's own Debian entry (URI + keyring).
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  src_file=$(grep -ls 'Suites:.*bookworm' /etc/apt/sources.list.d/*.sources | head -1 || true)
  if [ -n "$src_file" ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' "$src_file")
    key=$(awk '/^Signed-By:/{print $2; exit}' "$src_file")
  else
    uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)
    key=/usr/share/keyrings/debian-archive-keyring.gpg
  fi
  log "adding deb-src for bookworm main ($uri)"
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: %s\n' "$uri" "$key" \
    | $SUDO tee /etc/apt/sources.list.d/nanogate-src.sources >/dev/null
fi
log "apt-get update + build dependencies"
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq golang-1.19-go rsync golang-github-modern-go-reflect2-dev etcd-server gcc libc6-dev >&2

work="$CACHE_ROOT/build-k8s"
rm -rf "$work"; mkdir -p "$work"
cd "$work"
log "downloading kubernetes=$K8S_DEB_VERSION source"
apt-get source --download-only "kubernetes=$K8S_DEB_VERSION" >&2
tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz
tree=$(find . -maxdepth 1 -mindepth 1 -type d | head -1)
cd "$tree"
# reflect2 1.0.1 breaks under Go >= 1.18 (crash on the first custom-resource write).
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
log "building kube-apiserver, kube-controller-manager, kubelet, kube-scheduler, kube-proxy (about 10 minutes on 2 cores)"
PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 KUBE_GIT_VERSION=$K8S_GIT_VERSION \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubelet cmd/kube-scheduler cmd/kube-proxy" >&2
mkdir -p "$ASSETS.tmp"
for b in kube-apiserver kube-controller-manager kubelet kube-scheduler kube-proxy; do
  cp "_output/local/bin/linux/amd64/$b" "$ASSETS.tmp/"
done
# The pod sandbox's process: static, so the pause image is this one file FROM scratch.
gcc -Os -static -o "$ASSETS.tmp/pause" build/pause/linux/pause.c
cp /usr/bin/etcd "$ASSETS.tmp/etcd"  # self-contained cache: survives removal of etcd-server
rm -rf "$ASSETS"; mv "$ASSETS.tmp" "$ASSETS"
cd /; rm -rf "$work"
log "built in $(( $(date +%s) - start ))s, cached in $ASSETS"
echo "$ASSETS"
