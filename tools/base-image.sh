#!/usr/bin/env bash
# Builds the local base image (Debian bookworm minbase + Python 3.11) that swarmnode's Dockerfiles
# start FROM when no registry is reachable. A no-op when the image already exists.
#
#   tools/base-image.sh [IMAGE]        default IMAGE: swarmnode/base:bookworm
#
# With a registry, skip this and build on python:3.11-slim instead:
#   docker build --build-arg BASE=python:3.11-slim -f docker/node/Dockerfile .
set -euo pipefail
image=${1:-swarmnode/base:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
command -v debootstrap >/dev/null || {
  echo "installing debootstrap (Debian package)" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
# The mirror this machine's apt already uses (no other network is assumed).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
  | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d /tmp/swarmnode-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm (minbase + python3) from $mirror into $root" >&2
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" >/dev/null
# Small: no package caches, lists, docs, man pages or locales in the image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/* "$root"/var/log/*.log
chmod 0755 "$root"  # mktemp made it 0700: the image's / must be traversable by every user
tar -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
docker image inspect "$image" --format "base image {{.RepoTags}}: {{.Size}} bytes"
