#!/usr/bin/env bash
# Installs everything citytel's local stack and tests need on a Debian 12 machine, idempotently:
# Debian packages, Apache Kafka's jars from Maven Central, TimescaleDB (Apache edition) built
# from Debian trixie's source package against PostgreSQL 15, and the project's Python venv.
# Each step checks first and skips what is already there, so a second run takes seconds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${CITYTEL_CACHE:-$HOME/.cache/citytel}"
kafka_version="${CITYTEL_KAFKA_VERSION:-4.1.1}"
pg_major=15
pg_bin="/usr/lib/postgresql/$pg_major/bin"
venv="${CITYTEL_VENV:-$root/.venv}"

step() { printf '\033[1m[citytel install]\033[0m %s\n' "$*"; }
elapsed() { printf '%ss' "$((SECONDS - $1))"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Unpack the source package $2 of Debian suite $1 into $3/src and print its folder. The suite
# goes in a private sources file and lists dir, so the system's binary sources never see it
# (newer suites' binaries want a newer libc). The mirror is the machine's own (its first
# non-security Debian one, from either sources format): this script names no package host.
source_package() {
  local suite="$1" package="$2" build="$3" mirror apt_state
  mirror="$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
            | awk '/^[^#]*(deb |URIs:)/ { for (i = 1; i <= NF; i++) if ($i ~ /^https?:\/\/.*debian/ && $i !~ /security/) { print $i; exit } }')"
  if [ -z "$mirror" ]; then
    echo "no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/: $package's source" >&2
    echo "package comes from the machine's own mirror; add one to apt's configuration and run again" >&2
    exit 1
  fi
  apt_state="$build/apt"
  mkdir -p "$apt_state/lists/partial" "$build/src"
  printf 'deb-src %s %s main\n' "$mirror" "$suite" >"$apt_state/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$apt_state/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$apt_state/lists" -o APT::Sandbox::User=root)
  as_root apt-get "${apt_opts[@]}" update -qq >&2
  (cd "$build/src" && rm -rf "$package"-* && apt-get "${apt_opts[@]}" source -qq --download-only "$package" >/dev/null \
     && dpkg-source -x --no-check "$package"_*.dsc >/dev/null) || { echo "fetching $package's source failed" >&2; exit 1; }
  find "$build/src" -maxdepth 1 -type d -name "$package-*" | head -n1
}

# --- Debian packages -------------------------------------------------------------------------
debian_packages=(
  mosquitto mosquitto-clients            # MQTT broker and its CLI tools
  prometheus                             # metrics server (and promtool)
  "postgresql-$pg_major" "postgresql-client-$pg_major" "postgresql-server-dev-$pg_major"
  openjdk-17-jdk-headless maven          # Kafka, the jar fetcher, and javac for the stack's KafkaSecurity.java
  dpkg-dev cmake gcc make libssl-dev     # to unpack and build TimescaleDB's source package
  libcjson-dev libsqlite3-dev libargon2-dev libedit-dev libmicrohttpd-dev uthash-dev  # Mosquitto 2.1's
  python3-venv
)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  started=$SECONDS
  # The packages' own services (mosquitto on 1883, prometheus on 9090, a postgres 'main'
  # cluster) are not wanted: citytel starts its own on its own ports. policy-rc.d stops
  # invoke-rc.d from starting them during this install only.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" -eq 1 ] && as_root rm -f /usr/sbin/policy-rc.d
  step "Debian packages installed in $(elapsed $started)"
else
  step "Debian packages: already installed"
fi

# --- Apache Kafka jars -----------------------------------------------------------------------
kafka_home="$cache/kafka-$kafka_version"
if [ ! -f "$kafka_home/.complete" ]; then
  step "fetching Apache Kafka $kafka_version jars from Maven Central into $kafka_home (~100 MB, once)"
  started=$SECONDS
  mkdir -p "$kafka_home"
  sed "s/@KAFKA_VERSION@/$kafka_version/" "$here/kafka-pom.xml" >"$kafka_home/pom.xml"
  mvn -B -Dstyle.color=never -f "$kafka_home/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$kafka_home/libs" -DincludeScope=runtime >"$kafka_home/mvn.log" 2>&1 \
    || { tail -n 40 "$kafka_home/mvn.log" >&2; echo "fetching Kafka's jars failed; log: $kafka_home/mvn.log" >&2; exit 1; }
  touch "$kafka_home/.complete"
  step "Kafka jars ready ($(ls "$kafka_home/libs" | wc -l) jars) in $(elapsed $started)"
else
  step "Kafka $kafka_version jars: already in $kafka_home"
fi

# --- TimescaleDB (Apache edition) ------------------------------------------------------------
pg_libdir="$("$pg_bin/pg_config" --pkglibdir)"
pg_sharedir="$("$pg_bin/pg_config" --sharedir)"
# Trixie's source package is whatever version trixie carries (2.19.x when this was written);
# any installed timescaledb extension counts as done.
if ! ls "$pg_libdir"/timescaledb-2.*.so >/dev/null 2>&1 || \
   [ ! -f "$pg_sharedir/extension/timescaledb.control" ]; then
  step "building TimescaleDB (Apache edition) from Debian trixie's source for PostgreSQL $pg_major (~1-2 min, once)"
  started=$SECONDS
  build="$cache/timescaledb-build"
  source_dir="$(source_package trixie timescaledb "$build")"
  (cd "$source_dir" && rm -rf build && mkdir build && cd build \
     && cmake .. -DPG_CONFIG="$pg_bin/pg_config" -DAPACHE_ONLY=ON -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
          -DWARNINGS_AS_ERRORS=OFF -DCMAKE_BUILD_TYPE=Release >"$build/cmake.log" 2>&1 \
     && make -j"$(nproc)" >"$build/make.log" 2>&1 \
     && as_root make install >"$build/install.log" 2>&1) \
    || { echo "TimescaleDB build failed; logs in $build/*.log" >&2; exit 1; }
  step "TimescaleDB $(basename "$source_dir") built and installed in $(elapsed $started)"
