#!/usr/bin/env bash
# Builds citytel's container images, idempotently, from Debian's archive and the project's lock
# file: no network inside any image build.
#   citytel            bridge, processor, alerter, API and CLI (the command chooses the role)
#   citytel-simulator  the same plus the development tools (the simulated city)
#   citytel-mosquitto  Mosquitto 2.1 with SQLite persistence and citytel's topic index plugin
#   citytel-kafka      Apache Kafka (KRaft) from the same Maven jars as the local stack
#   citytel-postgres   PostgreSQL 15 with TimescaleDB (Apache edition)
#   citytel-prometheus Prometheus with citytel's alert rules
# Each image starts from a root filesystem that mmdebstrap makes from the machine's own apt
# sources (only the Debian packages that server needs); what Debian lacks is built on the host
# by deploy/local/install.sh (Kafka's jars, Mosquitto 2.1, TimescaleDB, the wheels) and copied
# in. A root filesystem is remade only when its package list changes; an image only when its
# inputs change (podman's layer cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${CITYTEL_CACHE:-$HOME/.cache/citytel}"
work="$cache/images"
kafka_version="${CITYTEL_KAFKA_VERSION:-4.1.1}"
suite=bookworm
podman() { "$here/podman.sh" "$@"; }
step() { printf '\033[1m[citytel images]\033[0m %s\n' "$*"; }

bash "$here/install.sh"
bash "$root/deploy/local/install.sh" >/dev/null
mkdir -p "$work"
started=$SECONDS

# Reproducible root filesystems: mmdebstrap stamps every file with SOURCE_DATE_EPOCH.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}"

# rootfs NAME PACKAGE...: localhost/citytel-rootfs-NAME:<hash of the package list>, tagged :current.
rootfs() {
  local name="$1"; shift
  local packages tag image
  packages="$(printf '%s,' tini ca-certificates "$@")"
  packages="${packages%,}"
  tag="$(printf '%s %s' "$suite" "$packages" | sha256sum | cut -c1-16)"
  image="localhost/citytel-rootfs-$name"
  if ! podman image exists "$image:$tag"; then
    step "root filesystem $name: $packages (from $suite, ~30 s)"
    # Documentation, manuals and translations are left out: nothing in a server reads them.
    # (Java's post-install links its manual page into man1, so that folder stays.)
    mmdebstrap --quiet --variant=minbase --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --essential-hook='mkdir -p "$1"/usr/share/man/man1' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "$suite" "$work/rootfs-$name.tar"
    podman import --quiet "$work/rootfs-$name.tar" "$image:$tag" >/dev/null
    rm -f "$work/rootfs-$name.tar"
  fi
  podman tag "$image:$tag" "$image:current"
}

rootfs python python3 python3-venv
rootfs mosquitto libcjson1 libmicrohttpd12 libsqlite3-0 libssl3
rootfs kafka openjdk-17-jre-headless
rootfs postgres postgresql-15
rootfs prometheus prometheus

# The build contexts: each image's Containerfile and what it copies in, gathered here.
context() {
  local name="$1"
  rm -rf "$work/ctx-$name"
  mkdir -p "$work/ctx-$name"
  cp -r "$here/$name/." "$work/ctx-$name/"
  echo "$work/ctx-$name"
}

# Python: wheels of every locked package (pip's cache makes a second run quick) and citytel's.
lock_hash="$(sha256sum "$root/requirements.lock" | cut -c1-16)"
wheels="$work/wheels-$lock_hash"
if [ ! -f "$wheels/.complete" ]; then
  step "wheelhouse from requirements.lock into $wheels"
  rm -rf "$wheels"
  "$root/.venv/bin/python" -m pip wheel -q --require-hashes -r "$root/requirements.lock" -w "$wheels"
  touch "$wheels/.complete"
fi
ctx="$(context citytel)"
mkdir -p "$ctx/wheels"
cp "$wheels"/*.whl "$ctx/wheels/"
"$root/.venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$ctx/wheels" "$root"
rm -rf "$root/build"
# The wheels reach the image through a bind mount, which podman's layer cache does not look
# into: their checksums, copied in first, make a changed wheel rebuild what follows.
(cd "$ctx/wheels" && sha256sum -- *.whl) >"$ctx/wheels.sha256"
podman build --quiet -t localhost/citytel:latest -f "$ctx/Containerfile" "$ctx" >/dev/null
step "image citytel built"
podman build --quiet -t localhost/citytel-simulator:latest -f "$ctx/Containerfile.simulator" "$ctx" >/dev/null
step "image citytel-simulator built"

ctx="$(context mosquitto)"
cp -a "$cache/mosquitto-2.1" "$ctx/mosquitto"
podman build --quiet -t localhost/citytel-mosquitto:latest "$ctx" >/dev/null
step "image citytel-mosquitto built"

ctx="$(context kafka)"
cp -a "$cache/kafka-$kafka_version/libs" "$ctx/libs"
mkdir -p "$ctx/classes"
javac -q -nowarn -cp "$ctx/libs/*" -d "$ctx/classes" "$root/citytel/devtools/KafkaSecurity.java" 2>/dev/null \
  || javac -nowarn -cp "$ctx/libs/*" -d "$ctx/classes" "$root/citytel/devtools/KafkaSecurity.java"
podman build --quiet -t localhost/citytel-kafka:latest "$ctx" >/dev/null
step "image citytel-kafka built"

ctx="$(context postgres)"
mkdir -p "$ctx/timescaledb/lib" "$ctx/timescaledb/extension"
cp /usr/lib/postgresql/15/lib/timescaledb*.so "$ctx/timescaledb/lib/"
cp /usr/share/postgresql/15/extension/timescaledb* "$ctx/timescaledb/extension/"
podman build --quiet -t localhost/citytel-postgres:latest "$ctx" >/dev/null
step "image citytel-postgres built"

ctx="$(context prometheus)"
cp "$root/deploy/prometheus/rules.yml" "$ctx/rules.yml"
podman build --quiet -t localhost/citytel-prometheus:latest "$ctx" >/dev/null
step "image citytel-prometheus built"

step "all images ready in $((SECONDS - started))s:"
podman images --filter 'reference=localhost/citytel*:latest' --format '  {{.Repository}}  {{.Size}}'
