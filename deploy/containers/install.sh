#!/usr/bin/env bash
# What citytel's images and compose deployment need on a Debian 12 machine, idempotently:
# podman with runc (containers), netavark and aardvark-dns (container networks in which services
# find each other by name; netavark sets them up with iptables, which some Debian 12 machines lack:
# without it every build step that runs a command fails), mmdebstrap (base images from Debian's
# archive, with the machine's own apt sources), podman-compose (PyPI, pinned, in its own venv) and
# Helm (built from the Go module proxy, for rendering and linting deploy/k8s). A second run takes
# seconds.
set -euo pipefail

cache="${CITYTEL_CACHE:-$HOME/.cache/citytel}"
compose_version=1.6.0
helm_version=v3.21.4

step() { printf '\033[1m[citytel containers]\033[0m %s\n' "$*"; }
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for package in podman runc netavark aardvark-dns iptables mmdebstrap uidmap openssl; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

compose_venv="$cache/podman-compose-$compose_version"
if [ ! -x "$compose_venv/bin/podman-compose" ]; then
  step "installing podman-compose $compose_version into $compose_venv"
  rm -rf "$compose_venv"
  python3 -m venv "$compose_venv"
  "$compose_venv/bin/python" -m pip install -q "podman-compose==$compose_version" \
    || { echo "installing podman-compose failed" >&2; exit 1; }
fi

helm="$cache/helm-$helm_version/helm"
if [ ! -x "$helm" ] && [ "${CITYTEL_SKIP_HELM:-0}" != 1 ]; then
  command -v go >/dev/null || { echo "Helm is built with Go, which is not installed" >&2; exit 1; }
  step "building Helm $helm_version from the Go module proxy (~3 min, once)"
  mkdir -p "$(dirname "$helm")"
  GOFLAGS=-mod=mod GOBIN="$(dirname "$helm")" go install "helm.sh/helm/v3/cmd/helm@$helm_version" \
    >"$cache/helm-$helm_version.log" 2>&1 \
    || { tail -n 20 "$cache/helm-$helm_version.log" >&2; echo "building Helm failed" >&2; exit 1; }
fi
step "podman $(podman --version | awk '{print $3}'), podman-compose $compose_version, Helm $helm_version: ready"
