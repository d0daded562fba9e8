#!/usr/bin/env bash
# Builds the operator image from the repository's Dockerfile, unchanged, with buildah (no Docker
# engine needed), as root:
#   hack/build-image.sh [--with-podman]     -> modelbudget/operator:<chart appVersion>
#   MB_IMAGE=registry.example.com/modelbudget/operator:0.1.0 hack/build-image.sh
#
# The Dockerfile's base is python:3.11-slim-bookworm. Where no registry can be reached, this makes
# an equivalent base first: Debian bookworm (--variant=minbase, no docs, man pages or locales)
# with Debian's Python 3.11, pip and venv, from the Debian mirror apt already uses; `python` and
# `pip` are linked into /usr/local/bin where the official image has them. The base is kept in
# buildah's storage under a tag derived from its recipe, so only the first build pays for it.
#
# --with-podman also installs podman and runc, to run the image (tests/e2e/test_image.py).
# Environment:
#   MB_IMAGE           name of the built image (default modelbudget/operator:<appVersion>)
#   MB_PYTHON_IMAGE    use this base and skip the pull and the local base
#   MB_REBUILD_BASE=1  rebuild the local base (e.g. for newer Debian security updates)
#   MB_STORAGE_DRIVER  buildah storage driver (default overlay where the kernel allows it, else
#                      vfs, which needs no kernel support but copies every layer in full)
#   MB_BUILD_CA_BUNDLE CA bundle the build's pip trusts (default: the host's system bundle, so a
#                      TLS-intercepting proxy the host trusts works); mounted read-only over the
#                      build stage's bundle for its RUN step only, never part of an image; "" = off
# Installs what it needs with apt-get when missing. The build fetches the operator's dependencies
# from PyPI. Writes .local/image.env (MB_IMAGE, MB_IMAGE_ID, MB_STORAGE_DRIVER) for the tests;
# the last line printed is "IMAGE <name> <image id> <size>".
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[build-image $(date +%H:%M:%S)] $*" >&2; }
die() { echo "build-image: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: buildah's chroot isolation and debootstrap need it"
start=$SECONDS
SUITE=bookworm
OFFICIAL_BASE=docker.io/library/python:3.11-slim-bookworm
# What the Dockerfile needs of its base (python, pip, python -m venv), and pip's certificates.
BASE_PACKAGES=(python3 python3-venv python3-pip ca-certificates)
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/modelbudget-operator/Chart.yaml)
IMAGE=${MB_IMAGE:-modelbudget/operator:$app_version}

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do  # a command of the package's name on PATH will do too
    command -v "$pkg" >/dev/null || dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
case "${1:-}" in
  --with-podman) apt_install buildah podman runc ;;
  "") apt_install buildah ;;
  *) die "unknown argument $1 (usage: hack/build-image.sh [--with-podman])" ;;
esac

# buildah checks at start-up that the kernel can mount overlay here (not, e.g., on an overlay
# root): then overlay, which shares unchanged layers; else vfs, which works everywhere.
driver=${MB_STORAGE_DRIVER:-}
if [ -z "$driver" ]; then
  driver=vfs
  buildah --storage-driver overlay images >/dev/null 2>&1 && driver=overlay
fi
bh() { buildah --storage-driver "$driver" "$@"; }
have_image() { bh inspect --type image "$1" >/dev/null 2>&1; }

# The first URI apt uses for a suite, from deb822 .sources files or one-line sources.list entries.
apt_mirror() {
  local suite=$1 default=$2 uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$suite" '
      /^$/ { if (u != "" && found) { print u; exit } u = ""; found = 0; next }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) found = 1 }
      END { if (u != "" && found) print u }' | head -1)
  [ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk -v s="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $(i+1) == s) { print $i; exit } }')
  echo "${uri:-$default}"
}

