"""The main job on the embedded default (no files needed):

    recast-main [--out runs/main] [--config cfg.yaml] [key=value ...]

1. SFT the tiny Qwen3 on the seeded synthetic catalogue (the post-SFT backbone);
2. from that same checkpoint, RL with ``grpo`` and with ``recast`` for the same number of steps, same
   prompts order and seeds;
3. print a comparison table (Pass@1, Pass@32, Recall@32, signal diagnostics, actor-side tokens, step
   time) and write it to ``<out>/comparison.md`` / ``.json`` with plots in ``<out>/plots/``.

Every stage checkpoints; re-running the command resumes where a killed run stopped.
"""
import argparse
import os
import sys
import time

from recast_ms.cli import base_parser, command, setup_logging


def _stage(args, *stage):
    """Run one stage in its own process: on the CPU backend each compiled graph keeps its memory for the
    process's life, so SFT, GRPO and ReCast in one process added up (3.9 GB measured); apart, the job's peak
    is its largest stage's. A failing stage stops the job with its exit status; rerunning resumes."""
    from recast_ms.utils.interrupt import run_child

    cmd = [sys.executable, "-m", "recast_ms.commands.main", "--out", args.out, "--stage", *stage]
    if args.config:
        cmd += ["--config", args.config]
    rc = run_child(cmd + list(args.overrides), f"recast-main: stage {' '.join(stage)}",
                   f"rerun the same command to resume (finished stages are skipped, a stopped one resumes from "
                   f"its last checkpoint)")
    if rc:
        sys.exit(rc)


@command  # environment first; configuration errors as one line, exit 2
def main():
    p = base_parser(__doc__)
    p.add_argument("--out", default="runs/main")
    p.add_argument("--estimators", default="grpo,recast", help="comma-separated estimators to compare")
    p.add_argument("--stage", nargs="+", default=None, help=argparse.SUPPRESS)  # internal: sft | rl EST
    args = p.parse_args()
    setup_logging(args.verbose, args.out)
    from recast_ms.config import load_config

    cfg = load_config(args.config, args.overrides)  # checked here, before any stage starts
    if not args.stage:  # and what only the data can refuse, before the SFT stage writes anything
        from recast_ms.trainer.setup import check_rl_inputs, load_splits

        check_rl_inputs(cfg, load_splits(cfg.data))
    sft_dir = os.path.join(args.out, "sft")
    if args.stage:
        from recast_ms.trainer import checkpoint as ckpt

        if args.stage[0] == "sft":
            from recast_ms.trainer.sft import run_sft

            run_sft(cfg, sft_dir)
        else:
            from recast_ms.trainer.rl import RLTrainer

            est = args.stage[1]
            c = load_config(args.config, list(args.overrides) + [f"rl.estimator={est}"])
            RLTrainer(c, os.path.join(args.out, f"rl_{est}"), ckpt.latest_checkpoint(sft_dir),
                      os.path.join(sft_dir, "tokenizer")).train()
        return

    from recast_ms.report import comparison_rows, format_comparison, plot_runs, write_comparison

    t0 = time.time()
    print(f"[1/3] SFT on {cfg.data.source} data -> {sft_dir}", flush=True)
    _stage(args, "sft")
    runs = {}
    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    for i, est in enumerate(names):
        rdir = os.path.join(args.out, f"rl_{est}")
        print(f"[2/3] RL {i + 1}/{len(names)}: {est} -> {rdir}", flush=True)
        _stage(args, "rl", est)
        runs[est] = rdir
    print("[3/3] report", flush=True)
    rows = comparison_rows(runs)
    table = format_comparison(rows)
    print("\n" + table)
    write_comparison(args.out, rows, table)
    plots = plot_runs(runs, os.path.join(args.out, "plots"))
    print(f"\nplots: {', '.join(plots)}\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
