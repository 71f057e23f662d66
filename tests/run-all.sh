#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (Dovecot,
# openssl, Cyrus, Chromium, playwright-core, schemathesis) when missing, then format and
# lint checks, the unit tests and the end-to-end tests against real IMAP servers.
# `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dovecot >/dev/null 2>&1 || [[ -x /usr/sbin/dovecot ]] || need+=(dovecot-core dovecot-imapd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
    echo "== installing ${need[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "run as root (or install ${need[*]} first)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's packages try to start a system-wide Dovecot; the tests never use it.
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Cyrus, the second IMAP implementation of the tests, conflicts with Dovecot as a
# package: its packages are unpacked into a directory of their own and only the
# libraries they link against are installed.
cyrus_root=${MAILFERRY_CYRUS_ROOT:-/var/tmp/mailferry-cyrus/root}
if [[ ! -x $cyrus_root/usr/lib/cyrus/bin/master ]]; then
    echo "== fetching Cyrus IMAP into $cyrus_root"
    [[ $(id -u) -eq 0 ]] || { echo "run as root to fetch Cyrus (or set MAILFERRY_CYRUS_ROOT)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libclamav12 libical3 libicu72 libjansson4 \
        libkrb5-3 libldap-2.5-0 libpcre3 libpq5 libsasl2-2 libsasl2-modules libsqlite3-0 \
        libxapian30 libxml2 libzephyr4 libwrap0 >/dev/null
    work=$(mktemp -d)
    (cd "$work" && apt-get download -qq cyrus-imapd cyrus-common)
    mkdir -p "$cyrus_root"
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$cyrus_root"; done
    rm -rf "$work"
fi
export MAILFERRY_CYRUS_ROOT=$cyrus_root

# The console's and the API's tools: Debian's Chromium, playwright-core from npm (the
# version tests/console/package-lock.json pins) and schemathesis from PyPI, each into
# $MAILFERRY_TOOLS once.
tools=${MAILFERRY_TOOLS:-/var/tmp/mailferry-tools}
export MAILFERRY_TOOLS=$tools
mkdir -p "$tools"
# Only what is missing: a machine's own Node (NodeSource's, say, which bundles npm)
# conflicts with Debian's npm package.
wanted=()
[[ -x /usr/bin/chromium ]] || wanted+=(chromium)
command -v node >/dev/null || wanted+=(nodejs)
command -v npm >/dev/null || wanted+=(npm)
if [[ ${#wanted[@]} -gt 0 ]]; then
    echo "== installing ${wanted[*]}"
    [[ $(id -u) -eq 0 ]] || { echo "run as root (or install ${wanted[*]} first)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
fi
if ! cmp -s tests/console/package-lock.json "$tools/console/package-lock.json" \
    || [[ ! -d $tools/console/node_modules/playwright-core ]]; then
    echo "== installing playwright-core (npm) into $tools/console"
    mkdir -p "$tools/console"
    cp tests/console/package.json tests/console/package-lock.json "$tools/console/"
    (cd "$tools/console" && npm ci --no-audit --no-fund --silent)
fi
if [[ ! -x $tools/st-venv/bin/schemathesis ]]; then
    echo "== installing schemathesis (PyPI) into $tools/st-venv"
    python3 -m venv "$tools/st-venv"
    "$tools/st-venv/bin/pip" install -q "schemathesis==4.32.5"
fi
# Screenshots of the console test are kept here.
export MAILFERRY_ARTIFACTS=${MAILFERRY_ARTIFACTS:-/var/tmp/mailferry-artifacts}

# Redis: the cluster store's tests use the machine's instance (own key prefix each).
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    echo "== starting Redis on 127.0.0.1:6379"
    if ! command -v redis-server >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    fi
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi

# RabbitMQ: the cluster queue's tests use the machine's broker (own queue prefix each).
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "== starting RabbitMQ on 127.0.0.1:5672"
    if ! command -v rabbitmq-server >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
    fi
    rabbitmq-server -detached
    for _ in $(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 0.5; done
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== rust-version"
python3 tests/rust-version.py
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
echo "== build"
cargo build --workspace --bins --locked -q
# The image: the release binary FROM scratch, built with Debian's Podman and runc, no
# registry (tests/image/build.sh checks it), then run by the cluster tests.
wanted=()
command -v podman >/dev/null || wanted+=(podman)
command -v runc >/dev/null || [[ -x /usr/sbin/runc ]] || wanted+=(runc)
if [[ ${#wanted[@]} -gt 0 ]]; then
    echo "== installing ${wanted[*]}"
    [[ $(id -u) -eq 0 ]] || { echo "run as root (or install ${wanted[*]} first)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${wanted[@]}" >/dev/null
fi
export CONTAINERS_CONF=$PWD/tests/image/containers.conf
export CONTAINERS_STORAGE_CONF=$PWD/tests/image/storage.conf
MAILFERRY_IMAGE=$(bash tests/image/build.sh | tail -n 1)
export MAILFERRY_IMAGE
echo "== tests"
cargo test --workspace --locked 2>&1 | tee "${TMPDIR:-/tmp}/mailferry-test.log"
echo "== Helm chart"
bash tests/chart/check.sh
