"""Grid report: aggregate the cells of ``scripts/run_grid.py`` over seeds, from each cell's metrics.jsonl.

Every number comes from a run's own log; nothing is recomputed or smoothed.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from recast_ms.report import summarize_run
from recast_ms.utils.tracking import read_jsonl

KEYS = ("pass@1", "pass@32", "recall@32", "ndcg@10", "all_zero_ratio", "repair_trigger_ratio",
        "naturally_trainable_ratio", "actor_tokens_per_step", "update_actor_s", "step_s")


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
    """Mean over seeds at the steps every seed logged ``key``."""
    per_seed = [{r["step"]: r[key] for r in rows if key in r} for rows in rows_by_seed]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    return steps, [float(np.mean([d[s] for d in per_seed])) for s in steps]


def grid_report(cells: Dict[str, dict], out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for c in cells.values():
        c["summary"] = summarize_run(c["run_dir"])
        c["rows"] = read_jsonl(os.path.join(c["run_dir"], "metrics.jsonl"))
    groups = defaultdict(list)  # (model, G, estimator) -> cells over seeds
    for c in cells.values():
        groups[(c["model"], c["group_size"], c["estimator"])].append(c)

    agg = {}
    for (model, G, est), cs in sorted(groups.items()):
        agg[f"{model}|G{G}|{est}"] = {
            k: {"mean": float(np.mean([c["summary"][k] for c in cs])), "std": float(np.std([c["summary"][k] for c in cs])),
                "n": len(cs)} for k in KEYS}
    budget = {}
    for (model, G, est), cs in groups.items():
        if est == "grpo":
            continue
        base = {c["seed"]: c for c in groups.get((model, G, "grpo"), [])}
        ratios = [matched_budget_ratio(c["rows"], base[c["seed"]]["rows"]) for c in cs if c["seed"] in base]
        budget[f"{model}|G{G}|{est}"] = ratios

    lines = ["| model | G | estimator | seeds | Pass@1 | Pass@32 | Recall@32 | NDCG@10 | all-zero | repair trigger | "
             "naturally trainable | actor tokens/step | update_actor s | matched-budget ratio per seed |",
             "|---" * 14 + "|"]
    for key, a in agg.items():
        model, G, est = key.split("|")
        ms = lambda k, f="{:.4f}": f"{f.format(a[k]['mean'])} ± {f.format(a[k]['std'])}"
        b = budget.get(key)
        btxt = "-" if b is None else ", ".join(
            "not reached" if x is None else ("baseline flat" if x != x else f"{x:.3f}") for x in b)
        lines.append(f"| {model} | {G[1:]} | {est} | {a['pass@1']['n']} | {ms('pass@1')} | {ms('pass@32')} | "
                     f"{ms('recall@32')} | {ms('ndcg@10')} | {ms('all_zero_ratio', '{:.3f}')} | "
                     f"{ms('repair_trigger_ratio', '{:.3f}')} | {ms('naturally_trainable_ratio', '{:.3f}')} | "
                     f"{a['actor_tokens_per_step']['mean']:.0f} | {ms('update_actor_s', '{:.3f}')} | {btxt} |")
    table = "\n".join(lines)

    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figs = []
    for model, G in sorted({(m, g) for m, g, _ in groups}):
        ests = sorted(e for m, g, e in groups if (m, g) == (model, G))
        panels = [("eval/pass@1", "Pass@1"), ("signals/all_zero_group_ratio", "all-zero group ratio"),
                  ("signals/repair_trigger_ratio", "repair trigger ratio"),
                  ("signals/naturally_trainable_ratio", "naturally trainable ratio")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3))
        for ax, (key, title) in zip(axes, panels):
            for e in ests:
                xs, ys = _curves([c["rows"] for c in groups[(model, G, e)]], key)
                if xs:
                    ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, ms=3, label=e)
            ax.set_title(f"{title} ({model}, G={G})", fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(fig_dir, f"curves_{model}_G{G}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        figs.append(path)
    results = {"cells": {n: {k: v for k, v in c.items() if k != "rows"} for n, c in cells.items()},
               "aggregate": agg, "matched_budget_ratio": budget, "figures": figs}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = "# Grid report\n\nMean ± std over seeds; every figure from the cell's own metrics.jsonl.\n\n" + table + \
        "\n\n" + "\n".join(f"![{os.path.basename(p)}](figures/{os.path.basename(p)})" for p in figs) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    return table
