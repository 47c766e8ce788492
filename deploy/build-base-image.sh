#!/usr/bin/env bash
# Build a base image with Python 3 for deploy/Dockerfile on a machine that cannot pull images:
# a minimal Debian (python3, python3-venv) made by debootstrap from this machine's own apt
# mirror (read from its apt sources at run time), then `docker import`.
#
#   deploy/build-base-image.sh [TAG]       default TAG: psrt-base:local
#   FORCE=1 deploy/build-base-image.sh      rebuild even if TAG exists
#
# Skips the build when TAG exists. Needs root, docker and debootstrap
# (apt-get install -y debootstrap). Then:
#   docker build -f deploy/Dockerfile --build-arg BASE=psrt-base:local .
set -euo pipefail

tag="${1:-psrt-base:local}"
if [[ -z "${FORCE:-}" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "build-base-image: $tag exists; skipping (FORCE=1 rebuilds)"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "build-base-image: debootstrap not found (apt-get install -y debootstrap)" >&2
    exit 1
}

# The host's Debian suite and mirror: first deb822 .sources entry, else sources.list.
. /etc/os-release
suite="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
mirror=""
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
    mirror="$(awk -v suite="$suite" '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) found = 1 }
        /^$/ { if (found && uri) { print uri; done = 1; exit } uri = ""; found = 0 }
        END { if (!done && found && uri) print uri }' "$f")"
    [[ -n "$mirror" ]] && break
done
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
    mirror="$(awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' \
        /etc/apt/sources.list)"
fi
[[ -n "$mirror" ]] || { echo "build-base-image: no apt mirror for $suite found" >&2; exit 1; }

root="$(mktemp -d /tmp/psrt-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "build-base-image: debootstrap $suite (minbase + python3) into $root"
debootstrap --variant=minbase --include=python3,python3-venv \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
}
rm -f "$root.log"
# Small, and without this machine's mirror: no apt lists, caches, docs or sources.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/* "$root"/tmp/*
: >"$root/etc/apt/sources.list"
rm -f "$root"/etc/apt/sources.list.d/*
tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
echo "build-base-image: built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
