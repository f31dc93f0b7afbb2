"""Analysis of the pre-registered decisive experiment (issue 14; ``docs/experiments/decisive/PLAN.md``).

Everything is read from the cells' own ``metrics.jsonl``; the rules below are PLAN.md's, verbatim in
code, and must not change once a cell has run:

- **Primary pair**: the sampled ``grpo`` and ``recast`` arms, paired by seed (identical prompts and RNG
  streams), final (last-step) Pass@1 on the same seeded 2,000 test prompts.
- **Valid** only if GRPO's seed-mean final Pass@1 exceeds SFT's (the step-0 evaluation) by more than
  2 binomial standard errors, ``SE = sqrt(p_SFT (1 - p_SFT) / n_eval)``.
- **Quality**, on the paired differences ``d_s = recast_s - grpo_s`` (Student t, ``n - 1`` d.o.f.):
  ``reproduced`` if ``mean(d) >= 0.091 * mean(grpo final)`` and the one-sided 95% lower bound
  ``mean - t_0.95 * SE_d > 0``; ``refuted`` if the two-sided 95% upper bound ``mean + t_0.975 * SE_d`` is
  below ``0.091 * mean(grpo final)``; otherwise ``inconclusive``.
- **Convergence**: the first evaluation step at which ReCast's seed-mean Pass@1 reaches GRPO's
  seed-mean final Pass@1: ``reproduced`` if <= 40, ``refuted`` if not reached by step 80, otherwise
  (first reached after 40, by 80) ``inconclusive``.
- An invalid experiment decides nothing: both verdicts are ``inconclusive`` and the rule outcomes are
  kept beside them (``verdicts_if_valid``).

Secondary comparisons (beam pair, anchor-only) get the same paired statistics but no verdict.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recast_ms.utils.tracking import read_jsonl

REL_EFFECT = 0.091  # the paper's smallest relative Pass@1 gain (+9.1%)
CONVERGED_BY = 40  # "ReCast's curve reaches GRPO's final Pass@1 by step 40"
REFUTED_AFTER = 80  # ... "refuted if not by step 80"
SE_MARGIN = 2.0  # validity: GRPO beats SFT by more than 2 binomial SEs
METRICS = ("pass@1", "pass@10", "pass@32", "ndcg@10")
PRIMARY = ("recast", "grpo")
SECONDARY = (("recast+beam", "grpo+beam"), ("anchor_only", "grpo"), ("recast", "anchor_only"))
ARM_ORDER = ("grpo", "recast", "grpo+beam", "recast+beam", "anchor_only")
TRAIN_KEYS = (("reward/mean", "training hit rate"), ("signals/repair_trigger_ratio", "repair trigger"),
              ("actor/grad_norm", "grad norm"), ("actor/kl", "KL (k3)"))


def _t(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def binomial_se(p: float, n: int) -> float:
    """Standard error of one Pass@1 measurement: ``sqrt(p (1 - p) / n)``."""
    return math.sqrt(p * (1 - p) / n)


def paired_stats(diffs: Sequence[float]) -> dict:
    """Mean, sample SD (``ddof=1``), Student-t two-sided 95% CI and one-sided 95% lower bound of paired
    differences; the bounds are None with fewer than 2 pairs."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else None, "sd": None, "ci95": [None, None], "lower95_one_sided": None}
    if n >= 2:
        sd = float(d.std(ddof=1))
        se = sd / math.sqrt(n)
        out.update(sd=sd, ci95=[out["mean"] - _t(0.975, n - 1) * se, out["mean"] + _t(0.975, n - 1) * se],
                   lower95_one_sided=out["mean"] - _t(0.95, n - 1) * se)
    return out


def quality_verdict(diffs: Sequence[float], grpo_final_mean: float) -> Tuple[str, dict]:
    """``reproduced`` / ``refuted`` / ``inconclusive`` by the pre-registered rule (module docstring)."""
    st = paired_stats(diffs)
    thr = REL_EFFECT * grpo_final_mean
    st["threshold"] = thr
    if st["sd"] is None:
        return "inconclusive", st
    if st["mean"] >= thr and st["lower95_one_sided"] > 0:
        return "reproduced", st
    if st["ci95"][1] < thr:
        return "refuted", st
    return "inconclusive", st


def convergence_verdict(recast_curve: Dict[int, float], target: float) -> Tuple[str, Optional[int]]:
    """First step at which the (seed-mean) curve reaches ``target``, and the verdict it gives."""
    first = next((s for s in sorted(recast_curve) if recast_curve[s] >= target), None)
    if first is not None and first <= CONVERGED_BY:
        return "reproduced", first
    if first is None or first > REFUTED_AFTER:
        return "refuted", first
    return "inconclusive", first


