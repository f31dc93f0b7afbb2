"""Issue 24, "beyond the paper": the exploratory grid's second-stage rule and the confirmatory verdict.

Pre-registered in ``docs/experiments/beyond/PLAN.md``; the presets are ``beyond`` and ``beyond_confirm`` in
``recast_ms/grid.py``. The statistics are pure functions of per-seed metrics and per-prompt hits (tested on
synthetic inputs in ``tests/test_beyond.py``); SDs are sample SDs (``ddof=1``) throughout, as the decisive
verdict's (``recast_ms.decisive.paired_stats``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recast_ms.decisive import paired_stats

METRICS = ("pass@1", "pass@10", "ndcg@10")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 24


def seed_mean(values: Sequence[float]) -> float:
    """Seed mean, rounded to 12 decimals: Pass@1 over 1,000 prompts is k / 1000, so two arms whose per-seed values
    sum alike tie exactly as PLAN.md's tie rules mean, whatever the summation order's float error."""
    return round(float(np.mean(values)), 12)


def is_beam_arm(arm: str) -> bool:
    """Beam-group arms as ``recast_ms.grid`` names them: ``est+beam`` or ``est+<tag>_beam``."""
    tag = arm.partition("+")[2]
    return tag == "beam" or tag.endswith("_beam")


def better_weight(reserved_pass1: Dict[str, Sequence[float]]) -> str:
    """The stage-1 rule for the divergent arm's weight: of ``recast+nw0.1`` and ``recast+nw0.3``, the one with the
    higher seed-mean final Pass@1 on the reserved slice; a tie goes to the larger weight (nearer ReCast)."""
    a, b = (seed_mean(reserved_pass1[k]) for k in ("recast+nw0.1", "recast+nw0.3"))
    return "0.1" if a > b else "0.3"


def best_arms(reserved_pass1: Dict[str, Sequence[float]], n: int = 2) -> List[str]:
    """The ``n`` sampled arms with the highest seed-mean final reserved Pass@1 (ties: arm name order)."""
    sampled = {k: seed_mean(v) for k, v in reserved_pass1.items() if not is_beam_arm(k)}
    return sorted(sampled, key=lambda k: (-sampled[k], k))[:n]


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> List[float]:
    """95% percentile CI of ``mean(a) - mean(b)`` for per-prompt hits ``[seeds, prompts]`` of two arms run on the
    same seeds and prompts: seeds and prompts are resampled jointly (the same draw for both arms), so both the
    seed-to-seed and the prompt-to-prompt variance enter the interval."""
    a, b = np.asarray(hits_a, np.float64), np.asarray(hits_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"per-prompt hits must be two [seeds, prompts] arrays of one shape, got {a.shape} / {b.shape}")
    d = a - b  # [S, N] paired by seed and prompt
    rng = np.random.default_rng(seed)
    S, N = d.shape
    means = np.empty(resamples)
    for i in range(resamples):
        s = rng.integers(0, S, S)
        p = rng.integers(0, N, N)
        means[i] = d[np.ix_(s, p)].mean()
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def paired_diff(final: Dict[str, Dict[int, float]], hits: Dict[str, Dict[int, np.ndarray]], arm: str,
                base: str) -> dict:
    """Per metric: the seed-paired difference ``arm - base`` (mean, Student-t CI over seeds) and the paired
    bootstrap CI over prompts x seeds. ``final[f"{arm}/{metric}"][seed]`` are final metrics; ``hits[...]`` the
    per-prompt values of the same metric (1/0 for Pass@K, the NDCG for NDCG@K), prompts in one order."""
    out = {}
    for m in METRICS:
        seeds = sorted(set(final[f"{arm}/{m}"]) & set(final[f"{base}/{m}"]))
        st = paired_stats([final[f"{arm}/{m}"][s] - final[f"{base}/{m}"][s] for s in seeds])
        boot = paired_bootstrap(np.stack([hits[f"{arm}/{m}"][s] for s in seeds]),
                                np.stack([hits[f"{base}/{m}"][s] for s in seeds]))
        out[m] = {"seeds": seeds, "mean": st["mean"], "ci95_seeds": st["ci95"], "ci95_bootstrap": boot}
    return out


def verdict(vs_grpo: dict, vs_anchor: dict) -> str:
    """PLAN.md's confirmatory rule on Pass@1 (primary): "helps" when BOTH intervals of BOTH comparisons lie above
    0; "hurts" when both intervals against grpo lie below 0; otherwise "not distinguishable"."""
    def above(d):
        return d["ci95_seeds"][0] > 0 and d["ci95_bootstrap"][0] > 0

    def below(d):
        return d["ci95_seeds"][1] < 0 and d["ci95_bootstrap"][1] < 0

    g, a = vs_grpo["pass@1"], vs_anchor["pass@1"]
    if above(g) and above(a):
        return "helps: beats grpo and anchor_only at Pass@1"
    if above(g):
        return "beats grpo at Pass@1, not distinguishable from anchor_only: the contrast adds nothing shown"
    if below(g):
        return "hurts: below grpo at Pass@1"
    return "not distinguishable from grpo at Pass@1"


def write_verdict(path: str, selected: str, final: Dict[str, Dict[int, float]],
                  hits: Dict[str, Dict[int, np.ndarray]]) -> dict:
    """``docs/experiments/beyond/verdict.json``: selected, paired_diff_vs_grpo, paired_diff_vs_anchor_only, verdict."""
    vs_g = paired_diff(final, hits, selected, "grpo")
    vs_a = paired_diff(final, hits, selected, "anchor_only")
    res = {"selected": selected, "paired_diff_vs_grpo": vs_g, "paired_diff_vs_anchor_only": vs_a,
           "verdict": verdict(vs_g, vs_a), "sd": "sample SD, ddof=1",
           "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "over": "prompts x seeds"}}
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    return res


# ----------------------------------------------------------------------------- from the cells' logs (PLAN.md 3 / 5)

KL_BOUND = 0.1  # PLAN.md section 3: an arm whose mean actor/kl over steps 151-160 exceeds this is excluded ...
KL_REFERENCE_ARM = "grpo"  # ... or, since PLAN.md's amendment of 2026-12-07, exceeds this arm's own KL if larger
KL_WINDOW = 10  # the last 10 training steps of 160
GRPO_ARMS = ("grpo", "grpo+lr2e-4")  # section 3: the confirmatory grpo's lr is decided between these two arms


def final_evals(rows: List[dict], steps: int) -> Dict[str, float]:
    """metric -> value of a cell's final evaluation: the row at ``steps`` carrying ``eval/pass@1`` (the last one
    when a resumed cell logged the step twice: the resumed run's)."""
    found = [r for r in rows if r.get("step") == steps and "eval/pass@1" in r]
    if not found:
        raise ValueError(f"no step-{steps} evaluation in the rows: the cell has not finished")
    return {m: float(found[-1][f"eval/{m}"]) for m in METRICS}


