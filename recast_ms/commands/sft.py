"""Supervised warm start: ``recast-sft --run-dir runs/sft [--config cfg.yaml] [key=value ...]``.

Resumes from the newest checkpoint in ``--run-dir`` (its stored config must agree in shape-relevant
keys) unless ``--fresh``, which starts a new run there and removes the earlier run's checkpoints.
"""
from recast_ms.cli import base_parser, configure_environment, quiet_mindformers, setup_logging


def main():
    configure_environment()  # before MindSpore starts its runtime
    p = base_parser(__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: removes the earlier checkpoints of --run-dir before the first save")
    args = p.parse_args()
    setup_logging()
    from recast_ms.config import load_config
    from recast_ms.trainer.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    quiet_mindformers()
    m = run_sft(cfg, args.run_dir, resume=not args.fresh)
    print({k: round(v, 4) for k, v in m.items()})


if __name__ == "__main__":
    main()
