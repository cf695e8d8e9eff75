#!/usr/bin/env bash
# Install the Debian packages hxp's demo and tests use. Idempotent: installs only what is
# missing, so a second run costs nothing. Used by `make demo`, `make test` and CI.
set -euo pipefail

# command-on-PATH  Debian package
wanted=(
  "systemd-analyze systemd"
  "nginx nginx"
  "dockerd docker.io"
  "busybox busybox-static"
  "iptables iptables"
  "debootstrap debootstrap"
  "systemd-nspawn systemd-container"
  "prometheus prometheus"
  "promtool prometheus"
  "prometheus-pushgateway prometheus-pushgateway"
  "prometheus-alertmanager prometheus-alertmanager"
  "ssh openssh-client"
  "ssh-keygen openssh-client"
  "sshd openssh-server"
  "chromium chromium"
  "chromedriver chromium-driver"
)

missing=()
for pair in "${wanted[@]}"; do
  cmd=${pair%% *}; pkg=${pair##* }
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "error: missing system packages (${missing[*]}) and not root; install them first" >&2
    exit 1
  fi
else
  SUDO=
fi

echo "system packages: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
echo "system packages: done"
