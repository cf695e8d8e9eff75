#!/usr/bin/env bash
# The fleet lab: test hosts as network namespaces in 198.18.0.0/24, each with its own sshd.
#   scripts/fleet-lab.sh up [--name N] [HOST:ROLE ...]   roles: docker, systemd, plain
#   scripts/fleet-lab.sh down [--name N]                 removes everything the lab made
#   scripts/fleet-lab.sh status [--name N]
# Needs root. See tests/support/fleet_lab.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "fleet-lab: needs root (it creates network namespaces, a bridge, veth links and runs" \
       "sshd and dockerd): run it as root, e.g. sudo $0 $*" >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.support.fleet_lab "$@"
