"""The experiment grid's quick preset runs end to end (what CI affords), resumes, and reports; an interrupted
grid stops its cell; ``--report-only`` reads finished cells and writes nothing else."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("mindspore")

from recast_ms.grid import matched_budget_ratio  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_matched_budget_ratio_golden():
    grpo = [{"step": 0, "eval/pass@1": 0.1}, {"step": 10, "eval/pass@1": 0.2}, {"step": 20, "eval/pass@1": 0.3}]
    recast = [{"step": 0, "eval/pass@1": 0.1}, {"step": 5, "eval/pass@1": 0.31}]
    assert matched_budget_ratio(recast, grpo) == 0.25
    assert matched_budget_ratio([{"step": 0, "eval/pass@1": 0.1}], grpo) is None  # never reached
    flat = [{"step": 0, "eval/pass@1": 0.2}, {"step": 20, "eval/pass@1": 0.2}]
    r = matched_budget_ratio(recast, flat)
    assert r != r  # NaN: the baseline did not improve, no budget to match


def test_quick_grid_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "grid"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "run_grid.py"), "--preset", "quick", "--out", str(out),
           "rl.steps=2", "rl.eval_every=2", "rl.save_every=2", "rl.log_entropy=false"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"]) == 4  # 2 estimators x 2 seeds
    agg = res["aggregate"]
    recast, grpo = agg["micro@synthetic|G4|recast"], agg["micro@synthetic|G4|grpo"]
    assert recast["actor_tokens_per_step"]["mean"] * 2 == grpo["actor_tokens_per_step"]["mean"]  # 2 of G=4 rows
    assert recast["steps"]["mean"] == grpo["steps"]["mean"] == 2  # the command-line override reached every cell
    report = (out / "report.md").read_text()
    assert report.count("| micro@synthetic | 4 |") == 4  # quality + degeneracy rows for both estimators
    assert (out / "figures" / "curves_micro-synthetic_G4.png").stat().st_size > 0
    for cell in res["cells"].values():  # every number has its config and its log beside it
        assert os.path.exists(os.path.join(cell["run_dir"], "config.yaml"))
        assert "rl.estimator=" + cell["estimator"] in (tmp_path / cell["run_dir"] / "stdout.log").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=900)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4  # a finished grid is not rerun
    assert "SFT micro@synthetic: finished before, not restarted" in again.stdout
    (out / "report.md").unlink()
    rebuilt = subprocess.run(cmd + ["--report-only"], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert rebuilt.returncode == 0 and (out / "report.md").read_text() == report  # from the logs alone
    assert len((out / "timings.json").read_text().splitlines()) == 2  # one line per invocation that ran


def test_grid_rejects_unknown_sft_key(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "run_grid.py"), "--preset", "quick", "--out",
           str(tmp_path / "g"), "--sft", "nosuch@data=" + str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "micro@synthetic" in r.stderr


def test_full_preset_plan():
    from recast_ms.grid import PRESETS, plan_cells

    preset = PRESETS["full"]
    cells = plan_cells(preset, {k: f"/sft/{k}" for k in preset["sft"]}, "/out")
    # shared cells run once: the G=16 seed-0 grpo/recast cells belong to the main and the group-size blocks
    assert cells["tiny-industrial_recast_G16_s0"]["blocks"] == ["main", "group_size"]
    assert len(cells) == 15 + 4 + 6 + 15 + 4 + 6
    assert {c["estimator"] for c in cells.values()} == {"grpo", "repair_only", "boundary_only", "recast",
                                                        "recast_adaptive"}
    assert all(os.path.exists(os.path.join(ROOT, s["config"])) for s in preset["sft"].values())


def _fake_cell(tmp_path, sft, est, G, seed, p1_end, tokens, update_s, all_zero=(0.9, 0.8), run_dir=None):
    """A cell directory with a metrics.jsonl shaped like the trainer's: evals at 0/10/20, 20 train steps."""
    d = run_dir or tmp_path / f"{sft}_{est}_{G}_{seed}"
    d.mkdir(parents=True)
    rows = [{"step": 0, "eval/pass@1": 0.05, "eval/pass@10": 0.1, "eval/num_prompts": 500.0}]
    for s in range(1, 21):
        r = {"step": s, "reward/mean": 0.01, "signals/all_zero_group_ratio": all_zero[0] if s <= 10 else all_zero[1],
             "signals/single_hit_group_ratio": 0.1, "signals/zero_reward_sample_ratio": 0.99,
             "signals/repair_trigger_ratio": 0.0 if est == "grpo" else 0.85,
             "signals/naturally_trainable_ratio": 0.15, "actor/rows": tokens / 10, "actor/tokens": tokens,
             "timing_s/step": 2 * update_s, "timing_s/update_actor": update_s, "timing_s/rollout": 0.1,
             "timing_s/ref": update_s / 3, "timing_s/old_log_prob": 0.0, "perf/rss_peak_step_mb": tokens / 4,
             "perf/peak_rss_mb": 3000.0}
        if s in (10, 20):
            r.update({"eval/pass@1": 0.05 + (p1_end - 0.05) * s / 20, "eval/pass@10": 0.1, "eval/pass@32": 0.2,
                      "eval/recall@32": 0.2, "eval/ndcg@10": 0.07, "eval/num_prompts": 500.0})
        rows.append(r)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model, dataset = sft.split("@")
    return {"sft": sft, "model": model, "dataset": dataset, "estimator": est, "group_size": G, "seed": seed,
            "run_dir": str(d)}


