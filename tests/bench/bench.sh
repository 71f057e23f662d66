#!/usr/bin/env bash
# The benchmark: `mailferry migrate` beside the raw pipelined copier (the practical limit
# on this machine) and any other tool the bench kit knows, on one realistic corpus, in
# one run. The kit (Dovecot pairs on tmpfs, the seeded corpus, the strict verifier,
# rawcopy.py, latproxy.py, peers.sh) is the team's shared bench directory.
#
#   tests/bench/bench.sh                      # 4 users x 2000 messages, loopback
#   RTT_MS=20 tests/bench/bench.sh            # 20 ms added round-trip time
#   TOOLS="custom rawcopy-multi mbsync" tests/bench/bench.sh
#
# Environment: MAILFERRY_BENCH_KIT (default ../shared/bench beside the checkout) and
# everything peers.sh reads (USERS, MSGS, RTT_MS, TLS, PAR, ...). Results land in
# /tmp/imapbench-results/<timestamp>/results.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
kit=${MAILFERRY_BENCH_KIT:-$root/../shared/bench}
if [[ ! -x $kit/peers.sh ]]; then
    echo "bench kit not found at $kit: set MAILFERRY_BENCH_KIT to the directory with peers.sh" >&2
    exit 2
fi
command -v dovecot >/dev/null || { echo "dovecot is needed: apt-get install dovecot-imapd" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "GNU time is needed: apt-get install time" >&2; exit 2; }

(cd "$root" && cargo build --release --bins --locked -q)
bin=${CARGO_TARGET_DIR:-$root/target}/release/mailferry

security="--source-security plain --target-security plain"
if [[ ${TLS:-0} == 1 ]]; then
    # the kit's certificates are self-signed leaf certificates, not a CA: accept them
    security="--source-security tls --source-insecure-accept-any-certificate \
--target-security tls --target-insecure-accept-any-certificate"
fi
export CUSTOM_NAME=${CUSTOM_NAME:-mailferry}
export CUSTOM_CMD="MAILFERRY_SOURCE_PASSWORD={pass} MAILFERRY_TARGET_PASSWORD={pass} \
$bin migrate --source {src_host}:{src_port} --target {dst_host}:{dst_port} $security \
--source-user {user} --state-dir {state} --progress none ${MAILFERRY_BENCH_ARGS:-}"
export TOOLS=${TOOLS:-"custom rawcopy-multi"}
exec "$kit/peers.sh"