else
  step "TimescaleDB: already installed ($(basename "$(ls "$pg_libdir"/timescaledb-2.*.so | tail -n1)"))"
fi

# --- Mosquitto 2.1 with its SQLite persistence ----------------------------------------------
# Mosquitto 2.0 (bookworm) keeps queued messages in memory and snapshots them every few seconds:
# a broker crash loses what it had acknowledged since. 2.1's persist-sqlite plugin writes each
# message before the acknowledgement. Debian sid carries its source; it is built here against
# bookworm's libraries (sid's binaries would want a newer libc) and kept in the cache, not
# installed system-wide: the local stack runs it from there.
mosquitto_home="$cache/mosquitto-2.1"
if [ ! -x "$mosquitto_home/mosquitto" ] || [ ! -f "$mosquitto_home/mosquitto_persist_sqlite.so" ]; then
  step "building Mosquitto 2.1 with SQLite persistence from Debian sid's source (~1-2 min, once)"
  started=$SECONDS
  build="$cache/mosquitto-build"
  mkdir -p "$mosquitto_home"
  source_dir="$(source_package sid mosquitto "$build")"
  (cd "$source_dir" && rm -rf build && mkdir build && cd build \
     && cmake .. -DWITH_TESTS=OFF -DWITH_DOCS=OFF -DCMAKE_BUILD_TYPE=Release >"$build/cmake.log" 2>&1 \
     && make -j"$(nproc)" >"$build/make.log" 2>&1) \
    || { echo "Mosquitto build failed; logs in $build/*.log" >&2; exit 1; }
  cp "$source_dir/build/src/mosquitto" "$mosquitto_home/mosquitto"
  cp "$(find "$source_dir/build" -name 'mosquitto_persist_sqlite.so' | head -n1)" "$mosquitto_home/"
  # The broker links its own shared library (libmosquitto_common or similar) from the build.
  find "$source_dir/build" -name 'libmosquitto*.so*' -exec cp -P {} "$mosquitto_home/" \;
  step "Mosquitto $(basename "$source_dir") built in $(elapsed $started), kept in $mosquitto_home"
else
  step "Mosquitto 2.1: already built in $mosquitto_home"
fi

# citytel's topic index for the live subscribers' ACL rules (deploy/mosquitto/), against the
# same Mosquitto's headers; rebuilt whenever its source changes.
index_source="$root/deploy/mosquitto/citytel_topic_index.c"
index_plugin="$mosquitto_home/citytel_topic_index.so"
index_want="$(sha256sum "$index_source" | cut -d' ' -f1)"
if [ ! -f "$index_plugin" ] || [ "$(cat "$index_plugin.sha256" 2>/dev/null)" != "$index_want" ]; then
  build="$cache/mosquitto-build"
  source_dir="$(ls -d "$build"/src/mosquitto-2.*/ 2>/dev/null | tail -n1)"
  [ -n "$source_dir" ] || source_dir="$(source_package sid mosquitto "$build")"
  cc -O2 -Wall -Wextra -fPIC -shared -I"$source_dir/include" -I"$source_dir/deps" \
     -o "$index_plugin" "$index_source"
  echo "$index_want" >"$index_plugin.sha256"
  step "Mosquitto topic index plugin built in $mosquitto_home"
fi

# --- Python environment ----------------------------------------------------------------------
lock="$root/requirements.lock"
stamp="$venv/.citytel-lock.sha256"
want="$(sha256sum "$lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  step "creating the Python environment in $venv from requirements.lock"
  started=$SECONDS
  pip_log="$venv.pip.log"
  # A download cut short by the network (it happened: a wheel stopped 0.2 MB from its end six
  # times over) is worth another try a little later; pip's cache keeps the wheels that arrived.
  locked_install() {
    local attempt
    for attempt in 1 2 3; do
      "$venv/bin/python" -m pip install --require-hashes -r "$lock" && return 0
      echo "installing requirements.lock failed (attempt $attempt of 3)"
      [ "$attempt" -lt 3 ] && sleep 15
    done
    return 1
  }
  {
    python3 -m venv "$venv" \
      && "$venv/bin/python" -m pip install --upgrade pip \
      && locked_install \
      && "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e "$root"
  } >"$pip_log" 2>&1 || { tail -n 40 "$pip_log" >&2; echo "Python environment failed; log: $pip_log" >&2; exit 1; }
  echo "$want" >"$stamp"
  step "Python environment ready in $(elapsed $started)"
else
  step "Python environment: up to date"
fi

# --- The detectors, compiled once ---------------------------------------------------------------
# numba compiles the detectors' kernels on first use and keeps the machine code on disk; doing it
# here spares the first `make run` (and the first test) a silent minute. Later runs find the cache.
step "compiling the detectors (first time on this machine: about a minute)"
started=$SECONDS
"$venv/bin/citytel" process --warm-up-only >/dev/null \
  || { echo "compiling the detectors failed: run $venv/bin/citytel process --warm-up-only" >&2; exit 1; }
step "detectors ready in $(elapsed $started)"
