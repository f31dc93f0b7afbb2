#!/usr/bin/env python
"""The main job on the embedded default (no files needed):

    python scripts/run_main.py [--out runs/main] [--config cfg.yaml] [key=value ...]

1. SFT the tiny Qwen3 on the seeded synthetic catalogue (the post-SFT backbone);
2. from that same checkpoint, RL with ``grpo`` and with ``recast`` for the same number of steps, same
   prompts order and seeds;
3. print a comparison table (Pass@1, Pass@32, Recall@32, signal diagnostics, actor-side tokens, step
   time) and write it to ``<out>/comparison.md`` / ``.json`` with plots in ``<out>/plots/``.

Every stage checkpoints; re-running the command resumes where a killed run stopped.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recast_ms.cli import base_parser, setup_logging  # noqa: E402


def main():
    p = base_parser(__doc__)
    p.add_argument("--out", default="runs/main")
    p.add_argument("--estimators", default="grpo,recast", help="comma-separated estimators to compare")
    args = p.parse_args()
    setup_logging()
    import gc

    from recast_ms.config import load_config
    from recast_ms.report import comparison_rows, format_comparison, plot_runs, write_comparison
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.rl import RLTrainer
    from recast_ms.trainer.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    sft_dir = os.path.join(args.out, "sft")
    print(f"[1/3] SFT on {cfg.data.source} data -> {sft_dir}", flush=True)
    run_sft(cfg, sft_dir)
    init = ckpt.latest_checkpoint(sft_dir)
    runs = {}
    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    for i, est in enumerate(names):
        rdir = os.path.join(args.out, f"rl_{est}")
        print(f"[2/3] RL {i + 1}/{len(names)}: {est} -> {rdir}", flush=True)
        c = load_config(args.config, list(args.overrides) + [f"rl.estimator={est}"])
        trainer = RLTrainer(c, rdir, init, os.path.join(sft_dir, "tokenizer"))
        trainer.train()
        runs[est] = rdir
        del trainer
        gc.collect()
    print("[3/3] report", flush=True)
    rows = comparison_rows(runs)
    table = format_comparison(rows)
    print("\n" + table)
    write_comparison(args.out, rows, table)
    plots = plot_runs(runs, os.path.join(args.out, "plots"))
    print(f"\nplots: {', '.join(plots)}\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
