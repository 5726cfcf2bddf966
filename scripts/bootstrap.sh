#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test Portico. Idempotent: every step
# checks first and does nothing when its part is already there.
set -euo pipefail

log() { printf 'bootstrap: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (apt packages, bpffs, kernel tests)"; exit 1
fi

# Debian packages the tests and the lab use.
packages=(
  bird2 frr gobgpd            # real BGP peers for the interop tests
  iproute2 iputils-ping ethtool bpftool tcpdump socat iperf3 nftables
  pkg-config
  python3-venv                # kmock and kubernetes-validate (tests/kmock/requirements.txt)
  prometheus                  # promtool checks the metrics exposition in tests
  mmdebstrap binutils         # the container image's Debian root; objcopy (scripts/image.sh)
  podman runc                 # runs the image in tests (runc: crun refuses hybrid cgroups)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The daemons must not start in the root namespace: tests start their own copies.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# Nightly toolchain with rust-src (the eBPF crate builds core with -Z build-std).
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker 0.10.4 loads the rustup toolchain's own LLVM; 0.11+ needs a system LLVM 21+.
if ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.4'; then
  log "installing bpf-linker 0.10.4"
  cargo install bpf-linker@0.10.4 --locked
fi

# cargo-fuzz, for the bounded fuzz run in `make test` (fuzz-smoke).
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# cargo-cyclonedx, for the binary's SBOM (scripts/image.sh).
if ! cargo cyclonedx --version 2>/dev/null | grep -q ' 0\.5\.9$'; then
  log "installing cargo-cyclonedx 0.5.9"
  cargo install cargo-cyclonedx@0.5.9 --locked
fi

# kmock (the emulated Kubernetes API of the controller and agent end-to-end tests) and
# kubernetes-validate (offline schema checks of deploy/) and cyclonedx-python-lib (SBOM
# validation, schemas included), pinned, in their own virtual environment:
# tests/common_kmock finds it at /opt/portico-kmock.
KMOCK_VENV=/opt/portico-kmock
KMOCK_PINS="$(dirname "$0")/../tests/kmock/requirements.txt"
if ! "$KMOCK_VENV/bin/python" -c 'import kmock, kubernetes_validate, cyclonedx, sys; sys.exit(kmock.__version__ != "0.8")' 2>/dev/null \
    || ! cmp -s "$KMOCK_PINS" "$KMOCK_VENV/requirements.txt"; then
  log "installing kmock and kubernetes-validate into $KMOCK_VENV"
  python3 -m venv "$KMOCK_VENV"
  "$KMOCK_VENV/bin/pip" install -q -r "$KMOCK_PINS"
  cp "$KMOCK_PINS" "$KMOCK_VENV/requirements.txt"
fi

# bpffs, for pinned maps.
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