def is_valid(grpo_final_mean: float, sft_pass1: float, n_eval: int) -> Tuple[bool, float]:
    se = binomial_se(sft_pass1, n_eval)
    return bool(grpo_final_mean - sft_pass1 > SE_MARGIN * se), se


def matched_budget(recast_rows: List[dict], grpo_rows: List[dict]) -> Optional[float]:
    """Steps ReCast needs to reach the same seed's GRPO final Pass@1, over GRPO's steps (grid.py's rule)."""
    from recast_ms.grid import matched_budget_ratio

    return matched_budget_ratio(recast_rows, grpo_rows)


# ----------------------------------------------------------------------------- from the logs


def _evals(rows: List[dict], metric: str) -> Dict[int, float]:
    return {int(r["step"]): float(r[f"eval/{metric}"]) for r in rows if f"eval/{metric}" in r}


def _curve(by_seed: Dict[int, List[dict]], metric: str) -> Dict[int, Tuple[float, float, List[float]]]:
    """step -> (seed mean, sample SD over seeds (ddof=1, as the verdict's paired SD), values) at the steps every
    seed evaluated; one seed gives SD 0."""
    per = [_evals(rows, metric) for rows in by_seed.values()]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return {s: (float(np.mean([p[s] for p in per])), float(np.std([p[s] for p in per], ddof=1)) if len(per) > 1 else 0.0, [p[s] for p in per])
            for s in steps}


def _train_window(rows: List[dict], key: str, first: bool, n: int = 20) -> float:
    vals = [r[key] for r in rows if key in r and "reward/mean" in r]
    vals = vals[:n] if first else vals[-n:]
    return float(np.mean(vals)) if vals else float("nan")


