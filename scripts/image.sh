#!/usr/bin/env bash
# Builds Portico's container image without a registry, a container engine or a base image,
# as an OCI archive (`podman load -i`, `skopeo copy oci-archive:…`, `ctr image import`),
# and the CycloneDX SBOMs of the binary and of the image.
#
#   scripts/image.sh [--binary FILE] [--out DIR] [--refresh]
#
# --binary  the portico binary to ship (default target/release/portico; `make image` builds
#           it); its debug info is stripped.
# --out     where everything goes (default target/image):
#             portico-<version>.oci.tar   the image, named localhost/portico:<version>
#             portico.cdx.json            SBOM of the binary (cargo-cyclonedx, Cargo.lock)
#             portico-image.cdx.json      SBOM of the image (Debian packages + the binary)
#             rootfs/                     the Debian root (kept between runs; --refresh)
#
# The root is the machine's Debian release (the binary links against its glibc), unpacked
# by mmdebstrap from the machine's own apt sources: base-files, libc6 and libgcc-s1 — what
# `ldd portico` lists — and nothing else (no shell, no package manager). Reproducible for a
# given SOURCE_DATE_EPOCH (default: the last commit's date).
# Needs mmdebstrap, dpkg-deb, objcopy, python3 and cargo-cyclonedx: scripts/bootstrap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/release/portico
out=target/image
refresh=false
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --refresh) refresh=true; shift ;;
    *) echo "image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { printf 'image: %s\n' "$*" >&2; }
need() {
  command -v "$1" >/dev/null || { log "$1 is missing (installed by scripts/bootstrap.sh)"; exit 1; }
}
need mmdebstrap; need dpkg-deb; need objcopy; need python3
cargo cyclonedx --version >/dev/null 2>&1 || { log "cargo-cyclonedx is missing (installed by scripts/bootstrap.sh)"; exit 1; }
[ -x "$binary" ] || { log "no binary at $binary (make image builds it)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { log "must run as root (mmdebstrap --mode=root)"; exit 1; }

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
version=$("$binary" --version | awk '{print $2}')
name=localhost/portico
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The machine's apt sources, as apt itself reads them (no mirror is named here).
sources=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
  if [ -s "$f" ]; then sources=$f; break; fi
done
[ -n "$sources" ] || { log "no apt sources on this machine"; exit 1; }
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
include=base-files,libc6,libgcc-s1
stamp="$suite $include"

rootfs="$out/rootfs"
if $refresh || [ "$(cat "$out/rootfs.stamp" 2>/dev/null)" != "$stamp" ]; then
  log "unpacking Debian $suite ($include) with mmdebstrap"
  rm -rf "$rootfs" "$out/rootfs.stamp"
  mmdebstrap --quiet --variant=extract --mode=root --include="$include" \
    --extract-hook="$PWD/scripts/image/dpkg-status.sh \"\$1\"" \
    "$suite" "$rootfs" "$sources"
  echo "$stamp" > "$out/rootfs.stamp"
fi

log "binary: $binary (version $version), debug info stripped"
objcopy --strip-debug "$binary" "$out/portico"

# cargo-cyclonedx writes an SBOM next to every workspace member's Cargo.toml, which would
# make cargo rebuild those crates: it runs on a copy of the sources, and the copy's path in
# the SBOM's references becomes /portico (the same SBOM from any checkout).
log "SBOM of the binary from Cargo.lock (cargo-cyclonedx)"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$src"
(cd "$src" && cargo cyclonedx --quiet --manifest-path Cargo.toml --format json \
  --spec-version 1.5 --target "$(rustc -vV | sed -n 's/^host: //p')" \
  --override-filename portico-sbom)
# Its serial number and timestamp are made reproducible too (SOURCE_DATE_EPOCH, content).
sed "s|$src|/portico|g" "$src/portico-sbom.json" | python3 -c '
import datetime, json, os, sys, uuid
bom = json.load(sys.stdin)
bom["metadata"]["timestamp"] = datetime.datetime.fromtimestamp(
    int(os.environ["SOURCE_DATE_EPOCH"]), tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
bom.pop("serialNumber", None)
bom["serialNumber"] = "urn:uuid:%s" % uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(bom, sort_keys=True))
json.dump(bom, sys.stdout, indent=2)
' > "$out/portico.cdx.json"

log "OCI archive"
digest=$(python3 scripts/image/oci.py --rootfs "$rootfs" --binary "$out/portico" \
  --binary-sbom "$out/portico.cdx.json" --name "$name" --version "$version" \
  --out "$out/portico-$version.oci.tar")
log "SBOM of the image"
python3 scripts/image/sbom.py --rootfs "$rootfs" --binary-sbom "$out/portico.cdx.json" \
  --name "$name" --version "$version" --digest "$digest" --out "$out/portico-image.cdx.json" >&2
ln -sf "portico-$version.oci.tar" "$out/portico.oci.tar"
log "done: $out/portico-$version.oci.tar ($name:$version, $digest, $(du -h "$out/portico-$version.oci.tar" | cut -f1))"
echo "$out/portico-$version.oci.tar"
