"""Supervised warm start: ``recast-sft --run-dir runs/sft [--config cfg.yaml] [key=value ...]``.

Resumes from the newest checkpoint in ``--run-dir`` (its stored config must agree in shape-relevant
keys) unless ``--fresh``, which starts a new run there and removes the earlier run's checkpoints. Under
msrun (``scripts/launch_msrun.sh --script scripts/sft.py``) pass ``--distributed``: ``sft.batch_size`` is
the global batch, split over the ranks; rank 0 writes the run directory.
"""
from recast_ms.cli import base_parser, command, quiet_mindformers, setup_logging


@command  # environment first; configuration errors as one line, exit 2
def main():
    p = base_parser(__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: removes the earlier checkpoints of --run-dir before the first save")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace files in --run-dir that no recast_ms run wrote (else: an error)")
    p.add_argument("--distributed", action="store_true", help="initialise MindSpore communication (msrun)")
    args = p.parse_args()
    setup_logging(args.verbose, args.run_dir)
    from recast_ms.config import load_config
    from recast_ms.trainer.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    quiet_mindformers()
    rank, world = 0, 1
    if args.distributed:
        from recast_ms.runtime import require_device, resolve_device
        from recast_ms.trainer.distributed import init_data_parallel

        device = resolve_device(cfg.runtime.device_target)[0]
        require_device(device)  # before communication init tries to load the device
        rank, world = init_data_parallel(device)
    m = run_sft(cfg, args.run_dir, resume=not args.fresh, overwrite=args.overwrite, rank=rank, world_size=world)
    if rank == 0:
        print({k: round(v, 4) for k, v in m.items()})


if __name__ == "__main__":
    main()
