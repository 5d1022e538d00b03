#!/usr/bin/env bash
# Debian packages the test suite drives for real: Chromium and ChromeDriver
# (the try-it page; test tools' own browser downloads do not work on our
# machines), systemd (systemd-analyze verify on the units, socket
# activation) and PostgreSQL (tests/pgcluster.py runs a throwaway cluster
# from /usr/lib/postgresql/NN/bin for the account-store tests), and OpenSSL's
# command (tests/test_operating.py makes a CA as docs/operating.rst does). Quick when
# they are there; needs root (or sudo) otherwise.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v systemd-socket-activate >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)
# Any major version will do; the metapackage pulls in Debian's current one.
havePostgres=no
for bin in /usr/lib/postgresql/*/bin/initdb; do
    [ -x "$bin" ] && [ -x "${bin%/initdb}/pg_ctl" ] && havePostgres=yes
done
[ "$havePostgres" = yes ] || missing+=(postgresql)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
        echo "install-system-packages: run as root, or: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi
echo "install-system-packages: installing ${missing[*]} from Debian"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
