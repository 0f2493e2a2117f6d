#!/usr/bin/env bash
# Set up dicomnode on a fresh Debian/Ubuntu machine: the DICOM peers the tests talk to
# (dcmtk, dicom3tools, Orthanc; openssl for the TLS test CA; iproute2 for the Ray tests' loopback-only
# network namespace) and a virtual environment with the project and its extras (dev, train, ray).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# dpkg, not `command -v`: pynetdicom installs its own storescu/storescp into the venv.
need_apt=()
for pkg in dcmtk dicom3tools orthanc openssl chromium chromium-driver iproute2; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing Debian packages: ${need_apt[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need_apt[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras=${DICOMNODE_EXTRAS:-dev,train,ray}
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "dicomnode is set up in .venv ($(.venv/bin/dicomnode --help >/dev/null && echo ok))"