# Runs inside the freshly bootstrapped root: security updates, Python, then everything a running
# operator never reads (docs, man pages, locales, apt lists, logs) goes.
read -r -d '' BASE_RECIPE <<'SH' || true
set -eu
cat > /etc/dpkg/dpkg.cfg.d/01-slim <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
rm -f /etc/apt/sources.list
cat > /etc/apt/sources.list.d/debian.sources <<SRC
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get upgrade -y -qq >/dev/null
apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
# Where python:3.11-slim has them (the Dockerfile calls `pip` and `python`).
ln -sf /usr/bin/python3 /usr/local/bin/python
ln -sf /usr/bin/pip3 /usr/local/bin/pip
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/*
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian/*
SH

make_base() {
  local tag=$1 mirror security ctr mnt
  apt_install debootstrap debian-archive-keyring
  mirror=$(apt_mirror "$SUITE" http://deb.debian.org/debian)
  security=$(apt_mirror "$SUITE-security" http://deb.debian.org/debian-security)
  log "making the base $tag: debootstrap $SUITE (minbase) from $mirror"
  ctr=$(bh from --name "mb-base-$$" scratch)
  trap 'bh rm "$ctr" >/dev/null 2>&1 || true' EXIT
  mnt=$(bh mount "$ctr")
  debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$mnt" "$mirror" > .local/logs/debootstrap.log 2>&1 \
    || { tail -20 .local/logs/debootstrap.log >&2; die "debootstrap failed (log: .local/logs/debootstrap.log)"; }
  log "base: security updates, ${BASE_PACKAGES[*]}, clean-up"
  bh run --isolation chroot --network host \
    -e MIRROR="$mirror" -e SECURITY_MIRROR="$security" -e SUITE="$SUITE" -e PACKAGES="${BASE_PACKAGES[*]}" \
    "$ctr" -- /bin/sh -c "$BASE_RECIPE"
  local version
  version=$(bh run --isolation chroot "$ctr" -- python --version)
  [[ $version == "Python 3.11."* ]] || die "the base has $version, not Python 3.11"
  bh run --isolation chroot "$ctr" -- sh -c 'pip --version && python -m venv --help >/dev/null' >&2
  # buildah run left the build host's resolver, hosts and name in these; a runtime mounts its own.
  : > "$mnt/etc/resolv.conf"; : > "$mnt/etc/hosts"; : > "$mnt/etc/hostname"
  chmod 644 "$mnt/etc/resolv.conf" "$mnt/etc/hosts" "$mnt/etc/hostname"
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label "org.opencontainers.image.description=Debian $SUITE minbase with $version" "$ctr"
  bh commit --quiet --rm "$ctr" "$tag" >/dev/null
  trap - EXIT
}

mkdir -p .local/logs
python_image=${MB_PYTHON_IMAGE:-}
if [ -z "$python_image" ]; then
  if have_image "$OFFICIAL_BASE" || timeout 120 buildah --storage-driver "$driver" pull --quiet "$OFFICIAL_BASE" >/dev/null 2>.local/logs/pull-base.log; then
    python_image=$OFFICIAL_BASE
  else
    log "cannot pull $OFFICIAL_BASE ($(tail -1 .local/logs/pull-base.log)); using a local base"
    key=$( (echo "$SUITE ${BASE_PACKAGES[*]}"; echo "$BASE_RECIPE"; declare -f make_base) | sha256sum | cut -c1-12)
    python_image=localhost/modelbudget-python-base:3.11-$SUITE-$key
    if [ "${MB_REBUILD_BASE:-0}" = 1 ] || ! have_image "$python_image"; then
      base_start=$SECONDS
      make_base "$python_image"
      log "base made in $((SECONDS - base_start)) s"
    else
      log "base $python_image cached"
    fi
  fi
fi

log "buildah bud $IMAGE (storage $driver, PYTHON_IMAGE=$python_image)"
build_start=$SECONDS
ca_bundle=${MB_BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
ca_mount=()
[ -n "$ca_bundle" ] && [ -f "$ca_bundle" ] && ca_mount=(--volume "$(realpath "$ca_bundle"):/etc/ssl/certs/ca-certificates.crt:ro")
bh bud --isolation chroot --network host --layers --build-arg "PYTHON_IMAGE=$python_image" "${ca_mount[@]}" \
  -f Dockerfile -t "$IMAGE" . >&2
id=$(bh inspect --type image --format '{{.FromImageID}}' "$IMAGE")
size=$(bh images --noheading --format '{{.Size}}' "$id")
printf 'MB_IMAGE=%s\nMB_IMAGE_ID=%s\nMB_STORAGE_DRIVER=%s\n' "$IMAGE" "$id" "$driver" > .local/image.env
log "built $IMAGE ($size, storage $driver) in $((SECONDS - build_start)) s ($((SECONDS - start)) s in all)"
echo "IMAGE $IMAGE $id $size"
