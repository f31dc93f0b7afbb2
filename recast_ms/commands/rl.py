"""RL post-training from an SFT run:

    recast-rl --init runs/sft --run-dir runs/rl_recast rl.estimator=recast [key=value ...]

``--init`` names the SFT run directory (its newest checkpoint and its tokenizer are used). Resumes
from the newest checkpoint in ``--run-dir`` unless ``--fresh``. Under msrun (``scripts/launch_msrun.sh``)
pass ``--distributed``: each worker rolls out its own prompts and gradients are averaged.
"""
import json
import os
import sys

from recast_ms.cli import base_parser, configure_environment, setup_logging


def main():
    configure_environment()  # before MindSpore starts its runtime
    p = base_parser(__doc__)
    p.add_argument("--init", required=True, help="SFT run directory")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: removes the earlier checkpoints of --run-dir before the first save")
    p.add_argument("--distributed", action="store_true", help="initialise MindSpore communication (msrun)")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args()
    setup_logging()
    from recast_ms.config import load_config
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.rl import RLTrainer

    init_cfg = os.path.join(args.init, ckpt.CONFIG_FILE)
    if not os.path.isdir(args.init) or not os.path.exists(init_cfg) or ckpt.latest_checkpoint(args.init) is None:
        sys.exit(f"--init {args.init} is not a finished SFT run directory (it needs {ckpt.CONFIG_FILE} and "
                 f"checkpoints/step_N): run recast-sft --run-dir {args.init} first")
    cfg = load_config(args.config or init_cfg, args.overrides)
    rank, world = 0, 1
    if args.distributed:
        from recast_ms.runtime import resolve_device
        from recast_ms.trainer.distributed import init_data_parallel

        rank, world = init_data_parallel(resolve_device(cfg.runtime.device_target)[0])
    init_ckpt = ckpt.latest_checkpoint(args.init)
    run_dir = args.run_dir
    trainer = RLTrainer(cfg, run_dir, init_ckpt, os.path.join(args.init, "tokenizer"), rank=rank, world_size=world)
    hist = trainer.train(resume=not args.fresh, evaluate=not args.no_eval)
    if rank == 0 and hist:
        last = {k: v for k, v in hist[-1].items() if not k.startswith("timing")}
        print(json.dumps(last))
    if args.distributed:
        # every rank writes a parameter checksum so a launcher (or test) can check the ranks stayed in sync
        import numpy as np

        digest = float(sum(np.abs(p.asnumpy()).sum() for p in trainer.model.trainable_params()))
        with open(os.path.join(run_dir, f"param_checksum_rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world": world, "step": trainer.step_idx, "checksum": digest}, f)


if __name__ == "__main__":
    main()
