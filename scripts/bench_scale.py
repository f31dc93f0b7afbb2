#!/usr/bin/env python
"""The real Qwen3-0.6B shape on CPU: one SFT step, one RL step with ``grpo`` and one with ``recast``
(reference model included), and a constrained beam search, each with its wall time and peak RSS.

    python scripts/bench_scale.py [--model model_configs/qwen3_0_6b.yaml] [--vocab 151936]
                                  [--prompts 2] [--group-size 4] [--beam-prompts 4] [--beam-width 8]

The model is ``--model`` built by the project (MindFormers' Qwen3, CPU patches, fp32) with ``--vocab``
embedding rows plus the SID code tokens (the real Qwen3 vocabulary grown for SIDs), on the embedded
synthetic data. Each stage runs in its own process from random weights, so its peak RSS is its own:

    sft_step        scripts' SFT path (``run_sft``), batch ``--sft-batch`` (one micro-batch: the fused step)
    rl_grpo_step    ``RLTrainer.step`` with ``grpo``: P x G rollout, reward, reference forward, update, in
                    ``--micro-batch``-row micro-batches
    rl_recast_step  the same with ``recast``: the [2P, T] batch
    beam_search     SID-constrained beam search (KV decoder) on ``--beam-prompts`` prompts

``s`` is the second step (the first compiles its graphs; its time is ``first_s``). Prints a table, then ONE
JSON line: ``completed``, ``params``, ``vocab_size``, ``peak_rss_mb`` (the largest stage's), ``stages``
(each ``{"s", "first_s", "peak_rss_mb"}``).
"""
import argparse
import json
import os
import subprocess
import sys
import time

from recast_ms.cli import add_verbose, command, setup_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = ("sft_step", "rl_grpo_step", "rl_recast_step", "beam_search")


def _config(args, run_dir, extra=()):
    from recast_ms.config import load_config

    over = [f"model_config={args.model}", "seed=0", f"rl.prompts_per_step={args.prompts}",
            f"rl.group_size={args.group_size}", "rl.kl_coef=0.001", f"rl.micro_batch_size={args.micro_batch}",
            f"sft.batch_size={args.sft_batch}",
            f"eval.beam_width={args.beam_width}", f"eval.batch_size={args.beam_prompts}",
            f"eval.ks=[1,{min(10, args.beam_width)}]", *extra]
    cfg = load_config(None, over)
    # the real vocabulary plus the SID tokens: the tokenizer's ids are a subset, the rest are padding rows
    from recast_ms.trainer.setup import get_tokenizer, load_splits

    splits = load_splits(cfg.data)
    tok = get_tokenizer(splits, os.path.join(args.work_dir, "tokenizer"), cfg)
    n_sid = len(splits.codebook.code_tokens())
    cfg.vocab_size = args.vocab + n_sid
    if cfg.vocab_size < tok.vocab_size:
        raise SystemExit(f"--vocab {args.vocab} + {n_sid} SID tokens < the tokenizer's {tok.vocab_size}")
    return cfg, splits, tok


