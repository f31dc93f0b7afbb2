"""Run-directory safety (issue 21): a run removes only what a recast_ms run wrote, one run per directory,
Ctrl-C / SIGTERM end with one line naming the resume point, half-written saves are cleared on resume, and
the source tree is never a run directory.

Each test failed on the code before the issue; the micro model, 1-2 steps (the signal test: until signalled).
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from recast_ms.config import ConfigError, load_config
from recast_ms.trainer import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "model_configs", "qwen3_micro.yaml")
SFT = [f"model_config={MICRO}", "seq_length=32", "data.num_users=60", "sft.batch_size=8", "sft.warmup_steps=0",
       "sft.log_every=1", "sft.eval_every=100"]


def _sft(run, *over, **kw):
    from recast_ms.trainer.sft import run_sft

    return run_sft(load_config(None, SFT + list(over)), str(run), progress=False, **kw)


def test_a_new_run_removes_only_what_a_recast_run_wrote(tmp_path):
    pytest.importorskip("mindspore")
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1").write_text("another tool's curves")
    (run / "checkpoints" / "step_3").mkdir(parents=True)  # no meta.json of ours
    (run / "config.yaml").write_text("lr: 1\n")
    (run / "sft_metrics.jsonl").write_text('{"step": 9}\n')
    (run / "notes.txt").write_text("not in the way")
    with pytest.raises(ConfigError) as e:  # before: tb/ and step_3 removed, config and metrics overwritten
        _sft(run, "sft.steps=1")
    assert str(e.value).count("\n") == 0
    for name in ("config.yaml", "sft_metrics.jsonl", "tb", "checkpoints/step_3", "--overwrite"):
        assert name in str(e.value)
    assert (run / "tb" / "events.out.tfevents.1").exists() and (run / "checkpoints" / "step_3").is_dir()
    assert (run / "config.yaml").read_text() == "lr: 1\n" and not (run / "checkpoints" / "step_1").exists()

    _sft(run, "sft.steps=1", "sft.save_every=1", overwrite=True)  # the user said so
    assert not (run / "tb" / "events.out.tfevents.1").exists() and not (run / "checkpoints" / "step_3").exists()
    assert (run / "notes.txt").exists() and ckpt.latest_checkpoint(str(run)).endswith("step_1")


def test_resume_removes_a_save_killed_mid_write(tmp_path):
    pytest.importorskip("mindspore")
    run = tmp_path / "run"
    _sft(run, "sft.steps=1", "sft.save_every=1")
    leftover = run / "checkpoints" / ".step_2.k9x1"  # what a kill inside save_state leaves
    leftover.mkdir()
    (leftover / "state.ckpt").write_bytes(b"half")
    _sft(run, "sft.steps=2", "sft.save_every=1")
    assert not leftover.exists()  # before: kept forever
    assert ckpt.latest_checkpoint(str(run)).endswith("step_2")


def test_the_source_tree_is_never_a_run_dir(tmp_path):
    fake = tmp_path / "checkout"
    fake.mkdir()
    (fake / "pyproject.toml").write_text('[project]\nname = "recast_ms"\nversion = "0.1"\n')
    with pytest.raises(ConfigError, match="pyproject.toml"):  # before: trained there
        _sft(fake, "sft.steps=1")
    assert sorted(os.listdir(fake)) == ["pyproject.toml"]
    for inside in (ROOT, os.path.join(ROOT, "recast_ms"), os.path.join(ROOT, "tests", "run")):
        with pytest.raises(ConfigError, match="--run-dir"):
            ckpt.check_run_dir(inside)
    if os.path.isdir(os.path.join(ROOT, ".git")):
        ckpt.check_run_dir(os.path.join(ROOT, "runs", "main"))  # git-ignored: the README's own example


def test_only_the_writing_rank_locks(tmp_path):
    with ckpt.hold_run_dir(str(tmp_path)):
        with ckpt.hold_run_dir(str(tmp_path), writer=False):  # msrun rank 1 beside rank 0
            pass
        with pytest.raises(ckpt.RunDirBusy, match=f"pid {os.getpid()} "):
            with ckpt.hold_run_dir(str(tmp_path)):
                pass
    assert not (tmp_path / ".lock").exists()
    with ckpt.hold_run_dir(str(tmp_path)):  # released
        pass


ENV = dict(os.environ, PYTHONPATH=ROOT, MS_DEV_HOST_BLOCKING_RUN="1")


def _cmd(run, steps):
    return [sys.executable, "-m", "recast_ms.commands.sft", "--run-dir", str(run), *SFT, "sft.save_every=1",
            f"sft.steps={steps}"]


def _start(run):
    """A run that goes on until signalled, checkpointing every step."""
    return subprocess.Popen(_cmd(run, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=str(run.parent))


def _finish(run, steps, timeout=240):
    return subprocess.run(_cmd(run, steps), capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(run.parent))


def _step(run):
    last = ckpt.latest_checkpoint(str(run))
    return int(last.rsplit("_", 1)[1]) if last else 0


def _wait_for_step_above(proc, run, step, timeout=240):
    end = time.time() + timeout
    while _step(run) <= step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before a checkpoint: {proc.communicate()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"no checkpoint past step {step} within {timeout}s")
        time.sleep(0.2)


def _stop(proc, sig):
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


@pytest.mark.serial
def test_a_second_run_is_refused_and_signals_end_with_a_resume_line(tmp_path):
    pytest.importorskip("mindspore")
    run = tmp_path / "run"
    a = _start(run)
    _wait_for_step_above(a, run, 0)
    b = _finish(run, 1)
    assert b.returncode != 0 and f"in use by pid {a.pid} " in b.stderr, b.stderr  # before: exit 0, both writing
    assert a.poll() is None  # the holder runs on

    for sig, code, name in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
        if sig == signal.SIGINT:
            a = _start(run)  # resumes
            _wait_for_step_above(a, run, _step(run))
        rc, err = _stop(a, sig)
        m = re.search(rf"interrupted by {name} at step (\d+); a rerun without --fresh resumes from (\S+)", err)
        assert rc == code and m, (rc, err[-2000:])  # before: 143 / a traceback, and no line
        assert m.group(2) == ckpt.latest_checkpoint(str(run)) and _step(run) <= int(m.group(1))
        assert "Traceback" not in err and not (run / ".lock").exists()
        assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]  # a save cut short cleans up

    # what a SIGKILL'd run leaves: its lock file, naming a dead pid (the kernel dropped its flock)
    (run / ".lock").write_text("pid 999999999 on a-host since 2026-01-01 00:00:00\n")
    done = _step(run) + 1
    e = _finish(run, done)
    assert e.returncode == 0, e.stderr[-2000:]
    assert _step(run) == done and not (run / ".lock").exists()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.serial
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_command_stops_its_stage_process_on_a_signal(tmp_path, signum):
    """recast-main and recast-grid run stages as children (run_child): a signal to the command stops the child's
    group before the command exits 128 + signal, so a rerun never runs a stage twice in one directory."""
    pidfile = tmp_path / "child.pid"
    code = ("import sys; from recast_ms.utils.interrupt import route_sigint, run_child; route_sigint(); "
            f"sys.exit(run_child(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 120'], 'recast-main: stage sft', "
            "'rerun the same command to resume'))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.time() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signum, err
        assert f"recast-main: stage sft: interrupted by {signal.Signals(signum).name}" in err
        assert "rerun the same command to resume" in err and "Traceback" not in err
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the stage process outlived the command"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_recast_main_runs_each_stage_through_run_child(monkeypatch):
    from recast_ms.commands import main as main_cmd

    calls = []
    monkeypatch.setattr("recast_ms.utils.interrupt.run_child", lambda cmd, what, hint, **kw: calls.append(what) or 3)
    args = type("A", (), {"out": "o", "config": None, "overrides": []})()
    with pytest.raises(SystemExit) as e:
        main_cmd._stage(args, "rl", "grpo")
    assert e.value.code == 3 and calls == ["recast-main: stage rl grpo"]
