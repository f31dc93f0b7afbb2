"""Evaluate a run's newest checkpoint with beam search: Pass/Recall/NDCG@K beside a most-popular baseline.

    recast-eval --run-dir runs/sft [--split test] [--max-prompts N] [--out FILE] [key=value ...]

Reads the run's ``config.yaml`` and tokenizer; overrides apply on top (e.g. ``eval.beam_width=16``).
Prints a markdown table and writes JSON (default ``<run-dir>/eval_<split>.json``).
"""
import os
import sys
import time

from recast_ms.cli import base_parser, command, quiet_mindformers, setup_logging


@command  # environment first; configuration errors as one line, exit 2
def main():
    p = base_parser(__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: newest in --run-dir)")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    # 0 = all, as data.max_eval_prompts / max_rl_prompts: one convention for every prompt cap of the project
    p.add_argument("--max-prompts", type=int, default=0, metavar="N",
                   help="evaluate N prompts of the split; 0 (the default) = the whole split. Which N: the first "
                        "rows, or with data.eval_subset_seed >= 0 the seeded random subset RL evaluates on")
    p.add_argument("--decoder", default="kv", choices=["kv", "full"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.max_prompts < 0:
        p.error(f"--max-prompts must be >= 0 (0 = the whole split), got {args.max_prompts}")
    out = args.out or os.path.join(args.run_dir, f"eval_{args.split}.json")
    if os.path.isdir(out):  # checked now, not after the whole evaluation
        p.error(f"--out {out} is a directory: give the JSON file to write")
    if not args.config and not os.path.exists(os.path.join(args.run_dir, "config.yaml")):
        p.error(f"--run-dir {args.run_dir} is not a run directory (no config.yaml)")
    setup_logging(args.verbose, args.run_dir)
    from recast_ms.config import load_config
    from recast_ms.evaluation import eval_subset, evaluate, format_table, popularity_baseline, write_json
    from recast_ms.rollout.decoder import make_decoder
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.setup import build_model, get_tokenizer, init_runtime, load_splits, response_len

    cfg = load_config(args.config or os.path.join(args.run_dir, "config.yaml"), args.overrides)
    splits = load_splits(cfg.data)
    tok = get_tokenizer(splits, os.path.join(args.run_dir, "tokenizer"), cfg)
    path = args.checkpoint or ckpt.latest_checkpoint(args.run_dir)
    if path is None:
        sys.exit(f"no checkpoint in {args.run_dir}/checkpoints")
    init_runtime(cfg)
    quiet_mindformers()
    model = build_model(cfg, tok, seed=cfg.seed)
    tensors, meta = ckpt.load_state(path)
    ckpt.restore_model(model, tensors, path=path)
    # data.eval_subset_seed >= 0: the same seeded random subset the RL trainer evaluates on
    samples = eval_subset(getattr(splits, args.split), args.max_prompts, cfg.data.eval_subset_seed)
    R = response_len(splits)
    decoder = make_decoder(model, cfg.seq_length - R, R, tok.pad_id, args.decoder)
    t0 = time.time()
    metrics, rankings = evaluate(decoder, samples, splits.codebook, tok, seq_length=cfg.seq_length, ecfg=cfg.eval,
                                 prefix="model", with_titles=cfg.data.with_titles, progress=True)
    elapsed = time.time() - t0
    base = popularity_baseline(splits.train, samples, cfg.eval.ks)
    name = f"{cfg.data.source}:{cfg.data.dataset if cfg.data.source == 'amazon' else 'synthetic'}"
    print(f"\n{name} {args.split} split, {len(samples)} prompts, beam {cfg.eval.beam_width}, "
          f"checkpoint {os.path.basename(path)} (step {meta['step']}), {elapsed:.0f}s")
    print(format_table({"model": metrics, "most-popular": base}, cfg.eval.ks))
    print(f"valid SID ratio of beams: {metrics['model/valid_ratio']:.4f}")
    write_json(out, {"checkpoint": path, "step": meta["step"], "split": args.split, "num_prompts": len(samples),
                     "model": metrics, "most_popular": base, "seconds": elapsed, "config": cfg.to_dict()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