def kl_tail(rows: List[dict], steps: int, window: int = KL_WINDOW) -> float:
    """Mean ``actor/kl`` over training steps ``steps - window + 1 .. steps`` (PLAN.md: 151-160), one value per step
    (the last logged). Every step of the window must be there: the exclusion rule is about all of them."""
    per = {int(r["step"]): float(r["actor/kl"]) for r in rows
           if "actor/kl" in r and steps - window < int(r["step"]) <= steps}
    if len(per) != window:
        missing = sorted(set(range(steps - window + 1, steps + 1)) - set(per))
        raise ValueError(f"actor/kl missing at steps {missing}: the KL exclusion needs steps "
                         f"{steps - window + 1}-{steps}")
    return float(np.mean(list(per.values())))


def kl_bound_of(kl_means: Dict[str, float]) -> float:
    """The KL bound of PLAN.md section 3 as amended on 2026-12-07: the larger of 0.1 and the ``grpo`` arm's seed-mean
    KL over the same window. The bound keeps selection from picking an arm that gains by drifting further from the
    reference policy than the baseline it has to beat; the fixed 0.1 (set on another starting policy) excluded
    ``grpo`` itself, and with it every variant, so it could not do that here. Without a ``grpo`` arm: 0.1."""
    ref = kl_means.get(KL_REFERENCE_ARM)
    return KL_BOUND if ref is None else max(KL_BOUND, float(ref))


