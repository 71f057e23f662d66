#!/usr/bin/env bash
# The cluster mode on one machine, measured: USERS mailboxes x MSGS messages from the
# team's bench kit (../shared/bench, or MAILFERRY_BENCH_KIT) on a Dovecot pair, a
# coordinator and WORKERS worker processes, RabbitMQ (the machine's, unique prefix) and
# a Redis of its own on a free port, so that its command counter counts only us. Then
# the embedded mode (`mailferry migrate --csv`, JOBS users at once) on the same corpus
# into a wiped target, in the same run. Both are verified message by message.
#
#   tests/bench/cluster.sh                         # 40 users x 100 messages, 2 workers
#   USERS=200 MSGS=20 WORKERS=4 tests/bench/cluster.sh
#   USERS=10000 MSGS=0 EMBEDDED=0 tests/bench/cluster.sh   # the coordinator planning 10,000
#   KEEP_SOURCE=1 USERS=200 MSGS=20 tests/bench/cluster.sh   # the last run's source again
#
# Prints wall seconds, messages/s, Redis commands per copied message, and the
# coordinator's CPU seconds and peak RSS.
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=${MAILFERRY_BENCH_KIT:-../shared/bench}
[[ -x $kit/dovecot.sh ]] || { echo "no bench kit at $kit (set MAILFERRY_BENCH_KIT)" >&2; exit 2; }
USERS=${USERS:-40} MSGS=${MSGS:-100} WORKERS=${WORKERS:-2} JOBS=${JOBS:-4}
SRC_PORT=${SRC_PORT:-20143} DST_PORT=${DST_PORT:-21143} REDIS_PORT=${REDIS_PORT:-16379}
export BENCH_ROOT=${BENCH_ROOT:-/tmp/mailferry-cluster-bench}

cargo build --release -q -p mailferry-coordinator
bin=${CARGO_TARGET_DIR:-target}/release/mailferry
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    bash "$kit/dovecot.sh" stop src >/dev/null 2>&1 || true
    bash "$kit/dovecot.sh" stop dst >/dev/null 2>&1 || true
}
trap cleanup EXIT

# KEEP_SOURCE=1: a source loaded by an earlier run with the same USERS and MSGS is
# used again (the migration only reads it), which saves the corpus load.
loaded="$BENCH_ROOT/src/mailferry-bench-corpus"
bash "$kit/dovecot.sh" destroy dst >/dev/null 2>&1 || true
if [[ ${KEEP_SOURCE:-0} == 1 && -f $loaded && $(<"$loaded") == "$USERS $MSGS $SRC_PORT" ]]; then
    bash "$kit/dovecot.sh" restart src >/dev/null
else
    bash "$kit/dovecot.sh" destroy src >/dev/null 2>&1 || true
    bash "$kit/dovecot.sh" start src --port "$SRC_PORT" --users "$USERS" >/dev/null
    # MSGS=0: empty mailboxes, to measure the coordinator planning many users.
    if [[ $MSGS -gt 0 ]]; then
        python3 "$kit/corpus.py" --port "$SRC_PORT" --users "$USERS" --messages "$MSGS" --jobs 4 >/dev/null 2>&1
    fi
    echo "$USERS $MSGS $SRC_PORT" > "$loaded"
fi
bash "$kit/dovecot.sh" start dst --port "$DST_PORT" --users "$USERS" >/dev/null
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --logfile "$work/redis.log" >/dev/null

{
    echo "EmailAddress,UserName,Password,TargetUserName,TargetPassword"
    for i in $(seq 1 "$USERS"); do u=$(printf 'user%04d' "$i"); echo "$u@bench,$u,pass-$u,$u,pass-$u"; done
} > "$work/users.csv"
prefix="bench-$(date +%s)"
cat > "$work/mailferry.toml" <<EOF
key_prefix = "$prefix"
redis_url = "redis://127.0.0.1:$REDIS_PORT/0"
[worker]
job_slots = 8
EOF
export MAILFERRY_SEALING_KEYS="k1:$(head -c 32 /dev/urandom | base64)"
admin() { "$bin" batch --config "$work/mailferry.toml" "$@"; }
admin create --batch bench --source "127.0.0.1:$SRC_PORT" --source-security plain \
    --target "127.0.0.1:$DST_PORT" --target-security plain --csv "$work/users.csv" >/dev/null

