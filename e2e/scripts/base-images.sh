#!/usr/bin/env bash
# Local stand-ins for the base images of build/Dockerfile and examples/Dockerfile, so that
# e2e/tests/shipping.rs (through e2e/src/images.rs) builds and runs the real images with podman
# (`bash e2e/scripts/base-images.sh`; setup.sh runs it). Idempotent: when every reference exists
# in nanogate's image store (e2e/scripts/podman.sh, under ~/.cache/nanogate/containers) it does
# nothing; otherwise it makes the missing ones.
#
# Why stand-ins: the test machines reach Debian's mirrors, crates.io and static.rust-lang.org but
# no container registry (docker.io, gcr.io, ghcr.io), so the Dockerfile's base images cannot be
# pulled. They are assembled here from Debian packages and tagged with exactly the references the
# Dockerfiles name, which then build unchanged with `podman build --pull=never`:
#
#   docker.io/library/rust:1.95-bookworm
#     `debootstrap --variant=minbase bookworm` from deb.debian.org plus the packages of the
#     official image (buildpack-deps:bookworm) that our build needs: gcc, libc6-dev,
#     ca-certificates (and tzdata, netbase, which the distroless stand-in takes files from).
#     apt sources as in debian:bookworm (bookworm, -updates, -security). Rust 1.95.0 as the
#     official image lays it out: RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo,
#     PATH starting with /usr/local/cargo/bin, the `minimal` profile (rustc, cargo, rust-std; no
#     docs, no clippy/rustfmt, no musl target: the Dockerfile adds that with rustup, from
#     static.rust-lang.org, as it does on the real image). The toolchain is this machine's
#     (rustup's 1.95.0 or stable, when that is 1.95.0), copied and trimmed with rustup.
#
#   gcr.io/distroless/static-debian12:nonroot
#     What distroless/static holds, taken from the same Debian files: /etc/passwd and
#     /etc/group (root, nobody, nonroot = 65532 with home /home/nonroot), nsswitch.conf,
#     os-release, the CA bundle /etc/ssl/certs/ca-certificates.crt, tzdata's
#     /usr/share/zoneinfo, netbase's /etc/services, /etc/protocols, /etc/rpc and
#     /etc/ethertypes, dpkg status records and copyright files of those packages, /tmp (1777),
#     /home/nonroot (65532, 0700). Config: USER 65532:65532, WORKDIR /home/nonroot, PATH and
#     SSL_CERT_FILE as distroless sets them. No shell, no package manager, no libc.
#
#   docker.io/library/debian:bookworm-slim (the first stage of examples/Dockerfile, the example
#   app's image)
#     `debootstrap --variant=minbase bookworm`, slimmed as the official image is: no man pages,
#     info, locales or docs but copyright files, and a dpkg.cfg.d file keeping later installs
#     so; apt sources as in debian:bookworm.
#
# The images carry the label io.nanogate.stand-in (what they stand in for). The real
# distroless layer differs in detail (its os-release, package versions), so image sizes
# measured on top of the stand-in are approximate for that layer; the layers our Dockerfile
# adds are real. Needs root (debootstrap), podman, runc and debootstrap (setup.sh installs them),
# about 3 minutes and 2 GB of scratch space once (the two debootstraps share one package
# download); the images take about 1.1 GB.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[base-images] %s\n' "$*" >&2; }
CACHE_ROOT="${NANOGATE_CACHE:-$HOME/.cache/nanogate}"
# The references, as build/Dockerfile spells them (its ARG defaults substituted).
dockerfile="$here/../../build/Dockerfile"
arg() { sed -n "s/^ARG $1=//p" "$dockerfile" | head -n 1; }
RUST_MINOR=$(arg RUST_VERSION)                # e.g. 1.95: the official tag follows 1.95.x
DISTROLESS_REF=$(arg BASE_IMAGE)
RUST_REF=$(sed -n 's/^FROM \(docker.io\/library\/rust:[^ ]*\) AS build$/\1/p' "$dockerfile" | head -n 1)
# shellcheck disable=SC2016 # the literal text ${RUST_VERSION} of the FROM line
RUST_REF=${RUST_REF//'${RUST_VERSION}'/$RUST_MINOR}
SUITE=${RUST_REF##*-}                         # bookworm
# The example app's Dockerfile: its Debian stage, and the same distroless base.
examples_dockerfile="$here/../../examples/Dockerfile"
DEBIAN_REF=$(sed -n 's/^ARG DEBIAN_IMAGE=//p' "$examples_dockerfile" | head -n 1)
EXAMPLES_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$examples_dockerfile" | head -n 1)
if [ -z "$RUST_MINOR" ] || [ -z "$DISTROLESS_REF" ] || [ -z "$RUST_REF" ] || [ -z "$DEBIAN_REF" ]; then
  log "cannot read the base images from $dockerfile and $examples_dockerfile"
  exit 1
fi
if [ "$EXAMPLES_BASE" != "$DISTROLESS_REF" ] || [ "${DEBIAN_REF##*:}" != "$SUITE-slim" ]; then
  log "$examples_dockerfile: expected BASE_IMAGE=$DISTROLESS_REF and a debian:$SUITE-slim stage"
  exit 1
fi
HOST_TRIPLE=x86_64-unknown-linux-gnu
HOST_RUSTUP="${RUSTUP_HOME:-$HOME/.rustup}"
MIRROR=http://deb.debian.org/debian
podman() { bash "$here/podman.sh" "$@"; }
t0=$(date +%s)

need=()
podman image exists "$RUST_REF" || need+=(rust)
podman image exists "$DISTROLESS_REF" || need+=(distroless)
podman image exists "$DEBIAN_REF" || need+=(debian)
if [ ${#need[@]} -eq 0 ]; then
  log "stand-in base images present: $RUST_REF, $DISTROLESS_REF, $DEBIAN_REF"
  exit 0
fi
needs() { [[ " ${need[*]} " == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, rootful podman)"; exit 1; }
for tool in debootstrap runc; do
  command -v "$tool" >/dev/null || { log "$tool missing: run bash e2e/scripts/setup.sh"; exit 1; }
done
log "building stand-ins for: ${need[*]} (registries are unreachable here; see this script's header)"

work="$CACHE_ROOT/containers/work"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rust"

# debootstrap_root DIR [PACKAGES]: Debian $SUITE minbase (+ PACKAGES) in DIR, with the apt
# sources of the official images and without package lists, caches, logs, man and info pages or
# docs but copyright files. The downloaded packages are shared between calls.
debootstrap_root() {
  local dir=$1 include=${2:-}
  [ -n "$dir" ] || { log "BUG: debootstrap_root without a directory"; exit 1; }
  log "debootstrap --variant=minbase ${include:+--include=$include }$SUITE from $MIRROR (a few minutes)"
  mkdir -p "$work/debs"
  debootstrap --variant=minbase --cache-dir="$work/debs" ${include:+--include="$include"} \
    "$SUITE" "$dir" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
  }
  rm -f "$dir/etc/apt/sources.list" "$dir/etc/resolv.conf"
  : >"$dir/etc/hostname"
  cat >"$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin \
    "$dir"/var/cache/apt/archives/*.deb "$dir"/var/log/*.log \
    "$dir"/usr/share/man/* "$dir"/usr/share/info/*
  find "$dir/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
}

# --- Debian bookworm, minbase + the build's packages (the rust image; distroless' files) -------
if needs rust || needs distroless; then
  debootstrap_root "$rootfs" ca-certificates,gcc,libc6-dev,tzdata,netbase
fi

# Packs a root directory into an image: `import DIR REF --change … …`.
import() {
  local dir=$1 ref=$2
  shift 2
  local changes=()
  while [ $# -gt 0 ]; do changes+=(--change "$1"); shift; done
  tar --numeric-owner --sort=name -C "$dir" -cf - . | podman import -q "${changes[@]}" - "$ref" >/dev/null
  log "imported $ref: $(podman image inspect --format '{{.Size}}' "$ref") bytes"
}

# --- rust:1.95-bookworm ------------------------------------------------------------------------
if needs rust; then
  # This machine's Rust $RUST_MINOR.x (rustup's $RUST_MINOR.x or stable), else rustup installs it.
  toolchain=""
  for dir in "$HOST_RUSTUP"/toolchains/*-"$HOST_TRIPLE"; do
    if [ -x "$dir/bin/rustc" ] && "$dir/bin/rustc" --version | grep -q "^rustc $RUST_MINOR\.[0-9]* "; then
      toolchain=$(readlink -f "$dir")
      break
    fi
  done
  if [ -z "$toolchain" ]; then
    log "no Rust $RUST_MINOR toolchain on this machine; installing it with rustup (minimal)"
    rustup toolchain install "$RUST_MINOR" --profile minimal >&2
    toolchain=$(readlink -f "$HOST_RUSTUP/toolchains/$RUST_MINOR-$HOST_TRIPLE")
  fi
  RUST_VERSION=$("$toolchain/bin/rustc" --version | cut -d' ' -f2)
  rustup_bin=$(command -v rustup)
  log "Rust $RUST_VERSION from $toolchain, rustup $("$rustup_bin" --version 2>/dev/null | cut -d' ' -f2)"
  export RUSTUP_HOME="$rootfs/usr/local/rustup" CARGO_HOME="$rootfs/usr/local/cargo"
  mkdir -p "$RUSTUP_HOME/toolchains" "$CARGO_HOME/bin"
  cp -a "$toolchain" "$RUSTUP_HOME/toolchains/$RUST_VERSION-$HOST_TRIPLE"
  cp "$rustup_bin" "$CARGO_HOME/bin/rustup"
  # The proxies rustup-init installs (all the same binary).
  for proxy in cargo cargo-clippy cargo-fmt cargo-miri clippy-driver rls rust-analyzer rust-gdb \
    rust-gdbgui rust-lldb rustc rustdoc rustfmt; do
    ln -s rustup "$CARGO_HOME/bin/$proxy"
  done
  r() { "$CARGO_HOME/bin/rustup" "$@" >&2; }
  r set profile minimal
  r set auto-self-update disable
  r default "$RUST_VERSION-$HOST_TRIPLE"
  # Down to the minimal profile, with rustup's own bookkeeping (components, manifests).
  installed=$("$CARGO_HOME/bin/rustup" component list --installed --toolchain "$RUST_VERSION-$HOST_TRIPLE")
  for c in $installed; do
    case $c in
      "rustc-$HOST_TRIPLE" | "cargo-$HOST_TRIPLE" | "rust-std-$HOST_TRIPLE") ;;
      rust-std-*)
        log "removing target ${c#rust-std-} from the toolchain copy"
        r target remove --toolchain "$RUST_VERSION-$HOST_TRIPLE" "${c#rust-std-}" ;;
      *)
        log "removing component ${c%-"$HOST_TRIPLE"} from the toolchain copy"
        r component remove --toolchain "$RUST_VERSION-$HOST_TRIPLE" "${c%-"$HOST_TRIPLE"}" ;;
    esac
  done
  chmod -R a+w "$RUSTUP_HOME" "$CARGO_HOME"
  unset RUSTUP_HOME CARGO_HOME
  import "$rootfs" "$RUST_REF" \
    'ENV RUSTUP_HOME=/usr/local/rustup' \
    'ENV CARGO_HOME=/usr/local/cargo' \
    'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "ENV RUST_VERSION=$RUST_VERSION" \
    "LABEL io.nanogate.stand-in=$RUST_REF: debootstrap $SUITE minbase + gcc libc6-dev ca-certificates, Rust $RUST_VERSION (minimal)" \
    'CMD ["bash"]'
fi

# --- distroless/static-debian12:nonroot ----------------------------------------------------
if needs distroless; then
  d="$work/distroless"
  mkdir -p "$d"/etc/ssl/certs "$d"/usr/share/doc "$d"/var/lib/dpkg/status.d "$d"/home/nonroot \
    "$d"/root "$d"/tmp
  cat >"$d/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$d/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  cat >"$d/etc/nsswitch.conf" <<'EOF'
passwd:         files
group:          files
shadow:         files
gshadow:        files
hosts:          files dns
networks:       files
protocols:      db files
services:       db files
ethers:         db files
rpc:            db files
EOF
  cat >"$d/etc/os-release" <<'EOF'
PRETTY_NAME="Distroless (nanogate stand-in assembled from Debian 12 packages)"
NAME="Debian GNU/Linux"
ID="debian"
VERSION_ID="12"
VERSION="Debian GNU/Linux 12 (bookworm)"
HOME_URL="https://github.com/GoogleContainerTools/distroless"
EOF
  cp "$rootfs/etc/ssl/certs/ca-certificates.crt" "$d/etc/ssl/certs/"
  cp -a "$rootfs/usr/share/zoneinfo" "$d/usr/share/"
  for f in services protocols rpc ethertypes; do cp "$rootfs/etc/$f" "$d/etc/"; done
  for pkg in ca-certificates netbase tzdata; do
    dpkg-query --admindir="$rootfs/var/lib/dpkg" -s "$pkg" >"$d/var/lib/dpkg/status.d/$pkg"
    mkdir -p "$d/usr/share/doc/$pkg"
    cp "$rootfs/usr/share/doc/$pkg/copyright" "$d/usr/share/doc/$pkg/"
  done
  chmod 1777 "$d/tmp"
  chmod 0700 "$d/root" "$d/home/nonroot"
  chown 65532:65532 "$d/home/nonroot"
  for forbidden in bin/sh usr/bin/sh bin/busybox usr/bin/apt usr/bin/dpkg; do
    [ ! -e "$d/$forbidden" ] || { log "BUG: distroless stand-in has /$forbidden"; exit 1; }
  done
  import "$d" "$DISTROLESS_REF" \
    'USER 65532:65532' \
    'WORKDIR /home/nonroot' \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    "LABEL io.nanogate.stand-in=$DISTROLESS_REF: passwd/group, CA bundle, tzdata, netbase from Debian $SUITE"
fi

# --- debian:bookworm-slim ---------------------------------------------------------------------
if needs debian; then
  slim="$work/debian"
  debootstrap_root "$slim"
  rm -rf "$slim"/usr/share/locale/* "$slim"/usr/share/lintian "$slim"/usr/share/linda \
    "$slim"/usr/share/groff/*
  # As in the official slim images: packages installed later stay slim too.
  cat >"$slim/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  import "$slim" "$DEBIAN_REF" \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "LABEL io.nanogate.stand-in=$DEBIAN_REF: debootstrap $SUITE minbase, slimmed" \
    'CMD ["bash"]'
fi

log "stand-in base images ready in $(($(date +%s) - t0))s"
