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
TIMEOUT_S = 300  # per subprocess (SFT, then the 2-worker RL run)

COMMON = [f"model_config={MICRO}", "seq_length=32", "data.num_users=60"]
SFT_ARGS = ["sft.steps=2", "sft.batch_size=8", "sft.warmup_steps=0", "sft.save_every=1", "sft.eval_every=1",
            "sft.log_every=1"]
RL_ARGS = ["rl.steps=2", "rl.prompts_per_step=4", "rl.group_size=4", "rl.micro_batch_size=8",
           "data.max_eval_prompts=8", "eval.beam_width=4", "eval.ks=[1,4]", "eval.batch_size=8"]


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


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (shipped with mindspore) is not on PATH")
def test_two_workers_stay_in_sync_and_train(tmp_path):
    from recast_ms.trainer import checkpoint as ckpt

    t0 = time.time()
    sft_dir, rl_dir, log_dir = tmp_path / "sft", tmp_path / "rl", tmp_path / "msrun_logs"
    # cwd = tmp_path: MindSpore may drop rank_*/ and kernel_meta/ folders into the working directory
    rc, out, timed_out = _run([sys.executable, os.path.join(ROOT, "scripts", "sft.py"), "--run-dir", str(sft_dir),
                               *COMMON, *SFT_ARGS], tmp_path, TIMEOUT_S)
    assert rc == 0 and not timed_out, f"SFT failed (rc={rc}, timed_out={timed_out}):\n{out[-5000:]}"
    init = ckpt.latest_checkpoint(str(sft_dir))
    assert init is not None
    tensors, _ = ckpt.load_state(init)
    # the same digest as scripts/train_rl.py: sum over parameters of sum(|p|)
    sft_checksum = float(sum(np.abs(v).sum() for k, v in tensors.items() if k.startswith("model/")))
    t_sft = time.time() - t0

    rc, out, timed_out = _run(["bash", LAUNCHER, "--workers", "2", "--port", str(_free_port()), "--addr", "127.0.0.1",
                               "--log-dir", str(log_dir), "--", "--init", str(sft_dir), "--run-dir", str(rl_dir),
                               "--fresh", "--no-eval", *COMMON, *RL_ARGS], tmp_path, TIMEOUT_S)
    report = f"launcher rc={rc} timed_out={timed_out}\n{out[-3000:]}\n{_worker_logs(log_dir)}"
    assert rc == 0 and not timed_out, report

    sums = []
    for rank in (0, 1):
        path = rl_dir / f"param_checksum_rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no checksum\n{report}"
        sums.append(json.loads(path.read_text()))
    assert [s["rank"] for s in sums] == [0, 1] and all(s["world"] == 2 for s in sums), sums
    assert sums[0]["step"] == sums[1]["step"] == 2, sums
    c0, c1 = sums[0]["checksum"], sums[1]["checksum"]
    # identical updates from identical all-reduced gradients; the tolerance is float32 rounding of the digest
    assert c0 == pytest.approx(c1, rel=1e-7, abs=0), f"ranks diverged: {sums}"
    # training moved the weights (a 2-step update at rl.lr=1e-4 changes the digest by ~0.1)
    assert abs(c0 - sft_checksum) > 1e-3, f"weights did not move: SFT {sft_checksum}, RL {sums}"
    # only rank 0 writes checkpoints and metrics
    assert ckpt.latest_checkpoint(str(rl_dir)) is not None
    assert len((rl_dir / "metrics.jsonl").read_text().splitlines()) == 2
    print(f"SFT {t_sft:.0f}s, msrun RL {time.time() - t0 - t_sft:.0f}s; checksums SFT {sft_checksum:.4f} "
          f"RL {c0:.4f}/{c1:.4f}")


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
