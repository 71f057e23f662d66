#!/usr/bin/env bash
# The scale benchmark: every shape a hosting provider's batch has, in one run, printed
# as one table, each figure beside the raw copier's of the same shape and run.
#
#   1. 4 users x 2,000 messages on loopback, and with 20 ms of added round-trip time
#      (bench.sh: mailferry migrate, one process a user, beside rawcopy --multiappend 50);
#   2. 1,000 users x 20 messages (cluster.sh: rawcopy-multi, the cluster with 4 workers,
#      migrate --csv and its no-op pass);
#   3. 10,000 empty mailboxes planned and synced by the cluster (cluster.sh, MSGS=0).
#
#   tests/bench/scale.sh                  # all of them (about 20 minutes on 2 cores)
#   SHAPES="small plan" tests/bench/scale.sh
#
# Environment: MAILFERRY_BENCH_KIT as bench.sh and cluster.sh; SHAPES (default
# "loopback rtt20 small plan"); JOBS (default 8) for the 1,000-user shape.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
shapes=${SHAPES:-loopback rtt20 small plan}
peers=()
rows=()
for shape in $shapes; do
    echo "== $shape (logs in $out)" >&2
    case $shape in
        loopback | rtt20)
            rtt=0; [[ $shape == rtt20 ]] && rtt=20
            RESULTS_DIR="$out/$shape" RTT_MS=$rtt USERS=4 MSGS=2000 TOOLS="custom rawcopy-multi" \
                bash "$here/bench.sh" > "$out/$shape.log" 2>&1
            peers+=("4 x 2000, RTT $rtt ms=$(ls "$out/$shape"/*/results.tsv):8000")
            ;;
        small)
            ROWS_OUT="$out/small.tsv" USERS=1000 MSGS=20 WORKERS=4 JOBS=${JOBS:-8} \
                bash "$here/cluster.sh" > "$out/small.log" 2>&1
            rows+=("$out/small.tsv")
            ;;
        plan)
            ROWS_OUT="$out/plan.tsv" USERS=10000 MSGS=0 WORKERS=2 RAWCOPY=0 EMBEDDED=0 \
                bash "$here/cluster.sh" > "$out/plan.log" 2>&1
            rows+=("$out/plan.tsv")
            ;;
        *) echo "unknown shape $shape (loopback, rtt20, small, plan)" >&2; exit 2 ;;
    esac
done
args=("${rows[@]}")
[[ ${#peers[@]} -gt 0 ]] && args+=(--peers "${peers[@]}")
python3 "$here/table.py" "${args[@]}"
