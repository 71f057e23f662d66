#!/usr/bin/env bash
# Repeated crashes, measured: `mailferry migrate` killed with `kill -9` mid-copy KILLS
# times in a row on one large mailbox, then a run to the end, then the kit's strict
# verifier (lost and duplicated messages), TRIES times. Each kill waits until the target
# has grown (so it lands mid-copy), and the target's count after each kill is printed.
#
#   tests/bench/kills.sh                      # 1 user x 12,000 messages, 5 kills, 3 tries
#   MSGS=20000 KILLS=8 TRIES=5 tests/bench/kills.sh
#   KEEP_SOURCE=1 tests/bench/kills.sh        # reuse the source loaded by the last run
#
# Needs the team's bench kit (MAILFERRY_BENCH_KIT, default ../shared/bench): dovecot.sh,
# corpus.py and verify.py. Its Dovecots listen on 10143 (source) and 11143 (target).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
kit=${MAILFERRY_BENCH_KIT:-$root/../shared/bench}
[[ -x $kit/dovecot.sh ]] || { echo "bench kit not found at $kit: set MAILFERRY_BENCH_KIT" >&2; exit 2; }
MSGS=${MSGS:-12000} KILLS=${KILLS:-5} TRIES=${TRIES:-3}
export BENCH_ROOT=${BENCH_ROOT:-/var/tmp/mailferry-kills}

(cd "$root" && cargo build --release --bins --locked -q)
bin=${CARGO_TARGET_DIR:-$root/target}/release/mailferry

if [[ ${KEEP_SOURCE:-0} != 1 ]] || ! bash "$kit/dovecot.sh" status 2>/dev/null | grep -q "^src *running"; then
    bash "$kit/dovecot.sh" destroy src >/dev/null 2>&1 || true
    bash "$kit/dovecot.sh" start src --port 10143 --users 1 >/dev/null
    python3 "$kit/corpus.py" --port 10143 --users 1 --messages "$MSGS" >/dev/null
fi
bash "$kit/dovecot.sh" status 2>/dev/null | grep -q "^dst *running" \
    || bash "$kit/dovecot.sh" start dst --port 11143 --users 1 >/dev/null

export MAILFERRY_SOURCE_PASSWORD=pass-user0001 MAILFERRY_TARGET_PASSWORD=pass-user0001
verify() { python3 "$kit/verify.py" --src-port 10143 --dst-port 11143 --user user0001 "$@"; }
# Messages at the target, all folders (doveadm: fast enough to poll while copying).
at_target() {
    bash "$kit/dovecot.sh" doveadm dst mailbox status -u user0001 messages '*' 2>/dev/null \
        | awk -F'messages=' '{n += $2} END {print n + 0}'
}

for try in $(seq "$TRIES"); do
    bash "$kit/dovecot.sh" wipe dst >/dev/null
    state=$(mktemp -d)
    args=(migrate --source 127.0.0.1:10143 --source-security plain
          --target 127.0.0.1:11143 --target-security plain
          --source-user user0001 --state-dir "$state" --progress none)
    counts=""
    before=0
    for _ in $(seq "$KILLS"); do
        "$bin" "${args[@]}" >/dev/null 2>&1 &
        pid=$!
        step=$((100 + RANDOM % 1400))
        for _ in $(seq 600); do   # at most 60 s
            kill -0 "$pid" 2>/dev/null || { echo "try $try: a run ended before its kill" >&2; break; }
            n=$(at_target)
            [[ ${n:-0} -ge $((before + step)) ]] && break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        before=$(at_target)
        counts="$counts $before"
    done
    "$bin" "${args[@]}" >/dev/null 2>&1 && rc=0 || rc=$?
    echo "try $try: target after each kill:$counts; last run exit $rc; $(verify 2>&1 | tail -1)"
    rm -rf "$state"
done
