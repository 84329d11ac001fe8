#!/usr/bin/env bash
# Build Ratchet's images:
#   ratchet/sandbox:latest   default experiment image (Python 3 + NumPy, uid 1000)
#   ratchet/service:latest   the HTTP service (top-level Dockerfile)
#   ratchet/torch:latest     the sandbox image + PyTorch (images/torch); only when named, as
#                            it is large: `images/build.sh torch` (builds sandbox first if missing)
#   ratchet/service:ray      the service with Ray, for `ratchet serve --executor ray` (--with-ray)
#
# Two ways to get base images:
#   public  FROM debian:bookworm-slim / python:3.11-slim (needs a reachable registry)
#   local   ratchet/base:bookworm, made here from Debian packages with debootstrap and
#           `docker import`; no registry needed and no network inside the image builds.
#
# Usage: images/build.sh [--local-base|--public-base] [--no-cache] [--torch cpu|cuda]
#                        [--with-ray] [sandbox] [service] [torch]
# No target: sandbox and service.
# --with-ray: the service image from requirements/ray.txt (the service and Ray, locked), as
# ratchet/service:ray; ratchet/service:latest stays without Ray.
#
# Environment:
#   RATCHET_LOCAL_BASE=1|0  force local / public base images (default: auto-detect; local
#                           when a public base image is missing and cannot be pulled)
#   RATCHET_CACHE_DIR       cache for the base rootfs tarball, build venv and logs
#                           (default /var/cache/ratchet, or ~/.cache/ratchet if not writable)
#   RATCHET_DEBIAN_MIRROR   Debian mirror for debootstrap (default: the first http(s) mirror
#                           of the host's apt sources that carries bookworm main)
#   RATCHET_SANDBOX_BASE    public base of the sandbox image (default debian:bookworm-slim)
#   RATCHET_SERVICE_BASE    public base of the service image (default python:3.11-slim)
#   RATCHET_IMAGE_PYTHON    Python X.Y inside the service image, for picking wheels (default:
#                           from a python:X.Y tag, else 3.11 = Debian bookworm's python3)
#   RATCHET_TORCH_FLAVOUR   cpu | cuda | auto (default): which torch build ratchet/torch gets
#                           (images/torch/requirements-<flavour>.lock); auto: cuda when
#                           `nvidia-smi -L` lists a GPU, else cpu. Same as --torch.
#   RATCHET_TORCH_CPU_INDEX PyTorch's CPU wheel index, for the cpu build of torch when no
#                           --find-links directory (PIP_FIND_LINKS) holds its wheel
#   PYTHON                  host interpreter used to build wheels (default python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SUITE=bookworm
SUITE_PYTHON=3.11
LOCAL_BASE_IMAGE="ratchet/base:${SUITE}"
BASE_PACKAGES="python3,python3-numpy,python3-venv,python3-pip,ca-certificates,git"
SANDBOX_IMAGE="ratchet/sandbox:latest"
SERVICE_IMAGE="ratchet/service:latest"
SERVICE_LOCK=requirements/service.txt
DEPS_NAME=deps  # under images/.wheels: the locked dependency wheels of SERVICE_LOCK
TORCH_IMAGE="ratchet/torch:latest"
PUBLIC_SANDBOX_BASE="${RATCHET_SANDBOX_BASE:-debian:bookworm-slim}"
PUBLIC_SERVICE_BASE="${RATCHET_SERVICE_BASE:-python:3.11-slim}"
WHEEL_DIR="$ROOT/images/.wheels"
PYTHON="${PYTHON:-python3}"
# Bump when the way the base rootfs is produced changes: it is part of the cache key.
BASE_RECIPE_VERSION=1

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

mode="${RATCHET_LOCAL_BASE:-auto}"
case "$mode" in
  1|true|yes) mode=local ;;
  0|false|no) mode=public ;;
  auto|"") mode=auto ;;
  *) die "RATCHET_LOCAL_BASE must be 1 or 0 (got '$mode')" ;;
