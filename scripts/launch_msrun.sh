#!/usr/bin/env bash
# Data-parallel RL under MindSpore's msrun, on one host (CPU workers over loopback).
#
#   scripts/launch_msrun.sh [--workers N] [--port P] [--addr A] [--log-dir DIR] [--script PATH] [--] ARGS...
#   multi-node: [--worker_num N] [--local_worker_num L] [--node_rank R] [--master_addr A] [--master_port P]
#   [--dry-run]
#
#   --workers N    number of workers (ranks), all on this host (default 2)
#   --port P       msrun scheduler port (default: a free port picked now)
#   --addr A       scheduler address (default 127.0.0.1)
#   --worker_num N        total ranks over all nodes (same as --workers)
#   --local_worker_num L  ranks on this node (default: worker_num, i.e. one node)
#   --node_rank R         this node's index, 0..nodes-1 (default 0; msrun's own default -1 = assigned)
#   --master_addr A       the scheduler's address, reachable from every node (same as --addr)
#   --master_port P       same as --port (multi-node: give it, every node must use the same)
#   --dry-run      print the msrun command and the resolved runtime plan (scripts/show_plan.py: device,
#                  DP x TP x PP, parallel context, dtypes, patches, rollout engine) and exit; exit 1 when
#                  the layout or the batch does not fit worker_num ranks. Needs no msrun.
#   (hyphenated spellings --worker-num, --local-worker-num, --node-rank, --master-addr work too)
#   --log-dir DIR  msrun's scheduler.log / worker_<rank>.log (default runs/msrun_logs/<date-time>)
#   --script PATH  the worker script (default scripts/train_rl.py)
#   ARGS           passed to the script unchanged; for scripts/train_rl.py `--distributed` is added
#                  when missing.
#
# Example (2 workers, each rolls out its own rl.prompts_per_step prompts; gradients are averaged):
#
#   scripts/launch_msrun.sh --workers 2 -- --init runs/sft --run-dir runs/rl_dp rl.estimator=recast
#
# Only rank 0 logs metrics, evaluates and saves checkpoints; every rank writes
# <run-dir>/param_checksum_rank<r>.json at the end (equal checksums = the ranks stayed in sync).
# MindSpore/MindFormers stay in stand-alone parallel mode: the optimizer cell all-reduces the
# accumulated gradients itself (recast_ms/trainer/optim.py). scripts/sft.py has no data-parallel
# path (it would only run N identical copies), so it is refused here: run it directly.
# MS_NODE_TIMEOUT (seconds, default here 3600; MindSpore's own default is 30) bounds how long a CPU
# collective waits for the other ranks: rank 0 evaluates and saves alone while the others wait in the
# next step's gradient AllReduce, so with MindSpore's 30 s a longer evaluation kills the run
# ("Ring ReduceScatter wait receiving ... failed"). Raise it if an evaluation takes longer.
# On failure the tail of each worker log is printed. Exit status: msrun's (0 = every worker exited 0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKERS=2
PORT=""
ADDR=127.0.0.1
LOG_DIR=""
SCRIPT="$ROOT/scripts/train_rl.py"
PYTHON="${PYTHON:-python}"
LOCAL_WORKERS=""
NODE_RANK=0
DRY_RUN=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers|--worker_num|--worker-num) WORKERS="$2"; shift 2 ;;
    --local_worker_num|--local-worker-num) LOCAL_WORKERS="$2"; shift 2 ;;
    --node_rank|--node-rank) NODE_RANK="$2"; shift 2 ;;
    --port|--master_port|--master-port) PORT="$2"; shift 2 ;;
    --addr|--master_addr|--master-addr) ADDR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --script) SCRIPT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

