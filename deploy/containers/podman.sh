#!/usr/bin/env bash
# podman with citytel's settings for these machines (containers.conf beside this file). Every
# citytel script and test calls podman through here, and podman-compose through compose.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="$here/containers.conf"
exec podman "$@"
