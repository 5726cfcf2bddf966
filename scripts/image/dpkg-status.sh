#!/bin/sh
# mmdebstrap --extract-hook of scripts/image.sh: records the unpacked packages in
# var/lib/dpkg/status and their files in var/lib/dpkg/info/<package>.list, as dpkg would.
# The image is built with the extract variant (unpacked, no dpkg run inside: the image has
# no shell for maintainer scripts), so without this it would carry no package database and
# scanners and the image SBOM could not tell what it contains.
set -eu
root=$1
db="$root/var/lib/dpkg"
mkdir -p "$db/info"
: > "$db/status"
for deb in $MMDEBSTRAP_ESSENTIAL; do
  deb="$root$deb"
  pkg=$(dpkg-deb --field "$deb" Package)
  arch=$(dpkg-deb --field "$deb" Architecture)
  multiarch=$(dpkg-deb --field "$deb" Multi-Arch)
  dpkg-deb --field "$deb" | awk '{ print } /^Package:/ { print "Status: install ok installed" }' >> "$db/status"
  echo >> "$db/status"
  list="$pkg"
  [ "$multiarch" = same ] && list="$pkg:$arch"
  dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -e 's|^\./|/|' -e 's|/$||' -e 's|^$|/.|' > "$db/info/$list.list"
done
