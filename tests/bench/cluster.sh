#!/usr/bin/env bash
# Many mailboxes, measured beside the raw copier: USERS mailboxes x MSGS messages from the
# team's bench kit (../shared/bench, or MAILFERRY_BENCH_KIT) on a Dovecot pair, copied in
# one run by
#   1. rawcopy.py --multiappend 50, JOBS users at once: the practical limit (RAWCOPY=0
#      leaves it out);
#   2. the cluster: a coordinator and WORKERS worker processes, RabbitMQ (the machine's,
#      unique prefix) and a Redis of its own on a free port, so that its command counter
#      counts only us;
#   3. the embedded mode (`mailferry migrate --csv --jobs JOBS`), then its no-op pass (the
#      same state directory, nothing new) (EMBEDDED=0 leaves it out);
# each into a wiped target, each verified message by message. Prints one table (wall
# seconds, messages/s, CPU seconds of the tool and of each Dovecot, each beside the raw
# copier's), then the Redis commands per copied message and the coordinator's CPU and
# peak RSS.
#
#   tests/bench/cluster.sh                         # 40 users x 100 messages, 2 workers
#   USERS=1000 MSGS=20 WORKERS=4 JOBS=8 tests/bench/cluster.sh
#   USERS=10000 MSGS=0 EMBEDDED=0 tests/bench/cluster.sh   # the coordinator planning 10,000
#   KEEP_SOURCE=1 USERS=200 MSGS=20 tests/bench/cluster.sh   # the last run's source again
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=${MAILFERRY_BENCH_KIT:-../shared/bench}
[[ -x $kit/dovecot.sh ]] || { echo "no bench kit at $kit (set MAILFERRY_BENCH_KIT)" >&2; exit 2; }
USERS=${USERS:-40} MSGS=${MSGS:-100} WORKERS=${WORKERS:-2} JOBS=${JOBS:-4}
SRC_PORT=${SRC_PORT:-20143} DST_PORT=${DST_PORT:-21143} REDIS_PORT=${REDIS_PORT:-16379}
export BENCH_ROOT=${BENCH_ROOT:-/tmp/mailferry-cluster-bench}
# As peers.sh: the servers' mail on a tmpfs (TMPFS=1) and without fsync (FSYNC=never),
# because on this VM's disk the cost of creating a file per message varies severalfold
# from run to run and would drown what the tools do.
FSYNC=${FSYNC:-never}
if [[ ${TMPFS:-1} == 1 ]] && ! mountpoint -q "$BENCH_ROOT"; then
    mkdir -p "$BENCH_ROOT"
    if [[ -n $(ls -A "$BENCH_ROOT") ]]; then
        echo "$BENCH_ROOT is not empty: remove it, or run with TMPFS=0 (mail on disk)" >&2
        exit 2
    fi
    mount -t tmpfs -o size=75%,mode=0755 tmpfs "$BENCH_ROOT"
fi

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
    bash "$kit/dovecot.sh" start src --port "$SRC_PORT" --users "$USERS" --fsync "$FSYNC" >/dev/null
    # MSGS=0: empty mailboxes, to measure the coordinator planning many users.
    if [[ $MSGS -gt 0 ]]; then
        python3 "$kit/corpus.py" --port "$SRC_PORT" --users "$USERS" --messages "$MSGS" --jobs 4 >/dev/null 2>&1
    fi
    echo "$USERS $MSGS $SRC_PORT" > "$loaded"
fi
bash "$kit/dovecot.sh" start dst --port "$DST_PORT" --users "$USERS" --fsync "$FSYNC" >/dev/null
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --logfile "$work/redis.log" >/dev/null

{
    echo "EmailAddress,UserName,Password,TargetUserName,TargetPassword"
    for i in $(seq 1 "$USERS"); do u=$(printf 'user%04d' "$i"); echo "$u@bench,$u,pass-$u,$u,pass-$u"; done
} > "$work/users.csv"

# Where the CPU goes: each process tree's seconds (tests/bench/cputree.py), read before
# and after a phase. `tool` is this script's tree: the processes a phase ran.
masters() {
    src_master=$(<"$BENCH_ROOT/src/run/master.pid")
    dst_master=$(<"$BENCH_ROOT/dst/run/master.pid")
}
cpu() { python3 tests/bench/cputree.py "tool=$$" "src=$src_master" "dst=$dst_master" "$@"; }
delta() {  # two readings -> "name=seconds ..."
    python3 -c 'import sys
a = dict(kv.split("=") for kv in sys.argv[1].split())
b = dict(kv.split("=") for kv in sys.argv[2].split())
print(" ".join(f"{k}={float(b[k]) - float(a.get(k, 0)):.2f}" for k in b))' "$1" "$2"
}
verify() { python3 "$kit/verify.py" --src-port "$SRC_PORT" --dst-port "$DST_PORT" --users "$USERS" | tail -1; }
wipe_target() { bash "$kit/dovecot.sh" wipe dst >/dev/null; masters; }
now() { date +%s.%N; }
# One line per run for tests/bench/table.py: the run's name, its start and end, the
# messages, the CPU delta, the no-op pass's seconds and a note. ROWS_OUT keeps them.
rows=${ROWS_OUT:-$work/rows}
shape="$USERS x $MSGS"
row() {
    python3 -c 'import sys
name, t0, t1, msgs, cpu, noop, note, shape = sys.argv[1:]
cpu = {k: float(v) for k, v in (kv.split("=") for kv in cpu.split())}
# "tool" is this script'"'"'s process tree: the tool it ran, or the coordinator and workers
# it started (the per-process trees beside it are already counted in it).
tool, src, dst, wall = cpu["tool"], cpu["src"], cpu["dst"], float(t1) - float(t0)
print("\t".join([shape, name, f"{wall:.2f}", msgs, f"{tool:.2f}", f"{src:.2f}", f"{dst:.2f}", noop, note]))' \
        "$@" "$shape" >> "$rows"
}
masters