LOCAL_WORKERS="${LOCAL_WORKERS:-$WORKERS}"
for pair in "worker_num:$WORKERS" "local_worker_num:$LOCAL_WORKERS"; do
  if [[ ! "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch_msrun.sh: --${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2; exit 2
  fi
done
if [[ ! "$NODE_RANK" =~ ^[0-9]+$ ]]; then
  echo "launch_msrun.sh: --node_rank must be a non-negative integer, got '$NODE_RANK'" >&2; exit 2
fi
if (( LOCAL_WORKERS > WORKERS || WORKERS % LOCAL_WORKERS != 0 )); then
  echo "launch_msrun.sh: worker_num=$WORKERS must be a multiple of local_worker_num=$LOCAL_WORKERS" >&2; exit 2
fi
if (( NODE_RANK >= WORKERS / LOCAL_WORKERS )); then
  echo "launch_msrun.sh: node_rank=$NODE_RANK but worker_num/local_worker_num = $((WORKERS / LOCAL_WORKERS)) nodes" >&2
  exit 2
fi
if (( WORKERS != LOCAL_WORKERS )) && [[ -z "$PORT" || "$ADDR" == 127.0.0.1 ]]; then
  echo "launch_msrun.sh: a multi-node launch needs --master_addr (reachable from every node) and --master_port" >&2
  exit 2
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "launch_msrun.sh (dry run): msrun --worker_num=$WORKERS --local_worker_num=$LOCAL_WORKERS --node_rank=$NODE_RANK" \
       "--master_addr=$ADDR --master_port=${PORT:-<free port>} --join=True $SCRIPT $*"
  exec "$PYTHON" "$ROOT/scripts/show_plan.py" --world-size "$WORKERS" "$@"
fi

if ! command -v msrun >/dev/null 2>&1; then
  echo "launch_msrun.sh: msrun not found on PATH (it comes with mindspore)" >&2
  exit 2
fi
if [[ ! "$WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch_msrun.sh: --workers must be a positive integer, got '$WORKERS'" >&2
  exit 2
fi
case "$(basename "$SCRIPT")" in
  sft.py) echo "launch_msrun.sh: scripts/sft.py is single-process (no data-parallel path); run it directly" >&2
          exit 2 ;;
esac
[[ -f "$SCRIPT" ]] || { echo "launch_msrun.sh: no script $SCRIPT" >&2; exit 2; }

ARGS=("$@")
if [[ "$(basename "$SCRIPT")" == "train_rl.py" ]]; then
  have_dist=0
  for a in "${ARGS[@]+"${ARGS[@]}"}"; do [[ "$a" == "--distributed" ]] && have_dist=1; done
  [[ $have_dist == 1 ]] || ARGS=(--distributed "${ARGS[@]+"${ARGS[@]}"}")
fi

if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
fi
LOG_DIR="${LOG_DIR:-runs/msrun_logs/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"

# before the MindSpore runtime starts in each worker: no busy-waiting runtime queue, C++ log at errors only
export MS_DEV_HOST_BLOCKING_RUN="${MS_DEV_HOST_BLOCKING_RUN:-1}"
export GLOG_v="${GLOG_v:-3}"
export MS_NODE_TIMEOUT="${MS_NODE_TIMEOUT:-3600}"

echo "launch_msrun.sh: $WORKERS workers ($LOCAL_WORKERS on node $NODE_RANK), master $ADDR:$PORT, logs in $LOG_DIR" >&2
status=0
msrun --worker_num="$WORKERS" --local_worker_num="$LOCAL_WORKERS" --node_rank="$NODE_RANK" --master_addr="$ADDR" \
  --master_port="$PORT" --join=True --log_dir="$LOG_DIR" "$SCRIPT" "${ARGS[@]+"${ARGS[@]}"}" || status=$?

if [[ $status -ne 0 ]]; then
  echo "launch_msrun.sh: msrun exited $status; worker log tails:" >&2
  for f in "$LOG_DIR"/worker_*.log "$LOG_DIR"/scheduler.log; do
    [[ -f "$f" ]] || continue
    echo "==== $f" >&2
    grep -v -e '^\[INFO\]' -e '^\s*$' "$f" | tail -n 30 >&2 || true
  done
fi
exit $status
