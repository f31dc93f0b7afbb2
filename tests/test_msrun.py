"""Data-parallel RL under msrun: 2 CPU workers over loopback, 2 RL steps from a 2-step micro SFT run.

Checks that both ranks exit 0, that their final weights are identical (the optimizer cell's AllReduce
kept them in sync although each rank rolled out different prompts) and that training moved them away
from the SFT weights. Also that the launcher fails fast, with the reason and no process left behind,
on bad arguments, a busy port and a worker that dies. Skipped only when ``msrun`` (shipped with
mindspore) is not on PATH.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("mindspore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "model_configs", "qwen3_micro.yaml")
LAUNCHER = os.path.join(ROOT, "scripts", "launch_msrun.sh")
TIMEOUT_S = 300  # per subprocess

COMMON = [f"model_config={MICRO}", "seq_length=32", "data.num_users=60",
          "rl.log_entropy=false"]  # the entropy diagnostic's extra forward graphs are not what these tests compare


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, cwd, timeout):
    """Run ``cmd`` in its own process group; on timeout kill the whole group (msrun's workers too)."""
    env = dict(os.environ, MS_DEV_HOST_BLOCKING_RUN="1", GLOG_v="3", PYTHONPATH=ROOT, PYTHON=sys.executable)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return proc.returncode, out, True


def _worker_logs(log_dir) -> str:
    parts = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            lines = [l for l in f if l.strip() and not l.startswith("[INFO]")]
        parts.append(f"==== {name} (last 60 lines)\n" + "".join(lines[-60:]))
    return "\n".join(parts) or f"(no logs in {log_dir})"


def _model_tensors(run_dir) -> dict:
    from recast_ms.trainer import checkpoint as ckpt

    path = ckpt.latest_checkpoint(str(run_dir))
    assert path is not None, f"{run_dir}: no checkpoint"
    return {k: v for k, v in ckpt.load_state(path)[0].items() if k.startswith("model/")}


def _assert_same_step(one, two, before, lr, what):
    """Parameters after one step of one process (``one``) and of 2 ranks (``two``) agree to fp32 tolerance.

    AdamW's first step moves each weight by about ``lr * g / |g|``: where a gradient is ~0 its sign is fp32
    rounding noise (summation order differs between 1 and 2 ranks), so the bound is 2% of one step (``lr``), far
    below a different batch, which moves most weights by the full ``lr`` the other way."""
    assert one.keys() == two.keys()
    diff = max(float(np.abs(one[k] - two[k]).max()) for k in one)
    close = sum(int((np.abs(one[k] - two[k]) <= 1e-6).sum()) for k in one) / sum(v.size for v in one.values())
    assert diff < 0.02 * lr, f"{what}: 1 process vs 2 ranks differ by {diff} = {diff / lr:.3f} x lr"
    moved = None
    if before is not None:
        moved = max(float(np.abs(one[k] - before[k]).max()) for k in one)
        assert moved > 0.5 * lr, f"{what}: the step moved the weights by {moved} only (lr {lr})"
    return diff, close, moved


def _last_metrics(path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (shipped with mindspore) is not on PATH")
def test_two_ranks_equal_one_process_over_the_global_batch(tmp_path):
    """One batch semantics: rl.prompts_per_step / sft.batch_size are global. One step on 2 msrun ranks equals
    one step of one process over the same global batch: SFT, the whole-group GRPO path (4 resp. 2 micro-batches,
    the buffered optimizer) and ReCast (one micro-batch, the fused step); each prompt is drawn by exactly one rank
    and logged metrics are the global batch's. Before: each rank drew its own P prompts with its own seed.

    The whole-group run is ``repair_only`` (GRPO's advantages; all-zero groups get the ground-truth anchor):
    from a 1-step SFT model plain ``grpo`` samples no hit among 300 SIDs, so its gradient is exactly zero and
    the comparison would prove nothing. Both share every line of the buffered path."""
    from recast_ms.config import load_config
    from recast_ms.data.batching import EpochSampler
    from recast_ms.trainer.setup import load_splits

    t0 = time.time()
    cfg = load_config(None, COMMON)
    sft = COMMON + ["sft.steps=1", "sft.batch_size=8", "sft.warmup_steps=0", "sft.save_every=1", "sft.log_every=1",
                    "sft.eval_every=1"]
    one, two = tmp_path / "sft_1", tmp_path / "sft_2"
    rc, out, to = _run([sys.executable, os.path.join(ROOT, "scripts", "sft.py"), "--run-dir", str(one), *sft],
                       tmp_path, TIMEOUT_S)
    assert rc == 0 and not to, out[-5000:]
    logs = tmp_path / "logs_sft"
    rc, out, to = _run(["bash", LAUNCHER, "--workers", "2", "--log-dir", str(logs), "--script",
                        os.path.join(ROOT, "scripts", "sft.py"), "--", "--run-dir", str(two), *sft], tmp_path, TIMEOUT_S)
    assert rc == 0 and not to, f"{out[-3000:]}\n{_worker_logs(logs)}"
    report = [("sft", *_assert_same_step(_model_tensors(one), _model_tensors(two), None, cfg.sft.lr, "SFT"))]
    m1, m2 = _last_metrics(one / "sft_metrics.jsonl"), _last_metrics(two / "sft_metrics.jsonl")
    assert m2["sft/loss"] == pytest.approx(m1["sft/loss"], rel=1e-5), (m1, m2)
    init = _model_tensors(one)

    n_prompts = len(load_splits(cfg.data).valid[: cfg.data.max_rl_prompts or None])
    for est, micro in (("repair_only", 4), ("recast", 8)):
        rl = COMMON + ["rl.steps=1", "rl.prompts_per_step=4", "rl.group_size=4", f"rl.micro_batch_size={micro}",
                       f"rl.estimator={est}"]
        one, two, logs = tmp_path / f"rl_{est}_1", tmp_path / f"rl_{est}_2", tmp_path / f"logs_{est}"
        rc, out, to = _run([sys.executable, os.path.join(ROOT, "scripts", "train_rl.py"), "--init",
                            str(tmp_path / "sft_1"), "--run-dir", str(one), "--fresh", "--no-eval", *rl], tmp_path,
                           TIMEOUT_S)
        assert rc == 0 and not to, out[-5000:]
        rc, out, to = _run(["bash", LAUNCHER, "--workers", "2", "--port", str(_free_port()), "--addr", "127.0.0.1",
                            "--log-dir", str(logs), "--", "--init",
                            str(tmp_path / "sft_1"), "--run-dir", str(two), "--fresh", "--no-eval", *rl], tmp_path,
                           TIMEOUT_S)
        assert rc == 0 and not to, f"{out[-3000:]}\n{_worker_logs(logs)}"
        report.append((est, *_assert_same_step(_model_tensors(one), _model_tensors(two), init, cfg.rl.lr, est)))
        m1, m2 = _last_metrics(one / "metrics.jsonl"), _last_metrics(two / "metrics.jsonl")
        for key in ("reward/mean", "signals/all_zero_group_ratio", "actor/loss", "actor/grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), (est, key, m1[key], m2[key])
        assert m2["actor/rows"] == m1["actor/rows"]  # the global actor batch, summed over ranks
        sums = [json.loads((two / f"param_checksum_rank{r}.json").read_text()) for r in (0, 1)]
        assert [(c["rank"], c["world"], c["step"]) for c in sums] == [(0, 2, 1), (1, 2, 1)], sums
        # the ranks stay in sync: identical updates from the all-reduced gradients (rank 1's weights are compared
        # nowhere else; the tolerance is float32 rounding of the digest, sum over parameters of sum(|p|))
        assert sums[0]["checksum"] == pytest.approx(sums[1]["checksum"], rel=1e-7, abs=0), sums
        # only rank 0 writes metrics and checkpoints: one line per step, not one per rank
        assert len((two / "metrics.jsonl").read_text().splitlines()) == 1
        # disjoint halves of the one global order: every prompt once per step
        prompts = [c["last_step_prompts"] for c in sums]
        assert prompts[0] + prompts[1] == list(EpochSampler(n_prompts, 4, cfg.seed).at(0)), prompts
    print(f"1 process vs 2 ranks in {time.time() - t0:.0f}s; (what, max |diff|, share within 1e-6, max |step|): "
          f"{report}")


def _running(marker: str):
    """Pids of live processes whose command line contains ``marker`` (a path unique to one test)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(pid))
    return out


def _kill_leftovers(marker: str):
    for pid in _running(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


needs_msrun = pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (shipped with mindspore) is not on PATH")


@needs_msrun
def test_launcher_names_argument_errors(tmp_path):
    for args, msg in ((["--workers"], "--workers needs a value"),  # before: "$2: unbound variable"
                      (["--workers", "--port", "1"], "--workers needs a value"),
                      (["--worker", "2", "--", "--init", "x"], "unknown option '--worker'")):  # before: passed on
        rc, out, timed_out = _run(["bash", LAUNCHER, *args], tmp_path, 30)
        assert rc == 2 and msg in out and not timed_out, (args, out)


@pytest.mark.serial
@needs_msrun
def test_busy_port_fails_fast_without_workers(tmp_path):
    script = tmp_path / "idle_worker.py"
    script.write_text("import time\ntime.sleep(600)\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.time()
        try:  # before: the scheduler failed at once, msrun waited forever and the workers outlived the launcher
            rc, out, timed_out = _run(["bash", LAUNCHER, "--workers", "2", "--port", str(port), "--log-dir",
                                       str(tmp_path / "logs"), "--script", str(script)], tmp_path, 60)
        finally:
            left = _running(str(tmp_path))
            _kill_leftovers(str(tmp_path))
    assert not timed_out and rc == 2 and f"port {port} on 127.0.0.1 is in use" in out, out
    assert time.time() - t0 < 60 and not left


@pytest.mark.serial
@needs_msrun
def test_dead_worker_stops_the_job_and_leaves_no_process(tmp_path):
    """Rank 1 dies after the cluster formed; rank 0 would wait in its next collective for MS_NODE_TIMEOUT."""
    script = tmp_path / "crashing_worker.py"
    script.write_text("import time\nfrom recast_ms.trainer.distributed import init_data_parallel\n"
                      "rank, _ = init_data_parallel()\n"
                      "if rank == 1:\n    raise RuntimeError('rank 1 dies on purpose')\ntime.sleep(600)\n")
    t0 = time.time()
    try:
        rc, out, timed_out = _run(["bash", LAUNCHER, "--workers", "2", "--log-dir", str(tmp_path / "logs"),
                                   "--script", str(script)], tmp_path, 120)
    finally:  # msrun's processes: scheduler, workers, and the `tail -f` it runs on each worker log
        left = _running(str(tmp_path))
        _kill_leftovers(str(tmp_path))
    assert not timed_out and rc == 1, f"rc={rc} timed_out={timed_out}\n{out[-3000:]}"
    assert "worker_1 failed: RuntimeError: rank 1 dies on purpose; stopping every worker" in out, out[-3000:]
    assert not left, f"processes left behind: {left}"
    print(f"dead worker detected and the job stopped in {time.time() - t0:.0f}s")


@pytest.mark.serial
@needs_msrun
def test_terminated_launcher_leaves_no_workers(tmp_path):
    """Before: killing the launcher left msrun's workers running (msrun puts them in their own groups)."""
    script = tmp_path / "idle_worker.py"
    script.write_text("import time\ntime.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", LAUNCHER, "--workers", "2", "--log-dir", str(tmp_path / "logs"), "--script",
                             str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 60
        while len([p for p in _running(str(script)) if p != proc.pid]) < 3 and time.time() < deadline:
            time.sleep(0.5)  # the scheduler and both workers run the script
        assert len(_running(str(script))) >= 3, "msrun did not start its processes"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        time.sleep(0.5)
        left = _running(str(tmp_path))
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(str(tmp_path))
    assert proc.returncode == 143 and "terminated; stopping every worker" in out, out
    assert not left, f"processes left behind: {left}"
