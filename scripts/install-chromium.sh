#!/usr/bin/env bash
# Installs Debian's Chromium (and a font) for the credit report's browser test
# (tests/train/test_report_browser.py) when no Chromium is on the PATH. Needs root and apt;
# `make test` runs it first. Anything else: install chromium yourself, or the test skips.
#
#   bash scripts/install-chromium.sh
set -euo pipefail

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no chromium on PATH and no root apt-get; the browser test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install-chromium: $(chromium --version 2>/dev/null) installed in $(( $(date +%s) - start )) s"
