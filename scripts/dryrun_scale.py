"""Compile the RL step of every shipped tensor-parallel Ascend run config under DryRun, per rank, at reduced
depth, and extrapolate each rank's simulated peak per layer (issue 23).

    python scripts/dryrun_scale.py [--out docs/bench/dryrun_scale] [--only 8b] [--ranks first|last|both]

One JSON per (model, world size, estimator, depth, rank) in ``--out`` (``<model>_w<W>_<est>_L<layers>_r<rank>.json``,
the report of ``recast-dryrun``); a finished one is skipped, so a rerun resumes. ``--summary`` writes
``summary.json`` / prints a table: per (model, W, estimator, rank) the peaks at 2 and 4 layers, the per-layer
slope and the full-depth extrapolation ``peak(L) = peak(2) + (L - 2) * (peak(4) - peak(2)) / 2``. The
extrapolation is checked on Qwen3-0.6B, whose full-depth peak was compiled (docs/bench/dryrun_qwen3_0_6b.json).

Full depth is not compiled for 8B / 14B here: the 2-core, 24 GiB machine spends ~1 min per layer-free graph
and host memory grows with depth (0.6B's full-depth compile took 5.6 GB of host RSS at 28 layers, 1.7B 14.2 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {  # run config, full depth
    "qwen3_8b": ("model_configs/runs/ascend_qwen3_8b.yaml", 36),
    "qwen3_14b": ("model_configs/runs/ascend_qwen3_14b.yaml", 40),
    "qwen3_0_6b": ("model_configs/runs/ascend_qwen3_0_6b.yaml", 28),
}
# the paper's 14B layout (DP 1 x TP 4 x PP 2 on 8 devices) beside the shipped TP 8 one
MODELS["qwen3_14b_pp2"] = (MODELS["qwen3_14b"][0], 40)
EXTRA = {"qwen3_14b_pp2": ["runtime.model_parallel=4", "runtime.pipeline_stage=2"]}
WORLDS = {"qwen3_8b": (8, 16), "qwen3_14b": (8, 16), "qwen3_0_6b": (8,), "qwen3_14b_pp2": (8,)}
ESTIMATORS = ("recast", "grpo")
DEPTHS = (2, 4)


def jobs(only: str, ranks: str, depths=DEPTHS, estimators=ESTIMATORS):
    out = []
    for model, (config, _) in MODELS.items():
        if only and only not in model:
            continue
        for world in WORLDS[model]:
            for est in estimators:
                for layers in depths:
                    rank_list = {"first": [0], "last": [world - 1], "both": [0, world - 1]}[ranks]
                    for rank in rank_list:
                        out.append((model, config, world, est, layers, rank))
    # every rank 0 first, then the last ranks: the first pass covers every config soonest
    return sorted(out, key=lambda j: (j[5] != 0, j[0] == "qwen3_0_6b", j[2], j[3] != "recast", j[4]))


def name(model, world, est, layers, rank) -> str:
    return f"{model}_w{world}_{est}_L{layers}_r{rank}.json"


def run(args) -> int:
    from recast_ms.dryrun import dryrun

    os.makedirs(args.out, exist_ok=True)
    todo = jobs(args.only, args.ranks, tuple(int(x) for x in args.layers.split(",")),
                tuple(e for e in args.estimators.split(",") if e))
    for i, (model, config, world, est, layers, rank) in enumerate(todo):
        path = os.path.join(args.out, name(model, world, est, layers, rank))
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if json.load(f).get("error") is None:
                    print(f"[{i + 1}/{len(todo)}] {os.path.basename(path)}: done, skipped", flush=True)
                    continue
        t0 = time.time()
        print(f"[{i + 1}/{len(todo)}] {os.path.basename(path)}: compiling", flush=True)
        extra = EXTRA.get(model, [])
        # "sft" compiles the SFT step (engines.ShardedSFT on the RL run's layout) in place of an RL estimator's step
        phase, est_arg = ("sft", []) if est == "sft" else ("rl", [f"rl.estimator={est}"])
        report = dryrun(os.path.join(ROOT, config), [*est_arg, "runtime.world_size=0", *extra], world,
                        [rank], phases=[phase], timeout=args.timeout, layers=layers)
        report["command"] = (f"recast-dryrun --config {config} --world-size {world} --ranks {rank} --phases {phase} "
                             f"--layers {layers} {' '.join(est_arg)} runtime.world_size=0 {' '.join(extra)}"
                             ).replace("  ", " ").strip()
        report["wall_s"] = round(time.time() - t0, 1)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
        r = report["ranks"].get(str(rank), {})
        print(f"[{i + 1}/{len(todo)}] {os.path.basename(path)}: compiled {r.get('compiled')}, peak {r.get('peak_mb')} MB, "
              f"{report['wall_s']} s" + (f"; error: {report['error'][:300]}" if report["error"] else ""), flush=True)
    return 0


def summary(args) -> dict:
    rows = {}
    for model, (config, full_depth) in MODELS.items():
        for world in WORLDS[model]:
            for est in ESTIMATORS + ("sft",):
                for rank in sorted({0, world - 1}):
                    peaks = {}
                    for layers in DEPTHS:
                        path = os.path.join(args.reports or args.out, name(model, world, est, layers, rank))
                        if os.path.exists(path):
                            with open(path, encoding="utf-8") as f:
                                rep = json.load(f)
                            r = rep["ranks"].get(str(rank), {})
                            if rep.get("error") is None and r.get("compiled"):
                                peaks[layers] = r["peak_mb"]
                    if len(peaks) < 2:
                        continue
                    slope = (peaks[4] - peaks[2]) / 2
                    rows[f"{model}_w{world}_{est}_r{rank}"] = {
                        "model": model, "world_size": world, "estimator": est, "rank": rank,
                        "layout": _layout(model, world),
                        "peak_mb_L2": peaks[2], "peak_mb_L4": peaks[4], "per_layer_mb": slope,
                        "full_depth": full_depth, "extrapolated_peak_mb": round(peaks[2] + (full_depth - 2) * slope)}
    for row in list(rows.values()):  # the last rank at 2 layers beside rank 0's (TP / DP layouts are symmetric)
        if row["rank"] == 0:
            last = row["world_size"] - 1
            path = os.path.join(args.reports or args.out, name(row["model"], row["world_size"], row["estimator"], 2, last))
            row["last_rank_L2_mb"] = None
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    rep = json.load(f)
                r = rep["ranks"].get(str(last), {})
                if rep.get("error") is None and r.get("compiled"):
                    row["last_rank_L2_mb"] = r["peak_mb"]
    for row in rows.values():  # the memory planner at the run's settings (seq 64, micro-batch 32, P = 16, G = 32)
        row["planned_mb"] = planned_mb(row["model"], row["world_size"], row["estimator"])
        row["planner_error"] = round(row["planned_mb"] / row["extrapolated_peak_mb"] - 1, 3)
    out = {"note": "simulated device peaks (MindSpore DryRun, a model of the cluster's memory, not a measurement), "
                   "extrapolated per layer from 2- and 4-layer compiles of the real width; planned_mb: "
                   "recast_ms.memory_plan at the same settings",
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    for key, row in rows.items():
        print(f"{key:32s} L2 {row['peak_mb_L2']:>7} MB  L4 {row['peak_mb_L4']:>7} MB  {row['per_layer_mb']:>7.0f} MB/layer  "
              f"-> {row['full_depth']} layers {row['extrapolated_peak_mb']:>7} MB; planned {row['planned_mb']} MB "
              f"({row['planner_error']:+.1%})")
    print("\n" + markdown(out))
    print(json.dumps(out))
    return out


def markdown(out: dict) -> str:
    lines = ["| model | devices | DP x TP (x PP) | estimator | rank | 2 layers | 4 layers | per layer | full depth (extrapolated) "
             "| planned | planner error | last rank, 2 layers |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in out["rows"].values():
        last = row.get("last_rank_L2_mb")
        last = f"{last:,}" if last is not None else ("(own row)" if row["rank"] else "-")
        lines.append(f"| {row['model']} | {row['world_size']} | {row['layout']} | {row['estimator']} | {row['rank']} | "
                     f"{row['peak_mb_L2']:,} | {row['peak_mb_L4']:,} | {row['per_layer_mb']:,.0f} | "
                     f"{row['extrapolated_peak_mb']:,} | {row['planned_mb']:,} | {row['planner_error']:+.1%} | {last} |")
    return "\n".join(lines)


def write_docs(out: dict, path: str = os.path.join(ROOT, "docs", "ascend.md")) -> None:
    import re

    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = "<!-- dryrun_scale --summary -->\n" + markdown(out) + "\n<!-- /dryrun_scale -->"
    new = re.sub(r"<!-- dryrun_scale --summary -->.*?<!-- /dryrun_scale -->", lambda _: block, text, flags=re.S)
    if new == text and block not in text:
        raise SystemExit(f"{path}: no dryrun_scale markers to replace")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def _layout(model: str, world: int) -> str:
    from recast_ms.config import load_config
    from recast_ms.runtime import plan_runtime

    lay = plan_runtime(load_config(os.path.join(ROOT, MODELS[model][0]), ["runtime.world_size=0", *EXTRA.get(model, [])]),
                       "Ascend", world).layout
    pp = f" x {lay.pipeline_stage}" if lay.pipeline_stage > 1 else ""
    return f"{lay.data_parallel} x {lay.model_parallel}{pp}"


def planned_mb(model: str, world: int, estimator: str) -> int:
    from recast_ms.config import load_config
    from recast_ms.memory_plan import plan_report
    from recast_ms.runtime import plan_runtime

    cfg = load_config(os.path.join(ROOT, MODELS[model][0]), ["runtime.world_size=0", *EXTRA.get(model, [])])
    plan = plan_runtime(cfg, "Ascend", world)
    rep = plan_report(cfg.model_config, world, 64, group_size=cfg.rl.group_size, prompts=cfg.rl.prompts_per_step,
                      micro_batch_size=cfg.rl.micro_batch_size, seq_length=cfg.seq_length,
                      tp=plan.layout.model_parallel, pp=plan.layout.pipeline_stage, sft_batch=cfg.sft.batch_size)
    return round(rep[estimator]["total_gb"] * 1024)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "dryrun_scale"))
    p.add_argument("--only", default="", help="models whose name contains this")
    p.add_argument("--ranks", default="both", choices=("first", "last", "both"))
    p.add_argument("--layers", default=",".join(map(str, DEPTHS)),
                   help="depths to compile, comma-separated (default: 2,4; the summary extrapolates from both)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help="comma-separated (default: recast,grpo); 'sft' compiles the SFT step instead")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--summary", action="store_true", help="only write summary.json from the finished JSONs")
    p.add_argument("--reports", default=None, help="read the per-cell JSONs from here (default: --out)")
    p.add_argument("--docs", action="store_true",
                   help="also replace the table between the dryrun_scale markers in docs/ascend.md")
    args = p.parse_args()
    if args.summary:
        out = summary(args)
        if args.docs:
            write_docs(out)
        return 0
    rc = run(args)
    summary(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