def arm_table(runs: Dict[str, Dict[int, List[dict]]], steps: int, kl_bound: Optional[float] = None
              ) -> Dict[str, dict]:
    """From ``arm -> seed -> metrics rows`` of finished cells: ``arm -> {seeds, final: metric -> seed -> value,
    kl: seed -> mean actor/kl over the last KL_WINDOW steps, mean: metric -> seed mean, kl_mean: seed mean of kl,
    kl_bound, excluded: kl_mean > kl_bound}``. The arm's KL is the mean over its seeds of each seed's window mean
    (equal windows: the mean over all its steps 151-160). ``kl_bound`` None: ``kl_bound_of`` these arms."""
    table = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        finals = {s: final_evals(by_seed[s], steps) for s in seeds}
        kl = {s: kl_tail(by_seed[s], steps, min(KL_WINDOW, steps)) for s in seeds}  # a short test grid: all steps
        kl_mean = float(np.mean([kl[s] for s in seeds]))
        table[arm] = {"seeds": seeds, "final": {m: {s: finals[s][m] for s in seeds} for m in METRICS},
                      "kl": kl, "mean": {m: seed_mean([finals[s][m] for s in seeds]) for m in METRICS},
                      "kl_mean": kl_mean}
    bound = kl_bound_of({a: t["kl_mean"] for a, t in table.items()}) if kl_bound is None else float(kl_bound)
    for t in table.values():
        t["kl_bound"], t["excluded"] = bound, bool(t["kl_mean"] > bound)
    return table


def reserved_pass1(table: Dict[str, dict]) -> Dict[str, List[float]]:
    """``arm -> final Pass@1 per seed`` (seed order): the input of ``recast_ms.grid.beyond_second_stage``."""
    return {arm: [t["final"]["pass@1"][s] for s in t["seeds"]] for arm, t in table.items()}


def _last(rl: Sequence[str], key: str) -> Optional[str]:
    vals = [o.split("=", 1)[1] for o in rl if o.split("=", 1)[0] == key]
    return vals[-1] if vals else None  # later overrides win, as load_config applies them


def arm_specs(blocks: Sequence[dict], common_rl: Sequence[str] = ()) -> Dict[str, dict]:
    """``arm -> {estimator, rl, tag, lr}`` of a preset's blocks, arms named as ``recast_ms.grid.plan_cells`` names
    them (``estimator`` or ``estimator+tag``); ``rl`` is the block's own overrides (what makes the arm), ``lr`` the
    one its cells run at (the block's ``rl.lr`` over ``common_rl``'s)."""
    out = {}
    for b in blocks:
        tag = b.get("tag", "")
        for est in b["estimators"]:
            rl = list(b.get("rl", []))
            lr = _last(list(common_rl) + rl, "rl.lr")
            out[est + (f"+{tag}" if tag else "")] = {"estimator": est, "rl": rl, "tag": tag,
                                                     "lr": float(lr) if lr is not None else None}
    return out


def arm_weight(rl: Sequence[str]) -> float:
    """The negative row's weight an arm runs at (``rl.negative_weight``; 1.0, ReCast's, when the arm leaves it)."""
    w = _last(rl, "rl.negative_weight")
    return float(w) if w is not None else 1.0


