"""The experiment grid's quick preset runs end to end (what CI affords), resumes, and reports."""
import json
import os
import subprocess
import sys

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
           "rl.steps=2", "rl.eval_every=2", "rl.save_every=2"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"]) == 4  # 2 estimators x 2 seeds
    agg = res["aggregate"]
    assert agg["micro|G4|recast"]["actor_tokens_per_step"]["mean"] * 2 == agg["micro|G4|grpo"]["actor_tokens_per_step"]["mean"]
    assert (out / "report.md").read_text().count("| micro |") == 2
    assert (out / "figures" / "curves_micro_G4.png").stat().st_size > 0
    for cell in res["cells"].values():  # every number has its config beside it
        assert os.path.exists(os.path.join(cell["run_dir"], "config.yaml"))
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=900)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4  # a finished grid is not rerun
