"""Issue 24: the reserved valid slice, the beyond presets' stage-2 rule, the selection and grpo-lr rules, the
confirmatory statistics and the 10M comparison, on synthetic inputs (tests/test_decisive.py pattern); the grid
runner's beyond / beyond_confirm / beyond_10m paths on synthetic finished cells (--report-only); and the per-prompt
record an RL evaluation writes, on the micro model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recast_ms import beyond as by
from recast_ms.beyond import best_arms, better_weight, paired_bootstrap, paired_diff, verdict, write_verdict
from recast_ms.config import ConfigError, load_config
from recast_ms.data.reserved import reserve_valid
from recast_ms.grid import (PRESETS, beyond_10m_preset, beyond_confirm_preset, beyond_second_stage, cell_config,
                            plan_cells)


def test_reserve_valid_is_seeded_disjoint_and_complete():
    valid = list(range(100))
    pool, res = reserve_valid(valid, 30, seed=7)
    assert len(res) == 30 and sorted(pool + res) == valid and not set(pool) & set(res)
    assert res == sorted(res) and pool == sorted(pool)  # split order kept
    assert reserve_valid(valid, 30, seed=7) == (pool, res)  # the same rows for every run
    assert reserve_valid(valid, 30, seed=8)[1] != res
    assert reserve_valid(valid, 0, seed=7) == (valid, [])  # off: the historical RL pool
    with pytest.raises(ValueError, match="reserved_valid_rows=100 leaves no RL prompt"):
        reserve_valid(valid, 100, seed=7)


@pytest.mark.parametrize("over,msg", [
    (["eval.split=reserved"], "eval.split=reserved needs data.reserved_valid_rows > 0"),
    (["data.reserved_valid_rows=10", "data.valid_in_train=true"], "needs data.valid_in_train=false"),
    (["eval.split=valid"], "eval.split must be 'test' or 'reserved', got 'valid'"),
    (["rl.negative_weight=-1"], "rl.negative_weight must be a finite number >= 0, got -1"),
    (["rl.negative_mask=prefix"], "rl.negative_mask must be 'full' or 'divergent', got 'prefix'"),
    (["rl.estimator=grpo", "rl.negative_mask=divergent"], "rl.estimator='grpo' has none"),
    (["rl.estimator=anchor_only", "rl.negative_weight=0.3"], "rl.estimator='anchor_only' has none"),
])
def test_bad_beyond_keys_are_named(over, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
                       .replace(".", r"\.")):
        load_config(None, over)


def test_beyond_preset_arms_and_evaluation():
    p = PRESETS["beyond"]
    assert "eval.split=reserved" in p["rl"] and "data.reserved_valid_rows=1000" in p["rl"]
    arms = [(e, b.get("tag", "")) for b in p["blocks"] for e in b["estimators"]]
    assert arms == [("grpo", ""), ("anchor_only", ""), ("recast", ""), ("recast", "nw0.1"), ("recast", "nw0.3"),
                    ("recast", "div"), ("grpo", "lr2e-4")]
    assert all(b["seeds"] == [0, 1, 2] and b["group_sizes"] == [16] for b in p["blocks"])
    conf = beyond_confirm_preset({"estimator": "recast", "rl": ["rl.negative_weight=0.1"], "tag": "nw0.1"})
    assert "eval.split=test" in conf["rl"] and "data.max_eval_prompts=2000" in conf["rl"]
    assert [b["seeds"] for b in conf["blocks"]] == [[0, 1, 2, 3, 4]] * 3
    assert conf["blocks"][2]["rl"] == ["rl.negative_weight=0.1"]


def test_second_stage_rule():
    res = {"grpo": [.10, .11, .12], "anchor_only": [.13, .13, .14], "recast": [.09, .10, .10],
           "recast+nw0.1": [.12, .12, .12], "recast+nw0.3": [.11, .12, .11], "recast+div": [.12, .13, .11],
           "grpo+lr2e-4": [.10, .10, .10]}
    assert better_weight(res) == "0.1"
    assert better_weight({**res, "recast+nw0.3": [.12, .12, .12]}) == "0.3"  # a tie goes to the larger weight
    assert best_arms(res) == ["anchor_only", "recast+div"]  # .1333 vs .12 ties recast+nw0.1: name order
    blocks = beyond_second_stage(res)
    assert blocks[0]["rl"] == ["rl.negative_weight=0.1", "rl.negative_mask=divergent"]
    assert blocks[1]["estimators"] == ["anchor_only"] and blocks[1]["rl"] == ["rl.rollout=beam"]
    assert blocks[2]["rl"] == ["rl.negative_mask=divergent", "rl.rollout=beam"] and blocks[2]["tag"] == "div_beam"
    # the beam arms it creates are named est+beam / est+<tag>_beam (plan_cells): never among the sampled arms
    assert [b["estimators"][0] + "+" + b["tag"] for b in blocks[1:]] == ["anchor_only+beam", "recast+div_beam"]
    assert best_arms({**res, "recast+div_beam": [.5] * 3, "grpo+beam": [.4] * 3, "recast+nw0.1_beam": [.3] * 3}) == \
        ["anchor_only", "recast+div"]


def test_paired_bootstrap_golden_and_coverage():
    # a constant paired difference: every resample's mean is that difference
    a = np.ones((3, 50))
    b = np.zeros((3, 50))
    b[:, :10] = 1  # a - b = 1 on 40 of 50 prompts, the same prompts in every seed
    lo, hi = paired_bootstrap(a, b, resamples=2000)
    assert lo < 0.8 < hi and 0.65 < lo and hi < 0.93
    same = np.random.default_rng(0).integers(0, 2, (3, 200)).astype(float)
    lo, hi = paired_bootstrap(same, same, resamples=500)
    assert lo == hi == 0.0  # identical arms: no difference in any resample
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(a, b[:2])


def _synthetic(effect, noise=0.0, seeds=5, prompts=400, rng=0):
    rng = np.random.default_rng(rng)
    final, hits = {}, {}
    for arm, shift in (("grpo", 0.0), ("anchor_only", effect / 2), ("sel", effect)):
        for m in ("pass@1", "pass@10", "ndcg@10"):
            per = {s: (rng.random(prompts) < 0.3 + shift + noise * rng.standard_normal()).astype(float)
                   for s in range(seeds)}
            hits[f"{arm}/{m}"] = per
            final[f"{arm}/{m}"] = {s: float(v.mean()) for s, v in per.items()}
    return final, hits


def test_verdict_helps_hurts_and_not_distinguishable(tmp_path):
    final, hits = _synthetic(0.2)
    d = paired_diff(final, hits, "sel", "grpo")
    assert d["pass@1"]["seeds"] == [0, 1, 2, 3, 4] and 0.15 < d["pass@1"]["mean"] < 0.25
    assert d["pass@1"]["ci95_seeds"][0] > 0 and d["pass@1"]["ci95_bootstrap"][0] > 0
    res = write_verdict(str(tmp_path / "verdict.json"), "sel", final, hits)
    assert res["verdict"].startswith("helps")
    assert json.loads((tmp_path / "verdict.json").read_text())["paired_diff_vs_anchor_only"]["ndcg@10"]["mean"] > 0
    final, hits = _synthetic(-0.2)
    assert write_verdict(str(tmp_path / "v2.json"), "sel", final, hits)["verdict"].startswith("hurts")
    final, hits = _synthetic(0.0)
    vs = paired_diff(final, hits, "sel", "grpo")
    assert verdict(vs, paired_diff(final, hits, "sel", "anchor_only")) == "not distinguishable from grpo at Pass@1"



# ----------------------------------------------------------------------------- selection, grpo lr, stage 2 records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 160


def _rows(p1, kl=0.01, steps=STEPS, kl_before=None, p10=None, ndcg=None):
    """metrics.jsonl rows shaped like the RL trainer's: evaluations at 0 and ``steps``, actor/kl every step
    (``kl_before`` on the steps before the last 10, default ``kl``)."""
    def ev(v):
        return {"eval/pass@1": v, "eval/pass@10": v + 0.05 if p10 is None else p10,
                "eval/ndcg@10": v + 0.02 if ndcg is None else ndcg, "eval/num_prompts": 1000.0}

    rows = [{"step": 0, **ev(0.05)}]
    for s in range(1, steps + 1):
        r = {"step": s, "reward/mean": 0.05, "actor/kl": kl if s > steps - 10 or kl_before is None else kl_before}
        if s == steps:
            r.update(ev(p1))
        rows.append(r)
    return rows


def _table(finals, kl=None, kl_bound=None):
    kl = kl or {}
    return by.arm_table({a: {s: _rows(v, kl.get(a, 0.01)) for s, v in enumerate(vals)}
                         for a, vals in finals.items()}, STEPS, kl_bound)


def test_arm_table_finals_and_kl_window():
    runs = {"recast+nw0.1": {0: _rows(0.12, kl=0.05, kl_before=5.0), 1: _rows(0.14, kl=0.25)},
            "grpo": {0: _rows(0.10, kl=0.2)}}
    t = by.arm_table(runs, STEPS, kl_bound=0.1)  # PLAN.md's fixed bound, as registered
    assert t["recast+nw0.1"]["final"]["pass@1"] == {0: 0.12, 1: 0.14}
    assert t["recast+nw0.1"]["mean"]["pass@1"] == 0.13 and t["recast+nw0.1"]["mean"]["pass@10"] == 0.18
    # only steps 151-160 count: 5.0 before them does not, so the seed mean is (0.05 + 0.25) / 2 = 0.15
    assert t["recast+nw0.1"]["kl"] == {0: pytest.approx(0.05), 1: pytest.approx(0.25)}
    assert t["recast+nw0.1"]["kl_mean"] == pytest.approx(0.15) and t["recast+nw0.1"]["excluded"]
    assert t["grpo"]["excluded"] and not _table({"a": [.1]}, {"a": 0.1})["a"]["excluded"]  # 0.1 is within the bound


def test_amended_kl_bound_is_grpos_own_kl_when_larger():
    """PLAN.md's amendment of 2026-12-07: the bound is max(0.1, grpo's seed-mean KL), so an arm is excluded only for
    drifting further than the baseline it must beat; with grpo inside 0.1 the registered rule is unchanged."""
    arms = {"grpo": [.05] * 3, "grpo+lr2e-4": [.05] * 3, "recast+nw0.1": [.06] * 3, "recast+div": [.07] * 3}
    t = _table(arms, {"grpo": 0.25, "grpo+lr2e-4": 0.7, "recast+nw0.1": 0.11, "recast+div": 0.26})
    assert {a: x["kl_bound"] for a, x in t.items()} == {a: pytest.approx(0.25) for a in arms}
    assert [a for a in arms if t[a]["excluded"]] == ["grpo+lr2e-4", "recast+div"]  # grpo itself: never
    s = by.select_arm(t, SPECS)
    assert s["selected"]["arm"] == "recast+nw0.1" and s["excluded"] == ["recast+div"]
    assert by.grpo_lr_rule(t, {"grpo": 1e-4, "grpo+lr2e-4": 2e-4})["why"] == "grpo+lr2e-4 is KL-excluded"
    t = _table(arms, {"grpo": 0.05, "recast+nw0.1": 0.11})  # grpo within 0.1: the fixed bound, as registered
    assert t["grpo"]["kl_bound"] == 0.1 and t["recast+nw0.1"]["excluded"] and not t["recast+div"]["excluded"]
    sel = by.selection(t, SPECS)
    assert sel["kl_bound"] == 0.1 and "amended on 2026-12-07" in sel["rule"] and sel["selected"]["arm"] == "recast+div"
    gap = [r for r in _rows(0.1) if r["step"] != 155]
    with pytest.raises(ValueError, match=r"actor/kl missing at steps \[155\]"):
        by.kl_tail(gap, STEPS)
    with pytest.raises(ValueError, match="no step-160 evaluation"):
        by.final_evals(_rows(0.1, steps=150), STEPS)


SPECS = by.arm_specs(PRESETS["beyond"]["blocks"] + [
    {"name": "d", "estimators": ["recast"], "rl": ["rl.negative_weight=0.3", "rl.negative_mask=divergent"],
     "tag": "div_nw0.3"},
    {"name": "b", "estimators": ["recast"], "rl": ["rl.negative_weight=0.3", "rl.rollout=beam"], "tag": "nw0.3_beam"},
    {"name": "b", "estimators": ["recast"], "rl": ["rl.rollout=beam"], "tag": "beam"}], PRESETS["beyond"]["rl"])


def test_arm_specs_name_arms_as_plan_cells():
    assert SPECS["grpo"] == {"estimator": "grpo", "rl": [], "tag": "", "lr": 1e-4}
    assert SPECS["grpo+lr2e-4"]["lr"] == 2e-4 and SPECS["recast+div"]["rl"] == ["rl.negative_mask=divergent"]
    cells = plan_cells(PRESETS["beyond"], {"tiny@industrial": "/sft"}, "/out")
    assert {c["arm"] for c in cells.values()} == set(SPECS) - {"recast+div_nw0.3", "recast+nw0.3_beam", "recast+beam"}
    assert [a for a in SPECS if by.is_variant(SPECS[a])] == ["recast+nw0.1", "recast+nw0.3", "recast+div",
                                                             "recast+div_nw0.3", "recast+nw0.3_beam"]


def test_selection_kl_exclusion_and_ties():
    base = {"grpo": [.10] * 3, "anchor_only": [.11] * 3, "recast": [.30] * 3, "recast+beam": [.30] * 3,
            "grpo+lr2e-4": [.10] * 3}
    # the best variant is KL-excluded; plain recast is no variant however good
    t = _table({**base, "recast+div_nw0.3": [.20] * 3, "recast+nw0.1": [.12, .13, .14], "recast+div": [.12] * 3},
               {"recast+div_nw0.3": 0.5})
    s = by.select_arm(t, SPECS)
    assert s["excluded"] == ["recast+div_nw0.3"] and s["selected"]["arm"] == "recast+nw0.1"
    assert s["selected"]["rl"] == ["rl.negative_weight=0.1"] and s["selected"]["tag"] == "nw0.1"
    assert s["beats_grpo_and_anchor_only"] is True
    # a tie (0.12 both, whatever the float sum order) goes to the larger weight: divergent at weight 1
    t = _table({**base, "recast+nw0.1": [.11, .12, .13], "recast+div": [.12] * 3, "recast+nw0.3": [.13, .12, .11]})
    assert by.select_arm(t, SPECS)["ranking"] == ["recast+div", "recast+nw0.3", "recast+nw0.1"]
    # ... and first to the sampled arm, even at a larger weight for the beam arm
    t = _table({**base, "recast+nw0.1": [.12] * 3, "recast+nw0.3_beam": [.12] * 3})
    s = by.select_arm(t, SPECS)
    assert s["selected"]["arm"] == "recast+nw0.1" and s["ranking"] == ["recast+nw0.1", "recast+nw0.3_beam"]
    # still selected when it beats neither baseline; nothing selected when every variant is excluded
    t = _table({**base, "recast+nw0.1": [.105] * 3})
    assert by.select_arm(t, SPECS)["selected"]["arm"] == "recast+nw0.1"
    assert by.select_arm(t, SPECS)["beats_grpo_and_anchor_only"] is False
    t = _table({**base, "recast+nw0.1": [.2] * 3}, {"recast+nw0.1": 0.11})
    assert by.select_arm(t, SPECS)["selected"] is None


@pytest.mark.parametrize("g,alt,kl,lr,why", [
    (.10, .11, {}, 2e-4, "grpo+lr2e-4 is higher"),
    (.11, .11, {}, 1e-4, "a tie"),
    (.12, .11, {}, 1e-4, "grpo is higher"),
    (.10, .11, {"grpo+lr2e-4": 0.2}, 1e-4, "grpo+lr2e-4 is KL-excluded"),
    (.12, .11, {"grpo": 0.2}, 2e-4, "grpo is KL-excluded"),
    (.10, .11, {"grpo": 0.2, "grpo+lr2e-4": 0.2}, 1e-4, "both KL-excluded"),
])
def test_grpo_lr_rule(g, alt, kl, lr, why):
    res = by.grpo_lr_rule(_table({"grpo": [g] * 3, "grpo+lr2e-4": [alt] * 3}, kl, kl_bound=0.1),
                          {"grpo": 1e-4, "grpo+lr2e-4": 2e-4})
    assert (res["lr"], res["why"]) == (lr, why)


def test_stage2_is_recorded_once_and_read_back(tmp_path):
    path = str(tmp_path / "stage2.json")
    assert by.stage2_record(path, None) is None and not os.path.exists(path)  # pending: nothing written
    stage1 = {"grpo": [.10, .11, .12], "anchor_only": [.13, .13, .14], "recast": [.09, .10, .10],
              "recast+nw0.1": [.12, .12, .12], "recast+nw0.3": [.11, .12, .11], "recast+div": [.12, .13, .11],
              "grpo+lr2e-4": [.10, .10, .10]}
    rec = by.stage2_record(path, _table(stage1))
    assert rec["weight"] == "0.1" and rec["beam_arms"] == ["anchor_only", "recast+div"]
    assert rec["blocks"] == json.loads(json.dumps(beyond_second_stage(stage1)))
    assert json.loads(open(path).read()) == rec
    # a rerun reads the decision back: other inputs (a cell rerun, a changed log) never change it
    again = by.stage2_record(path, _table({**stage1, "recast+nw0.3": [.5] * 3}))
    assert again == rec and by.stage2_record(path, None) == rec


def test_choose_checkpoint_and_scale_words():
    assert by.choose_checkpoint({200: .05, 400: .061, 600: .061, 800: .06}) == 400  # tie: the earlier step
    with pytest.raises(ValueError):
        by.choose_checkpoint({})
    d = {"ci95_seeds": [0.001, 0.009], "ci95_bootstrap": [0.002, 0.008]}
    assert by.scale_words(-0.003, d) == "grows"  # both 10M intervals above the tiny mean
    assert by.scale_words(0.012, d) == "shrinks"
    assert by.scale_words(0.0015, d) == "not distinguishable at this scale"  # inside the Student-t interval
    assert by.scale_words(0.0, {"ci95_seeds": [None, None], "ci95_bootstrap": [0.1, 0.2]}) == \
        "not distinguishable at this scale"
    final, hits = _synthetic(0.2, seeds=3, prompts=200)
    tiny = {"paired_diff_vs_grpo": {m: {"mean": 0.0} for m in by.METRICS},
            "paired_diff_vs_anchor_only": {m: {"mean": 0.5} for m in by.METRICS}}
    cmp = by.scale_comparison(tiny, paired_diff(final, hits, "sel", "grpo"),
                              paired_diff(final, hits, "sel", "anchor_only"))
    assert cmp["paired_diff_vs_grpo"]["pass@1"]["words"] == "grows"
    assert cmp["paired_diff_vs_anchor_only"]["pass@1"]["words"] == "shrinks"


def test_paired_inputs_pair_prompts_and_check_records():
    idx = np.arange(4)
    e = {"final": {"pass@1": 0.5, "pass@10": 0.75, "ndcg@10": 0.5},
         "values": {"pass@1": np.array([1, 0, 1, 0]), "pass@10": np.array([1, 1, 1, 0]), "ndcg@10": np.full(4, .5)}}
    final, hits = by.paired_inputs({"a": {0: {**e, "prompt_index": idx}}, "b": {0: {**e, "prompt_index": idx}}})
    assert final["b/pass@10"] == {0: 0.75} and hits["a/pass@1"][0].tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="other prompts"):
        by.paired_inputs({"a": {0: {**e, "prompt_index": idx}}, "b": {0: {**e, "prompt_index": idx[::-1]}}})
    with pytest.raises(ValueError, match="not that evaluation's"):
        by.paired_inputs({"a": {0: {**e, "prompt_index": idx, "final": {**e["final"], "pass@1": 0.25}}}})


def test_derived_presets_grpo_lr_and_10m_sft():
    sel = {"estimator": "recast", "rl": ["rl.negative_mask=divergent", "rl.rollout=beam"], "tag": "div_beam"}
    conf = beyond_confirm_preset(sel, grpo_lr=2e-4)
    cells = plan_cells(conf, {"tiny@industrial": "/nonexistent"}, "/out")
    assert len(cells) == 15 and {c["arm"] for c in cells.values()} == {"grpo", "anchor_only", "recast+div_beam"}
    lr = {c["arm"]: cell_config(conf, "tiny@industrial", "/nonexistent", c["overrides"]).rl.lr for c in cells.values()}
    assert lr == {"grpo": 2e-4, "anchor_only": 1e-4, "recast+div_beam": 1e-4}  # only grpo moves to its lr
    beam = cells["tiny-industrial_recast_G16_s4_div_beam"]["overrides"]
    cfg = cell_config(conf, "tiny@industrial", "/nonexistent", beam)
    assert cfg.rl.rollout == "beam" and cfg.data.eval_subset_seed == 2424 and cfg.data.max_eval_prompts == 2000
    ten = beyond_10m_preset(sel, grpo_lr=2e-4)
    cells = plan_cells(ten, {"10m@industrial": "/nonexistent"}, "/out")
    assert len(cells) == 9 and sorted({c["seed"] for c in cells.values()}) == [0, 1, 2]
    spec = ten["sft"]["10m@industrial"]
    scfg = load_config(os.path.join(ROOT, spec["config"]), spec["overrides"])
    assert scfg.model_config.endswith("qwen3_10m.yaml") and scfg.sft.steps == 1600 and scfg.sft.save_every == 200
    assert scfg.sft.keep_checkpoints == 0 and scfg.sft.dropout == 0.2 and scfg.sft.weight_decay == 0.2


def test_rl_init_resolves_a_run_or_one_of_its_checkpoints(tmp_path):
    from recast_ms.trainer.checkpoint import resolve_init

    for s in (200, 400):
        d = tmp_path / "sft" / "checkpoints" / f"step_{s}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": s, "phase": "sft"}))
    run = str(tmp_path / "sft")
    assert resolve_init(run) == (run, os.path.join(run, "checkpoints", "step_400"))  # the newest
    step_200 = os.path.join(run, "checkpoints", "step_200")
    assert resolve_init(step_200) == (run, step_200)  # a chosen checkpoint: its run's config and tokenizer
    assert resolve_init(os.path.join(run, "checkpoints", "step_600"))[1] is None


# ----------------------------------------------------------------------------- the runner, on synthetic finished cells


def _grid(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_grid.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def _write(cells, values, kl=None, skip=()):
    """Finished cells: ``values[arm]`` = final Pass@1 per seed; ``kl[arm]`` its actor/kl over every step."""
    kl = kl or {}
    for name, c in cells.items():
        if name in skip:
            continue
        os.makedirs(c["run_dir"], exist_ok=True)
        rows = _rows(values[c["arm"]][c["seed"]], kl.get(c["arm"], 0.01))
        with open(os.path.join(c["run_dir"], "metrics.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")


STAGE1 = {"grpo": [.10, .11, .12], "anchor_only": [.13, .13, .14], "recast": [.09, .10, .10],
          "recast+nw0.1": [.12, .12, .12], "recast+nw0.3": [.11, .11, .11], "recast+div": [.12, .13, .11],
          "grpo+lr2e-4": [.11, .11, .12]}
STAGE2 = {"recast+div_nw0.1": [.14, .14, .14], "anchor_only+beam": [.12, .12, .12], "recast+div_beam": [.12, .12, .12]}


def test_runner_beyond_report_only_decides_stage2_then_selection(tmp_path):
    out = tmp_path / "beyond"
    sft = str(tmp_path / "sft_K")
    (out).mkdir()
    (out / "preset.json").write_text(json.dumps({"preset": "beyond", "overrides": [],
                                                 "sft_dirs": {"tiny@industrial": sft}}))
    stage1 = plan_cells(PRESETS["beyond"], {"tiny@industrial": sft}, str(out))
    assert len(stage1) == 21
    last = list(stage1)[-1]
    _write(stage1, STAGE1, skip=(last,))
    r = _grid("--preset", "beyond", "--out", str(out), "--report-only")
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "**Stage 2: pending** (20 of 21 stage-1 cells finished" in md and "INTERIM" in md
    assert not (out / "stage2.json").exists() and not (out / "selection.json").exists()
    assert "| recast+nw0.1 | 0,1,2 | 0.1200 | 0.1200, 0.1200, 0.1200 |" in md

    _write({last: stage1[last]}, STAGE1)  # the last stage-1 cell finishes: stage 2 is decided, once
    r = _grid("--preset", "beyond", "--out", str(out), "--report-only")
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "stage2.json").read_text())
    assert rec["weight"] == "0.1" and rec["beam_arms"] == ["anchor_only", "recast+div"]  # .12 tie: name order
    assert [b["tag"] for b in rec["blocks"]] == ["div_nw0.1", "beam", "div_beam"]
    assert not (out / "selection.json").exists()  # the stage-2 cells have not run
    md = (out / "report.md").read_text()
    assert "**Stage 2** (decided" in md and "**Selection: pending**" in md
    assert r.stdout.count("not finished, left out of the report") == 9

    full = plan_cells({**PRESETS["beyond"], "blocks": PRESETS["beyond"]["blocks"] + rec["blocks"]},
                      {"tiny@industrial": sft}, str(out))
    assert len(full) == 30
    _write({n: c for n, c in full.items() if n not in stage1}, STAGE2, kl={"recast+div_nw0.1": 0.3})
    r = _grid("--preset", "beyond", "--out", str(out), "--report-only")
    assert r.returncode == 0, r.stderr
    sel = json.loads((out / "selection.json").read_text())
    # recast+div_nw0.1 (0.14) is KL-excluded; recast+div, recast+nw0.1 and recast+div_beam tie at 0.12:
    # the sampled arms first, then the larger weight (divergent, weight 1)
    assert sel["excluded"] == ["recast+div_nw0.1"]
    assert sel["selected"] == {"arm": "recast+div", "estimator": "recast", "rl": ["rl.negative_mask=divergent"],
                               "tag": "div", "seed_mean_pass@1": 0.12, "seeds": [0, 1, 2]}
    assert sel["ranking"][:3] == ["recast+div", "recast+nw0.1", "recast+div_beam"]
    assert sel["beats_grpo_and_anchor_only"] is False
    assert sel["grpo_lr"]["lr"] == 2e-4 and sel["grpo_lr"]["arm"] == "grpo+lr2e-4"  # .1133 > .11, both within KL
    assert sel["arms"]["recast+div_nw0.1"]["excluded"] is True
    md = (out / "report.md").read_text()
    assert "**Selected arm**" in md and "`recast+div`" in md and "INTERIM" not in md
    assert "| recast+div_nw0.1 | 0,1,2 | 0.1400 |" in md and "| 0.3 | 0.3, 0.3, 0.3 | yes |" in md
    assert (out / "stage2.json").read_text() == json.dumps(rec, indent=1) + "\n"  # never rewritten


def test_runner_beyond_confirm_writes_the_verdict_beside_the_selection(tmp_path):
    beyond_dir = tmp_path / "beyond"
    out = beyond_dir / "confirm"
    r = _grid("--preset", "beyond_confirm", "--out", str(out), "--report-only")
    assert r.returncode == 2 and "selection.json does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    selected = {"arm": "recast+nw0.1", "estimator": "recast", "rl": ["rl.negative_weight=0.1"], "tag": "nw0.1"}
    out.mkdir(parents=True)
    (beyond_dir / "selection.json").write_text(json.dumps({"selected": selected, "grpo_lr": {"lr": 2e-4}}))
    cells = plan_cells(beyond_confirm_preset(selected, 2e-4), {"tiny@industrial": str(tmp_path / "sft")}, str(out))
    _confirm_cells(cells, 0.3, np.random.default_rng(0))
    r = _grid("--preset", "beyond_confirm", "--out", str(out), "--report-only")
    assert r.returncode == 0, r.stderr
    v = json.loads((beyond_dir / "verdict.json").read_text())
    assert v["selected"] == "recast+nw0.1" and v["verdict"].startswith("helps")
    assert v["paired_diff_vs_grpo"]["pass@1"]["seeds"] == [0, 1, 2, 3, 4]
    assert v["paired_diff_vs_grpo"]["pass@1"]["ci95_bootstrap"][0] > 0
    md = (out / "report.md").read_text()
    assert "**Verdict**" in md and "| recast+nw0.1 - grpo | pass@1 |" in md
    # a selection that changed after the cells ran is refused (the recorded blocks are the cells' own)
    (out / "preset.json").write_text(json.dumps({"preset": "beyond_confirm", "blocks": []}))
    r = _grid("--preset", "beyond_confirm", "--out", str(out), "--report-only")
    assert r.returncode == 2 and "the selection changed after they ran" in r.stderr


# ----------------------------------------------------------------------------- per-prompt records of an RL evaluation


def test_rl_evaluation_writes_per_prompt_records(tmp_path):
    pytest.importorskip("mindspore")
    from recast_ms.evaluation import eval_subset_rows, per_prompt_path, read_per_prompt
    from recast_ms.trainer.rl import RLTrainer
    from recast_ms.utils.tracking import read_jsonl

    micro = os.path.join(ROOT, "model_configs", "qwen3_micro.yaml")
    over = {"model_config": micro, "seq_length": 32, "data.num_users": 60, "rl.prompts_per_step": 4,
            "rl.group_size": 4, "rl.kl_coef": 0.0, "rl.lr": 1e-3, "rl.save_every": 1, "rl.steps": 1,
            "rl.micro_batch_size": 8, "data.max_eval_prompts": 8, "data.eval_subset_seed": 3, "eval.beam_width": 4,
            "eval.ks": "[1,4]", "eval.batch_size": 8, "rl.estimator": "grpo"}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    run = str(tmp_path / "rl")
    tr = RLTrainer(cfg, run, None, str(tmp_path / "tok"), progress=False)
    tr.train(resume=False)
    logged = {r["step"]: r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "eval/pass@1" in r}
    assert sorted(logged) == [0, 1]
    for step in (0, 1):
        idx, split, values = read_per_prompt(per_prompt_path(run, step))
        assert split == "test" and idx.tolist() == eval_subset_rows(len(tr.splits.test), 8, 3).tolist()
        assert sorted(values) == ["ndcg@1", "ndcg@4", "pass@1", "pass@4"]
        assert all(v.shape == (8,) for v in values.values())
        assert set(np.unique(values["pass@1"])) <= {0.0, 1.0}
        for m, v in values.items():  # the logged means are these records' means
            assert v.mean() == pytest.approx(logged[step][f"eval/{m}"], abs=1e-12)


def _confirm_cells(cells, effect, rng, prompts=200):
    """Finished confirmatory cells with per-prompt records whose means are the logged finals."""
    from recast_ms.evaluation import per_prompt_path, write_per_prompt

    idx = np.arange(0, 3 * prompts, 3)  # the same rows for every cell
    for c in cells.values():
        p = {"grpo": 0.2, "anchor_only": 0.2 + effect / 2}.get(c["arm"], 0.2 + effect)
        values = {"pass@1": (rng.random(prompts) < p).astype(np.uint8),
                  "pass@10": (rng.random(prompts) < p + .2).astype(np.uint8), "ndcg@10": rng.random(prompts) * p}
        os.makedirs(c["run_dir"])
        rows = _rows(float(values["pass@1"].mean()), p10=float(values["pass@10"].mean()),
                     ndcg=float(values["ndcg@10"].mean()))
        with open(os.path.join(c["run_dir"], "metrics.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        write_per_prompt(per_prompt_path(c["run_dir"], STEPS), idx, values, "test")


def test_runner_10m_chooses_its_sft_start_and_compares_with_the_tiny_verdict(tmp_path):
    from recast_ms.commands.grid import _choose_sft
    from recast_ms.config import save_config

    selected = {"arm": "recast+nw0.1", "estimator": "recast", "rl": ["rl.negative_weight=0.1"], "tag": "nw0.1"}
    beyond_dir, out, sdir = tmp_path / "beyond", tmp_path / "beyond" / "10m", tmp_path / "sft_10m"
    preset = beyond_10m_preset(selected, 1e-4)
    spec = preset["sft"]["10m@industrial"]
    sdir.mkdir()
    save_config(load_config(os.path.join(ROOT, spec["config"]), spec["overrides"]), str(sdir / "config.yaml"))
    evdir = out / "sft_valid_eval" / "10m@industrial"
    evdir.mkdir(parents=True)
    valid = {200: .04, 400: .05, 600: .062, 800: .061, 1000: .062, 1200: .06, 1400: .059, 1600: .06}
    for s, v in valid.items():
        (sdir / "checkpoints" / f"step_{s}").mkdir(parents=True)
        (sdir / "checkpoints" / f"step_{s}" / "meta.json").write_text(json.dumps({"step": s, "phase": "sft"}))
        # evaluated before: the runner reads these instead of evaluating the checkpoint again
        (evdir / f"step_{s}.json").write_text(json.dumps({"model": {"model/pass@1": v}}))
    inits = _choose_sft(preset, {"10m@industrial": str(sdir)}, str(out), False, sys.executable)
    assert inits == {"10m@industrial": str(sdir / "checkpoints" / "step_600")}  # 0.062 at 600 and 1000: the earlier
    rec = json.loads((out / "sft_choice.json").read_text())
    assert rec["10m@industrial"]["step"] == 600 and rec["10m@industrial"]["valid"]["1000"] == .062
    (evdir / "step_1000.json").write_text(json.dumps({"model": {"model/pass@1": .09}}))
    assert _choose_sft(preset, {"10m@industrial": str(sdir)}, str(out), False, sys.executable) == inits  # recorded
    import shutil

    shutil.rmtree(sdir / "checkpoints" / "step_400")
    (out / "sft_choice.json").unlink()
    with pytest.raises(ConfigError, match=r"checkpoints at steps \[400\] are gone"):
        _choose_sft(preset, {"10m@industrial": str(sdir)}, str(out), False, sys.executable)

    # the 9 cells finished: scale.json beside the report, words against the tiny model's verdict
    (beyond_dir / "selection.json").write_text(json.dumps({"selected": selected, "grpo_lr": {"lr": 1e-4}}))
    tiny = {"paired_diff_vs_grpo": {m: {"mean": -0.5} for m in by.METRICS},
            "paired_diff_vs_anchor_only": {m: {"mean": 0.0} for m in by.METRICS}}
    (beyond_dir / "verdict.json").write_text(json.dumps(tiny))
    cells = plan_cells(preset, {"10m@industrial": str(sdir)}, str(out))
    assert len(cells) == 9
    _confirm_cells(cells, 0.4, np.random.default_rng(1))
    r = _grid("--preset", "beyond_10m", "--out", str(out), "--report-only")
    assert r.returncode == 0, r.stderr
    scale = json.loads((out / "scale.json").read_text())
    assert scale["selected"] == "recast+nw0.1" and scale["paired_diff_vs_grpo"]["pass@1"]["seeds"] == [0, 1, 2]
    assert scale["comparison"]["paired_diff_vs_grpo"]["pass@1"]["words"] == "grows"  # +0.4-ish vs the tiny -0.5
    md = (out / "report.md").read_text()
    assert "| vs_grpo | pass@1 | -0.5000 |" in md and "| grows |" in md
    assert not (out / "verdict.json").exists() and json.loads((beyond_dir / "verdict.json").read_text()) == tiny