def is_variant(spec: dict) -> bool:
    """PLAN.md section 5's variant arms: ReCast with its negative row changed (a weight or the divergent mask), sampled
    or beam; plain ``recast`` (and its beam version) is the paper's method, not a variant."""
    return spec["estimator"] == "recast" and any(
        o.split("=", 1)[0] in ("rl.negative_weight", "rl.negative_mask") for o in spec["rl"])


def select_arm(table: Dict[str, dict], specs: Dict[str, dict]) -> dict:
    """PLAN.md section 5: among the variant arms that are not KL-excluded, the highest seed-mean final reserved
    Pass@1; ties go to the sampled arm, then to the larger weight (then, for determinism only, arm name order:
    PLAN.md names no further tie-break). Also whether the selected arm beats both grpo and anchor_only (it is
    selected either way). ``selected`` is None when every variant arm is excluded."""
    variants = [a for a in table if a in specs and is_variant(specs[a])]
    excluded = [a for a in variants if table[a]["excluded"]]

    def key(a):
        return (-table[a]["mean"]["pass@1"], "rl.rollout=beam" in specs[a]["rl"], -arm_weight(specs[a]["rl"]), a)

    ranking = sorted((a for a in variants if a not in excluded), key=key)
    res = {"variants": sorted(variants, key=key), "excluded": excluded, "ranking": ranking, "selected": None,
           "beats_grpo_and_anchor_only": None}
    if ranking:
        best = ranking[0]
        spec = specs[best]
        res["selected"] = {"arm": best, "estimator": spec["estimator"], "rl": list(spec["rl"]),
                           "tag": spec["tag"], "seed_mean_pass@1": table[best]["mean"]["pass@1"],
                           "seeds": table[best]["seeds"]}
        res["beats_grpo_and_anchor_only"] = all(
            b in table and table[best]["mean"]["pass@1"] > table[b]["mean"]["pass@1"] for b in ("grpo", "anchor_only"))
    return res


def grpo_lr_rule(table: Dict[str, dict], lrs: Dict[str, float]) -> dict:
    """PLAN.md section 3: of ``grpo`` (the shared lr) and ``grpo+lr2e-4``, the lr with the higher seed-mean final
    reserved Pass@1 among the arms within the KL bound; a tie, or both excluded, goes to ``grpo``'s (1e-4)."""
    base, alt = GRPO_ARMS
    ok = [a for a in GRPO_ARMS if a in table and not table[a]["excluded"]]
    if alt in ok and (base not in ok or table[alt]["mean"]["pass@1"] > table[base]["mean"]["pass@1"]):
        arm, why = alt, (f"{alt} is higher" if base in ok else f"{base} is KL-excluded")
    else:
        arm = base
        why = ("both KL-excluded" if not ok else f"{alt} is KL-excluded" if alt not in ok
               else "a tie" if table[alt]["mean"]["pass@1"] == table[base]["mean"]["pass@1"] else f"{base} is higher")
    return {"lr": lrs[arm], "arm": arm, "why": why,
            "seed_mean_pass@1": {a: table[a]["mean"]["pass@1"] for a in GRPO_ARMS if a in table},
            "excluded": [a for a in GRPO_ARMS if a in table and table[a]["excluded"]]}


def _jsonable(table: Dict[str, dict]) -> Dict[str, dict]:
    return {a: {**t, "final": {m: {str(s): v for s, v in d.items()} for m, d in t["final"].items()},
                "kl": {str(s): v for s, v in t["kl"].items()}} for a, t in table.items()}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a kill mid-write leaves no half record


