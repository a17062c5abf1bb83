#!/usr/bin/env bash
# Install Debian's Slurm (controller, node daemon, client) and munge, only if missing.
# Used by tests/integration/test_slurm.py and .ci/run; needs root (or sudo) and apt.
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
if [ ${#need[@]} -eq 0 ]; then
  echo "slurm and munge already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_slurm.sh: need root (or passwordless sudo) to apt-get install ${need[*]}" >&2
    exit 2
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: apt-get not found; install ${need[*]} with your package manager" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# The Debian metapackage slurm-wlm is slurmctld + slurmd + slurm-client (+ docs); install the
# parts without recommends to keep it small.
echo "installing ${need[*]}"
if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/megamoe-apt.log 2>&1; then
  $SUDO apt-get update -q >>/tmp/megamoe-apt.log 2>&1 || true
  if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/megamoe-apt.log 2>&1; then
    tail -n 30 /tmp/megamoe-apt.log >&2
    echo "install_slurm.sh: apt-get install ${need[*]} failed (see /tmp/megamoe-apt.log)" >&2
    exit 2
  fi
fi
echo "installed: $(slurmctld -V 2>/dev/null || true), $(munged --version 2>/dev/null | head -1 || true)"
