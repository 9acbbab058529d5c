#!/usr/bin/env bash
# Install Debian's redis-server for the tests that need a real Redis, unless it is on PATH.
#
# The tests start their own redis-server processes on free loopback ports (tests/redis_server.py).
# This script only installs the binary. It does not start or enable a system service.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server found: $(redis-server --version | cut -d' ' -f1-3)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is not installed and apt-get is not available;" \
        "install Redis 6 or newer so that redis-server is on PATH" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "installing redis-server needs root; run: sudo apt-get install redis-server" >&2
        exit 1
    fi
    sudo="sudo"
fi

echo "Installing redis-server (Debian package)..."
export DEBIAN_FRONTEND=noninteractive
# Try with the package lists on the machine first; refresh them only when that fails.
if ! $sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1; then
    $sudo apt-get update -qq || echo "apt-get update reported errors; trying the install anyway" >&2
    $sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
echo "redis-server installed: $(redis-server --version | cut -d' ' -f1-3)"
