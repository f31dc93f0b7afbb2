#!/usr/bin/env bash
# Data-parallel RL under MindSpore's msrun, on one host (CPU workers over loopback).
#
#   scripts/launch_msrun.sh [--workers N] [--port P] [--addr A] [--log-dir DIR] [--script PATH] [--] ARGS...
#
#   --workers N    number of workers (ranks), all on this host (default 2)
#   --port P       msrun scheduler port (default: a free port picked now)
#   --addr A       scheduler address (default 127.0.0.1)
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

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --addr) ADDR="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --script) SCRIPT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

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

echo "launch_msrun.sh: $WORKERS workers, master $ADDR:$PORT, logs in $LOG_DIR" >&2
status=0
msrun --worker_num="$WORKERS" --local_worker_num="$WORKERS" --master_addr="$ADDR" --master_port="$PORT" \
  --join=True --log_dir="$LOG_DIR" "$SCRIPT" "${ARGS[@]+"${ARGS[@]}"}" || status=$?

if [[ $status -ne 0 ]]; then
  echo "launch_msrun.sh: msrun exited $status; worker log tails:" >&2
  for f in "$LOG_DIR"/worker_*.log "$LOG_DIR"/scheduler.log; do
    [[ -f "$f" ]] || continue
    echo "==== $f" >&2
    grep -v -e '^\[INFO\]' -e '^\s*$' "$f" | tail -n 30 >&2 || true
  done
fi
exit $status