if [[ ${RAWCOPY:-1} == 1 && $MSGS -gt 0 ]]; then
    wipe_target
    before=$(cpu) t0=$(now)
    python3 "$kit/rawcopy.py" --src-port "$SRC_PORT" --dst-port "$DST_PORT" --users "$USERS" \
        --jobs "$JOBS" --multiappend 50 >"$work/rawcopy.log" 2>&1 || true
    t1=$(now)
    row "rawcopy-multi (--jobs $JOBS)" "$t0" "$t1" "$((USERS * MSGS))" "$(delta "$before" "$(cpu)")" - "verify $(verify)"
fi
wipe_target

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

redis_pid=$(redis-cli -p "$REDIS_PORT" info server | tr -d '\r' | awk -F: '/^process_id/ {print $2}')
rabbit_pid=$(pgrep -o beam.smp || echo 0)
commands() { redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ {print $2+0}'; }
"$bin" coordinator --config "$work/mailferry.toml" 2>"$work/coordinator.log" &
coordinator=$!
pids+=("$coordinator")
trees=("coordinator=$coordinator" "redis=$redis_pid" "rabbitmq=$rabbit_pid")
for w in $(seq 1 "$WORKERS"); do
    "$bin" worker --config "$work/mailferry.toml" 2>"$work/worker$w.log" &
    pids+=($!)
    trees+=("worker$w=$!")
done
sleep 2
redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
redis_before=$(commands)
before=$(cpu "${trees[@]}")
start=$(now)
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
end=$(now)
cpu_cluster=$(delta "$before" "$(cpu "${trees[@]}")")
redis_after=$(( $(commands) - polls ))
redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | grep '^cmdstat' |
    sed -E 's/^cmdstat_([^:]+):calls=([0-9]+).*/\2 \1/' | sort -rn | head -12 > "$work/commandstats"
summary=$(admin status --batch bench | tail -1)
copied=$(sed -E 's/.*copied ([0-9]+) messages.*/\1/' <<<"$summary")
[[ $copied =~ ^[0-9]+$ ]] || copied=0
# The coordinator's CPU seconds (utime + stime, in clock ticks) and peak RSS (KiB).
read -r -a stat < "/proc/$coordinator/stat"
coord_cpu=$(awk -v t="$(( ${stat[13]} + ${stat[14]} ))" -v hz="$(getconf CLK_TCK)" 'BEGIN {print t / hz}')
coord_rss=$(awk '/^VmHWM/ {print $2}' "/proc/$coordinator/status")
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
redis_cost="Redis $((redis_after - redis_before)) commands"
[[ $copied -gt 0 ]] && redis_cost="Redis $(awk -v c="$((redis_after - redis_before))" -v m="$copied" 'BEGIN {printf "%.3f", c / m}') commands a message"
row "cluster ($WORKERS workers)" "$start" "$end" "$copied" "$cpu_cluster" - \
    "verify $(verify); $redis_cost; coordinator $coord_cpu CPU s, peak RSS $((coord_rss / 1024)) MiB"

if [[ ${EMBEDDED:-1} == 1 ]]; then
    wipe_target
    migrate() {
        "$bin" migrate --source "127.0.0.1:$SRC_PORT" --source-security plain \
            --target "127.0.0.1:$DST_PORT" --target-security plain --csv "$work/users.csv" \
            --state-dir "$work/state" --jobs "$JOBS" --progress lines >>"$work/embedded.log" 2>&1 || true
    }
    before=$(cpu) t0=$(now)
    migrate
    t1=$(now)
    used=$(delta "$before" "$(cpu)")
    n0=$(now)
    migrate
    noop=$(awk -v a="$n0" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}')
    row "embedded --csv (--jobs $JOBS)" "$t0" "$t1" "$((USERS * MSGS))" "$used" "$noop" "verify $(verify)"
fi

echo "$USERS users x $MSGS messages; tool CPU: the tool's processes (the cluster's: coordinator and workers)"
python3 tests/bench/table.py "$rows"
echo "cluster: Redis commands $((redis_after - redis_before)) for $copied messages; CPU s by process tree: $cpu_cluster"
echo "Redis calls by command (including those inside scripts, and the status polling):"
cat "$work/commandstats"
