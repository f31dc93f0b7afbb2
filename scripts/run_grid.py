#!/usr/bin/env python
"""Experiment grid: estimators x seeds x group size x model size, from a shared SFT checkpoint per
model size; resumable; writes ``results.json``, ``report.md`` and PNG figures into ``--out``.

    python scripts/run_grid.py --preset quick --out runs/grid_quick [key=value ...]

Presets (``--preset``): ``quick`` (the micro test model, a handful of steps: minutes on 2 cores) and
``full`` (the tiny Qwen3 on the synthetic default, 3 seeds, G in 8/16/32/64). Overrides apply to the
base run config of every cell. A cell whose run has reached its last step is not rerun; a half-run
cell resumes from its checkpoint; every cell's config is saved beside its metrics.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recast_ms.cli import base_parser, setup_logging  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "quick": {
        "models": {"micro": os.path.join(ROOT, "tests", "data", "qwen3_micro.yaml")},
        "estimators": ["grpo", "recast"],
        "seeds": [0, 1],
        "group_sizes": [4],
        "base": ["seq_length=32", "data.num_users=60", "sft.steps=10", "sft.batch_size=8", "sft.warmup_steps=2",
                 "sft.save_every=10", "sft.eval_every=10", "sft.log_every=5", "rl.steps=3", "rl.prompts_per_step=4",
                 "rl.eval_every=3", "rl.save_every=3", "rl.micro_batch_size=16", "data.max_eval_prompts=8",
                 "eval.batch_size=8"],
    },
    "full": {
        "models": {"tiny": "model_configs/qwen3_tiny.yaml", "10m": "model_configs/qwen3_10m.yaml"},
        "estimators": ["grpo", "repair_only", "boundary_only", "recast", "recast_adaptive"],
        "seeds": [0, 1, 2],
        "group_sizes": [8, 16, 32, 64],
        "base": ["rl.steps=60", "rl.eval_every=10"],
    },
}


def cell_name(model, est, G, seed):
    return f"{model}_{est}_G{G}_s{seed}"


def main():
    p = base_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    setup_logging()
    import gc

    from recast_ms.config import load_config
    from recast_ms.grid import grid_report
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.rl import RLTrainer
    from recast_ms.trainer.sft import run_sft
    from recast_ms.utils.tracking import read_jsonl

    preset = PRESETS[args.preset]
    t0 = time.time()
    cells = {}
    for model, model_yaml in preset["models"].items():
        base = list(preset["base"]) + [f"model_config={model_yaml}"] + list(args.overrides)
        sft_dir = os.path.join(args.out, f"sft_{model}")
        run_sft(load_config(args.config, base), sft_dir)
        init = ckpt.latest_checkpoint(sft_dir)
        for G in preset["group_sizes"]:
            for est in preset["estimators"]:
                for seed in preset["seeds"]:
                    name = cell_name(model, est, G, seed)
                    rdir = os.path.join(args.out, "cells", name)
                    cfg = load_config(args.config, base + [f"rl.estimator={est}", f"rl.group_size={G}", f"seed={seed}"])
                    cells[name] = {"model": model, "estimator": est, "group_size": G, "seed": seed, "run_dir": rdir}
                    mpath = os.path.join(rdir, "metrics.jsonl")
                    if os.path.exists(mpath) and any(r.get("step") == cfg.rl.steps and "reward/mean" in r
                                                     for r in read_jsonl(mpath)):
                        print(f"[grid] {name}: done, skipped", flush=True)
                        continue
                    print(f"[grid] {name}", flush=True)
                    trainer = RLTrainer(cfg, rdir, init, os.path.join(sft_dir, "tokenizer"))
                    trainer.train(resume=True)
                    del trainer
                    gc.collect()
    report = grid_report(cells, args.out)
    print(report)
    print(f"\n[grid] {len(cells)} cells, {time.time() - t0:.0f}s; report: {os.path.join(args.out, 'report.md')}")
    with open(os.path.join(args.out, "preset.json"), "w") as f:
        json.dump({"preset": args.preset, "overrides": args.overrides, **preset}, f, indent=1)


if __name__ == "__main__":
    main()