def test_report_sections_from_logged_numbers(tmp_path):
    """Ablation across two policies, the G sweep and the system table come from the cells' own logs."""
    from recast_ms.grid import grid_report

    cells = {}
    for sft in ("big@d", "small@d"):
        for seed in (0, 1):
            for est, end in (("grpo", 0.07), ("recast", 0.06 + 0.02 * seed)):
                c = _fake_cell(tmp_path, sft, est, 16, seed, end, 1024 if est == "grpo" else 128,
                               2.0 if est == "grpo" else 0.25)
                cells[f"{sft}{est}{seed}"] = c
    for G in (8, 32):
        for est in ("grpo", "recast"):
            c = _fake_cell(tmp_path, "big@d", est, G, 0, 0.06, 64 * G if est == "grpo" else 128,
                           0.1 * G if est == "grpo" else 0.25)
            cells[f"big{est}G{G}"] = c
    md = grid_report(cells, str(tmp_path / "out"))
    # 0.06 and 0.08: the sample SD (ddof=1, as every verdict) is 0.0141, the population one would be 0.0100
    assert "| big@d | 16 | recast | 0,1 | 0.0500 ± 0.0000 | 0.0700 ± 0.0141 | +0.0200 ± 0.0141 |" in md
    assert "mean ± sample SD (ddof=1" in md
    # recast reaches grpo's final 0.07 only in seed 1 (0.08 at step 20 of grpo's 20)
    assert "| big@d | 16 | recast |" in md and "not reached, 1.000 |" in md
    assert "| big@d | 16 | grpo | 0.900 → 0.800 |" in md  # first-10 / last-10 step means
    assert "## Ablation" in md
    assert "| small@d | 16 | 0.0500 ± 0.0000 | 0.1000 ± 0.0000 | 0.900 | +0.0200 ± 0.0000 / +0.0000 ± 0.0000 | " \
           "+0.0200 ± 0.0141 / +0.0000 ± 0.0000 |" in md
    assert "## Search width (big@d)" in md
    # system table at G=32: 2048 vs 128 actor tokens, update 3.2 s vs 0.25 s
    sys_rows = md.split("## System cost at G=32")[1]
    assert "| GRPO / ReCast | 12.80x | 12.80x |" in sys_rows and "| 16.00x |" in sys_rows
    assert "±0.0097 (Pass@1 0.0500 on 500 prompts)" in md
    out = tmp_path / "out"
    assert (out / "figures" / "group_size_big-d.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["matched_budget_ratio"]["big@d|G16|recast"][1] == 1.0


QUICK_CELLS = ["micro-synthetic_grpo_G4_s0", "micro-synthetic_recast_G4_s0", "micro-synthetic_grpo_G4_s1",
               "micro-synthetic_recast_G4_s1"]
# the grid with its sys.executable replaced by argv[1]: each stage it starts runs that program instead of Python;
# SIGINT handled as in a terminal's foreground job (a background job started by a shell script ignores it)
WITH_PYTHON = ("import runpy, signal, sys; sys.executable = sys.argv.pop(1); "
               "signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('recast_ms.commands.grid', run_name='__main__', alter_sys=True)")


def _grid(args, python=None):
    """``recast-grid --preset quick ARGS`` (stages run ``python`` when given), as a process."""
    cmd = [sys.executable] + (["-c", WITH_PYTHON, str(python)] if python else
                              [os.path.join(ROOT, "scripts", "run_grid.py")])
    return cmd + ["--preset", "quick"] + list(args)


def _fake_sft(tmp_path):
    """A finished SFT run as ``--sft`` accepts it (the stages that would load it are fakes)."""
    step = tmp_path / "sft" / "checkpoints" / "step_10"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 10, "phase": "sft"}))
    return f"micro@synthetic={tmp_path / 'sft'}"