def record_once(path: str, make) -> Tuple[dict, bool]:
    """``(record, written)``: the JSON at ``path`` when it exists (read back, never recomputed, so a decision made by
    the rule cannot drift on a rerun), else ``make()``'s, written there."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), False
    rec = make()
    _write_json(path, rec)
    return rec, True


def stage2_record(path: str, table: Optional[Dict[str, dict]]) -> Optional[dict]:
    """PLAN.md section 3's stage 2, decided once: the record at ``path`` (``stage2.json``) when it exists; else, with
    ``table`` (every stage-1 arm, all seeds finished), ``recast_ms.grid.beyond_second_stage`` of its final reserved
    Pass@1, written there with its inputs and date; else None (stage 2 pending)."""
    from recast_ms.grid import beyond_second_stage

    if table is None and not os.path.exists(path):
        return None

    def make():
        p1 = reserved_pass1(table)
        return {"decided": time.strftime("%Y-%m-%d"), "rule": "docs/experiments/beyond/PLAN.md section 3, "
                "recast_ms.grid.beyond_second_stage", "reserved_pass1": p1,
                "seed_mean_pass@1": {a: seed_mean(v) for a, v in p1.items()},
                "weight": better_weight(p1), "beam_arms": best_arms(p1), "blocks": beyond_second_stage(p1)}

    return record_once(path, make)[0]


def selection(table: Dict[str, dict], specs: Dict[str, dict]) -> dict:
    """``selection.json``'s content: PLAN.md section 5's selected arm and section 3's grpo lr, with every input."""
    lrs = {a: specs[a]["lr"] for a in GRPO_ARMS if a in specs}
    bounds = {t["kl_bound"] for t in table.values()}
    return {"decided": time.strftime("%Y-%m-%d"),
            "rule": "docs/experiments/beyond/PLAN.md sections 3 and 5, KL bound as amended on 2026-12-07",
            "kl_bound": bounds.pop() if len(bounds) == 1 else sorted(bounds),
            "kl_bound_rule": f"max({KL_BOUND}, seed-mean KL of {KL_REFERENCE_ARM})", "kl_window": KL_WINDOW,
            **select_arm(table, specs),
            "grpo_lr": grpo_lr_rule(table, lrs), "arms": _jsonable(table)}


# ----------------------------------------------------------------------------- confirmatory inputs (PLAN.md 6 / 7)


def paired_inputs(evals: Dict[str, Dict[int, dict]]
                  ) -> Tuple[Dict[str, Dict[int, float]], Dict[str, Dict[int, np.ndarray]]]:
    """``(final, hits)`` in ``paired_diff`` / ``write_verdict``'s form from ``arm -> seed -> {final: metric -> value,
    prompt_index: [N], values: metric -> [N]}`` (a cell's final evaluation and its per-prompt record). Every cell
    must have scored the same prompts in the same order, else the pairing over prompts means nothing."""
    final: Dict[str, Dict[int, float]] = {}
    hits: Dict[str, Dict[int, np.ndarray]] = {}
    ref = None
    for arm, by_seed in evals.items():
        for seed, e in by_seed.items():
            idx = np.asarray(e["prompt_index"])
            if ref is None:
                ref = idx
            elif not np.array_equal(idx, ref):
                raise ValueError(f"{arm} seed {seed} scored other prompts than the first cell: the per-prompt records "
                                 "cannot be paired (the same data.eval_subset_seed and max_eval_prompts are needed)")
            for m in METRICS:
                v = np.asarray(e["values"][m], np.float64)  # [N]
                if abs(float(v.mean()) - float(e["final"][m])) > 1e-9:  # a record of another run or step
                    raise ValueError(f"{arm} seed {seed}: the per-prompt {m} averages {v.mean():.6f}, the logged final "
                                     f"evaluation says {float(e['final'][m]):.6f}: the record is not that evaluation's")
                final.setdefault(f"{arm}/{m}", {})[seed] = float(e["final"][m])
                hits.setdefault(f"{arm}/{m}", {})[seed] = v
    return final, hits


def choose_checkpoint(valid: Dict[int, float]) -> int:
    """PLAN.md section 7's SFT start (the rule that chose recipe K's length): the step whose checkpoint has the highest
    valid Pass@1 (``valid``: step -> value); ties go to the earlier step."""
    if not valid:
        raise ValueError("no evaluated checkpoint to choose from")
    return min(valid, key=lambda s: (-round(valid[s], 12), s))


