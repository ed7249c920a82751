#!/usr/bin/env bash
# Installs the services the tests start themselves: Orthanc with its DICOMweb plugin (Debian/Ubuntu packages
# orthanc and orthanc-dicomweb), the real PACS of tests/orthanc.py. Idempotent: does nothing when Orthanc and the
# plugin are there. Part of the README's test command (and so of .ci/run).
set -euo pipefail

plugin_present() {
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ -f /usr/lib/orthanc/plugins/libOrthancDicomWeb.so ]
}

if command -v Orthanc >/dev/null 2>&1 && plugin_present; then
  echo "install_test_services: Orthanc $(Orthanc --version 2>/dev/null | head -n 1 | awk '{print $NF}') and its DICOMweb plugin are installed; nothing to do"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_services: Orthanc is missing and apt-get is not available; install the orthanc and" \
       "orthanc-dicomweb packages (or Orthanc with its DICOMweb plugin) yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "install_test_services: installing orthanc and orthanc-dicomweb with ${SUDO:+sudo }apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
echo "install_test_services: installed $(command -v Orthanc) ($(Orthanc --version 2>/dev/null | head -n 1))"
