"""Shared command-line plumbing: ``--config``, ``key=value`` overrides, logging, quiet MindFormers."""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")  # must precede the MindSpore runtime start
os.environ.setdefault("GLOG_v", "3")
# MindFormers writes its log files under $LOCAL_DEFAULT_PATH (default ./output); keep them out of the cwd
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(os.path.expanduser("~"), ".cache", "recast_ms", "mindformers"))


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="run YAML (default: the embedded synthetic defaults)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.group_size=32 sft.steps=100")
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