def scale_words(tiny_mean: float, d10m: dict) -> str:
    """PLAN.md section 7, per comparison and metric: the 10M paired difference "grows" / "shrinks" only where its
    interval excludes the tiny model's mean difference; otherwise "not distinguishable at this scale". Both 10M
    intervals (Student t over seeds and the paired bootstrap) must exclude it, as section 6 asks both intervals to
    agree. Signed: "grows" means the difference (arm - base) is larger at 10M (both intervals above the tiny mean)."""
    ivs = [d10m["ci95_seeds"], d10m["ci95_bootstrap"]]
    if any(v is None for iv in ivs for v in iv):
        return "not distinguishable at this scale"
    if all(iv[0] > tiny_mean for iv in ivs):
        return "grows"
    if all(iv[1] < tiny_mean for iv in ivs):
        return "shrinks"
    return "not distinguishable at this scale"


def scale_comparison(tiny: dict, vs_grpo: dict, vs_anchor: dict) -> dict:
    """``comparison -> metric -> {tiny_mean, 10m_mean, 10m intervals, words}`` from the tiny model's ``verdict.json``
    and the 10M ``paired_diff`` results of the same selected arm."""
    out = {}
    for name, d10 in (("paired_diff_vs_grpo", vs_grpo), ("paired_diff_vs_anchor_only", vs_anchor)):
        out[name] = {m: {"tiny_mean": tiny[name][m]["mean"], "10m_mean": d10[m]["mean"],
                         "10m_ci95_seeds": d10[m]["ci95_seeds"], "10m_ci95_bootstrap": d10[m]["ci95_bootstrap"],
                         "words": scale_words(tiny[name][m]["mean"], d10[m])} for m in METRICS}
    return out


# ----------------------------------------------------------------------------- the report


def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def arms_markdown(table: Dict[str, dict], order: Sequence[str] = ()) -> List[str]:
    """One row per arm: seed mean and per-seed final Pass@1 / Pass@10 / NDCG@10, mean actor/kl over the last
    KL_WINDOW steps and whether that excludes the arm."""
    arms = [a for a in order if a in table] + sorted(set(table) - set(order))
    bound = next(iter(table.values()))["kl_bound"] if table else KL_BOUND
    head = ["arm", "seeds"] + [f"{m} {w}" for m in METRICS for w in ("mean", "per seed")] + \
        [f"KL (last {KL_WINDOW} steps) mean", "per seed", f"excluded (KL > {bound:.4g})"]
    rows = []
    for a in arms:
        t = table[a]
        rows.append([a, ",".join(map(str, t["seeds"]))] + [
            x for m in METRICS for x in (_f(t["mean"][m]), ", ".join(_f(t["final"][m][s]) for s in t["seeds"]))] + [
            _f(t["kl_mean"], "{:.4g}"), ", ".join(_f(t["kl"][s], "{:.4g}") for s in t["seeds"]),
            "yes" if t["excluded"] else "no"])
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _diff_rows(name: str, d: dict) -> List[str]:
    return [f"| {name} | {m} | {_f(d[m]['mean'], '{:+.4f}')} | [{_f(d[m]['ci95_seeds'][0], '{:+.4f}')}, "
            f"{_f(d[m]['ci95_seeds'][1], '{:+.4f}')}] | [{_f(d[m]['ci95_bootstrap'][0], '{:+.4f}')}, "
            f"{_f(d[m]['ci95_bootstrap'][1], '{:+.4f}')}] |" for m in METRICS]


def diffs_markdown(selected: str, vs_grpo: dict, vs_anchor: dict) -> List[str]:
    return ["| comparison | metric | mean | 95% CI (Student t, seeds) | 95% CI (paired bootstrap, prompts x seeds) |",
            "|---|---|---|---|---|"] + _diff_rows(f"{selected} - grpo", vs_grpo) + \
        _diff_rows(f"{selected} - anchor_only", vs_anchor)


