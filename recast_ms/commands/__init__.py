"""Console commands (``pyproject.toml`` ``[project.scripts]``): recast-sft, recast-rl, recast-eval, recast-grid,
recast-main. Each ``main()`` applies the environment settings first (``recast_ms.cli.configure_environment``)."""
