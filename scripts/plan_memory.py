#!/usr/bin/env python
"""Per-device memory plan of a GRPO / ReCast RL step on Ascend, and the CPU calibration behind it:

    python scripts/plan_memory.py --model model_configs/qwen3_8b.yaml --devices 8 --device-memory-gb 64 \\
        --estimator recast --group-size 32 --prompts 16 [--micro-batch-size 128] [--seq-length 1024]

Prints, per device: parameters, gradients, optimizer states (with / without optimizer parallel), reference
model, activations per micro-batch (with / without recompute), logits, rollout KV cache, for grpo and
recast, and whether each fits (MindFormers' max_device_memory share: 58 of 64 GB); then the CPU
calibration (measured records in recast_ms/memory_calibration.json, relative error). The last line is one
JSON object: model, devices, calibration_error, grpo / recast {total_gb, fits, micro_rows}, ...
The layout is the model YAML's TP / PP / recompute / optimizer parallel with DP = devices / (TP x PP).

    python scripts/plan_memory.py --calibrate                   # the calibration alone (JSON)
    python scripts/plan_memory.py --add-record '{"name": ..., "model": ..., "vocab_size": ..., "seq_length": ...,
        "stage": "rl_step", "train_rows": ..., "rollout_rows": ..., "peak_rss_mb": ..., "source": "..."}'
"""
import argparse
import json
import sys



def _tri(v):
    return None if v == "auto" else v == "true"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="model_configs/qwen3_8b.yaml")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--device-memory-gb", type=float, default=64.0)
    p.add_argument("--estimator", default="recast", choices=["grpo", "recast"],
                   help="the estimator the run uses (both are planned; this one decides the exit status)")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=128, help="rl.micro_batch_size (rows per micro-batch)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per row (default: the model YAML's)")
    p.add_argument("--optimizer-parallel", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--recompute", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--no-kl", action="store_true", help="no reference model (rl.kl_coef = 0)")
    p.add_argument("--calibrate", action="store_true", help="print the CPU calibration as JSON and exit")
    p.add_argument("--add-record", default=None, help="a measured record (JSON) to add to the calibration file")
    args = p.parse_args(argv)
    from recast_ms import memory_plan as mp

    if args.add_record:
        print(json.dumps(mp.add_record(json.loads(args.add_record)), indent=1))
        return 0
    if args.calibrate:
        print(json.dumps(mp.calibrate(), indent=1))
        return 0
    rep = mp.plan_report(args.model, args.devices, args.device_memory_gb, group_size=args.group_size,
                         prompts=args.prompts, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                         kl=not args.no_kl, optimizer_parallel=_tri(args.optimizer_parallel),
                         recompute=_tri(args.recompute))
    print(mp.format_report(rep))
    print(mp.summary_json(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
