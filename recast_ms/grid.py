"""Experiment grid: presets, the cell plan, and the report (aggregated over seeds from each cell's own
``metrics.jsonl``; nothing is recomputed or smoothed). The runner is ``scripts/run_grid.py``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from recast_ms.report import summarize_run
from recast_ms.signals import ESTIMATORS
from recast_ms.utils.tracking import read_jsonl

# the paper's estimators, in the registry's order (ablations such as anchor_only are named per block)
ALL_ESTIMATORS = [name for name, est in ESTIMATORS.items() if not est.ablation]
EST_ORDER = {name: i for i, name in enumerate(ESTIMATORS)}

# A preset: SFT runs keyed "model@dataset" (a run YAML + overrides), RL overrides shared by every cell,
# and blocks (one SFT key x estimators x seeds x group sizes). Cells shared by blocks run once.
PRESETS = {
    "quick": {
        "sft": {"micro@synthetic": {"config": None, "overrides": [
            "model_config=model_configs/qwen3_micro.yaml", "seq_length=32", "data.num_users=60", "sft.steps=10",
            "sft.batch_size=8", "sft.warmup_steps=2", "sft.save_every=10", "sft.eval_every=10", "sft.log_every=5"]}},
        "rl": ["rl.steps=3", "rl.prompts_per_step=4", "rl.eval_every=3", "rl.save_every=3", "rl.micro_batch_size=16",
               "data.max_eval_prompts=8", "eval.batch_size=8"],
        "blocks": [{"name": "main", "sft": "micro@synthetic", "estimators": ["grpo", "recast"], "seeds": [0, 1],
                    "group_sizes": [4]}],
    },
    "full": {
        "sft": {
            "tiny@industrial": {"config": "model_configs/runs/sft_industrial.yaml", "overrides": ["sft.steps=1000"]},
            "mini@industrial": {"config": "model_configs/runs/sft_industrial.yaml", "overrides": [
                "model_config=model_configs/qwen3_mini.yaml", "sft.steps=800", "sft.eval_every=800"]},
            "tiny@office": {"config": "model_configs/runs/sft_office.yaml", "overrides": ["sft.steps=600"]},
            # the same tiny model stopped early: a weak policy for the paper's regime-shift question
            # (the mini model's SFT turned out as strong as the tiny one's by Pass@1)
            "tiny_early@industrial": {"config": "model_configs/runs/sft_industrial.yaml", "overrides": [
                "sft.steps=150", "sft.warmup_steps=20", "sft.eval_every=150", "sft.save_every=150"]},
        },
        "rl": ["rl.steps=40", "rl.eval_every=10", "rl.save_every=10", "rl.prompts_per_step=8", "rl.lr=2e-4",
               "rl.micro_batch_size=128", "data.max_eval_prompts=500"],
        "blocks": [
            {"name": "main", "sft": "tiny@industrial", "estimators": ALL_ESTIMATORS, "seeds": [0, 1, 2],
             "group_sizes": [16]},
            # the headline pair gets two more seeds: its Pass@1 gap is smaller than one evaluation's error
            {"name": "main", "sft": "tiny@industrial", "estimators": ["grpo", "recast"], "seeds": [3, 4],
             "group_sizes": [16]},
            {"name": "group_size", "sft": "tiny@industrial", "estimators": ["grpo", "recast"], "seeds": [0],
             "group_sizes": [8, 16, 32, 64]},
            {"name": "weak_model", "sft": "mini@industrial", "estimators": ALL_ESTIMATORS, "seeds": [0, 1, 2],
             "group_sizes": [16]},
            {"name": "weak_policy", "sft": "tiny_early@industrial",
             "estimators": ["grpo", "repair_only", "boundary_only", "recast"], "seeds": [0], "group_sizes": [16]},
            {"name": "held_out", "sft": "tiny@office", "estimators": ["grpo", "recast"], "seeds": [0, 1, 2],
             "group_sizes": [16]},
        ],
    },
}


# The pre-registered decisive experiment (issue 14; docs/experiments/decisive/PLAN.md). Changing anything
# here after its first cell ran breaks the pre-registration: the design and verdict rules are fixed.
DECISIVE_EVAL_STEPS = (0, 10, 20, 40, 80, 160)
DECISIVE_EVAL_SEED = 14  # data.eval_subset_seed: the 2,000 test prompts every arm is evaluated on
PRESETS["decisive"] = {
    # PLAN.md amendment (2026-12-02): the policy is run B's step-800 checkpoint (this recipe, stopped at step 800),
    # committed in docs/experiments/decisive/sft_industrial and passed with --sft
    "sft": {"tiny@industrial": {"config": "model_configs/runs/sft_industrial.yaml",
                                "overrides": ["sft.weight_decay=0.1"]}},
    "rl": ["rl.steps=160", "rl.prompts_per_step=16", "rl.eval_steps=[" + ",".join(map(str, DECISIVE_EVAL_STEPS)) + "]",
           "rl.save_every=10", "rl.micro_batch_size=128", "rl.kl_coef=0.001", "rl.temperature=1.0",
           "data.max_eval_prompts=2000", f"data.eval_subset_seed={DECISIVE_EVAL_SEED}", "eval.beam_width=32",
           "eval.ks=[1,5,10,32]", "eval.constrained=true", "rl.constrained=true"],
    # keys the runner refuses to run without (given as key=value on its command line, or added to "rl"
    # above): the shared lr is tuned on the valid split only, by the rule in PLAN.md, before any cell runs
    "pending": {"rl.lr": "the lr tuned on the valid split by the rule in docs/experiments/decisive/PLAN.md"},
    "report": "decisive",
    "blocks": [
        {"name": "sampled", "sft": "tiny@industrial", "estimators": ["grpo", "recast"], "seeds": [0, 1, 2, 3, 4],
         "group_sizes": [16]},
        {"name": "beam", "sft": "tiny@industrial", "estimators": ["grpo", "recast"], "seeds": [0, 1, 2],
         "group_sizes": [16], "rl": ["rl.rollout=beam"], "tag": "beam"},
        {"name": "anchor_only", "sft": "tiny@industrial", "estimators": ["anchor_only"], "seeds": [0, 1, 2],
         "group_sizes": [16]},
    ],
}


# Issue 24, pre-registered in docs/experiments/beyond/PLAN.md: variants of the negative row, selected on a reserved
# valid slice the RL sampler never draws (eval.split=reserved), then confirmed on a fresh test subset.
BEYOND_RESERVED_SEED = 24  # data.reserved_valid_seed: the 1,000 reserved valid rows
BEYOND_CONFIRM_EVAL_SEED = 2424  # data.eval_subset_seed of the confirmatory 2,000 test prompts (decisive used 14)
# rl.lr: the decisive experiment's valid-tuned shared lr (its PLAN.md section 4), so stage 1 reproduces its arms
_BEYOND_COMMON = ["rl.lr=1e-4", "rl.steps=160", "rl.prompts_per_step=16", "rl.eval_steps=[0,40,80,160]", "rl.save_every=10",
                  "rl.micro_batch_size=128", "rl.kl_coef=0.001", "rl.temperature=1.0", "rl.constrained=true",
                  "data.reserved_valid_rows=1000", f"data.reserved_valid_seed={BEYOND_RESERVED_SEED}",
                  "eval.beam_width=32", "eval.ks=[1,5,10,32]", "eval.constrained=true"]
_BEYOND_SFT = {"tiny@industrial": {"config": "model_configs/runs/sft_industrial.yaml",
                                   "overrides": ["sft.dropout=0.2", "sft.weight_decay=0.2", "sft.steps=1600"]}}


def _arm(name: str, est: str, rl: List[str], tag: str, seeds=(0, 1, 2)) -> dict:
    return {"name": name, "sft": "tiny@industrial", "estimators": [est], "seeds": list(seeds), "group_sizes": [16],
            "rl": rl, "tag": tag}


PRESETS["beyond"] = {
    "sft": _BEYOND_SFT,
    "rl": _BEYOND_COMMON + ["eval.split=reserved", "data.max_eval_prompts=0"],
    # the runner adds stage 2 (stage2.json), then writes selection.json (recast_ms.beyond); see commands/grid.py
    "report": "beyond",
    "blocks": [
        {"name": "base", "sft": "tiny@industrial", "estimators": ["grpo", "anchor_only", "recast"],
         "seeds": [0, 1, 2], "group_sizes": [16]},
        _arm("weight", "recast", ["rl.negative_weight=0.1"], "nw0.1"),
        _arm("weight", "recast", ["rl.negative_weight=0.3"], "nw0.3"),
        _arm("divergent", "recast", ["rl.negative_mask=divergent"], "div"),
        # lr parity: at the shared lr ReCast's clipped step (norm 1.0) dwarfs GRPO's (~0.15); GRPO at the other
        # candidate lr of {1e-4, 2e-4} asks whether the gap is step size
        _arm("lr_parity", "grpo", ["rl.lr=2e-4"], "lr2e-4"),
    ],
}


def beyond_second_stage(reserved_pass1: Dict[str, List[float]]) -> List[dict]:
    """The stage-2 blocks PLAN.md adds once every stage-1 cell is done (``reserved_pass1``: arm -> final reserved
    Pass@1 per seed): divergent at the better of weights 0.1 / 0.3, and beam groups of the two best sampled arms."""
    from recast_ms.beyond import best_arms, better_weight

    w = better_weight(reserved_pass1)
    blocks = [_arm("divergent", "recast", [f"rl.negative_weight={w}", "rl.negative_mask=divergent"], f"div_nw{w}")]
    stage1 = {b.get("tag", ""): b for b in PRESETS["beyond"]["blocks"]}
    for arm in best_arms(reserved_pass1):
        est, _, tag = arm.partition("+")
        rl = list(stage1[tag]["rl"]) if tag else []
        blocks.append(_arm("beam", est, rl + ["rl.rollout=beam"], (tag + "_" if tag else "") + "beam"))
    return blocks


def beyond_confirm_preset(selected: dict, grpo_lr: float = 1e-4) -> dict:
    """``beyond_confirm``: the selected arm (``{"estimator", "rl", "tag"}``, from the grid by PLAN.md's rule) vs grpo
    (at ``grpo_lr``, PLAN.md section 3's rule; still arm ``grpo``) vs anchor_only, 5 paired seeds, on a fresh seeded
    2,000-prompt test subset (not the decisive experiment's)."""
    return {
        "sft": _BEYOND_SFT,
        "rl": _BEYOND_COMMON + ["eval.split=test", "data.max_eval_prompts=2000",
                                f"data.eval_subset_seed={BEYOND_CONFIRM_EVAL_SEED}"],
        "report": "beyond_confirm",
        "blocks": [
            {"name": "confirm", "sft": "tiny@industrial", "estimators": ["grpo"], "seeds": [0, 1, 2, 3, 4],
             "group_sizes": [16], "rl": [f"rl.lr={grpo_lr:g}"]},
            {"name": "confirm", "sft": "tiny@industrial", "estimators": ["anchor_only"], "seeds": [0, 1, 2, 3, 4],
             "group_sizes": [16]},
            _arm("confirm", selected["estimator"], list(selected.get("rl", [])), selected.get("tag", "selected"),
                 seeds=(0, 1, 2, 3, 4)),
        ],
    }


# PLAN.md section 7: recipe K's SFT on the 10M model, every save_every (200) checkpoint kept so that the runner can
# start from the one with the highest valid Pass@1 ("sft_choice"; ties: the earlier step)
_BEYOND_10M_SFT = {"10m@industrial": {"config": "model_configs/runs/sft_industrial.yaml", "overrides": list(
    _BEYOND_SFT["tiny@industrial"]["overrides"]) + ["model_config=model_configs/qwen3_10m.yaml", "sft.save_every=200",
                                                     "sft.keep_checkpoints=0"]}}


def beyond_10m_preset(selected: dict, grpo_lr: float = 1e-4) -> dict:
    """``beyond_10m`` (PLAN.md section 7): the confirmatory trio on the 10M model, 3 paired seeds, every other setting
    as ``beyond_confirm``'s; its SFT start is chosen by valid Pass@1 among the kept checkpoints."""
    conf = beyond_confirm_preset(selected, grpo_lr)
    blocks = [{**b, "sft": "10m@industrial", "seeds": [0, 1, 2]} for b in conf["blocks"]]
    return {**conf, "sft": _BEYOND_10M_SFT, "blocks": blocks, "report": "beyond_10m",
            "sft_choice": {"10m@industrial": "pass@1"}}


# presets built from a recorded decision (``--selection``: the beyond grid's selection.json), not fixed in PRESETS
DERIVED_PRESETS = {"beyond_confirm": beyond_confirm_preset, "beyond_10m": beyond_10m_preset}


def cell_name(sft_key: str, est: str, G: int, seed: int, tag: str = "") -> str:
    return f"{sft_key.replace('@', '-')}_{est}_G{G}_s{seed}" + (f"_{tag}" if tag else "")


def pending_keys(preset: dict, overrides: List[str]) -> Dict[str, str]:
    """The preset's ``pending`` keys that neither its RL overrides nor ``overrides`` set: key -> why it is needed."""
    given = {o.split("=", 1)[0] for o in list(preset.get("rl", [])) + list(overrides)}
    return {k: why for k, why in preset.get("pending", {}).items() if k not in given}


def cell_config(preset: dict, sft_key: str, sft_dir: str, overrides: List[str]):
    """The RL config a cell runs under, resolved as the RL command resolves it: the SFT run's stored
    ``config.yaml`` (else the preset's SFT YAML and overrides) plus the cell's ``overrides``."""
    from recast_ms.config import REPO_ROOT, load_config

    stored = os.path.join(sft_dir, "config.yaml")
    if os.path.exists(stored):
        return load_config(stored, list(overrides))
    spec = preset["sft"][sft_key]
    path = os.path.join(REPO_ROOT, spec["config"]) if spec.get("config") else None
    return load_config(path, list(spec.get("overrides", [])) + list(overrides))


def plan_cells(preset: dict, sft_dirs: Dict[str, str], out_dir: str, extra: List[str] = ()) -> Dict[str, dict]:
    """name -> cell (sft key, estimator, arm, G, seed, blocks, run dir, RL overrides), in block order.

    A block may add RL overrides of its own (``rl``) and a ``tag``: the tag suffixes its cell names and
    names its arm (``grpo+beam``), so cells that differ only in a block override never collide."""
    cells: Dict[str, dict] = {}
    for block in preset["blocks"]:
        tag = block.get("tag", "")
        for G in block["group_sizes"]:
            for seed in block["seeds"]:
                for est in block["estimators"]:
                    name = cell_name(block["sft"], est, G, seed, tag)
                    if name in cells:
                        cells[name]["blocks"].append(block["name"])
                        continue
                    model, dataset = block["sft"].split("@")
                    ov = list(preset["rl"]) + list(block.get("rl", [])) + [
                        f"rl.estimator={est}", f"rl.group_size={G}", f"seed={seed}"]
                    cells[name] = {"sft": block["sft"], "model": model, "dataset": dataset, "estimator": est,
                                   "arm": est + (f"+{tag}" if tag else ""),
                                   "group_size": G, "seed": seed, "blocks": [block["name"]],
                                   "sft_dir": sft_dirs[block["sft"]], "run_dir": os.path.join(out_dir, "cells", name),
                                   "overrides": ov,
                                   "steps": cell_config(preset, block["sft"], sft_dirs[block["sft"]], ov + list(extra)).rl.steps}
    return cells


def cell_done(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    return os.path.exists(path) and any(r.get("step") == steps and "eval/pass@1" in r for r in read_jsonl(path))


def matched_budget_ratio(recast_rows: List[dict], grpo_rows: List[dict]) -> Optional[float]:
    """Steps ReCast needs to reach the baseline's final Pass@1, over the baseline's steps (paper: 0.041
    at 1.7B). None when ReCast never reaches it within its run; NaN when the baseline ended no better
    than it started (the ratio would be a meaningless 0)."""
    g_evals = [r for r in grpo_rows if "eval/pass@1" in r]
    r_evals = [r for r in recast_rows if "eval/pass@1" in r]
    if not g_evals or not r_evals:
        return None
    target, g_steps = g_evals[-1]["eval/pass@1"], g_evals[-1]["step"]
    if target <= g_evals[0]["eval/pass@1"]:
        return float("nan")
    for r in r_evals:
        if r["eval/pass@1"] >= target:
            return r["step"] / max(g_steps, 1)
    return None


def _curves(rows_by_seed: List[List[dict]], key: str):
    """Mean and sample SD (``ddof=1``, as every verdict) over seeds at the steps every seed logged ``key``."""
    per_seed = [{r["step"]: r[key] for r in rows if key in r} for rows in rows_by_seed]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    vals = np.array([[d[s] for s in steps] for d in per_seed]).reshape(len(per_seed), len(steps))
    return steps, vals.mean(0), _sd(vals)


def _sd(vals, axis=0):
    """Sample SD over seeds (``ddof=1``, the verdicts' SD); 0 for a single seed."""
    vals = np.asarray(vals, dtype=float)
    return vals.std(axis, ddof=1) if vals.shape[axis] > 1 else np.zeros_like(vals.mean(axis))


def _ms(vals, fmt="{:.4f}") -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    mean = float(np.mean(vals))
    mean = 0.0 if abs(mean) < 1e-12 else mean  # a difference that is zero up to float error prints as +0.0000
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(float(_sd(vals)))}"


def _window(rows: List[dict], key: str, first: bool, n: int = 10) -> float:
    vals = [r[key] for r in rows if key in r and "reward/mean" in r]
    vals = vals[:n] if first else vals[-n:]
    return float(np.mean(vals)) if vals else float("nan")


def _table(header: List[str], rows: List[List[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def _fmt_ratio(x) -> str:
    return "not reached" if x is None else ("baseline flat" if x != x else f"{x:.3f}")


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_report(cells: Dict[str, dict], out_dir: str, preset: Optional[dict] = None,
                sft_dirs: Optional[Dict[str, str]] = None) -> str:
    """Writes ``report.md``, ``results.json`` and ``figures/*.png`` into ``out_dir``; returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for c in cells.values():
        c["summary"] = summarize_run(c["run_dir"])
        c["rows"] = read_jsonl(os.path.join(c["run_dir"], "metrics.jsonl"))
    groups = defaultdict(list)  # (sft key, G, estimator) -> cells over seeds
    for c in cells.values():
        groups[(c["sft"], c["group_size"], c["estimator"])].append(c)
    for cs in groups.values():
        cs.sort(key=lambda c: c["seed"])
    est_order = EST_ORDER
    sft_order = {s: i for i, s in enumerate(dict.fromkeys(c["sft"] for c in cells.values()))}  # the preset's order
    keys = sorted(groups, key=lambda k: (sft_order[k[0]], k[1], est_order.get(k[2], 99)))

    def col(k, key):
        return [c["summary"][key] for c in groups[k]]

    agg = {f"{s}|G{G}|{e}": {key: {"mean": float(np.mean(col((s, G, e), key))), "std": float(_sd(col((s, G, e), key))),
                                   "n": len(groups[(s, G, e)])} for key in groups[(s, G, e)][0]["summary"]}
           for s, G, e in keys}
    budget = {}
    for s, G, e in keys:
        base = {c["seed"]: c for c in groups.get((s, G, "grpo"), [])}
        if e != "grpo" and base:
            budget[f"{s}|G{G}|{e}"] = [matched_budget_ratio(c["rows"], base[c["seed"]]["rows"])
                                       for c in groups[(s, G, e)] if c["seed"] in base]

    blocks = (preset or {}).get("blocks") or [{"name": "main"}]
    md = ["# Experiment grid report", "",
          "Every number is read from a cell's own `metrics.jsonl` (config beside it in `cells/<name>/config.yaml`); "
          "mean ± sample SD (ddof=1, as in every verdict) over the seeds listed. Pass@K/Recall@K/NDCG@K: beam search (constrained to the "
          "catalogue) on the first `data.max_eval_prompts` test prompts; `SFT` is the step-0 evaluation of the "
          "same checkpoint on the same prompts. Timings are medians over steps after the first (graph compile).", ""]
    if sft_dirs:
        md += ["SFT checkpoints: " + "; ".join(f"`{k}` = `{v}`" for k, v in sft_dirs.items()), ""]

    # 1. quality table, one row per (SFT, G, estimator)
    rows = []
    for s, G, e in keys:
        k = (s, G, e)
        d = [c["summary"]["pass@1"] - c["summary"]["pass@1_start"] for c in groups[k]]
        rows.append([s, str(G), e, ",".join(str(c["seed"]) for c in groups[k]),
                     _ms(col(k, "pass@1_start")), _ms(col(k, "pass@1")), _ms(d, "{:+.4f}"), _ms(col(k, "pass@10")),
                     _ms(col(k, "ndcg@10")), _ms(col(k, "pass@32")), _ms(col(k, "recall@32")),
                     f"{np.mean(col(k, 'actor_tokens_per_step')):.0f}", _ms(col(k, "update_actor_s"), "{:.3f}"),
                     ", ".join(_fmt_ratio(x) for x in budget.get(f"{s}|G{G}|{e}", [])) or "-"])
    md += ["## Quality at equal rollout budget", "",
           _table(["SFT", "G", "estimator", "seeds", "Pass@1 (SFT)", "Pass@1", "ΔPass@1", "Pass@10", "NDCG@10",
                   "Pass@32", "Recall@32", "actor tokens/step", "update_actor s", "matched-budget ratio per seed"], rows),
           "", "Matched-budget ratio: steps the estimator needs to reach GRPO's final Pass@1 (same seed), over "
           "GRPO's steps (paper: 0.041 at 1.7B); `baseline flat` when GRPO ended no better than it started.", ""]
    noise = []
    for s in dict.fromkeys(k[0] for k in keys):
        c = next(c for k in keys if k[0] == s for c in groups[k])
        n = next((r["eval/num_prompts"] for r in c["rows"] if "eval/num_prompts" in r), 0)
        p = c["summary"]["pass@1_start"]
        if n:
            noise.append(f"`{s}`: ±{np.sqrt(p * (1 - p) / n):.4f} (Pass@1 {p:.4f} on {int(n)} prompts)")
    if noise:
        md += ["Sampling error of one Pass@1 measurement (binomial standard error over the evaluation prompts; "
               "differences well inside it are not evidence either way): " + "; ".join(noise) + ".", ""]

    # 2. signal degeneracy and repair receding: first vs last 10 training steps
    sig = [("signals/all_zero_group_ratio", "all-zero groups"), ("signals/single_hit_group_ratio", "single-hit groups"),
           ("signals/zero_reward_sample_ratio", "zero-reward samples"),
           ("signals/repair_trigger_ratio", "repair trigger"),
           ("signals/naturally_trainable_ratio", "naturally trainable")]
    rows = []
    for s, G, e in keys:
        rs = [c["rows"] for c in groups[(s, G, e)]]
        rows.append([s, str(G), e] + [f"{np.mean([_window(r, key, True) for r in rs]):.3f} → "
                                      f"{np.mean([_window(r, key, False) for r in rs]):.3f}" for key, _ in sig])
    md += ["## Signal degeneracy over training (mean of the first 10 → last 10 steps)", "",
           _table(["SFT", "G", "estimator"] + [t for _, t in sig], rows),
           "", "Paper: all-zero groups 88% → 85% over GRPO training.", ""]

    # 3. curves, one figure per (SFT, G)
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figs = []
    panels = [("eval/pass@1", "Pass@1 (test)"), ("signals/all_zero_group_ratio", "all-zero group ratio"),
              ("signals/repair_trigger_ratio", "repair trigger ratio"),
              ("signals/naturally_trainable_ratio", "naturally trainable ratio")]
    for s, G in dict.fromkeys((s, G) for s, G, _ in keys):
        ests = [e for s2, G2, e in keys if (s2, G2) == (s, G)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3))
        for ax, (key, title) in zip(axes, panels):
            for e in ests:
                xs, ys, sd = _curves([c["rows"] for c in groups[(s, G, e)]], key)
                if key.startswith("eval") and len(groups[(s, G, e)]) > 1:  # spread over seeds
                    ax.fill_between(xs, ys - sd, ys + sd, alpha=0.12)
                if xs and not key.startswith("eval"):  # per-step ratios are noisy at P prompts: 5-step mean
                    w = min(5, len(ys))
                    ys = np.convolve(ys, np.ones(w) / w, mode="valid")
                    xs = xs[w - 1:]
                if len(xs):
                    ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, ms=3, label=e)
            ax.set_title(f"{title}\n{s}, G={G}" + (" (mean ± sample SD over seeds)" if key.startswith("eval")
                                                   else " (5-step mean)"), fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        figs.append(_save(fig, os.path.join(fig_dir, f"curves_{s.replace('@', '-')}_G{G}.png")))

    # 4. ablation across SFT policies (model sizes): ΔPass@1 per estimator at each SFT's main G
    by_sft = defaultdict(dict)
    for s, G, e in keys:
        if len(groups[(s, G, e)]) > 1 or len({g for s2, g, _ in keys if s2 == s}) == 1:
            by_sft[s].setdefault(G, []).append(e)
    ests_all = [e for e in ALL_ESTIMATORS if any(k[2] == e for k in keys)]
    if len(by_sft) > 1:
        rows = []
        for s, gs in by_sft.items():
            G = max(gs, key=lambda g: len(gs[g]))
            ref = groups[(s, G, gs[G][0])]
            all_zero = np.mean([_window(c["rows"], "signals/all_zero_group_ratio", True)
                                for e in gs[G] for c in groups[(s, G, e)]])
            rows.append([s, str(G), _ms([c["summary"]["pass@1_start"] for c in ref]),
                         _ms([c["summary"]["pass@10_start"] for c in ref]), f"{all_zero:.3f}"] + [
                "{} / {}".format(*(_ms([c["summary"][m] - c["summary"][m + "_start"] for c in groups[(s, G, e)]],
                                       "{:+.4f}") for m in ("pass@1", "pass@10")))
                if (s, G, e) in groups else "-" for e in ests_all])
        md += ["## Ablation: ΔPass@1 / ΔPass@10 over the SFT start, per SFT policy", "",
               _table(["SFT", "G", "Pass@1 (SFT)", "Pass@10 (SFT)", "all-zero groups (first 10 steps)"] + ests_all,
                      rows),
               "", "Paper's regime shift: repair helps weak policies, the boundary contrast helps strong ones. "
               "Policy strength shows in the SFT metrics and in how many groups start without a hit.", ""]

    # 5. search width: estimators x G for SFTs with more than one G
    for s in dict.fromkeys(s for s, _, _ in keys):
        gs = sorted({G for s2, G, _ in keys if s2 == s})
        if len(gs) < 2:
            continue
        ests = [e for e in ALL_ESTIMATORS if all((s, G, e) in groups for G in gs)]
        rows = [[str(G), e, _ms(col((s, G, e), "pass@1")), _ms(col((s, G, e), "update_actor_s"), "{:.3f}"),
                 f"{np.mean(col((s, G, e), 'actor_tokens_per_step')):.0f}", _ms(col((s, G, e), "step_s"), "{:.2f}")]
                for G in gs for e in ests]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
        for e in ests:
            axes[0].plot(gs, [np.mean(col((s, G, e), "pass@1")) for G in gs], marker="o", label=e)
            axes[1].plot(gs, [np.mean(col((s, G, e), "update_actor_s")) for G in gs], marker="o", label=e)
        for ax, t in zip(axes, ["final Pass@1", "update_actor s / step"]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(gs, [str(g) for g in gs])
            ax.set_xlabel("group size G")
            ax.set_title(f"{t} ({s})", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        figs.append(_save(fig, os.path.join(fig_dir, f"group_size_{s.replace('@', '-')}.png")))
        md += [f"## Search width ({s})", "",
               _table(["G", "estimator", "final Pass@1", "update_actor s", "actor tokens/step", "step s"], rows), ""]
        # 6. system table at the G nearest 32 (paper Table 4)
        G = min(gs, key=lambda g: abs(g - 32))
        if (s, G, "grpo") in groups and (s, G, "recast") in groups:
            cols = [("step_s", "step s", "{:.3f}"), ("update_actor_s", "update_actor s", "{:.3f}"),
                    ("old_log_prob_s", "old_log_prob s", "{:.4f}"), ("ref_s", "ref s", "{:.3f}"),
                    ("rollout_s", "rollout s", "{:.3f}"), ("actor_tokens_per_step", "actor tokens", "{:.0f}"),
                    ("rss_step_mb", "peak RSS MB", "{:.0f}")]
            vals = {e: {k: float(np.mean(col((s, G, e), k))) for k, _, _ in cols} for e in ("grpo", "recast")}
            for e in vals:
                vals[e]["per_ktok"] = 1000 * vals[e]["update_actor_s"] / max(vals[e]["actor_tokens_per_step"], 1)
            cols.append(("per_ktok", "update s per 1k actor tokens", "{:.4f}"))
            rows = [[e] + [f.format(vals[e][k]) for k, _, f in cols] for e in ("grpo", "recast")]
            rows.append(["GRPO / ReCast"] + [f"{vals['grpo'][k] / vals['recast'][k]:.2f}x"
                                             if vals["recast"][k] > 0 else "-" for k, _, _ in cols])
            md += [f"## System cost at G={G} ({s}; paper Table 4)", "",
                   _table(["estimator"] + [t for _, t, _ in cols], rows), "",
                   "old_log_prob is skipped (≈0 s) with `rl.ppo_epochs=1`: the sampling policy is the one being "
                   "updated, so its log-probs come from the update's own forward. Peak RSS: the largest resident set "
                   "sampled during a step, in the cell's own process.", ""]

    md += [f"![{os.path.basename(p)}](figures/{os.path.basename(p)})" for p in figs]
    report = "\n".join(md) + "\n"
    results = {"cells": {n: {k: v for k, v in c.items() if k != "rows"} for n, c in cells.items()},
               "aggregate": agg, "matched_budget_ratio": budget, "figures": figs, "blocks": blocks}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    return report