def _fake_program(tmp_path, body):
    path = tmp_path / "fake_python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _stat(pid):
    """(state, ppid, command name) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    name, rest = stat.split("(", 1)[1].rsplit(")", 1)
    state, ppid = rest.split()[:2]
    return None if state == "Z" else (state, int(ppid), name)


def _children(pid):
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and (_stat(d) or (0, 0))[1] == pid]


@pytest.mark.parametrize("signum,cell_body", [
    (signal.SIGINT, "exec sleep 120"),
    (signal.SIGTERM, "trap '' TERM\nexec sleep 120"),  # a cell that ignores TERM is KILLed after the grace period
])
def test_interrupted_grid_stops_its_cell(tmp_path, signum, cell_body):
    out = tmp_path / "g"
    grid = subprocess.Popen(_grid(["--out", str(out), "--sft", _fake_sft(tmp_path)],
                                  _fake_program(tmp_path, cell_body)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    child = None
    try:
        deadline = time.time() + 60
        while child is None and time.time() < deadline and grid.poll() is None:
            child = next((c for c in _children(grid.pid) if (_stat(c) or (0, 0, ""))[2] == "sleep"), None)
            time.sleep(0.05)
        assert child is not None, grid.communicate(timeout=30)
        grid.send_signal(signum)
        _, err = grid.communicate(timeout=60)
        deadline = time.time() + 10  # the grid waits 5 s for TERM before it KILLs
        while _stat(child) and time.time() < deadline:
            time.sleep(0.05)
        assert _stat(child) is None, f"cell process {child} outlived the grid: {err}"
        assert grid.returncode == 128 + signum, err
        assert f"cell {QUICK_CELLS[0]}: interrupted by {signal.Signals(signum).name}" in err
        assert "rerun the same command to resume it" in err
        # what a rerun needs to resume: the plan it ran with
        assert json.loads((out / "preset.json").read_text())["sft_dirs"] == {"micro@synthetic": str(tmp_path / "sft")}
    finally:
        if grid.poll() is None:
            grid.kill()
            grid.wait()
        if child is not None and _stat(child):
            os.kill(child, signal.SIGKILL)


def test_a_cell_that_exits_0_unfinished_is_a_failure_not_done(tmp_path):
    r = subprocess.run(_grid(["--out", str(tmp_path / "g"), "--sft", _fake_sft(tmp_path)],
                             _fake_program(tmp_path, "exit 0")),
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode != 0 and r.stdout.count("FAILED (exit 0 without its step-3 evaluation)") == 4, r.stdout
    assert "done" not in r.stdout and "no report written" in r.stdout and "report:" not in r.stdout
    assert "failed cells: " + ", ".join(QUICK_CELLS) in r.stderr
    assert not (tmp_path / "g" / "report.md").exists()


def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def test_report_only_with_no_finished_cell_is_an_error_that_writes_nothing(tmp_path):
    out = tmp_path / "g"
    r = subprocess.run(_grid(["--out", str(out), "--report-only"]), capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and f"--out {out}: no such directory" in r.stderr
    assert not out.exists()
    # a grid whose first cell stopped before its last evaluation; the others never started
    cell = out / "cells" / QUICK_CELLS[0]
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/pass@1": 0.1}) + "\n"
                                        + json.dumps({"step": 1, "reward/mean": 0.0}) + "\n")
    before = _tree(out)
    r = subprocess.run(_grid(["--out", str(out), "--report-only"]), capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "no finished cell" in r.stderr and f"step 3 in {cell}/metrics.jsonl" in r.stderr
    assert "done" not in r.stdout
    assert _tree(out) == before  # no preset.json, logs/, report or figures
    (out / "preset.json").write_text(json.dumps({"preset": "full", "overrides": []}))  # another grid's directory
    r = subprocess.run(_grid(["--out", str(out), "--report-only"]), capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2 and "the grid there ran --preset full, not --preset quick" in r.stderr


def _finished_quick_grid(tmp_path):
    """A quick-preset grid directory whose 4 cells finished 20 steps (the steps recorded in preset.json)."""
    out = tmp_path / "g"
    for name in QUICK_CELLS:
        est, seed = name.split("_")[1], int(name[-1])
        _fake_cell(tmp_path, "micro@synthetic", est, 4, seed, 0.07, 64, 0.5, run_dir=out / "cells" / name)
    (out / "preset.json").write_text(json.dumps({"preset": "quick", "overrides": ["rl.steps=20"],
                                                 "sft_dirs": {"micro@synthetic": str(tmp_path / "sft")}}))
    return out


def test_report_only_skips_a_cut_last_line_and_names_a_corrupt_one(tmp_path):
    out = _finished_quick_grid(tmp_path)
    cut = out / "cells" / QUICK_CELLS[3] / "metrics.jsonl"  # killed while writing its step-20 row
    cut.write_text(cut.read_text()[:-40])
    preset = (out / "preset.json").read_text()
    r = subprocess.run(_grid(["--out", str(out), "--report-only"]), capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{cut}: line 21 is cut short" in r.stderr
    assert f"{QUICK_CELLS[3]}: not finished" in r.stdout and r.stdout.count(": finished\n") == 3
    assert "3/4 cells finished" in r.stdout
    assert "rl.steps=20" in r.stdout  # planned with the recorded overrides: 20 steps, not the preset's 3
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 3
    assert (out / "preset.json").read_text() == preset
    bad = out / "cells" / QUICK_CELLS[0] / "metrics.jsonl"
    lines = bad.read_text().splitlines(keepends=True)
    bad.write_text("".join(lines[:4] + ['{"step": 4, "reward/me\n'] + lines[5:]))
    r = subprocess.run(_grid(["--out", str(out), "--report-only"]), capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 2 and f"{bad}: line 5 is not JSON" in r.stderr.splitlines()[-1], r.stderr


def test_resume_drops_a_cut_short_metrics_line(tmp_path):
    from recast_ms.utils.tracking import MetricsLogger, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s / 3}) + "\n" for s in range(3)) + '{"step": 3, "x')
    MetricsLogger(str(tmp_path), resume_step=1, tensorboard=False).close()
    assert read_jsonl(str(path)) == [{"step": 0, "x": 0.0}, {"step": 1, "x": 1 / 3}]