# ----------------------------------------------------------------------------- the runner's cells


def cell_runs(cells: Dict[str, dict]) -> Tuple[Dict[str, Dict[int, List[dict]]], int]:
    """``arm -> seed -> metrics rows`` of the runner's ``cells`` (``recast_ms.grid.plan_cells``) and their one final
    step."""
    from recast_ms.utils.tracking import read_jsonl

    runs, steps = {}, {c["steps"] for c in cells.values()}
    if len(steps) != 1:
        raise ValueError(f"cells of different lengths {sorted(steps)}: the final evaluations are not comparable")
    for c in cells.values():
        runs.setdefault(c["arm"], {})[c["seed"]] = read_jsonl(os.path.join(c["run_dir"], "metrics.jsonl"))
    return runs, steps.pop()


def cell_paired_inputs(cells: Dict[str, dict], table: Dict[str, dict], steps: int):
    """``(final, hits)`` for ``recast_ms.beyond.paired_diff`` from finished cells' final evaluations and their
    per-prompt records (``eval_per_prompt/step_<steps>.npz``)."""
    from recast_ms.config import ConfigError
    from recast_ms.evaluation import per_prompt_path, read_per_prompt

    evals = {}
    for c in cells.values():
        path = per_prompt_path(c["run_dir"], steps)
        if not os.path.exists(path):
            raise ConfigError(f"{path} is missing: the paired bootstrap needs every cell's per-prompt record of its "
                              f"step-{steps} evaluation (written by the RL trainer's evaluation)")
        idx, _, values = read_per_prompt(path)
        evals.setdefault(c["arm"], {})[c["seed"]] = {
            "final": {m: table[c["arm"]]["final"][m][c["seed"]] for m in table[c["arm"]]["final"]},
            "prompt_index": idx, "values": values}
    return paired_inputs(evals)


