#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (Dovecot,
# openssl) when missing, then format and lint checks, the unit tests and the end-to-end
# tests against real IMAP servers. `.ci/run` calls exactly this.
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
# A system-wide Dovecot left running by the package would not hurt (tests use their
# own ports), but it is not needed either.

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
echo "== build"
cargo build --workspace --bins --locked -q
echo "== tests"
cargo test --workspace --locked 2>&1 | tee "${TMPDIR:-/tmp}/mailferry-test.log"
