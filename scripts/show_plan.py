#!/usr/bin/env python
"""Print the resolved runtime plan of a run and exit (what ``scripts/launch_msrun.sh --dry-run`` shows):

    python scripts/show_plan.py --world-size 8 --config model_configs/runs/ascend_qwen3_8b.yaml [key=value ...]
    python scripts/show_plan.py --world-size 2 --init runs/sft [--device Ascend] [key=value ...]

Takes the worker script's own arguments (``--config`` / ``--init`` / overrides; others are ignored). The run
config is ``--config``, else ``<init>/config.yaml``, else the defaults. ``--device`` plans for that device
instead of resolving ``runtime.device_target`` (``auto`` = Ascend only where MindSpore can use it), so an
Ascend plan can be checked on a CPU machine. Prints the plan as indented JSON, then one JSON line; exit 2
with the reason (one line) when the layout or the batch does not fit the world size.
"""
import argparse
import json
import os
import sys

from recast_ms.cli import command


@command  # a plan that does not fit (PlanError) is one line, exit 2
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, required=True, help="total ranks (msrun worker_num)")
    p.add_argument("--device", default=None, choices=["CPU", "Ascend"], help="plan for this device")
    p.add_argument("--config", default=None)
    p.add_argument("--init", default=None, help="SFT run directory (its config.yaml when --config is absent)")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    from recast_ms.config import load_config
    from recast_ms.runtime import plan_runtime, resolve_device

    path = args.config
    if path is None and args.init and os.path.exists(os.path.join(args.init, "config.yaml")):
        path = os.path.join(args.init, "config.yaml")
    cfg = load_config(path, overrides)
    if args.device:
        device, why = args.device, "--device"
    else:
        device, why = resolve_device(cfg.runtime.device_target)
    plan = plan_runtime(cfg, device, args.world_size)
    d = plan.to_dict()
    d["device_reason"] = why
    d["config"] = path or "<defaults>"
    print(json.dumps(d, indent=2, sort_keys=True))
    print(json.dumps(d, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
