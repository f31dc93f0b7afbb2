#!/usr/bin/env python
"""System benchmark: GRPO versus ReCast on the same prompts and the same model (issue 5 targets).

    python scripts/bench_system.py --group-size 32 [--prompts 16] [--steps 5] [--sweep 8,16,32,64] [--rollout beam]

Each (estimator, G) runs in its own process, so peak memory is that run's alone. Both start from the
same seeded weights and draw the same prompts. ``--rollout beam`` forms every group from the G best
constrained beams (``rl.rollout=beam``) instead of G samples; the actor batch, and so the token ratio,
does not depend on where the group came from. Per-stage times are medians over steps 2..N (step 1
compiles the graphs). Prints a table, then ONE JSON line with ``actor_tokens_ratio``,
``update_actor_ratio``, ``step_ratio`` (each GRPO / ReCast at ``--group-size``), ``peak_memory_mb``
for each, and the sweep.
"""
import argparse
import json
import os
import subprocess
import sys

from recast_ms.cli import add_verbose, command, setup_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_overrides(args):
    """The RL config of one worker process (the same for both estimators but ``rl.estimator``)."""
    return [f"rl.estimator={args.estimator}", f"rl.group_size={args.group_size}",
            f"rl.prompts_per_step={args.prompts}", f"rl.steps={args.steps}",
            *([f"rl.micro_batch_size={args.micro}"] if args.micro else []),
            f"model_config={args.model}", "rl.kl_coef=0.001", f"data.num_users={max(600, 4 * args.prompts)}",
            f"rl.rollout={args.rollout}", f"rl.log_entropy={str(bool(args.log_entropy)).lower()}"]


def worker(args):
    import numpy as np

    from recast_ms.config import load_config
    from recast_ms.trainer.rl import RLTrainer
    from recast_ms.utils.tracking import peak_rss_mb

    cfg = load_config(None, worker_overrides(args))
    tr = RLTrainer(cfg, args.run_dir, None, os.path.join(args.run_dir, "tok"), progress=False)
    rows = [tr.step() for _ in range(args.steps)]
    keys = ["timing_s/step", "timing_s/rollout", "timing_s/reward", "timing_s/signal", "timing_s/old_log_prob",
            "timing_s/ref", "timing_s/update_actor"]
    if args.log_entropy:
        keys.append("timing_s/entropy")
    out = {k.split("/")[1]: float(np.median([r[k] for r in rows[1:]])) for k in keys}
    out.update({"actor_rows": rows[-1]["actor/rows"], "actor_tokens": rows[-1]["actor/tokens"],
                "actor_response_tokens": float(np.mean([r["actor/response_tokens"] for r in rows])),
                "peak_memory_mb": peak_rss_mb(), "first_step_s": rows[0]["timing_s/step"]})
    out["update_cost_per_token_ms"] = 1000 * out["update_actor"] / out["actor_tokens"]
    print("RESULT " + json.dumps(out), flush=True)


def run_one(estimator, G, args):
    run_dir = os.path.join(args.work_dir, f"{estimator}_G{G}")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--estimator", estimator, "--group-size", str(G),
           "--prompts", str(args.prompts), "--steps", str(args.steps), "--micro", str(args.micro),
           "--model", args.model, "--rollout", args.rollout, "--run-dir", run_dir,
           *(["--log-entropy"] if args.log_entropy else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{estimator} G={G} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16, help="P prompts per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--micro", type=int, default=0,
                   help="rl.micro_batch_size for both estimators (0: the config default, 16 rows)")
    p.add_argument("--model", default="model_configs/qwen3_tiny.yaml")
    p.add_argument("--rollout", default="sample", choices=["sample", "beam"],
                   help="rl.rollout: G sampled responses per prompt, or the G best constrained beams")
    # TRL logs its entropy from the training forward; ours is a second forward over the actor rows (a diagnostic of
    # issue 24, on in the main job), so a speed comparison leaves it out unless asked
    p.add_argument("--log-entropy", action="store_true",
                   help="keep the per-step policy-entropy diagnostic on (rl.log_entropy; off here by default)")
    p.add_argument("--sweep", default="", help="comma-separated G values for the decoupling sweep, e.g. 8,16,32,64")
    p.add_argument("--work-dir", default="/tmp/recast_bench_system")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--estimator", default="recast", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    add_verbose(p)
    return p.parse_args(argv)


@command
def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)  # RECAST_VERBOSE reaches the worker processes
    if args.worker:
        return worker(args)

    results = {}
    Gs = sorted({args.group_size} | {int(g) for g in args.sweep.split(",") if g.strip()})
    for G in Gs:
        for est in ("grpo", "recast"):
            print(f"running {est} G={G} ...", file=sys.stderr, flush=True)
            results[(est, G)] = run_one(est, G, args)

    def ratio(G, key):
        return results[("grpo", G)][key] / max(results[("recast", G)][key], 1e-12)

    hdr = "| G | estimator | actor rows | actor tokens/step | step s | rollout s | ref s | update_actor s | update ms/token | peak MB |"
    print(hdr + "\n" + "|---" * 10 + "|")
    for G in Gs:
        for est in ("grpo", "recast"):
            r = results[(est, G)]
            print(f"| {G} | {est} | {r['actor_rows']:.0f} | {r['actor_tokens']:.0f} | {r['step']:.3f} | {r['rollout']:.3f} "
                  f"| {r['ref']:.3f} | {r['update_actor']:.3f} | {r['update_cost_per_token_ms']:.4f} | {r['peak_memory_mb']:.0f} |")
    G = args.group_size
    summary = {
        "group_size": G, "prompts_per_step": args.prompts, "model": args.model, "rollout": args.rollout,
        "log_entropy": bool(args.log_entropy),
        "actor_tokens_ratio": ratio(G, "actor_tokens"),
        "recast_over_grpo_actor_tokens": 1.0 / ratio(G, "actor_tokens"),
        "update_actor_ratio": ratio(G, "update_actor"),
        "ref_ratio": ratio(G, "ref"),
        "step_ratio": ratio(G, "step"),
        "peak_memory_mb": {"grpo": results[("grpo", G)]["peak_memory_mb"], "recast": results[("recast", G)]["peak_memory_mb"]},
        "sweep": {str(g): {"update_actor_ratio": ratio(g, "update_actor"), "step_ratio": ratio(g, "step"),
                           "grpo_update_actor_s": results[("grpo", g)]["update_actor"],
                           "recast_update_actor_s": results[("recast", g)]["update_actor"]} for g in Gs},
        "raw": {f"{e}_G{g}": r for (e, g), r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
