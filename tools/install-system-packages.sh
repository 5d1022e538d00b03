#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver, for the try-it page test. Browser
# downloads by test tools do not work on our machines; Debian's packages do.
# Quick when they are already there; needs root (or sudo) otherwise.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
        echo "install-browser: run as root, or: apt-get install -y chromium chromium-driver" >&2
        exit 1
    fi
fi
echo "install-browser: installing chromium and chromium-driver from Debian"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
