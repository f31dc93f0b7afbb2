#!/usr/bin/env bash
# Data-parallel RL or SFT under MindSpore's msrun (CPU workers over loopback, or Ascend devices).
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
#                  DP x TP x PP, parallel context, dtypes, patches, rollout engine) and exit; exit 2 when
#                  the layout or the batch does not fit worker_num ranks. Needs no msrun.
#   (hyphenated spellings --worker-num, --local-worker-num, --node-rank, --master-addr work too)
#   --log-dir DIR  msrun's scheduler.log / worker_<rank>.log (default runs/msrun_logs/<date-time>)
#   --script PATH  the worker script (default scripts/train_rl.py; scripts/sft.py for SFT)
#   ARGS           passed to the script unchanged; for scripts/train_rl.py and scripts/sft.py
#                  `--distributed` is added when missing.
#
# Examples (2 workers; rl.prompts_per_step and sft.batch_size are the GLOBAL batch of one step, each
# rank takes its 1/N share of it, whole groups; gradients are averaged, metrics reduced over ranks):
#
#   scripts/launch_msrun.sh --workers 2 --script scripts/sft.py -- --run-dir runs/sft_dp
#   scripts/launch_msrun.sh --workers 2 -- --init runs/sft_dp --run-dir runs/rl_dp rl.estimator=recast
#
# Only rank 0 logs metrics, evaluates and saves checkpoints; every RL rank writes
# <run-dir>/param_checksum_rank<r>.json at the end (equal checksums = the ranks stayed in sync).
# MindSpore/MindFormers stay in stand-alone parallel mode on CPU and, for data-parallel layouts
# (TP = PP = 1), on Ascend: the optimizer cell all-reduces the accumulated gradients itself
# (recast_ms/trainer/optim.py; MCCL on CPU, HCCL on Ascend).
# MS_NODE_TIMEOUT (seconds, default here 3600; MindSpore's own default is 30) bounds how long a CPU
# collective waits for the other ranks: rank 0 evaluates and saves alone while the others wait in the
# next step's gradient AllReduce, so with MindSpore's 30 s a longer evaluation kills the run
# ("Ring ReduceScatter wait receiving ... failed"). Raise it if an evaluation takes longer.
#
# Failures end the run within seconds, with the reason, and leave no process behind: a busy --port is
# refused before msrun starts; while msrun runs, the launcher polls the logs every second and stops
# the whole job (msrun, scheduler, every worker: msrun puts some in their own process groups, and
# would wait for them forever) as soon as the scheduler cannot listen or any worker or the scheduler
# dies with a Python traceback (a dead rank leaves the others blocked in a collective for
# MS_NODE_TIMEOUT). The same clean-up runs when the launcher itself is interrupted or terminated.
# Missing option values and unknown options are errors naming them (script arguments go after --).
# On failure the tail of each log is printed. Exit status: 0 = every worker exited 0; 2 = bad
# arguments or busy port; otherwise msrun's status, or 1 when the launcher stopped a failed job.
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
die() { echo "launch_msrun.sh: $*" >&2; exit 2; }
# an option's value: present, and not the next option (`--workers --port 1` must not take `--port`)
value() { [[ $# -ge 2 && -n "$2" && "$2" != -* ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers|--worker_num|--worker-num) value "$@"; WORKERS="$2"; shift 2 ;;
    --local_worker_num|--local-worker-num) value "$@"; LOCAL_WORKERS="$2"; shift 2 ;;
    --node_rank|--node-rank) value "$@"; NODE_RANK="$2"; shift 2 ;;
    --port|--master_port|--master-port) value "$@"; PORT="$2"; shift 2 ;;
    --addr|--master_addr|--master-addr) value "$@"; ADDR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --log-dir) value "$@"; LOG_DIR="$2"; shift 2 ;;
    --script) value "$@"; SCRIPT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (launcher options: --workers --local_worker_num --node_rank --port --addr --dry-run --log-dir --script; arguments for the script go after --)" ;;
    *) break ;;
  esac
done

