"""Training-state checkpoints for exact resume: weights, optimizer moments, step, data order, RNG.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding ``state.ckpt`` (a MindSpore
checkpoint with CRC: ``model/<param>`` weights and ``optim/<name>`` optimizer moments, written by
``recast_ms.models.weights.save_checkpoint``) and ``meta.json`` (step, sampler positions, RNG states).
The directory is written under a temporary name and renamed into place, so a kill mid-write never
leaves a half checkpoint that ``latest_checkpoint`` would pick up. Only the newest ``keep`` at or
below the saved step are kept: a checkpoint newer than the one just saved is never pruned.

A run directory has one owner (``claim_run_dir``): a run that does not resume removes the earlier
checkpoints before it saves anything, so ``latest_checkpoint`` (resume, ``--init``, evaluation) can
never pick up another run's weights, and ``config.yaml`` is written only once the run's data and
model were built, and (on resume) after the stored config was checked against the given one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.step_\d+\.")  # a save killed mid-write
CONFIG_FILE = "config.yaml"

logger = logging.getLogger(__name__)


def save_state(run_dir: str, step: int, tensors: Dict[str, np.ndarray], meta: dict, keep: int = 2) -> str:
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, f"step_{step}")
    tmp = tempfile.mkdtemp(prefix=f".step_{step}.", dir=ckpt_root)
    try:
        from recast_ms.models.weights import save_checkpoint

        save_checkpoint(tensors, os.path.join(tmp, "state.ckpt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": int(step), **meta}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    older = [(s, p) for s, p in _list(ckpt_root) if s <= step]  # never prune past the run's own step
    for old_step, path in older[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _list(ckpt_root: str):
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = _STEP_RE.match(name)
        if m and os.path.exists(os.path.join(ckpt_root, name, "meta.json")):
            out.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return sorted(out)


def check_run_dir(run_dir: str) -> None:
    """Fail before any work when ``run_dir`` or ``<run_dir>/checkpoints`` exists but is not a directory
    (otherwise the run would fail at its first save)."""
    for path in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a directory: the run cannot save checkpoints there")


def check_resume(run_dir: str, cfg, last: str, phase: str) -> None:
    """Before resuming from ``last``: it must be a ``phase`` checkpoint, and the run's stored
    ``config.yaml`` must agree with ``cfg`` in every shape-relevant key (``config.SHAPE_KEYS``)."""
    from recast_ms.config import check_compatible

    try:
        with open(os.path.join(last, "meta.json")) as f:
            found = json.load(f).get("phase")
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {last}: meta.json unreadable ({type(e).__name__}: {e})") from None
    if found != phase:
        raise ValueError(f"{last} is a {found!r} checkpoint, not {phase!r}: {run_dir} belongs to another kind of run "
                         f"(use another --run-dir)")
    stored = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(stored):
        check_compatible(stored, cfg, f"run {run_dir}")


def clear_checkpoints(run_dir: str) -> List[str]:
    """Remove every checkpoint (and half-written one) of ``run_dir``; returns the removed names."""
    root = os.path.join(run_dir, "checkpoints")
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if _STEP_RE.match(name) or _TMP_RE.match(name):
            shutil.rmtree(os.path.join(root, name))
            removed.append(name)
    return removed


def claim_run_dir(run_dir: str, cfg, resumed: bool) -> None:
    """Make ``run_dir`` this run's: a run that does not resume first removes the checkpoints left by an
    earlier one (else pruning by step number would delete the new run's own, and the old ``step_N``
    would stay "latest"); then ``config.yaml`` is written. Call after data and model were built and
    before the first save."""
    from recast_ms.config import save_config

    os.makedirs(run_dir, exist_ok=True)
    if not resumed:
        removed = clear_checkpoints(run_dir)
        if os.path.isdir(os.path.join(run_dir, "tb")):  # the old run's TensorBoard curves would mix with the new
            shutil.rmtree(os.path.join(run_dir, "tb"))
            removed.append("tb")
        if removed:
            logger.warning("%s: a new run starts here; removed the earlier run's %s", run_dir, removed)
    save_config(cfg, os.path.join(run_dir, CONFIG_FILE))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = _list(os.path.join(run_dir, "checkpoints"))
    return found[-1][1] if found else None


def load_state(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """``(tensors, meta)`` of a checkpoint directory; a corrupt file is an error naming it."""
    from recast_ms.models.weights import read_checkpoint

    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: meta.json unreadable ({type(e).__name__}: {e})") from None
    tensors, _ = read_checkpoint(os.path.join(path, "state.ckpt"))
    return tensors, meta


def model_tensors(model, prefix: str = "model/") -> Dict[str, np.ndarray]:
    return {prefix + p.name: p.asnumpy() for p in model.get_parameters()}


def restore_model(model, tensors: Dict[str, np.ndarray], prefix: str = "model/", path: str = "checkpoint") -> None:
    """Load the ``prefix``-ed weights of a training state into ``model``. Every name and shape is checked
    before anything is set; a mismatch raises ``weights.CheckpointError`` naming ``path`` and the tensor."""
    from recast_ms.models.weights import set_parameters

    arrays = {k[len(prefix):]: (v, "") for k, v in tensors.items() if k.startswith(prefix)}
    set_parameters(model, arrays, path, strict=True)


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
