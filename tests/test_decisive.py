"""Issue 14: the decisive preset's plan, its pre-registered analysis on synthetic logs with hand-computed
values, the config keys it needs (seeded eval subset, explicit eval steps, rl.rollout), and the
bench_system --rollout plumbing."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recast_ms.config import load_config
from recast_ms.decisive import analyse, convergence_verdict, decisive_report, is_valid, quality_verdict
from recast_ms.evaluation import eval_subset
from recast_ms.grid import PRESETS, pending_keys, plan_cells

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_STEPS = (0, 10, 20, 40, 80, 160)
GRPO = [0.080, 0.082, 0.084, 0.086, 0.088]  # final Pass@1 per seed, mean 0.084
DIFF = [0.008, 0.010, 0.012, 0.006, 0.014]  # recast - grpo: mean 0.010, SD sqrt(1e-5)


def _rows(final, reach_step, sft=0.066, hit=0.04, trigger=0.0):
    """metrics.jsonl rows shaped like the trainer's: eval at EVAL_STEPS, Pass@1 linear from SFT's to
    ``final`` at ``reach_step`` and flat after; 160 training rows (hit rate +0.01 in the last 20)."""
    def p1(s):
        return sft + (final - sft) * min(1.0, s / reach_step)

    rows = [{"step": 0, "eval/pass@1": sft, "eval/pass@10": 0.12, "eval/pass@32": 0.17, "eval/ndcg@10": 0.09,
             "eval/num_prompts": 2000.0}]
    for s in range(1, 161):
        r = {"step": s, "reward/mean": hit + (0.01 if s > 140 else 0.0), "signals/repair_trigger_ratio": trigger,
             "actor/grad_norm": 0.5, "actor/kl": 0.002}
        if s in EVAL_STEPS:
            r.update({"eval/pass@1": p1(s), "eval/pass@10": 0.12 + (p1(s) - sft), "eval/pass@32": 0.17,
                      "eval/ndcg@10": 0.09, "eval/num_prompts": 2000.0})
        rows.append(r)
    return rows


def _arms():
    arms = {"grpo": {s: _rows(g, 160) for s, g in enumerate(GRPO)},
            "recast": {s: _rows(g + d, 40, trigger=0.9) for s, (g, d) in enumerate(zip(GRPO, DIFF))},
            "grpo+beam": {s: _rows(GRPO[s], 160) for s in range(3)},
            "recast+beam": {s: _rows(GRPO[s] + d, 40, trigger=0.8) for s, d in enumerate([-0.002, -0.004, 0.0])},
            "anchor_only": {s: _rows(GRPO[s] + 0.004, 80, trigger=0.9) for s in range(3)}}
    return arms


def test_analysis_golden_values_and_verdicts():
    res = analyse(_arms(), sft_pass_at_10_full=0.125)
    assert res["valid"] is True  # GRPO +0.018 over SFT > 2 x sqrt(0.066 x 0.934 / 2000) = 0.011104
    assert res["sft_binomial_se"] == pytest.approx(0.00555176, abs=1e-8)
    assert res["paired_diff_mean"] == pytest.approx(0.010, abs=1e-12)
    assert res["paired_diff_sd"] == pytest.approx(0.00316228, abs=1e-8)
    # t_{0.975, 4} = 2.776445, t_{0.95, 4} = 2.131847, SE = 0.00141421
    assert res["paired_diff_ci95"] == pytest.approx([0.00607351, 0.01392649], abs=1e-8)
    assert res["paired_diff_lower95_one_sided"] == pytest.approx(0.00698511, abs=1e-8)
    assert res["absolute_threshold"] == pytest.approx(0.091 * 0.084)
    assert res["quality_verdict"] == "reproduced"  # 0.010 >= 0.007644 and 0.00699 > 0
    # ReCast's seed mean: 0.080 at step 20, 0.094 at step 40 >= GRPO's final 0.084
    assert res["convergence_first_step"] == 40 and res["convergence_verdict"] == "reproduced"
    assert res["matched_budget_ratio"] == {str(s): 0.25 for s in range(5)}
    assert res["seeds"] == [0, 1, 2, 3, 4] and res["steps"] == 160 and res["eval_prompts"] == 2000
    assert res["sft_industrial_pass_at_10"] == 0.125
    beam = res["secondary"]["recast+beam - grpo+beam"]  # diffs -0.002, -0.004, 0: t_{0.975, 2} = 4.302653
    assert beam["mean"] == pytest.approx(-0.002) and beam["sd"] == pytest.approx(0.002)
    assert beam["ci95"] == pytest.approx([-0.00696828, 0.00296828], abs=1e-8)
    assert res["secondary"]["anchor_only - grpo"]["ci95"] == pytest.approx([0.004, 0.004])  # SD 0
    assert res["secondary"]["recast - anchor_only"]["mean"] == pytest.approx(0.006)
    # Pass@10 = 0.12 + (Pass@1 - SFT) in these logs, so its paired differences equal Pass@1's; Pass@32 is flat
    assert res["secondary"]["recast - anchor_only"]["metrics"]["pass@10"]["mean"] == pytest.approx(0.006)
    assert res["secondary"]["anchor_only - grpo"]["metrics"]["pass@32"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert res["secondary_metrics"]["pass@10"]["mean"] == pytest.approx(0.010)  # pass@10 moves with pass@1 here
    assert res["curves"]["recast"]["pass@1"]["20"]["mean"] == pytest.approx(0.080)
    assert res["curves"]["grpo"]["pass@1"]["160"]["sd"] == pytest.approx(np.std(GRPO, ddof=1))  # as the verdict's
    tr = res["training"]["recast"]["reward/mean"]
    assert tr["first20_mean"] == pytest.approx(0.04) and tr["last20_mean"] == pytest.approx(0.05)
    assert res["training"]["recast"]["signals/repair_trigger_ratio"]["last20_mean"] == pytest.approx(0.9)


def test_verdict_rules_each_branch():
    thr = 0.091 * 0.084
    assert quality_verdict(DIFF, 0.084)[0] == "reproduced"
    # mean 0, upper bound 0.003927 < 0.007644: the +9.1% effect is excluded
    assert quality_verdict([-0.002, 0.0, 0.002, -0.004, 0.004], 0.084)[0] == "refuted"
    # mean 0.006 < threshold, but the upper bound 0.0099 is above it
    v, st = quality_verdict([0.004, 0.006, 0.008, 0.002, 0.010], 0.084)
    assert v == "inconclusive" and st["ci95"][1] > thr > st["mean"]
    # mean above the threshold but the one-sided lower bound below 0
    assert quality_verdict([0.05, -0.03, 0.04, -0.02, 0.0], 0.084)[0] == "inconclusive"
    assert quality_verdict([0.02], 0.084)[0] == "inconclusive"  # one pair: no interval
    curve = {0: 0.066, 10: 0.07, 20: 0.075, 40: 0.08, 80: 0.085, 160: 0.09}
    assert convergence_verdict(curve, 0.08) == ("reproduced", 40)
    assert convergence_verdict(curve, 0.085) == ("inconclusive", 80)
    assert convergence_verdict(curve, 0.09) == ("refuted", 160)
    assert convergence_verdict(curve, 0.10) == ("refuted", None)
    assert is_valid(0.084, 0.066, 2000)[0] and not is_valid(0.077, 0.066, 2000)[0]  # +0.011 < 0.011104


def test_invalid_experiment_decides_nothing():
    arms = _arms()
    for a in arms.values():
        for rows in a.values():
            rows[0]["eval/pass@1"] = 0.075  # SFT 0.075: GRPO's +0.009 < 2 x 0.00589
    res = analyse(arms)
    assert res["valid"] is False
    assert res["quality_verdict"] == res["convergence_verdict"] == "inconclusive"
    assert res["verdicts_if_valid"]["quality"] == "reproduced"


def _write_cells(tmp_path) -> dict:
    """The golden arms written as finished cells (``cells/<arm>_<seed>/metrics.jsonl``), as the runner lists them."""
    cells = {}
    for arm, by_seed in _arms().items():
        for seed, rows in by_seed.items():
            d = tmp_path / "cells" / f"{arm}_{seed}"
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            cells[f"{arm}_{seed}"] = {"estimator": arm.split("+")[0], "arm": arm, "seed": seed, "run_dir": str(d)}
    return cells


def test_decisive_report_writes_verdict_json_and_figures(tmp_path):
    cells = _write_cells(tmp_path)
    (tmp_path / "sft_full_test_eval.json").write_text(json.dumps(
        {"split": "test", "num_prompts": 4533, "model": {"model/pass@10": 0.1234}}))
    md = decisive_report(cells, str(tmp_path), sft_dirs={"tiny@industrial": "runs/sft_industrial"})
    v = json.loads((tmp_path / "verdict.json").read_text())
    assert {"valid", "quality_verdict", "convergence_verdict", "paired_diff_mean", "paired_diff_ci95", "seeds",
            "steps", "eval_prompts", "sft_industrial_pass_at_10"} <= set(v)
    assert v["quality_verdict"] == "reproduced" and v["sft_industrial_pass_at_10"] == 0.1234
    assert v["sft_full_eval_prompts"] == 4533
    assert "**Quality verdict: reproduced.**" in md and "**Convergence verdict: reproduced.**" in md
    assert "seed 0: 0.250" in md and "| recast+beam - grpo+beam | pass@1 | 0,1,2 | -0.0020 |" in md
    for f in ("decisive_eval_curves.png", "decisive_training.png"):
        assert (tmp_path / "figures" / f).stat().st_size > 0
    assert v["complete"] is True and "INTERIM" not in md


def test_unfinished_grid_writes_an_interim_report_not_a_verdict(tmp_path):
    cells = _write_cells(tmp_path)
    decisive_report(cells, str(tmp_path), planned=len(cells))  # complete: a verdict
    assert (tmp_path / "verdict.json").exists()
    partial = dict(list(cells.items())[:-1])
    md = decisive_report(partial, str(tmp_path), planned=len(cells))
    assert md.startswith(f"> **INTERIM: {len(partial)} of {len(cells)} cells finished. Not a verdict**")
    assert not (tmp_path / "verdict.json").exists()  # the earlier verdict of other cells must not linger
    interim = json.loads((tmp_path / "interim.json").read_text())
    assert interim["complete"] is False and interim["cells_finished"] == len(cells) - 1
    decisive_report(cells, str(tmp_path), planned=len(cells))
    assert (tmp_path / "verdict.json").exists() and not (tmp_path / "interim.json").exists()


def test_decisive_preset_plan():
    preset = PRESETS["decisive"]
    cells = plan_cells(preset, {"tiny@industrial": "/sft"}, "/out")
    assert len(cells) == 5 * 2 + 3 * 2 + 3
    arms = {}
    for c in cells.values():
        arms.setdefault(c["arm"], []).append(c["seed"])
    assert arms == {"grpo": [0, 1, 2, 3, 4], "recast": [0, 1, 2, 3, 4], "grpo+beam": [0, 1, 2],
                    "recast+beam": [0, 1, 2], "anchor_only": [0, 1, 2]}
    beam = cells["tiny-industrial_recast_G16_s1_beam"]
    assert "rl.rollout=beam" in beam["overrides"] and beam["steps"] == 160
    assert not any("rollout" in o for o in cells["tiny-industrial_recast_G16_s1"]["overrides"])
    # the lr is pending until tuned; every cell's overrides then make a valid config with the fixed design
    assert pending_keys(preset, []) == {"rl.lr": preset["pending"]["rl.lr"]}
    assert pending_keys(preset, ["rl.lr=1e-4"]) == {}
    for c in (beam, cells["tiny-industrial_anchor_only_G16_s2"]):
        cfg = load_config(None, c["overrides"] + ["rl.lr=1e-4"])
        assert cfg.rl.eval_steps == EVAL_STEPS and cfg.rl.prompts_per_step == 16 and cfg.rl.group_size == 16
        assert cfg.data.max_eval_prompts == 2000 and cfg.data.eval_subset_seed >= 0
        assert [s for s in range(161) if cfg.rl.eval_due(s)] == list(EVAL_STEPS)
    assert os.path.exists(os.path.join(ROOT, preset["sft"]["tiny@industrial"]["config"]))


def test_run_grid_refuses_decisive_without_tuned_lr(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_grid.py"), "--preset", "decisive",
                        "--out", str(tmp_path / "g")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "rl.lr=" in r.stderr and "PLAN.md" in r.stderr
    assert not (tmp_path / "g" / "sft").exists()  # refused before any SFT or cell started


def test_report_only_keeps_the_recorded_lr(tmp_path):
    """A report-only run of a finished decisive grid without rl.lr reads the lr recorded in preset.json and
    never rewrites the file."""
    preset = PRESETS["decisive"]
    sft = str(tmp_path / "sft")
    arms = _arms()
    for name, c in plan_cells(preset, {"tiny@industrial": sft}, str(tmp_path)).items():
        d = tmp_path / "cells" / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in arms[c["arm"]][c["seed"]]) + "\n")
    recorded = json.dumps({"preset": "decisive", "overrides": ["rl.lr=1e-4"], "sft_dirs": {"tiny@industrial": sft}})
    (tmp_path / "preset.json").write_text(recorded)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_grid.py"), "--preset", "decisive",
                        "--out", str(tmp_path), "--report-only"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "preset.json").read_text() == recorded
    assert f"overrides recorded in {tmp_path / 'preset.json'}: rl.lr=1e-4" in r.stdout
    assert json.loads((tmp_path / "verdict.json").read_text())["cells_finished"] == 19


def test_eval_subset_is_seeded_random_and_stable():
    rows = list(range(100))
    a = eval_subset(rows, 20, 14)
    assert a == eval_subset(rows, 20, 14) and len(set(a)) == 20 and a == sorted(a)
    assert a != rows[:20] and a != eval_subset(rows, 20, 15)
    assert eval_subset(rows, 20, -1) == rows[:20] and eval_subset(rows, 0, 14) == rows
    assert eval_subset(rows, 500, 14) == rows


@pytest.mark.parametrize("override,msg", [
    ("rl.rollout=greedy", "rl.rollout must be"),
    ("rl.eval_steps=[0,50]", "rl.eval_steps"),  # rl.steps defaults to 30
    ("data.eval_subset_seed=-2", "eval_subset_seed"),
])
def test_new_config_keys_are_validated(override, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, [override])
    with pytest.raises(ValueError, match="top_k"):
        load_config(None, ["rl.rollout=beam", "rl.top_k=5"])
    cfg = load_config(None, ["rl.eval_every=10"])
    assert [s for s in range(31) if cfg.rl.eval_due(s)] == [0, 10, 20, 30]  # the default rule is unchanged


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_system", os.path.join(ROOT, "scripts", "bench_system.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_system_passes_rollout_through(monkeypatch, capsys):
    bench = _bench_module()
    cmds = []

    def fake_run(cmd, **kw):
        cmds.append(cmd)
        est = cmd[cmd.index("--estimator") + 1]
        G = int(cmd[cmd.index("--group-size") + 1])
        rows = 2 * 4 if est == "recast" else 4 * G
        res = {"actor_rows": rows, "actor_tokens": 48.0 * rows, "step": 1.0, "rollout": 0.1, "ref": 0.1,
               "update_actor": 0.01 * rows, "update_cost_per_token_ms": 0.1, "peak_memory_mb": 100.0}
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(res) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.main(["--rollout", "beam", "--group-size", "8", "--prompts", "4"])
    assert len(cmds) == 2 and all(c[c.index("--rollout") + 1] == "beam" for c in cmds)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rollout"] == "beam" and summary["actor_tokens_ratio"] == 4.0  # 32 rows vs 8
    # the worker turns the flag into the RL config it trains with
    args = bench.parse_args(["--worker", "--estimator", "grpo", "--rollout", "beam", "--group-size", "8"])
    cfg = load_config(None, bench.worker_overrides(args))
    assert cfg.rl.rollout == "beam" and cfg.rl.estimator == "grpo" and cfg.rl.group_size == 8
    # the entropy diagnostic (a second forward) is off in the speed comparison unless asked for, and recorded
    assert cfg.rl.log_entropy is False and summary["log_entropy"] is False
    assert "--log-entropy" not in cmds[0]
    on = bench.parse_args(["--worker", "--estimator", "grpo", "--log-entropy"])
    assert load_config(None, bench.worker_overrides(on)).rl.log_entropy is True