def beyond_report(kind: str, finished: Dict[str, dict], planned: int, out: str, *, stage2: Optional[dict] = None,
                  stage1_done: Optional[int] = None, stage1_total: Optional[int] = None, sel: Optional[dict] = None,
                  sel_path: Optional[str] = None) -> str:
    """``report.md`` of the ``kind`` preset (``beyond`` / ``beyond_confirm`` / ``beyond_10m``) from its finished cells;
    once every one of the ``planned`` cells has finished, also ``verdict.json`` beside ``sel_path``
    (``beyond_confirm``) or ``<out>/scale.json`` (``beyond_10m``). ``stage2`` / ``sel``: the recorded decisions
    (``beyond``: None while pending; derived presets: the selection they were built from). Returns the markdown."""
    from recast_ms.decisive import _shown_path

    runs, steps = cell_runs(finished)
    table = arm_table(runs, steps)
    complete = len(finished) == planned
    title = {"beyond": "stage 1 + 2 on the 1,000 reserved valid rows",
             "beyond_confirm": "confirmatory run on the 2,000-prompt test subset (seed 2424)",
             "beyond_10m": "one step up in scale: the 10M model, 2,000-prompt test subset (seed 2424)"}[kind]
    md = [f"# Beyond the paper: {title}", "",
          "Pre-registered in [PLAN.md](" + ("PLAN.md" if kind == "beyond" else "../PLAN.md") + "). Every number is "
          f"read from a cell's own `metrics.jsonl`: final = the step-{steps} evaluation; KL = mean `actor/kl` over "
          f"the last {min(KL_WINDOW, steps)} steps (an arm above the larger of {KL_BOUND} and `{KL_REFERENCE_ARM}`'s "
          f"own KL, {next(iter(table.values()))['kl_bound']:.4g} here, is excluded from selection: PLAN.md's "
          "amendment of 2026-12-07). "
          f"{len(finished)} of {planned} cells finished.", ""]
    if not complete:
        md += ["> **INTERIM**: the table covers the finished cells only; nothing below is a decision until every cell "
               "has finished.", ""]
    md += arms_markdown(table, ["grpo", "grpo+lr2e-4", "anchor_only", "recast"]) + [""]
    if kind == "beyond":
        if stage2 is None:
            md += [f"**Stage 2: pending** ({stage1_done} of {stage1_total} stage-1 cells finished; decided by PLAN.md "
                   "section 3 once all have).", ""]
        else:
            md += [f"**Stage 2** (decided {stage2['decided']}, `stage2.json`): divergent masking at weight "
                   f"{stage2['weight']}; beam versions of {', '.join(f'`{a}`' for a in stage2['beam_arms'])}.", ""]
        if sel is not None:
            s = sel["selected"]
            g = sel["grpo_lr"]
            md += [f"**Selected arm** (decided {sel['decided']}, `selection.json`, PLAN.md section 5): "
                   + (f"`{s['arm']}` (seed-mean final reserved Pass@1 {s['seed_mean_pass@1']:.4f}; "
                      f"seed mean {'above' if sel['beats_grpo_and_anchor_only'] else 'not above'} both grpo's and "
                      "anchor_only's: a selection statistic on 3 seeds, no interval)"
                      if s else "none (every variant arm is KL-excluded)")
                   + f". Ranking: {', '.join(sel['ranking']) or '-'}; "
                   f"KL-excluded: {', '.join(sel['excluded']) or 'none'}.", "",
                   f"**GRPO's lr for the confirmatory run** (PLAN.md section 3): {g['lr']:g} "
                   f"(`{g['arm']}`: {g['why']}).",
                   ""]
        elif stage2 is not None:
            md += ["**Selection: pending** until every stage-1 and stage-2 cell has finished.", ""]
    elif complete:
        final, hits = cell_paired_inputs(finished, table, steps)
        arm = sel["selected"]["arm"]
        if kind == "beyond_confirm":
            path = os.path.join(os.path.dirname(sel_path), "verdict.json")
            res = write_verdict(path, arm, final, hits)
            md += [f"**Verdict** (`{_shown_path(path)}`, Pass@1 decides): **{res['verdict']}**.", ""]
            md += diffs_markdown(arm, res["paired_diff_vs_grpo"], res["paired_diff_vs_anchor_only"]) + [""]
        else:
            vs_g, vs_a = paired_diff(final, hits, arm, "grpo"), paired_diff(final, hits, arm, "anchor_only")
            tiny_path = os.path.join(os.path.dirname(sel_path), "verdict.json")
            res = {"selected": arm, "paired_diff_vs_grpo": vs_g, "paired_diff_vs_anchor_only": vs_a,
                   "tiny_verdict": _shown_path(tiny_path), "comparison": None}
            md += ["10M paired differences:", ""] + diffs_markdown(arm, vs_g, vs_a) + [""]
            if os.path.exists(tiny_path):
                with open(tiny_path) as f:
                    res["comparison"] = scale_comparison(json.load(f), vs_g, vs_a)
                md += [f"Against the tiny model's mean differences (`{_shown_path(tiny_path)}`; PLAN.md section 7: "
                       "\"grows\" / \"shrinks\" only where both 10M intervals exclude the tiny mean):", "",
                       "| comparison | metric | tiny mean | 10M mean | words |", "|---|---|---|---|---|"]
                for name, per in res["comparison"].items():
                    md += [f"| {name.replace('paired_diff_', '')} | {m} | {d['tiny_mean']:+.4f} | {d['10m_mean']:+.4f} "
                           f"| {d['words']} |" for m, d in per.items()]
                md += [""]
            else:
                md += [f"The comparison with the tiny model waits for its verdict ({_shown_path(tiny_path)}).", ""]
            _write_json(os.path.join(out, "scale.json"), res)
    else:
        md += ["The paired differences and the verdict are computed once every cell has finished.", ""]
    report = "\n".join(md) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    return report