esac
no_cache=()
targets=()
torch_flavour="${RATCHET_TORCH_FLAVOUR:-auto}"
while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) mode=local ;;
    --public-base) mode=public ;;
    --no-cache) no_cache=(--no-cache) ;;
    --with-ray) SERVICE_IMAGE="ratchet/service:ray"; SERVICE_LOCK=requirements/ray.txt; DEPS_NAME=deps-ray ;;
    --torch) [ $# -ge 2 ] || die "--torch needs cpu, cuda or auto"; torch_flavour="$2"; shift ;;
    --torch=*) torch_flavour="${1#--torch=}" ;;
    sandbox|service|torch) targets+=("$1") ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(sandbox service)
want() { local t; for t in "${targets[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }
case "$torch_flavour" in
  cpu|cuda) ;;
  auto|"")
    if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then torch_flavour=cuda; else torch_flavour=cpu; fi ;;
  *) die "the torch flavour must be cpu, cuda or auto (got '$torch_flavour')" ;;
esac

docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (run scripts/setup.sh)"
# ratchet/torch is built FROM the sandbox image: make that first when it is not there.
if want torch && ! want sandbox && ! docker image inspect "$SANDBOX_IMAGE" >/dev/null 2>&1; then
  targets=(sandbox "${targets[@]}")
fi

if [ -n "${RATCHET_CACHE_DIR:-}" ]; then
  CACHE_DIR="$RATCHET_CACHE_DIR"
elif mkdir -p /var/cache/ratchet 2>/dev/null && [ -w /var/cache/ratchet ]; then
  CACHE_DIR=/var/cache/ratchet
else
  CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/ratchet"
fi
mkdir -p "$CACHE_DIR"

# One build at a time on this machine (the rootfs cache and the wheel dir are shared).
exec 9>"$CACHE_DIR/build.lock"
flock 9

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_ALL=$(now)
timings=()

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------
# Which base images?
# ---------------------------------------------------------------------------
if [ "$mode" = auto ]; then
  mode=public
  public_bases=()
  { want sandbox || want torch; } && public_bases+=("$PUBLIC_SANDBOX_BASE")
  want service && public_bases+=("$PUBLIC_SERVICE_BASE")
  for img in "${public_bases[@]}"; do
    image_exists "$img" && continue
    log "pulling $img"
    if ! timeout 300 docker pull -q "$img" >/dev/null 2>&1; then
      log "cannot pull $img: using a local base image made from Debian packages"
      mode=local
      break
    fi
  done
fi
build_args=()
if [ "$mode" = local ]; then
  sandbox_base="$LOCAL_BASE_IMAGE"
  service_base="$LOCAL_BASE_IMAGE"
  # Everything the builds need is in the base image or in images/.wheels.
  build_args+=(--network none)
else
  sandbox_base="$PUBLIC_SANDBOX_BASE"
  service_base="$PUBLIC_SERVICE_BASE"
fi
log "base images: $mode (sandbox FROM $sandbox_base, service FROM $service_base)"