def _clean(x):
    """JSON without NaN: NaN -> None, recursively."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def analyse(arms: Dict[str, Dict[int, List[dict]]], sft_pass_at_10_full: Optional[float] = None) -> dict:
    """The verdict and every number the report shows, from ``arm -> seed -> metrics rows``."""
    grpo, recast = arms.get("grpo", {}), arms.get("recast", {})
    if not grpo or not recast:
        raise ValueError(f"the decisive analysis needs finished grpo and recast cells; have arms {sorted(arms)}")
    final = {a: {seed: _evals(rows, "pass@1") for seed, rows in by.items()} for a, by in arms.items()}
    steps = min(max(e) for by in final.values() for e in by.values())  # the last step every cell evaluated
    last = {a: {seed: e[max(e)] for seed, e in by.items()} for a, by in final.items()}
    n_eval = int(next(r["eval/num_prompts"] for rows in grpo.values() for r in rows if "eval/num_prompts" in r))
    sft_p1 = float(np.mean([e[0] for e in final["grpo"].values() if 0 in e]))
    sft_p10 = float(np.mean([_evals(rows, "pass@10")[0] for rows in grpo.values()]))
    grpo_mean = float(np.mean(list(last["grpo"].values())))
    valid, se = is_valid(grpo_mean, sft_p1, n_eval)

    def pair(a: str, b: str, metric: str = "pass@1") -> Tuple[List[int], List[float]]:
        seeds = sorted(set(arms.get(a, {})) & set(arms.get(b, {})))
        va = {s: _evals(arms[a][s], metric) for s in seeds}
        vb = {s: _evals(arms[b][s], metric) for s in seeds}
        return seeds, [va[s][max(va[s])] - vb[s][max(vb[s])] for s in seeds]

    seeds, diffs = pair(*PRIMARY)
    q, qstats = quality_verdict(diffs, grpo_mean)
    rc = _curve(recast, "pass@1")
    c, first = convergence_verdict({s: v[0] for s, v in rc.items()}, grpo_mean)
    out = {
        "valid": valid,
        "quality_verdict": q if valid else "inconclusive",
        "convergence_verdict": c if valid else "inconclusive",
        "verdicts_if_valid": {"quality": q, "convergence": c},
        "paired_diff_mean": qstats["mean"],
        "paired_diff_ci95": qstats["ci95"],
        "paired_diff_sd": qstats["sd"],
        "paired_diff_lower95_one_sided": qstats["lower95_one_sided"],
        "paired_diffs": dict(zip(map(str, seeds), diffs)),
        "relative_threshold": REL_EFFECT,
        "absolute_threshold": qstats["threshold"],
        "seeds": seeds,
        "steps": int(steps),
        "eval_prompts": n_eval,
        "sft_pass_at_1": sft_p1,
        "sft_pass_at_10": sft_p10,
        "sft_binomial_se": se,
        "grpo_final_pass_at_1": grpo_mean,
        "recast_final_pass_at_1": float(np.mean(list(last["recast"].values()))),
        "grpo_minus_sft": grpo_mean - sft_p1,
        "convergence_first_step": first,
        "matched_budget_ratio": {str(s): matched_budget(recast[s], grpo[s]) for s in seeds},
        "sft_industrial_pass_at_10": sft_pass_at_10_full,
        "secondary_metrics": {m: paired_stats(pair(*PRIMARY, m)[1]) for m in METRICS[1:]},
        "secondary": {},
        "curves": {},
        "training": {},
    }
    for a, b in SECONDARY:
        if a in arms and b in arms:
            s2, d2 = pair(a, b)
            # pass@1 at the top level (as pre-registered); the other metrics are descriptive
            out["secondary"][f"{a} - {b}"] = {"seeds": s2, "diffs": d2, **paired_stats(d2),
                                              "metrics": {m: paired_stats(pair(a, b, m)[1]) for m in METRICS[1:]}}
    for a in [a for a in ARM_ORDER if a in arms] + sorted(set(arms) - set(ARM_ORDER)):
        out["curves"][a] = {m: {str(s): {"mean": v[0], "sd": v[1], "values": v[2]}
                                for s, v in _curve(arms[a], m).items()} for m in METRICS}
        tr = {}
        for key, _ in TRAIN_KEYS:
            firsts = [_train_window(rows, key, True) for rows in arms[a].values()]
            lasts = [_train_window(rows, key, False) for rows in arms[a].values()]
            tr[key] = {"first20_mean": float(np.mean(firsts)), "last20_mean": float(np.mean(lasts)),
                       "last20_sd": float(np.std(lasts, ddof=1)) if len(lasts) > 1 else 0.0}
        out["training"][a] = tr
    return _clean(out)


def _shown_path(path: str) -> str:
    """A path as the committed report shows it: relative to the working directory when inside it (the runner
    makes every path absolute; a machine-specific prefix means nothing to a reader of the repository)."""
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return path if rel.startswith("..") else rel


def _fmt(x, f="{:+.4f}") -> str:
    return "-" if x is None else f.format(x)


def _table(header: List[str], rows: List[List[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def _figures(arms: Dict[str, Dict[int, List[dict]]], res: dict, fig_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, m in zip(axes, METRICS):
        for a, cur in res["curves"].items():
            st = sorted(int(s) for s in cur[m])
            mean = np.array([cur[m][str(s)]["mean"] for s in st])
            sd = np.array([cur[m][str(s)]["sd"] for s in st])
            line, = ax.plot(st, mean, marker="o", ms=3, label=f"{a} (n={len(arms[a])})")
            ax.fill_between(st, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
        if m == "pass@1":
            ax.axhline(res["grpo_final_pass_at_1"], color="k", ls="--", lw=0.8, label="GRPO final")
            ax.axhline(res["grpo_final_pass_at_1"] * (1 + REL_EFFECT), color="k", ls=":", lw=0.8,
                       label="GRPO final +9.1%")
        ax.set_title(m)
        ax.set_xlabel("RL step")
    axes[0].legend(fontsize=7)
    fig.suptitle("decisive: seed mean ± sample SD (ddof=1, band) on the 2,000-prompt test subset")
    fig.tight_layout()
    paths.append(os.path.join(fig_dir, "decisive_eval_curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(TRAIN_KEYS), figsize=(4.2 * len(TRAIN_KEYS), 3.6))
    for ax, (key, title) in zip(axes, TRAIN_KEYS):
        for a in res["curves"]:
            per = [{r["step"]: r[key] for r in rows if key in r and "reward/mean" in r} for rows in arms[a].values()]
            st = sorted(set.intersection(*(set(p) for p in per)))
            if not st:
                continue
            vals = np.array([[p[s] for s in st] for p in per])  # [seeds, steps]
            # per-step values are one rollout's worth (16 prompts): a trailing 10-step mean shows the trend
            w = min(10, len(st))
            kernel = np.ones(w) / w
            smooth = np.array([np.convolve(v, kernel, mode="valid") for v in vals])
            xs = st[w - 1:]
            lo, mid, hi = smooth.min(0), smooth.mean(0), smooth.max(0)
            line, = ax.plot(xs, mid, lw=1.2, label=f"{a} (n={len(per)})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        if key == "actor/kl":  # one seed's spike would flatten every other curve on a linear axis
            ax.set_yscale("log")
        ax.set_title(f"{title} ({w}-step mean; band = seed range)" if st else title, fontsize=9)
        ax.set_xlabel("RL step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(fig_dir, "decisive_training.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def report_markdown(res: dict, fig_names: Sequence[str] = (), sft_dirs: Optional[Dict[str, str]] = None) -> str:
    v = res
    md = ["## Decisive experiment (pre-registered, issue 14)", "",
          "Design and verdict rules: [PLAN.md](PLAN.md), fixed before any cell ran. Tiny Qwen3 on "
          f"Industrial_and_Scientific, {v['steps']} RL steps x 16 prompts x G = 16, evaluation = constrained beam 32 on "
          f"the same seeded random {v['eval_prompts']} test prompts for every arm. Every number below is read from "
          "the cells' own `metrics.jsonl`.", ""]
    if sft_dirs:
        md += ["SFT checkpoint: " + "; ".join(f"`{k}` = `{_shown_path(d)}`" for k, d in sft_dirs.items()), ""]
    md += [f"**Valid: {'yes' if v['valid'] else 'NO'}** - GRPO's final Pass@1 {v['grpo_final_pass_at_1']:.4f} vs "
           f"SFT's {v['sft_pass_at_1']:.4f}: {v['grpo_minus_sft']:+.4f}, needed > 2 x SE = "
           f"{2 * v['sft_binomial_se']:.4f} (SE = sqrt(p(1-p)/n) at SFT's Pass@1, n = {v['eval_prompts']}).", "",
           f"**Quality verdict: {v['quality_verdict']}.** Paired final Pass@1 difference ReCast - GRPO over seeds "
           f"{', '.join(map(str, v['seeds']))}: mean {_fmt(v['paired_diff_mean'])} (SD {_fmt(v['paired_diff_sd'], '{:.4f}')}), "
           f"two-sided 95% CI [{_fmt(v['paired_diff_ci95'][0])}, {_fmt(v['paired_diff_ci95'][1])}], one-sided 95% "
           f"lower bound {_fmt(v['paired_diff_lower95_one_sided'])}; the +9.1% threshold is "
           f"{v['absolute_threshold']:.4f}.", "",
           f"**Convergence verdict: {v['convergence_verdict']}.** ReCast's seed-mean Pass@1 first reaches GRPO's "
           f"final {v['grpo_final_pass_at_1']:.4f} at step "
           f"{v['convergence_first_step'] if v['convergence_first_step'] is not None else '- (never)'} "
           f"(reproduced if <= {CONVERGED_BY}, refuted if not by {REFUTED_AFTER}).", ""]
    if not v["valid"]:
        md += [f"(The experiment is invalid, so it decides nothing; the rules would have said quality "
               f"{v['verdicts_if_valid']['quality']}, convergence {v['verdicts_if_valid']['convergence']}.)", ""]
    md += ["Matched-budget ratio per seed (steps ReCast needs to reach the same seed's GRPO final Pass@1, over "
           f"{v['steps']}; paper 0.041): " + ", ".join(
               f"seed {s}: " + ("not reached" if r is None else f"{r:.3f}")
               for s, r in v["matched_budget_ratio"].items()), ""]
    if v.get("sft_industrial_pass_at_10") is not None:
        md += [f"SFT Pass@10 on the full Industrial test split: {v['sft_industrial_pass_at_10']:.4f}.", ""]
    def diff_row(name: str, metric: str, seeds: Sequence[int], mean: float, ci) -> List[str]:
        return [name, metric, ",".join(map(str, seeds)), _fmt(mean), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"]

    rows = [diff_row("recast - grpo (primary)", "pass@1", v["seeds"], v["paired_diff_mean"], v["paired_diff_ci95"])]
    rows += [diff_row("recast - grpo", m, v["seeds"], st["mean"], st["ci95"]) for m, st in v["secondary_metrics"].items()]
    for name, st in v["secondary"].items():
        rows += [diff_row(name, m, st["seeds"], ms["mean"], ms["ci95"])
                 for m, ms in [("pass@1", st)] + list(st["metrics"].items())]
    md += ["Paired differences at the last step (Student t, 95%; secondary rows decide nothing):", "",
           _table(["comparison", "metric", "seeds", "mean", "95% CI"], rows), ""]
    cur_rows = []
    for a, cur in v["curves"].items():
        for m in ("pass@1", "pass@10", "pass@32", "ndcg@10"):
            cur_rows.append([a, m] + [f"{cur[m][s]['mean']:.4f} ± {cur[m][s]['sd']:.4f}"
                                      for s in sorted(cur[m], key=int)])
    steps = sorted(next(iter(v["curves"].values()))["pass@1"], key=int)
    md += ["Learning curves (seed mean ± sample SD over seeds, ddof=1 as in the verdict, at each evaluation step):", "",
           _table(["arm", "metric"] + [f"step {s}" for s in steps], cur_rows), ""]
    tr_rows = [[a] + [f"{t[k]['first20_mean']:.4f} → {t[k]['last20_mean']:.4f}" for k, _ in TRAIN_KEYS]
               for a, t in v["training"].items()]
    md += ["Training diagnostics per arm (mean over seeds of the first 20 → last 20 steps):", "",
           _table(["arm"] + [t for _, t in TRAIN_KEYS], tr_rows), ""]
    md += [f"![{n}](figures/{n})" for n in fig_names]
    return "\n".join(md) + "\n"


def decisive_report(cells: Dict[str, dict], out_dir: str, preset: Optional[dict] = None,
                    sft_dirs: Optional[Dict[str, str]] = None, sft_full_eval: Optional[str] = None,
                    planned: Optional[int] = None) -> str:
    """Writes ``verdict.json``, ``results.json``, ``report.md`` (the report section) and
    ``figures/decisive_*.png`` into ``out_dir``; returns the markdown.

    ``sft_full_eval``: the JSON ``scripts/evaluate.py --out`` wrote for the SFT checkpoint on the full test
    split (default ``<out_dir>/sft_full_test_eval.json``); its ``model/pass@10`` becomes
    ``sft_industrial_pass_at_10`` (None when the file is absent).

    ``planned``: how many cells the preset has. With fewer finished, the grid is not complete and nothing
    it writes may read as a verdict (PLAN.md: verdicts once all cells have finished): the figures and an
    ``INTERIM`` ``report.md`` / ``interim.json`` are written, and a stale ``verdict.json`` is removed."""
    complete = planned is None or len(cells) >= planned
    arms: Dict[str, Dict[int, List[dict]]] = defaultdict(dict)
    for c in cells.values():
        arms[c.get("arm", c["estimator"])][c["seed"]] = read_jsonl(os.path.join(c["run_dir"], "metrics.jsonl"))
    path = sft_full_eval or os.path.join(out_dir, "sft_full_test_eval.json")
    p10, n_full = None, None
    if os.path.exists(path):
        with open(path) as f:
            full = json.load(f)
        if full.get("split") != "test":
            raise ValueError(f"{path}: an evaluation of the {full.get('split')!r} split, not the test split")
        p10, n_full = float(full["model"]["model/pass@10"]), int(full["num_prompts"])
    res = analyse(dict(arms), p10)
    res["sft_full_eval_prompts"] = n_full
    figs = _figures(dict(arms), res, os.path.join(out_dir, "figures"))
    md = report_markdown(res, [os.path.basename(p) for p in figs], sft_dirs)
    verdict_keys = ["valid", "quality_verdict", "convergence_verdict", "paired_diff_mean", "paired_diff_ci95",
                    "seeds", "steps", "eval_prompts", "sft_industrial_pass_at_10", "verdicts_if_valid",
                    "paired_diff_sd", "paired_diff_lower95_one_sided", "paired_diffs", "relative_threshold",
                    "absolute_threshold", "sft_pass_at_1", "sft_binomial_se", "grpo_final_pass_at_1",
                    "recast_final_pass_at_1", "convergence_first_step", "matched_budget_ratio", "sft_full_eval_prompts"]
    os.makedirs(out_dir, exist_ok=True)
    if not complete:
        md = (f"> **INTERIM: {len(cells)} of {planned} cells finished. Not a verdict**: the verdict lines below are "
              "what the rules say of the cells finished so far; the pre-registered verdicts are read only once "
              "every cell has finished (`verdict.json` is written then).\n\n") + md
    res["complete"], res["cells_finished"], res["cells_planned"] = complete, len(cells), planned
    verdict_keys += ["complete", "cells_finished", "cells_planned"]
    name, other = ("verdict.json", "interim.json") if complete else ("interim.json", "verdict.json")
    if os.path.exists(os.path.join(out_dir, other)):  # never leave a verdict beside an interim, or the reverse
        os.remove(os.path.join(out_dir, other))
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump({k: res[k] for k in verdict_keys}, f, indent=1)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"analysis": res, "cells": {n: {k: v for k, v in c.items() if k != "rows"} for n, c in cells.items()},
                   "figures": figs}, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    return md
