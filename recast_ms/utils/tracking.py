"""Metrics tracking: slash-namespaced scalars to JSONL + TensorBoard event files, stage timers, memory."""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (monotonic: compare across processes)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class StageTimer:
    """``with timer("rollout"): ...`` accumulates wall seconds under ``timing_s/rollout`` and records the
    resident memory at the stage's end under ``memory_mb/rollout``. On the CPU backend a compiled graph keeps
    the memory of its first run, so the growth from one stage's figure to the next is what that stage holds."""

    def __init__(self):
        self.times: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"timing_s/{name}"
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0
            self.times[f"memory_mb/{name}"] = current_rss_mb()

    def pop(self) -> Dict[str, float]:
        out, self.times = self.times, {}
        return out


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    The JSONL file is flushed every step, so a killed run loses nothing already logged; on resume
    rows past the resumed step are dropped so curves never double up.
    """

    def __init__(self, out_dir: str, resume_step: Optional[int] = None, tensorboard: bool = True, filename: str = "metrics.jsonl"):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, filename)
        if resume_step is not None and os.path.exists(self.path):
            keep = [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:  # TensorBoard files are a convenience, JSONL is the record
                self._tb = None

    def log(self, step: int, metrics: Dict[str, float]):
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str):
    """The rows of a JSONL file. Its last line, unparseable and without its newline, is a write a kill cut short
    (rows are written whole, newline included): skipped with a warning. Any other unparseable line is a
    :class:`recast_ms.config.ConfigError` naming the file and line (the commands print it as one line)."""
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) and not line.endswith("\n"):
                logging.getLogger(__name__).warning("%s: line %d is cut short (a run stopped mid-write); skipped",
                                                    path, i)
                continue
            from recast_ms.config import ConfigError

            raise ConfigError(f"{path}: line {i} is not JSON ({e}); only a last line without its newline is taken "
                              "for a cut-short write, so the file is corrupt: repair or remove it") from None
    return rows