# Where the CPU goes: each process tree's seconds, read before and after each phase.
src_master=$(<"$BENCH_ROOT/src/run/master.pid") dst_master=$(<"$BENCH_ROOT/dst/run/master.pid")
redis_pid=$(redis-cli -p "$REDIS_PORT" info server | tr -d '\r' | awk -F: '/^process_id/ {print $2}')
rabbit_pid=$(pgrep -o beam.smp || echo 0)
cpu() { python3 tests/bench/cputree.py "$@" "dovecot-src=$src_master" "dovecot-dst=$dst_master" "redis=$redis_pid" "rabbitmq=$rabbit_pid"; }
cpu_delta() {  # two readings -> "name +seconds ..."
    python3 -c 'import sys
a = dict(kv.split("=") for kv in sys.argv[1].split())
b = dict(kv.split("=") for kv in sys.argv[2].split())
print(" ".join(f"{k} {float(b[k]) - float(a.get(k, 0)):.1f}" for k in b))' "$1" "$2"
}
commands() { redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ {print $2+0}'; }
"$bin" coordinator --config "$work/mailferry.toml" 2>"$work/coordinator.log" &
coordinator=$!
pids+=("$coordinator")
for w in $(seq 1 "$WORKERS"); do
    "$bin" worker --config "$work/mailferry.toml" 2>"$work/worker$w.log" &
    pids+=($!)
done
sleep 2
redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
before=$(commands)
workers_cpu=()
for i in "${!pids[@]}"; do [[ $i -gt 0 ]] && workers_cpu+=("worker$i=${pids[$i]}"); done
cpu_before=$(cpu "coordinator=$coordinator" "${workers_cpu[@]}")
start=$(date +%s.%N)
admin start --batch bench >/dev/null
# Done when every user's pass record says synced: one HVALS a second (taken out of
# the count below), where `batch status` reads every user's job states and counters.
polls=0
while :; do
    synced=$(redis-cli -p "$REDIS_PORT" hvals "$prefix:pass:bench" | grep -c '"synced_ms":[0-9]' || true)
    polls=$((polls + 1))
    [[ $synced -ge $USERS ]] && break
    sleep 1
done
end=$(date +%s.%N)
cpu_cluster=$(cpu_delta "$cpu_before" "$(cpu "coordinator=$coordinator" "${workers_cpu[@]}")")
after=$(( $(commands) - polls ))
redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | grep '^cmdstat' |
    sed -E 's/^cmdstat_([^:]+):calls=([0-9]+).*/\2 \1/' | sort -rn | head -12 > "$work/commandstats"
summary=$(admin status --batch bench | tail -1)
copied=$(sed -E 's/.*copied ([0-9]+) messages.*/\1/' <<<"$summary")
[[ $copied =~ ^[0-9]+$ ]] || copied=0
# The coordinator's CPU seconds (utime + stime, in clock ticks) and peak RSS (KiB).
read -r -a stat < "/proc/$coordinator/stat"
coord_cpu=$(( ${stat[13]} + ${stat[14]} ))
coord_rss=$(awk '/^VmHWM/ {print $2}' "/proc/$coordinator/status")
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
python3 "$kit/verify.py" --src-port "$SRC_PORT" --dst-port "$DST_PORT" --users "$USERS" | tail -1 > "$work/verify.cluster"

if [[ ${EMBEDDED:-1} == 0 ]]; then
    echo "$USERS users x $MSGS messages, $WORKERS workers: cluster $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}') s," \
        "Redis commands $((after - before)) for $copied messages," \
        "coordinator $(awk -v t="$coord_cpu" -v hz="$(getconf CLK_TCK)" 'BEGIN {print t / hz}') CPU s, peak RSS $((coord_rss / 1024)) MiB;" \
        "$(cat "$work/verify.cluster")"
    echo "Redis calls by command (including those inside scripts):"
    cat "$work/commandstats"
    exit 0
fi
bash "$kit/dovecot.sh" wipe dst >/dev/null
dst_master=$(<"$BENCH_ROOT/dst/run/master.pid")
estart=$(date +%s.%N)
cpu_before=$(cpu "migrate=$$")
"$bin" migrate --source "127.0.0.1:$SRC_PORT" --source-security plain \
    --target "127.0.0.1:$DST_PORT" --target-security plain --csv "$work/users.csv" \
    --state-dir "$work/state" --jobs "$JOBS" --progress lines >"$work/embedded.log" 2>&1 || true
eend=$(date +%s.%N)
cpu_embedded=$(cpu_delta "$cpu_before" "$(cpu "migrate=$$")")
python3 "$kit/verify.py" --src-port "$SRC_PORT" --dst-port "$DST_PORT" --users "$USERS" | tail -1 > "$work/verify.embedded"

python3 - "$USERS" "$MSGS" "$WORKERS" "$start" "$end" "$estart" "$eend" "$before" "$after" "$copied" \
    "$(awk -v t="$coord_cpu" -v hz="$(getconf CLK_TCK)" 'BEGIN {print t / hz}')" 0 "$coord_rss" \
    "$(cat "$work/verify.cluster")" "$(cat "$work/verify.embedded")" <<'EOF'
import sys
users, msgs, workers = sys.argv[1:4]
start, end, estart, eend = map(float, sys.argv[4:8])
before, after, copied = map(int, sys.argv[8:11])
cu, cs, crss = float(sys.argv[11]), float(sys.argv[12]), int(sys.argv[13])
vc, ve = sys.argv[14], sys.argv[15]
wall, ewall = end - start, eend - estart
print(f"{users} users x {msgs} messages, {workers} workers")
print(f"| mode | wall s | msgs/s | vs embedded | Redis cmds/msg | verify |")
print(f"|---|---:|---:|---:|---:|---|")
print(f"| cluster | {wall:.1f} | {copied/wall:.0f} | {ewall/wall:.2f}x | {(after-before)/max(copied,1):.3f} | {vc} |")
print(f"| embedded | {ewall:.1f} | {copied/ewall:.0f} | 1.00x | - | {ve} |")
print(f"coordinator: {cu+cs:.2f} CPU s, peak RSS {crss/1024:.0f} MiB; Redis commands {after-before} for {copied} messages")
EOF
echo "CPU seconds, cluster phase:  $cpu_cluster"
echo "CPU seconds, embedded phase: $cpu_embedded (migrate = this script's reaped children)"
echo "Redis calls by command (including those inside scripts, and the status polling):"
cat "$work/commandstats"
