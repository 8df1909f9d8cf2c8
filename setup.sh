#!/usr/bin/env bash
# Installs what the project needs on a fresh machine: the system libraries for headless rendering (EGL through
# Mesa, which also renders on CPU-only machines), then the pinned Python packages.
#   ./setup.sh         what the agent scripts need
#   ./setup.sh --dev   the same, plus pytest and ruff, and Slurm with munge for the sweep's test
set -euo pipefail
cd "$(dirname "$0")"

missing_packages() {  # the Debian packages among "$@" that are not installed
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || echo "$package"; done
}

rendering=(libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libglx-mesa0)
slurm=(slurm-wlm munge)  # --dev: a test starts a one-node Slurm cluster to run benchmark.sh's array job
if ! command -v dpkg >/dev/null 2>&1; then
  echo "setup.sh: not a Debian system; make sure EGL (Mesa or the NVIDIA driver) is installed for MUJOCO_GL=egl" >&2
else
  wanted=("${rendering[@]}")
  [ "${1:-}" = "--dev" ] && wanted+=("${slurm[@]}")
  mapfile -t missing < <(missing_packages "${wanted[@]}")
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  elif [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing_rendering < <(missing_packages "${rendering[@]}")
    echo "setup.sh: not root; install these Debian packages with sudo apt-get install ${missing[*]}" >&2
    [ ${#missing_rendering[@]} -gt 0 ] && exit 1  # without Slurm only its test is skipped
  fi
fi

requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt
python3 -m pip install -q -r "$requirements"
