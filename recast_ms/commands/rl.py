"""RL post-training from an SFT run:

    recast-rl --init runs/sft --run-dir runs/rl_recast rl.estimator=recast [key=value ...]

``--init`` names the SFT run directory (its newest checkpoint and its tokenizer are used), or one of its
checkpoints, ``<sft run>/checkpoints/step_N`` (that checkpoint, the run's tokenizer and config). Resumes
from the newest checkpoint in ``--run-dir`` unless ``--fresh``. Under msrun (``scripts/launch_msrun.sh``)
pass ``--distributed``: each worker rolls out its own prompts and gradients are averaged.
"""
import json
import os
import sys

from recast_ms.cli import base_parser, command, setup_logging


@command  # environment first; configuration errors as one line, exit 2
def main():
    p = base_parser(__doc__)
    p.add_argument("--init", required=True, help="SFT run directory, or one of its checkpoints/step_N")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: removes the earlier checkpoints of --run-dir before the first save")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace files in --run-dir that no recast_ms run wrote (else: an error)")
    p.add_argument("--distributed", action="store_true", help="initialise MindSpore communication (msrun)")
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, args.run_dir)
    from recast_ms.config import load_config
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.rl import RLTrainer

    sft_dir, init_ckpt = ckpt.resolve_init(args.init)
    init_cfg = os.path.join(sft_dir, ckpt.CONFIG_FILE)
    if not os.path.isdir(sft_dir) or not os.path.exists(init_cfg) or init_ckpt is None:
        sys.exit(f"--init {args.init} is not a finished SFT run directory (it needs {ckpt.CONFIG_FILE} and "
                 f"checkpoints/step_N) nor one of its checkpoints: run recast-sft --run-dir {args.init} first")
    cfg = load_config(args.config or init_cfg, args.overrides)
    rank, world = 0, 1
    if args.distributed:
        from recast_ms.runtime import require_device, resolve_device
        from recast_ms.trainer.distributed import init_data_parallel

        device = resolve_device(cfg.runtime.device_target)[0]
        require_device(device)  # before communication init tries to load the device
        rank, world = init_data_parallel(device)
    run_dir = args.run_dir
    trainer = RLTrainer(cfg, run_dir, init_ckpt, os.path.join(sft_dir, "tokenizer"), rank=rank, world_size=world)
    hist = trainer.train(resume=not args.fresh, evaluate=not args.no_eval, overwrite=args.overwrite)
    if rank == 0 and hist:
        last = {k: v for k, v in hist[-1].items() if not k.startswith("timing")}
        print(json.dumps(last))
    if args.distributed:
        # every rank writes a parameter checksum so a launcher (or test) can check the ranks stayed in sync
        import numpy as np

        digest = float(sum(np.abs(p.asnumpy()).sum() for p in trainer.model.trainable_params()))
        with open(os.path.join(run_dir, f"param_checksum_rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world": world, "step": trainer.step_idx, "checksum": digest,
                       "last_step_prompts": [int(i) for i in trainer.last_prompt_index]}, f)


if __name__ == "__main__":
    main()
