"""Compile a run's Ascend graphs here, without Ascend (MindSpore DryRun), and report each rank's device memory:

    recast-dryrun --config model_configs/runs/ascend_qwen3_0_6b.yaml --world-size 8 --ranks 0,N-1 [key=value ...]

For each chosen rank (``N`` = the world size), one process per phase with ``RANK_SIZE`` / ``RANK_ID`` set, in a
scratch directory, compiles every graph of one SFT step (train step, validation forward) and one RL step
(KV-decoder rollout, the estimator's selection, reference forward, actor update) for Ascend. Needs no Ascend:
MindSpore compiles against a stand-in for CANN (``../shared/tools/ascend-dryrun/build.sh``, built once into
~/.cache/ascend-dryrun, or ``--stub DIR``) and mocks the device. Outputs are dummies; the peak device memory is
MindSpore's simulated plan, a model of the cluster's memory, not a measurement. The last stdout line is one JSON
object: {"config", "world_size", "ranks": {rank: {"compiled", "peak_mb", "graphs": {...}}}, "error"}.
Exit status 0 when every chosen rank compiled.
"""
import json
import os
import sys

from recast_ms.cli import base_parser, command


@command  # environment first; configuration errors as one line, exit 2
def main():
    p = base_parser(__doc__)
    p.add_argument("--world-size", type=int, default=0,
                   help="ranks of the launch (default: the config's runtime.world_size, else 1)")
    p.add_argument("--ranks", default="0,N-1", help="ranks to compile: '0,N-1' (default), '0,3' or 'all'")
    p.add_argument("--phases", default="sft,rl", help="phases to compile: sft, rl or both (default)")
    p.add_argument("--stub", default=None, help="directory of a built CANN stand-in (holding env.sh)")
    p.add_argument("--scratch", default=None,
                   help="keep the per-rank working directories and logs here (default: a temporary directory, removed)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per rank and phase (default 3600)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--layers", type=int, default=0,
                   help="compile the model at this depth, its width unchanged (default: the model YAML's)")
    p.add_argument("--init", default=None, metavar="STEP_DIR",
                   help="the RL phase's --init checkpoint (a sharded step of the same layout loads slice by slice)")
    args = p.parse_args()
    from recast_ms.config import load_config
    from recast_ms.dryrun import NOTE, PHASES, dryrun, parse_ranks

    world = args.world_size or load_config(args.config, args.overrides).runtime.world_size or 1
    phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    bad = [ph for ph in phases if ph not in PHASES]
    if bad or not phases:
        sys.exit(f"--phases {args.phases!r}: each must be one of {', '.join(PHASES)}")
    try:
        ranks = parse_ranks(args.ranks, world)
    except ValueError as err:
        sys.exit(str(err))
    echo = lambda line: print(line, file=sys.stderr, flush=True)
    echo(NOTE)
    echo(f"compiling ranks {ranks} of {world} ({', '.join(phases)}), one process at a time")
    report = dryrun(args.config, args.overrides, world, ranks, phases=phases, stub=args.stub,
                    scratch=os.path.abspath(args.scratch) if args.scratch else None, timeout=args.timeout,
                    keep=bool(args.scratch), echo=echo, layers=args.layers, init=args.init)
    text = json.dumps(report, sort_keys=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=1) + "\n")
    print(text)
    ok = report["error"] is None and report["ranks"] and all(r["compiled"] for r in report["ranks"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
