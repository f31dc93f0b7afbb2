"""Training-state checkpoints for exact resume: weights, optimizer moments, step, data order, RNG.

A checkpoint is a directory ``<run>/checkpoints/step_<N>/`` holding ``state.ckpt`` (a MindSpore
checkpoint with CRC: ``model/<param>`` weights and ``optim/<name>`` optimizer moments, written by
``recast_ms.models.weights.save_checkpoint``) and ``meta.json`` (step, sampler positions, RNG states).
The directory is written under a temporary name and renamed into place, so a kill mid-write never
leaves a half checkpoint that ``latest_checkpoint`` would pick up. Only the newest ``keep`` are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

_STEP_RE = re.compile(r"^step_(\d+)$")


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
    for old_step, path in _list(ckpt_root)[:-keep] if keep > 0 else []:
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
