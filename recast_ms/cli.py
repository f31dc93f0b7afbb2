"""Shared command-line plumbing: environment settings, the :func:`command` wrapper (configuration errors as one
line, exit 2), ``--config`` + ``key=value`` overrides (every config key listed with its help in ``--help``),
logging, and a quiet console: framework chatter goes to a log file unless ``--verbose`` / ``RECAST_VERBOSE=1``."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

# MindSpore reads these when its runtime starts, so they are applied by each command's first line
# (configure_environment), not as a side effect of importing a module.
ENVIRONMENT = {
    # the largest CPU speed setting here: without it the runtime's queue busy-waits on one of two cores
    "MS_DEV_HOST_BLOCKING_RUN": "1",
    # MindSpore's logging (C++ and Python): errors only; --verbose lowers it to 2 (warnings, MindSpore's default).
    # Not routed to a file: its C++ logger echoes every logged warning to stderr whatever GLOG_stderrthreshold
    # says (measured with GLOG_logtostderr=0, thresholds 1 to 4: the graph compiler's warnings still printed)
    "GLOG_v": "3",
    # MindFormers writes its log files under $LOCAL_DEFAULT_PATH (default ./output); keep them out of the cwd
    "LOCAL_DEFAULT_PATH": os.path.join(os.path.expanduser("~"), ".cache", "recast_ms", "mindformers"),
}


DEFAULT_LOG_DIR = os.path.join(os.path.expanduser("~"), ".cache", "recast_ms", "logs")
FRAMEWORK_LOG = "framework.log"  # MindFormers' console lines
_framework_log = {"path": None, "stream": None}


def verbose() -> bool:
    return os.environ.get("RECAST_VERBOSE", "") not in ("", "0")


def configure_environment() -> None:
    """Apply :data:`ENVIRONMENT` (values already set by the user win) and route framework logs to
    :data:`DEFAULT_LOG_DIR` until a command names its run directory. Call before MindSpore is imported."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    route_framework_logs(DEFAULT_LOG_DIR)
    if "mindspore" in sys.modules and os.environ.get("MS_DEV_HOST_BLOCKING_RUN") != "1":
        logging.getLogger("recast_ms").warning("MindSpore was imported before configure_environment(): "
                                               "MS_DEV_HOST_BLOCKING_RUN may not take effect")


def command(main):
    """Wrap a console command's ``main``: apply the environment first, and print a
    :class:`recast_ms.config.ConfigError` (a bad key, type or value, a config file, a runtime or memory plan, a
    missing device) as one line naming it, exit 2. Any other exception keeps its traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        configure_environment()  # before MindSpore starts its runtime
        from recast_ms.utils.interrupt import route_sigint

        route_sigint()  # before numpy / MindSpore start threads: Ctrl-C stays SIGINT (exit 130, not 143)
        from recast_ms.config import ConfigError

        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
            print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    return run


def base_parser(description: str) -> argparse.ArgumentParser:
    from recast_ms.config import config_help

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys (YAML sections or key=value overrides):\n" + config_help())
    p.add_argument("--config", default=None, help="run YAML (default: the embedded synthetic defaults)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. rl.group_size=32 sft.steps=100 (keys below)")
    add_verbose(p)
    return p


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show MindSpore / MindFormers logs on the console (RECAST_VERBOSE=1 does the same); by "
                        f"default they go to <run dir>/logs/ (or {DEFAULT_LOG_DIR})")


def setup_logging(verbose_flag: bool = False, run_dir: str = None):
    """The project's INFO lines on stderr; framework logs to ``<run_dir>/logs`` (``verbose_flag``: the console,
    inherited by the processes this one starts)."""
    if verbose_flag:
        os.environ["RECAST_VERBOSE"] = "1"
    route_framework_logs(os.path.join(run_dir, "logs") if run_dir else DEFAULT_LOG_DIR)
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("recast_ms").setLevel(logging.INFO)


def quiet_mindformers():
    """MindFormers logs each model build (a full config table) at INFO through loggers named
    ``mindformers<log path>``; keep them to errors (all of it with ``--verbose``). Call after mindformers is
    imported."""
    if verbose():
        return
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("mindformers") and isinstance(lg, logging.Logger):
            lg.setLevel(logging.ERROR)


class _RoutedLogger(logging.Logger):
    """MindFormers builds its logger on first use (even while being imported: "Import PyNative... failed: No
    module named 'hyper_parallel'", twice per process) with a console handler on stdout and
    ``propagate=False``; a console handler added to a ``mindformers*`` logger writes to the framework log."""

    def addHandler(self, hdlr):
        if self.name.startswith("mindformers"):
            _to_framework_log(hdlr)
        super().addHandler(hdlr)


def _to_framework_log(handler: logging.Handler) -> None:
    console = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    if _framework_log["path"] and not isinstance(handler, logging.FileHandler) \
            and (getattr(handler, "stream", None) in console or getattr(handler, "recast_routed", False)):
        if _framework_log["stream"] is None:
            os.makedirs(os.path.dirname(_framework_log["path"]), exist_ok=True)
            _framework_log["stream"] = open(_framework_log["path"], "a", buffering=1, encoding="utf-8")
        handler.setStream(_framework_log["stream"])
        handler.recast_routed = True


def route_framework_logs(log_dir: str) -> None:
    """Keep framework chatter off the console (it says nothing about the user's run): MindFormers' console lines
    go to ``log_dir/framework.log`` (created on the first line), MindSpore logs errors only (``GLOG_v=3``).
    With ``RECAST_VERBOSE=1`` everything stays on the console and MindSpore logs warnings too (if MindSpore is
    not imported yet: it reads ``GLOG_v`` once)."""
    if verbose():
        if os.environ.get("GLOG_v") == ENVIRONMENT["GLOG_v"]:
            os.environ["GLOG_v"] = "2"
        _framework_log["path"] = None
        return
    if _framework_log["path"] != os.path.join(log_dir, FRAMEWORK_LOG):
        _framework_log.update(path=os.path.join(log_dir, FRAMEWORK_LOG), stream=None)
    if not issubclass(logging.getLoggerClass(), _RoutedLogger):
        logging.setLoggerClass(_RoutedLogger)
    for name, lg in list(logging.root.manager.loggerDict.items()):  # created before this call
        if name.startswith("mindformers") and isinstance(lg, logging.Logger):
            for handler in lg.handlers:
                _to_framework_log(handler)