def worker(args):
    from recast_ms.utils.tracking import peak_rss_mb

    run_dir = os.path.join(args.work_dir, args.stage)
    out = {}
    if args.stage == "sft_step":
        from recast_ms.trainer.sft import run_sft

        cfg, _, _ = _config(args, run_dir, ["sft.steps=100", "sft.log_every=1", "sft.eval_every=100000",
                                            "sft.save_every=100000", "sft.warmup_steps=0"])
        t0 = time.perf_counter()
        run_sft(cfg, run_dir, resume=False, progress=False, stop_after=2)
        out["wall_s"] = time.perf_counter() - t0
        with open(os.path.join(run_dir, "sft_metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out["first_s"], out["s"] = rows[0]["timing_s/step"], rows[1]["timing_s/step"]
    elif args.stage in ("rl_grpo_step", "rl_recast_step"):
        from recast_ms.trainer.rl import RLTrainer

        est = args.stage.split("_")[1]
        cfg, _, _ = _config(args, run_dir, [f"rl.estimator={est}"])
        tr = RLTrainer(cfg, run_dir, None, os.path.join(args.work_dir, "tokenizer"), progress=False)
        out["params"] = sum(int(p.size) for p in tr.model.get_parameters())
        out["vocab_size"] = int(tr.model.config.vocab_size)
        rows = [tr.step() for _ in range(2)]
        out["first_s"], out["s"] = rows[0]["timing_s/step"], rows[1]["timing_s/step"]
        out["stages_s"] = {k.split("/")[1]: v for k, v in rows[1].items() if k.startswith("timing_s/")}
        # resident memory at the end of each stage of the first step (compiles + first runs: what each keeps)
        out["memory_mb_first_step"] = {k.split("/")[1]: v for k, v in rows[0].items() if k.startswith("memory_mb/")}
        out["actor_rows"] = rows[1]["actor/rows"]
    elif args.stage == "beam_search":
        from recast_ms.evaluation import evaluate
        from recast_ms.rollout.decoder import make_decoder
        from recast_ms.trainer.setup import build_model, init_runtime, response_len

        cfg, splits, tok = _config(args, run_dir)
        init_runtime()
        model = build_model(cfg, tok, seed=0)
        R = response_len(splits)
        decoder = make_decoder(model, cfg.seq_length - R, R, tok.pad_id)
        samples = splits.test[: args.beam_prompts]
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            metrics, rankings = evaluate(decoder, samples, splits.codebook, tok, seq_length=cfg.seq_length,
                                         ecfg=cfg.eval)
            times.append(time.perf_counter() - t0)
        out["first_s"], out["s"] = times
        out["beams_per_prompt"] = float(sum(len(r) for r in rankings) / len(rankings))
        out["valid_ratio"] = float(metrics["eval/valid_ratio"])
    else:
        raise SystemExit(f"unknown stage {args.stage!r}")
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def run_stage(stage, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--stage", stage, "--model", args.model,
           "--vocab", str(args.vocab), "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--sft-batch", str(args.sft_batch), "--micro-batch", str(args.micro_batch),
           "--beam-prompts", str(args.beam_prompts),
           "--beam-width", str(args.beam_width), "--work-dir", args.work_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["process_s"] = time.perf_counter() - t0
            return res
    with open(os.path.join(args.work_dir, f"{stage}.err"), "w") as f:
        f.write(proc.stderr)
    raise RuntimeError(f"stage {stage} failed (rc {proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}")


@command
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_configs/qwen3_0_6b.yaml")
    p.add_argument("--vocab", type=int, default=151936, help="embedding rows before the SID tokens are added")
    p.add_argument("--prompts", type=int, default=2, help="RL prompts per step (P)")
    p.add_argument("--group-size", type=int, default=4, help="RL samples per prompt (G)")
    p.add_argument("--sft-batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=1,
                   help="rl.micro_batch_size: the CPU grad graph keeps ~39 MB per row per 0.6B layer (measured), so "
                        "1-row micro-batches are what fits the RL step in 24 GB")
    p.add_argument("--beam-prompts", type=int, default=4)
    p.add_argument("--beam-width", type=int, default=8)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work-dir", default="/tmp/recast_bench_scale")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)
    add_verbose(p)
    args = p.parse_args()
    setup_logging(args.verbose)  # RECAST_VERBOSE reaches the stage processes
    os.makedirs(args.work_dir, exist_ok=True)
    if args.worker:
        return worker(args)

    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    from tqdm import tqdm

    results, failed = {}, {}
    for stage in tqdm(stages, desc="bench_scale", dynamic_ncols=True):
        try:
            results[stage] = run_stage(stage, args)
        except RuntimeError as err:
            failed[stage] = str(err).splitlines()[0]
            print(err, file=sys.stderr)
    print("| stage | step s | first step s (compiles) | process s | peak RSS MB |\n|---|---|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r['s']:.2f} | {r['first_s']:.2f} | {r['process_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    info = next((r for r in results.values() if "params" in r), {})
    summary = {
        "completed": not failed and len(results) == len(stages),
        "model": args.model, "params": info.get("params"), "vocab_size": info.get("vocab_size"),
        "prompts": args.prompts, "group_size": args.group_size, "micro_batch": args.micro_batch,
        "sft_batch": args.sft_batch, "beam_width": args.beam_width, "beam_prompts": args.beam_prompts,
        "peak_rss_mb": max((r["peak_rss_mb"] for r in results.values()), default=None),
        "stages": {s: {"s": r["s"], "first_s": r["first_s"], "peak_rss_mb": r["peak_rss_mb"]}
                   for s, r in results.items()},
        "failed": failed, "raw": results,
    }
    print(json.dumps(summary))
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