# ---------------------------------------------------------------------------
# Service wheels, prepared on the host: pip inside `docker build` cannot verify TLS
# through an intercepting proxy, so the image build installs offline from these.
#   images/.wheels/app/   the ratchet wheel (rebuilt every time, reproducibly)
#   images/.wheels/deps/  its dependencies for the image's Python and platform (cached)
# ---------------------------------------------------------------------------
build_venv() {
  # A cached venv with pip and setuptools for building the project wheel.
  local venv="$CACHE_DIR/build-venv" want
  want="$("$PYTHON" -c 'import sys; print(sys.version)' 2>/dev/null | head -n1) $(sha256sum requirements/build.txt | cut -c1-16)"
  if [ "$(cat "$venv/.ratchet-stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" || die "cannot create a venv with $PYTHON (python3-venv missing?)"
    "$venv/bin/python" -m pip install -q --require-hashes --no-deps -r requirements/build.txt \
      || die "cannot install the locked build backend (requirements/build.txt) into the build venv"
    printf '%s\n' "$want" >"$venv/.ratchet-stamp"
  fi
}

build_wheels() {
  local pyver="$1" py="$CACHE_DIR/build-venv/bin/python" arch stamp src
  arch=$(uname -m)
  build_venv
  mkdir -p "$WHEEL_DIR"

  # The project, from a clean copy of its sources (no stale build/ directories).
  src=$(mktemp -d)
  cp pyproject.toml "$src/"
  for f in README.md README.rst LICENSE LICENSE.txt; do
    if [ -f "$f" ]; then cp "$f" "$src/"; fi
  done
  [ -f "$src/README.md" ] || : >"$src/README.md"
  tar -cf - --exclude='__pycache__' --exclude='*.pyc' client nodeagent sandbox service | tar -C "$src" -xf -
  rm -rf "$WHEEL_DIR/app"
  # SOURCE_DATE_EPOCH: identical sources give an identical wheel, hence a cached layer.
  if ! SOURCE_DATE_EPOCH=315532800 "$py" -m pip wheel -q --no-deps --no-build-isolation \
       --wheel-dir "$WHEEL_DIR/app" "$src"; then
    rm -rf "$src"
    die "building the ratchet wheel failed"
  fi
  rm -rf "$src"

  # Dependencies for the image's interpreter (not the host's): exactly the locked set, hashes
  # checked here and again inside the build.
  local deps="$WHEEL_DIR/$DEPS_NAME"
  stamp="$(sha256sum "$SERVICE_LOCK" | cut -c1-16) py$pyver $arch"
  if [ "$(cat "$deps/.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "downloading the locked dependency wheels for Python $pyver ($arch)"
    rm -rf "$deps"
    "$py" -m pip download -q --only-binary=:all: --require-hashes --no-deps \
      --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none \
      --platform "manylinux_2_36_$arch" --platform "manylinux_2_34_$arch" \
      --platform "manylinux_2_31_$arch" --platform "manylinux_2_28_$arch" \
      --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
      --platform "manylinux_2_12_$arch" --platform "manylinux2010_$arch" \
      --platform "manylinux_2_5_$arch" --platform "manylinux1_$arch" --platform "linux_$arch" \
      --dest "$deps" -r "$SERVICE_LOCK" \
      || die "downloading the locked dependency wheels ($SERVICE_LOCK) failed"
    cp "$SERVICE_LOCK" "$deps/requirements.txt"
    printf '%s\n' "$stamp" >"$deps/.stamp"
  fi
}

wheels_pid=
if want service; then
  if [ -n "${RATCHET_IMAGE_PYTHON:-}" ]; then
    pyver="$RATCHET_IMAGE_PYTHON"
  elif [[ "$service_base" =~ ^(docker\.io/)?(library/)?python:([0-9]+\.[0-9]+) ]]; then
    pyver="${BASH_REMATCH[3]}"
  else
    pyver="$SUITE_PYTHON"
  fi
  log "preparing service wheels (Python $pyver) in the background"
  wheels_log="$CACHE_DIR/wheels.log"
  T_WHEELS=$(now)
  ( build_wheels "$pyver"; echo "wheels took $(elapsed "$T_WHEELS")s" ) >"$wheels_log" 2>&1 &
  wheels_pid=$!
  trap 'if [ -n "$wheels_pid" ]; then kill "$wheels_pid" 2>/dev/null || true; fi' EXIT
fi

# ---------------------------------------------------------------------------
# ratchet/torch: wheels from the lock and (local base) Debian packages, both fetched on the
# host, so the image build itself needs no network.
# ---------------------------------------------------------------------------
TORCH_DIR="$ROOT/images/torch"

torch_wheels() {
  # The locked wheels for the image's Python, checked against their hashes; cached per lock.
  local flavour="$1" lock key dir py extra=()
  lock="$TORCH_DIR/requirements-$flavour.lock"
  [ -f "$lock" ] || die "no lock file $lock"
  key=$(sha256sum "$lock" | cut -c1-16)
  dir="$CACHE_DIR/torch-wheels/$flavour-$key"
  if [ ! -f "$dir/.complete" ]; then
    build_venv
    py="$CACHE_DIR/build-venv/bin/python"
    mapfile -t platform < <("$PYTHON" "$TORCH_DIR/lock.py" --pip-platform-args)
    if [ -n "${RATCHET_TORCH_CPU_INDEX:-}" ]; then extra=(--extra-index-url "$RATCHET_TORCH_CPU_INDEX"); fi
    echo "downloading the $flavour wheels of $lock"
    rm -rf "$dir.partial"
    if ! "$py" -m pip download -q --no-deps --require-hashes --only-binary=:all: "${platform[@]}" \
         "${extra[@]}" --dest "$dir.partial" -r "$lock"; then
      [ "$flavour" = cpu ] && echo "the cpu build of torch comes from PyTorch's CPU wheel index:" \
        "set RATCHET_TORCH_CPU_INDEX to it, or put the wheel in a PIP_FIND_LINKS directory" >&2
      return 1
    fi
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
    : >"$dir/.complete"
  fi
  find "$CACHE_DIR/torch-wheels" -mindepth 1 -maxdepth 1 -name "$flavour-*" ! -name "$flavour-$key" \
    -exec rm -rf {} +
  echo "$dir" >"$CACHE_DIR/torch-wheels/$flavour.current"
}

torch_debs() {
  # The Debian packages images/torch needs, resolved against the sandbox image's own package
  # database (so exactly what is missing there) from the suite its base was made from.
  local dest="$1" tmp cid key dir mirror keyring arch apt_opts
  tmp=$(mktemp -d)
  cid=$(docker create "$SANDBOX_IMAGE" true) || die "cannot create a container of $SANDBOX_IMAGE"
  docker cp "$cid:/var/lib/dpkg/status" "$tmp/status" >/dev/null || die "cannot read the dpkg status of $SANDBOX_IMAGE"
  docker rm "$cid" >/dev/null
  mirror=$(debian_mirror) || exit 1
  key=$( { cat "$tmp/status" "$TORCH_DIR/debian-packages"; echo "$mirror $SUITE"; } | sha256sum | cut -c1-16)
  dir="$CACHE_DIR/torch-debs/$key"
  if [ ! -f "$dir/.complete" ]; then
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || die "$keyring is missing (install debian-archive-keyring)"
    command -v apt-get >/dev/null || die "apt-get is needed to fetch the Debian packages of $TORCH_IMAGE"
    arch=$(docker run --rm --network none "$SANDBOX_IMAGE" dpkg --print-architecture)
    mkdir -p "$tmp/lists/partial" "$tmp/cache" "$dir.partial/partial"
    echo "deb [signed-by=$keyring] $mirror $SUITE main" >"$tmp/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/none"
              -o "Dir::Etc::Preferences=$tmp/none" -o "Dir::Etc::PreferencesParts=$tmp/none"
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::State::status=$tmp/status"
              -o "Dir::Cache=$tmp/cache" -o "Dir::Cache::archives=$dir.partial"
              -o "APT::Architecture=$arch" -o "APT::Architectures=$arch"
              -o "APT::Install-Recommends=false" -o "Debug::NoLocking=1")
    log "fetching Debian packages for $TORCH_IMAGE from $mirror ($SUITE)"
    # shellcheck disable=SC2046
    if ! { apt-get "${apt_opts[@]}" -q update && apt-get "${apt_opts[@]}" -q -y install --download-only \
           $(cat "$TORCH_DIR/debian-packages"); } >"$CACHE_DIR/torch-debs.log" 2>&1; then
      tail -n 20 "$CACHE_DIR/torch-debs.log" >&2
      die "fetching the Debian packages failed (full log: $CACHE_DIR/torch-debs.log)"
    fi
    rm -rf "$dir.partial/partial" "$dir"
    mv "$dir.partial" "$dir"
    : >"$dir/.complete"
  fi
  rm -rf "$tmp"
  find "$CACHE_DIR/torch-debs" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
  ln "$dir"/*.deb "$dest"/ 2>/dev/null || cp "$dir"/*.deb "$dest"/
}

torch_wheels_pid=
if want torch; then
  log "preparing the $torch_flavour wheels of $TORCH_IMAGE in the background"
  mkdir -p "$CACHE_DIR/torch-wheels"
  torch_log="$CACHE_DIR/torch-wheels.log"
  T_TWHEELS=$(now)
  ( torch_wheels "$torch_flavour"; echo "torch wheels took $(elapsed "$T_TWHEELS")s" ) >"$torch_log" 2>&1 &
  torch_wheels_pid=$!
  trap 'for p in "$wheels_pid" "$torch_wheels_pid"; do if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi; done' EXIT
fi

# ---------------------------------------------------------------------------
# Local base image: debootstrap -> tar (cached) -> docker import
# ---------------------------------------------------------------------------
debian_mirror() {
  if [ -n "${RATCHET_DEBIAN_MIRROR:-}" ]; then echo "$RATCHET_DEBIAN_MIRROR"; return; fi
  local m
  m=$("$PYTHON" - "$SUITE" <<'PY' 2>/dev/null || true
import glob, re, sys

suite = sys.argv[1]

def ok(uri, suites, comps):
    return uri.startswith(("http://", "https://")) and suite in suites and "main" in comps

for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb" and ok(words[1], [words[2]], words[3:]):
            print(words[1].rstrip("/"))
            sys.exit(0)

for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        continue
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            if ok(uri, fields.get("suites", "").split(), fields.get("components", "").split()):
                print(uri.rstrip("/"))
                sys.exit(0)
sys.exit(1)
PY
)
  [ -n "$m" ] || die "no Debian mirror for $SUITE main in the host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/): set RATCHET_DEBIAN_MIRROR to one, e.g. your organisation's mirror"
  echo "$m"
}

unmount_under() {
  # debootstrap mounts /proc, /sys (and may bind /dev) inside the target; a failed run can
  # leave them mounted.
  local mnt
  awk -v d="$1/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
}

remove_rootfs() {
  [ -e "$1" ] || return 0
  unmount_under "$1"
  rm -rf --one-file-system "${1:?}"
}

build_local_base() {
  local recipe key tarball rootfs mirror t
  recipe="suite=$SUITE variant=minbase include=$BASE_PACKAGES recipe=$BASE_RECIPE_VERSION"
  key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
  if image_exists "$LOCAL_BASE_IMAGE" &&
     [ "$(docker image inspect -f '{{ index .Config.Labels "org.ratchet.base.recipe" }}' \
          "$LOCAL_BASE_IMAGE" 2>/dev/null)" = "$key" ]; then
    log "$LOCAL_BASE_IMAGE is up to date"
    return
  fi
  tarball="$CACHE_DIR/base-$SUITE-$key.tar"
  if [ ! -s "$tarball" ]; then
    [ "$(id -u)" = 0 ] || die "building the local base image needs root (debootstrap)"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (run scripts/setup.sh)"
    mirror=$(debian_mirror) || exit 1
    rootfs="$CACHE_DIR/rootfs-$SUITE-$key.tmp"
    remove_rootfs "$rootfs"
    log "debootstrap $SUITE from $mirror (a minute or two)"
    t=$(now)
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" \
         "$SUITE" "$rootfs" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1; then
      tail -n 30 "$CACHE_DIR/debootstrap.log" >&2
      remove_rootfs "$rootfs"
      die "debootstrap failed (full log: $CACHE_DIR/debootstrap.log)"
    fi
    timings+=("debootstrap $(elapsed "$t")s")
    unmount_under "$rootfs"
    if awk -v d="$rootfs/" 'index($2 "/", d) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
      die "file systems are still mounted under $rootfs"
    fi
    # Drop what a container never needs: package caches, docs, man pages, translations.
    rm -rf --one-file-system "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/cache/apt/*.bin \
           "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/log/* \
           "${rootfs:?}"/usr/share/doc/* "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* \
           "${rootfs:?}"/usr/share/locale/* "${rootfs:?}"/dev/* "${rootfs:?}"/run/* "${rootfs:?}"/tmp/*
    : >"$rootfs/etc/resolv.conf"
    rm -f "$rootfs/etc/hostname"
    tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    remove_rootfs "$rootfs"
  else
    log "using the cached rootfs $tarball"
  fi
  log "importing $LOCAL_BASE_IMAGE"
  t=$(now)
  docker import \
    --change "LABEL org.ratchet.base.recipe=$key" \
    --change "LABEL org.opencontainers.image.title=ratchet-base" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$LOCAL_BASE_IMAGE" >/dev/null
  timings+=("import $(elapsed "$t")s")
  # Tarballs of earlier recipes are dead weight.
  find "$CACHE_DIR" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "base-$SUITE-$key.tar" -delete
}

docker_build() {
  local name="$1"; shift
  local t out
  t=$(now)
  out="$CACHE_DIR/build-$name.log"
  if ! docker build "${build_args[@]}" "${no_cache[@]}" "$@" >"$out" 2>&1; then
    tail -n 40 "$out" >&2
    die "building $name failed (full log: $out)"
  fi
  timings+=("$name $(elapsed "$t")s")
}

if [ "$mode" = local ]; then
  build_local_base
fi

if want sandbox; then
  log "building $SANDBOX_IMAGE"
  docker_build sandbox -t "$SANDBOX_IMAGE" --build-arg "BASE_IMAGE=$sandbox_base" \
    "$ROOT/images/sandbox"
fi

if want service; then
  if ! wait "$wheels_pid"; then
    cat "$wheels_log" >&2
    die "preparing the service wheels failed (log: $wheels_log)"
  fi
  wheels_pid=
  timings+=("wheels $(sed -n 's/^wheels took //p' "$wheels_log") (in parallel)")
  log "building $SERVICE_IMAGE"
  version=$(basename "$WHEEL_DIR"/app/ratchet-*.whl | cut -d- -f2)
  docker_build service -t "$SERVICE_IMAGE" -f "$ROOT/Dockerfile" \
    --build-arg "BASE_IMAGE=$service_base" --build-arg "RATCHET_VERSION=$version" \
    --build-arg "DEPS=$DEPS_NAME" "$ROOT"
fi

if want torch; then
  if ! wait "$torch_wheels_pid"; then
    cat "$torch_log" >&2
    die "preparing the torch wheels failed (log: $torch_log)"
  fi
  torch_wheels_pid=
  timings+=("$(sed -n 's/^torch wheels took /torch wheels /p' "$torch_log") (in parallel)")
  log "building $TORCH_IMAGE ($torch_flavour)"
  ctx=$(mktemp -d "$CACHE_DIR/torch-context.XXXXXX")
  cp "$TORCH_DIR/Dockerfile" "$TORCH_DIR/install.sh" "$TORCH_DIR/debian-packages" "$ctx/"
  cp "$TORCH_DIR/requirements-$torch_flavour.lock" "$ctx/requirements.lock"
  mkdir "$ctx/wheels" "$ctx/debs"
  wheel_dir=$(cat "$CACHE_DIR/torch-wheels/$torch_flavour.current")
  ln "$wheel_dir"/*.whl "$ctx/wheels/" 2>/dev/null || cp "$wheel_dir"/*.whl "$ctx/wheels/"
  if [ "$mode" = local ]; then
    t=$(now)
    torch_debs "$ctx/debs"
    timings+=("torch debs $(elapsed "$t")s")
  fi
  docker_build torch -t "$TORCH_IMAGE" --build-arg "BASE_IMAGE=$SANDBOX_IMAGE" \
    --build-arg "TORCH_FLAVOUR=$torch_flavour" \
    --label "org.ratchet.torch.lock=$(sha256sum "$TORCH_DIR/requirements-$torch_flavour.lock" | cut -c1-16)" \
    "$ctx"
  rm -rf "$ctx"
  log "$TORCH_IMAGE: $(docker image inspect -f '{{.Size}}' "$TORCH_IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
fi

log "done in $(elapsed "$T_ALL")s (${timings[*]:-nothing to build})"