[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"
LOCAL_WORKERS="${LOCAL_WORKERS:-$WORKERS}"
[[ "$LOCAL_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--local_worker_num must be a positive integer, got '$LOCAL_WORKERS'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "--node_rank must be a non-negative integer, got '$NODE_RANK'"
(( LOCAL_WORKERS <= WORKERS && WORKERS % LOCAL_WORKERS == 0 )) \
  || die "worker_num=$WORKERS must be a multiple of local_worker_num=$LOCAL_WORKERS"
(( NODE_RANK < WORKERS / LOCAL_WORKERS )) \
  || die "node_rank=$NODE_RANK but worker_num/local_worker_num = $((WORKERS / LOCAL_WORKERS)) nodes"
if (( WORKERS != LOCAL_WORKERS )) && [[ -z "$PORT" || "$ADDR" == 127.0.0.1 ]]; then
  die "a multi-node launch needs --master_addr (reachable from every node) and --master_port"
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "launch_msrun.sh (dry run): msrun --worker_num=$WORKERS --local_worker_num=$LOCAL_WORKERS --node_rank=$NODE_RANK" \
       "--master_addr=$ADDR --master_port=${PORT:-<free port>} --join=True $SCRIPT $*"
  exec "$PYTHON" "$ROOT/scripts/show_plan.py" --world-size "$WORKERS" "$@"
fi
command -v msrun >/dev/null 2>&1 || die "msrun not found on PATH (it comes with mindspore)"
[[ -f "$SCRIPT" ]] || die "no script $SCRIPT"

ARGS=("$@")
if [[ "$(basename "$SCRIPT")" == "train_rl.py" || "$(basename "$SCRIPT")" == "sft.py" ]]; then
  have_dist=0
  for a in "${ARGS[@]+"${ARGS[@]}"}"; do [[ "$a" == "--distributed" ]] && have_dist=1; done
  [[ $have_dist == 1 ]] || ARGS=(--distributed "${ARGS[@]+"${ARGS[@]}"}")
fi

if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
fi
[[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ]] || die "--port must be in 1..65535, got '$PORT'"
# a listening socket on the port makes msrun's scheduler fail at once while msrun waits for its workers
# forever; SO_REUSEADDR so that a port merely in TIME_WAIT is not refused
"$PYTHON" - "$ADDR" "$PORT" <<'PY' || die "port $PORT on $ADDR is in use (or not bindable): choose another --port or omit it"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print(f"launch_msrun.sh: cannot bind {sys.argv[1]}:{sys.argv[2]}: {e}", file=sys.stderr)
    sys.exit(1)
PY
LOG_DIR="${LOG_DIR:-runs/msrun_logs/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"
LOG_DIR_ABS="$(cd "$LOG_DIR" && pwd)"

# before the MindSpore runtime starts in each worker: no busy-waiting runtime queue, C++ log at errors only
export MS_DEV_HOST_BLOCKING_RUN="${MS_DEV_HOST_BLOCKING_RUN:-1}"
export GLOG_v="${GLOG_v:-3}"
export MS_NODE_TIMEOUT="${MS_NODE_TIMEOUT:-3600}"

MSRUN_PID=""
KNOWN=""  # every process msrun started (scheduler, workers), remembered while msrun is alive to find them

descendants() {  # pids below $1, breadth first
  ps -eo pid=,ppid= | awk -v root="$1" '{ kids[$2] = kids[$2] " " $1 }
    END { n = split(root, q, " "); for (i = 1; i <= n; i++) { m = split(kids[q[i]], c, " ");
          for (j = 1; j <= m; j++) { print c[j]; q[++n] = c[j] } } }'
}

# a process msrun started runs `python $SCRIPT ...` or follows a log (`tail -f $LOG_DIR/worker_0.log`):
# checked before each kill, so a pid reused by an unrelated process after ours exited is never touched
ours() {
  local args; args="$(ps -o args= -p "$1" 2>/dev/null)" || return 1
  [[ "$args" == *"$SCRIPT"* || "$args" == *"$LOG_DIR/"* || "$args" == *"$LOG_DIR_ABS/"* ]]
}
remember() {
  [[ -n "$MSRUN_PID" ]] || return 0
  local p live=""
  for p in $KNOWN $(descendants "$MSRUN_PID"); do ours "$p" && live="$live $p"; done
  KNOWN="$(printf '%s\n' $live | sort -un | tr '\n' ' ')"
}

stop_all() {  # msrun, then everything it started (their process groups too); TERM, then KILL after 5 s
  remember
  local sig p i alive
  for sig in TERM KILL; do
    [[ -z "$MSRUN_PID" ]] || kill -"$sig" "$MSRUN_PID" 2>/dev/null || true
    for p in $KNOWN; do
      ours "$p" || continue
      if [[ "$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ')" == "$p" ]]; then kill -"$sig" -- "-$p" 2>/dev/null || true; fi
      kill -"$sig" "$p" 2>/dev/null || true
    done
    [[ $sig == KILL ]] && break
    for i in $(seq 1 50); do
      alive=0
      for p in $MSRUN_PID $KNOWN; do ours "$p" && alive=1; done
      [[ -n "$MSRUN_PID" ]] && kill -0 "$MSRUN_PID" 2>/dev/null && alive=1
      [[ $alive == 0 ]] && break
      sleep 0.1
    done
  done
  [[ -n "$MSRUN_PID" ]] && { wait "$MSRUN_PID" 2>/dev/null || true; }
  MSRUN_PID=""
  KNOWN=""
}
trap 'stop_all' EXIT
trap 'echo "launch_msrun.sh: interrupted; stopping every worker" >&2; stop_all; exit 130' INT
trap 'echo "launch_msrun.sh: terminated; stopping every worker" >&2; stop_all; exit 143' TERM HUP

failure() {  # the first sign that the job cannot succeed, as one line; silent (status 1) when none
  local f
  if [[ -f "$LOG_DIR/scheduler.log" ]] && grep -q -e "Failed to init the tcp server" -e "Failed to create the TCP server" "$LOG_DIR/scheduler.log"; then
    echo "the msrun scheduler could not listen on $ADDR:$PORT (port taken?); see $LOG_DIR/scheduler.log"
    return 0
  fi
  for f in "$LOG_DIR"/scheduler.log "$LOG_DIR"/worker_*.log; do
    [[ -f "$f" ]] || continue
    if grep -q "Traceback (most recent call last)" "$f"; then
      echo "$(basename "$f" .log) failed: $(grep -E '^[A-Za-z_.]*(Error|Exception|Interrupt)\b' "$f" | tail -n 1)"
      return 0
    fi
  done
  if grep -q "exit with exception" "$LOG_DIR/msrun.log" 2>/dev/null; then
    echo "$(grep "exit with exception" "$LOG_DIR/msrun.log" | head -n 1 | sed 's/.*\] //')"
    return 0
  fi
  return 1
}

echo "launch_msrun.sh: $WORKERS workers ($LOCAL_WORKERS on node $NODE_RANK), master $ADDR:$PORT, logs in $LOG_DIR" >&2
status=0
msrun --worker_num="$WORKERS" --local_worker_num="$LOCAL_WORKERS" --node_rank="$NODE_RANK" --master_addr="$ADDR" \
  --master_port="$PORT" --join=True --log_dir="$LOG_DIR" "$SCRIPT" "${ARGS[@]+"${ARGS[@]}"}" >"$LOG_DIR/msrun.log" 2>&1 &
MSRUN_PID=$!
reason=""
while kill -0 "$MSRUN_PID" 2>/dev/null; do
  remember
  if reason="$(failure)"; then
    echo "launch_msrun.sh: $reason; stopping every worker" >&2
    stop_all
    status=1
    break
  fi
  sleep 1
done
if [[ -n "$MSRUN_PID" ]]; then
  wait "$MSRUN_PID" || status=$?
  MSRUN_PID=""
  stop_all  # msrun is gone; a worker it left behind (it had failed) goes too
fi
cat "$LOG_DIR/msrun.log" >&2

if [[ $status -ne 0 ]]; then
  echo "launch_msrun.sh: failed (status $status)${reason:+: $reason}; log tails:" >&2
  for f in "$LOG_DIR"/worker_*.log "$LOG_DIR"/scheduler.log; do
    [[ -f "$f" ]] || continue
    echo "==== $f" >&2
    grep -v -e '^\[INFO\]' -e '^\s*$' "$f" | tail -n 30 >&2 || true
  done
fi
exit $status
