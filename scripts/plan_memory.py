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
import math
import os
import sys

import yaml

from recast_ms.cli import command
from recast_ms.config import REPO_ROOT, ConfigError


def _tri(v):
    return None if v == "auto" else v == "true"


def check_args(args) -> None:
    """Numbers the planner would turn into NaN, negative terms or a traceback; each a one-line ConfigError."""
    from recast_ms.runtime import read_model_yaml

    for ok, msg in ((args.devices >= 1, f"--devices must be >= 1, got {args.devices}"),
                    (math.isfinite(args.device_memory_gb) and args.device_memory_gb > 0,
                     f"--device-memory-gb must be a finite number > 0, got {args.device_memory_gb}"),
                    (args.group_size >= 2, f"--group-size must be >= 2 (G responses per prompt), got {args.group_size}"),
                    (args.prompts >= 1, f"--prompts must be >= 1, got {args.prompts}"),
                    (args.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {args.micro_batch_size}"),
                    (args.seq_length is None or args.seq_length >= 1, f"--seq-length must be >= 1, got {args.seq_length}")):
        if not ok:
            raise ConfigError(msg)
    path = args.model if os.path.isabs(args.model) else os.path.join(REPO_ROOT, args.model)
    if not os.path.isfile(path):
        raise ConfigError(f"--model {args.model}: no such file ({path})")
    try:
        read_model_yaml(path)
    except ValueError as err:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        if isinstance(raw, dict) and "model_config" in raw:
            raise ConfigError(f"--model {args.model} is a run YAML: give its model YAML, "
                              f"--model {raw['model_config']}") from None
        raise ConfigError(f"--model {args.model} is not a model YAML (model_configs/*.yaml): {err}") from None


@command
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
    p.add_argument("--model-parallel", type=int, default=0, help="TP (default: the model YAML's)")
    p.add_argument("--pipeline-stage", type=int, default=0, help="PP (default: the model YAML's)")
    p.add_argument("--no-kl", action="store_true", help="no reference model (rl.kl_coef = 0)")
    p.add_argument("--calibrate", action="store_true", help="print the CPU calibration as JSON and exit")
    p.add_argument("--add-record", default=None, help="a measured record (JSON) to add to the calibration file")
    args = p.parse_args(argv)
    from recast_ms import memory_plan as mp

    if args.add_record:
        try:
            record = mp.add_record(json.loads(args.add_record))
        except ValueError as err:  # not JSON, or a key missing
            raise ConfigError(f"--add-record: {err}") from None
        print(json.dumps(record, indent=1))
        return 0
    if args.calibrate:
        print(json.dumps(mp.calibrate(), indent=1))
        return 0
    check_args(args)
    try:
        rep = mp.plan_report(args.model, args.devices, args.device_memory_gb, group_size=args.group_size,
                             prompts=args.prompts, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                             kl=not args.no_kl, optimizer_parallel=_tri(args.optimizer_parallel),
                             recompute=_tri(args.recompute), tp=args.model_parallel, pp=args.pipeline_stage)
    except ValueError as err:  # the memory plan's own checks (layout vs devices, a null vocab_size)
        raise ConfigError(str(err)) from None
    print(mp.format_report(rep))
    print(mp.summary_json(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
