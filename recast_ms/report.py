"""Run comparison tables and plots, read back from each run's ``metrics.jsonl`` (nothing recomputed)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from recast_ms.utils.tracking import read_jsonl


def _median_after_first(rows, key):
    vals = [r[key] for r in rows if key in r and r["step"] > 1]  # step 1 carries graph compilation
    if not vals:
        vals = [r[key] for r in rows if key in r]
    return float(np.median(vals)) if vals else float("nan")


def _mean(rows, key):
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else float("nan")


def summarize_run(run_dir: str) -> Dict[str, float]:
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = [r for r in rows if "eval/pass@1" in r]
    train = [r for r in rows if "reward/mean" in r]
    if not evals or not train:
        raise ValueError(f"{run_dir}: no evaluation or training rows in metrics.jsonl")
    first, last = evals[0], evals[-1]
    out = {
        "steps": float(train[-1]["step"]),
        "pass@1_start": first["eval/pass@1"],
        "pass@10_start": first.get("eval/pass@10", float("nan")),
        "pass@1": last["eval/pass@1"],
        "pass@10": last.get("eval/pass@10", float("nan")),
        "pass@32": last.get("eval/pass@32", float("nan")),
        "recall@32": last.get("eval/recall@32", float("nan")),
        "ndcg@10": last.get("eval/ndcg@10", float("nan")),
        "reward_mean": _mean(train, "reward/mean"),
        "all_zero_ratio": _mean(train, "signals/all_zero_group_ratio"),
        "single_hit_ratio": _mean(train, "signals/single_hit_group_ratio"),
        "zero_reward_sample_ratio": _mean(train, "signals/zero_reward_sample_ratio"),
        "repair_trigger_ratio": _mean(train, "signals/repair_trigger_ratio"),
        "naturally_trainable_ratio": _mean(train, "signals/naturally_trainable_ratio"),
        "actor_rows_per_step": _mean(train, "actor/rows"),
        "actor_tokens_per_step": _mean(train, "actor/tokens"),
        "step_s": _median_after_first(train, "timing_s/step"),
        "update_actor_s": _median_after_first(train, "timing_s/update_actor"),
        "rollout_s": _median_after_first(train, "timing_s/rollout"),
        "ref_s": _median_after_first(train, "timing_s/ref"),
        "old_log_prob_s": _median_after_first(train, "timing_s/old_log_prob"),
        "rss_step_mb": max(r.get("perf/rss_peak_step_mb", 0.0) for r in train),
        "peak_rss_mb": max(r.get("perf/peak_rss_mb", 0.0) for r in train),
    }
    return out


def comparison_rows(runs: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    return {name: summarize_run(d) for name, d in runs.items()}


COLUMNS = [
    ("pass@1_start", "Pass@1 (SFT)", "{:.4f}"),
    ("pass@1", "Pass@1", "{:.4f}"),
    ("pass@32", "Pass@32", "{:.4f}"),
    ("recall@32", "Recall@32", "{:.4f}"),
    ("all_zero_ratio", "all-zero", "{:.3f}"),
    ("single_hit_ratio", "single-hit", "{:.3f}"),
    ("repair_trigger_ratio", "repair trigger", "{:.3f}"),
    ("naturally_trainable_ratio", "naturally trainable", "{:.3f}"),
    ("actor_tokens_per_step", "actor tokens/step", "{:.0f}"),
    ("step_s", "step s (median)", "{:.2f}"),
    ("update_actor_s", "update_actor s", "{:.3f}"),
]


def format_comparison(rows: Dict[str, Dict[str, float]]) -> str:
    head = "| estimator | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [head, sep]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def write_comparison(out_dir: str, rows, table: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=1)


def plot_runs(runs: Dict[str, str], out_dir: str) -> List[str]:
    """Reward and Pass@1 curves, all-zero and repair-trigger ratios, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    data = {name: read_jsonl(os.path.join(d, "metrics.jsonl")) for name, d in runs.items()}
    panels = [
        ("reward/mean", "reward (hit rate of samples)", "reward.png"),
        ("eval/pass@1", "Pass@1 (test, beam search)", "pass_at_1.png"),
        ("signals/all_zero_group_ratio", "all-zero group ratio", "all_zero_ratio.png"),
        ("signals/repair_trigger_ratio", "repair trigger ratio", "repair_trigger_ratio.png"),
    ]
    paths = []
    for key, title, fname in panels:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, ms=3, label=name)
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
