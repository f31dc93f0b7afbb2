"""Shared command-line plumbing: environment settings, ``--config`` + ``key=value`` overrides (every config
key listed with its help in ``--help``), logging, quiet MindFormers."""
from __future__ import annotations

import argparse
import logging
import os
import sys

# MindSpore reads these when its runtime starts, so they are applied by each command's first line
# (configure_environment), not as a side effect of importing a module.
ENVIRONMENT = {
    # the largest CPU speed setting here: without it the runtime's queue busy-waits on one of two cores
    "MS_DEV_HOST_BLOCKING_RUN": "1",
    "GLOG_v": "3",  # MindSpore's C++ logging: errors only
    # MindFormers writes its log files under $LOCAL_DEFAULT_PATH (default ./output); keep them out of the cwd
    "LOCAL_DEFAULT_PATH": os.path.join(os.path.expanduser("~"), ".cache", "recast_ms", "mindformers"),
}


def configure_environment() -> None:
    """Apply :data:`ENVIRONMENT` (values already set by the user win). Call before MindSpore is imported."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if "mindspore" in sys.modules and os.environ.get("MS_DEV_HOST_BLOCKING_RUN") != "1":
        logging.getLogger("recast_ms").warning("MindSpore was imported before configure_environment(): "
                                               "MS_DEV_HOST_BLOCKING_RUN may not take effect")


def base_parser(description: str) -> argparse.ArgumentParser:
    from recast_ms.config import config_help

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys (YAML sections or key=value overrides):\n" + config_help())
    p.add_argument("--config", default=None, help="run YAML (default: the embedded synthetic defaults)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.group_size=32 sft.steps=100 (keys below)")
    return p


def setup_logging(verbose: bool = False):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # MindFormers logs every model build as a large config table at INFO/WARNING: keep it to errors
    for name in ("mindformers",):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("recast_ms").setLevel(logging.INFO)


def quiet_mindformers():
    """MindFormers logs each model build (a full config table) at INFO through loggers named
    ``mindformers<log path>``; keep them to errors. Call after mindformers is imported."""
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("mindformers") and isinstance(lg, logging.Logger):
            lg.setLevel(logging.ERROR)
