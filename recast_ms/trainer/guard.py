"""The NaN guard shared by SFT and RL: stop a run whose numbers blew up, never save a blown-up state.

Two checks, both cheap:

* every step, the loss terms and the gradient norm the step already returns (computed before the
  update, so a finite loss does not prove the updated weights are good);
* before every save, the state about to be written: every weight finite with ``|w| <= EXPLODED_ABS``
  and every optimizer moment finite. The arrays are materialised for the save anyway, so this is one
  ``max(|x|)`` pass over them (measured: ~3 ms for arrays the size of the 3.4M-parameter tiny Qwen3
  and its AdamW moments, 10.2M float32; nothing per step).

So every checkpoint on disk is good, and the error names the newest one, or says that nothing of this
run was saved and the ``--init`` checkpoint is untouched. Steps are numbered from 1 in both trainers
(the step that failed is the one whose checkpoint would be ``step_<N>``).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional

import numpy as np

from recast_ms.trainer.checkpoint import latest_checkpoint

logger = logging.getLogger(__name__)

# No weight of a working model comes near this (trained Qwen3 weights are O(1), the largest norm
# weights O(10^2)); a value above it is a blown-up update (e.g. ``rl.lr=1e30`` gives ~1e30 at step 1)
# even while it is still finite.
EXPLODED_ABS = 1e6


def last_good(run_dir: str, init: Optional[str] = None) -> str:
    """What the user can restart from: the newest checkpoint of this run (every saved one passed
    ``check_state``), else the untouched ``init`` checkpoint."""
    last = latest_checkpoint(run_dir)
    if last:
        return f"Last good checkpoint: {last}"
    if init:
        return f"No checkpoint of this run was saved yet; the --init checkpoint {init} is untouched"
    return "No checkpoint of this run was saved yet (it started from scratch)"


def check_step(phase: str, step: int, values: Dict[str, float], run_dir: str, init: Optional[str] = None) -> None:
    """``FloatingPointError`` naming each non-finite value of ``step`` (loss terms, grad norm)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        ok = {k: v for k, v in values.items() if k not in bad}
        raise FloatingPointError(
            f"{phase} step {step}: non-finite " + ", ".join(f"{k}={v}" for k, v in bad.items())
            + (" (finite: " + ", ".join(f"{k}={v:.4g}" for k, v in ok.items()) + ")" if ok else "")
            + f"; stopping, this step is not saved. {last_good(run_dir, init)}")


def check_state(phase: str, step: int, tensors: Dict[str, np.ndarray], run_dir: str,
                init: Optional[str] = None) -> None:
    """Before saving ``step``: ``FloatingPointError`` if a weight (``model/...``) is non-finite or above
    ``EXPLODED_ABS`` in magnitude, or an optimizer moment is non-finite. Nothing is written."""
    for name, v in tensors.items():
        if not v.size or not np.issubdtype(v.dtype, np.floating):
            continue
        peak = float(np.max(np.abs(v)))  # nan and inf propagate
        weight = name.startswith("model/")
        if math.isfinite(peak) and (peak <= EXPLODED_ABS or not weight):
            continue
        what = f"|w| reaches {peak:.3g} > {EXPLODED_ABS:g}" if math.isfinite(peak) else "non-finite values"
        raise FloatingPointError(
            f"{phase} step {step}: the updated state is not usable ({name}: {what}); it is not saved, stopping. "
            f"{last_good(run_dir, init)}")


def warn_if_no_update(phase: str, grad_norms) -> bool:
    """Say so when every step of a run had a zero gradient (its weights never changed); returns True then."""
    norms = [float(g) for g in grad_norms]
    if norms and all(g == 0.0 for g in norms):
        logger.warning("%s: all %d updates of this run were zero (grad norm 0 at every step): the weights did not "
                       "change. Check the learning signal (advantages, loss mask) and the sampling settings.",
                       phase, len(norms))
        return True
    return False
