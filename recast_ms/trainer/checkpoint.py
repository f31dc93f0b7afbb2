"""The project's own checkpoints: the ``.ckpt`` file format and training states for exact resume.

File format (:func:`save_checkpoint` / :func:`read_checkpoint` / :func:`load_checkpoint`): a MindSpore
``.ckpt`` with CRC32 checks, written to a temporary file in the same directory, flushed and renamed into
place (a crash never leaves a half file under the final name), with a JSON metadata dict stored inside.

Training state (:func:`save_train_state` / :func:`load_train_state`, shared by SFT and RL): a directory
``<run>/checkpoints/step_<N>/`` holding ``state.ckpt`` (``model/<param>`` weights and ``optim/<name>``
optimizer moments) and ``meta.json`` (step, phase, and what a loop adds). Data order and RNG streams are
pure functions of (seed, rank, step) in both loops, so the step is all a resume needs.
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
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]
META_KEY = "__recast_meta__"  # JSON string stored inside our .ckpt files
FORMAT_KEY = "__recast_format__"
CKPT_FORMAT = "recast_ms.weights/1"  # the value files written before this module held the format carry
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
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: meta.json unreadable ({type(e).__name__}: {e})") from None
    tensors, _ = read_checkpoint(os.path.join(path, "state.ckpt"))
    return tensors, meta


def model_tensors(model, prefix: str = "model/") -> Dict[str, np.ndarray]:
    from recast_ms.models.weights import model_tensors as tensors_of

    return tensors_of(model, prefix)


def restore_model(model, tensors: Dict[str, np.ndarray], prefix: str = "model/", path: str = "checkpoint") -> None:
    """Load the ``prefix``-ed weights of a training state into ``model``. Every name and shape is checked
    before anything is set; a mismatch raises ``weights.CheckpointError`` naming ``path`` and the tensor."""
    from recast_ms.models.weights import set_parameters

    arrays = {k[len(prefix):]: (v, "") for k, v in tensors.items() if k.startswith(prefix)}
    set_parameters(model, arrays, path, strict=True)


def save_train_state(run_dir: str, step: int, model, opt, meta: dict, *, what: str,
                     init_checkpoint: Optional[str] = None) -> str:
    """Save weights and optimizer moments at ``step`` (``meta`` must carry ``phase``), after checking
    every tensor is finite (``what`` names the loop in the error: "SFT", "RL")."""
    from recast_ms.trainer import guard

    tensors = model_tensors(model)
    tensors.update({"optim/" + k: v for k, v in opt.state_dict().items()})
    guard.check_state(what, step, tensors, run_dir, init_checkpoint)  # never write a blown-up state
    return save_state(run_dir, step, tensors, meta)


def load_train_state(path: str, model, opt) -> dict:
    """Restore weights and optimizer moments from the training state at ``path``; returns its meta."""
    tensors, meta = load_state(path)
    restore_model(model, tensors, path=path)
    opt.load_state_dict({k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")})
    return meta


# ----------------------------------------------------------------------------- the .ckpt file format

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_ckpt_path(path: PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".ckpt":
        raise ValueError(f"{path}: MindSpore checkpoints must end in .ckpt")
    return path


def save_checkpoint(params, path: PathLike, extra: Optional[dict] = None) -> Path:
    """Save a Cell's parameters (or a ``{name: Parameter|Tensor|ndarray}`` dict, e.g. optimizer moments) to a
    MindSpore ``.ckpt`` with CRC32, atomically: written to a temporary file beside ``path``, flushed to disk,
    then renamed over ``path``. ``extra`` (JSON-serialisable: step, config, ...) is stored inside the file.
    Returns ``path``."""
    import mindspore as ms
    from mindspore import Tensor

    path = _check_ckpt_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(extra or {})  # fails before anything is written if extra is not JSON-serialisable
    named = dict(params) if isinstance(params, dict) else {p.name: p for p in params.get_parameters()}
    for reserved in (META_KEY, FORMAT_KEY):
        if reserved in named:
            raise ValueError(f"parameter name {reserved!r} is reserved")
    items = []
    for name, value in named.items():
        if isinstance(value, np.ndarray):
            value = Tensor(value)
        items.append({"name": name, "data": value})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.ckpt", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        ms.save_checkpoint(items, str(tmp), append_dict={META_KEY: meta, FORMAT_KEY: CKPT_FORMAT}, crc_check=True)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def read_checkpoint(path: PathLike) -> Tuple[Dict[str, np.ndarray], dict]:
    """``({name: array}, extra)`` of a checkpoint written by :func:`save_checkpoint` (CRC checked); a plain
    MindSpore checkpoint reads with ``extra == {}``."""
    import mindspore as ms
    from mindspore import Parameter, Tensor

    from recast_ms.models.weights import CheckpointError

    path = _check_ckpt_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        loaded = ms.load_checkpoint(str(path), crc_check=True)
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated MindSpore checkpoint ({err})") from None
    meta = loaded.pop(META_KEY, None)
    loaded.pop(FORMAT_KEY, None)
    try:
        extra = {} if meta is None else json.loads(str(meta))  # a plain MindSpore checkpoint has no metadata
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt metadata ({err})") from None
    arrays = {}
    for name, value in loaded.items():
        if not isinstance(value, (Parameter, Tensor)):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        arrays[name] = value.asnumpy()
    return arrays, extra


def load_checkpoint(params, path: PathLike, strict: bool = True) -> dict:
    """Load a :func:`save_checkpoint` file into a Cell (or ``{name: Parameter}`` dict); returns ``extra``.

    Every name and shape is checked before anything is set (``weights.set_parameters``): a parameter
    missing from the file, a tensor of the wrong shape or (``strict``) a tensor the target does not have
    raises ``CheckpointError`` naming it and the file."""
    from recast_ms.models.weights import set_parameters

    arrays, extra = read_checkpoint(path)
    set_parameters(params, {k: (v, "") for k, v in arrays.items()}, str(path), strict=strict)
    return extra
