#!/usr/bin/env bash
# Installs what the project needs on a fresh machine: the system libraries for headless rendering (EGL through
# Mesa, which also renders on CPU-only machines), then the pinned Python packages.
#   ./setup.sh         what the agent scripts need
#   ./setup.sh --dev   the same, plus pytest and ruff
set -euo pipefail
cd "$(dirname "$0")"

system_packages=(libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libglx-mesa0)
if command -v dpkg >/dev/null 2>&1; then
  missing=()
  for package in "${system_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
      echo "setup.sh: rendering needs these Debian packages; install them with sudo apt-get install ${missing[*]}" >&2
      exit 1
    fi
  fi
else
  echo "setup.sh: not a Debian system; make sure EGL (Mesa or the NVIDIA driver) is installed for MUJOCO_GL=egl" >&2
fi

requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt
python3 -m pip install -q -r "$requirements"
