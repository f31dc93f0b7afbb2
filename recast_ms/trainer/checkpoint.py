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
run's checkpoints and files before it saves anything, so ``latest_checkpoint`` (resume, ``--init``,
evaluation) can never pick up another run's weights; it removes only what a recast_ms run wrote, known
by content (a checkpoint's meta.json, the run marker ``.recast_run.json`` listing the files a run
writes), and refuses anything else in the way unless told to overwrite. ``config.yaml`` is written only
once the run's data and model were built, and (on resume) after the stored config was checked against
the given one. One run at a time (``hold_run_dir``): the writing process holds ``<run>/.lock``, and
Ctrl-C / SIGTERM end a run with one line naming the checkpoint a rerun resumes from.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from recast_ms.utils.interrupt import RunInterrupted

from recast_ms.config import ConfigError  # printed by every command as one line, exit 2

PathLike = Union[str, os.PathLike]
META_KEY = "__recast_meta__"  # JSON string stored inside our .ckpt files
FORMAT_KEY = "__recast_format__"
CKPT_FORMAT = "recast_ms.weights/1"  # the value files written before this module held the format carry
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^\.step_\d+\.")  # a save killed mid-write
CONFIG_FILE = "config.yaml"
PHASES = ("sft", "rl")  # meta.json "phase" of the training states this project writes
RUN_MARKER = ".recast_run.json"  # project, run id and the names a run wrote: what a later run may remove
LOCK_FILE = ".lock"

logger = logging.getLogger(__name__)


@contextmanager
def atomic_dir(final: str, prefix: str):
    """Yield a fresh temporary directory beside ``final``; on a clean exit it replaces ``final`` by one rename, on
    any exception (a kill's KeyboardInterrupt included) it is removed, so ``final`` is never half written."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune(ckpt_root: str, step: int, keep: int) -> None:
    """Keep the newest ``keep`` step directories up to ``step`` (never prune past the run's own step)."""
    older = [(s, p) for s, p in _list(ckpt_root) if s <= step]
    for _, path in older[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def save_state(run_dir: str, step: int, tensors: Dict[str, np.ndarray], meta: dict, keep: int = 2) -> str:
    ckpt_root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(ckpt_root, f"step_{step}")
    with atomic_dir(final, prefix=f".step_{step}.") as tmp:
        save_checkpoint(tensors, os.path.join(tmp, "state.ckpt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": int(step), **meta}, f)
    prune(ckpt_root, step, keep)
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
    (otherwise the run would fail at its first save), or when ``run_dir`` is part of the project's source."""
    for path in (run_dir, os.path.join(run_dir, "checkpoints")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a directory: the run cannot save checkpoints there")
    why = _source_tree(run_dir)
    if why:
        raise ConfigError(f"--run-dir {run_dir}: {why}; a run writes checkpoints and logs there, so choose a "
                          f"directory outside the source (e.g. runs/NAME, which git ignores)")


def _source_tree(path: str) -> Optional[str]:
    """Why ``path`` is part of this project's source (the run would write into it), or None."""
    real = os.path.realpath(path)
    if os.path.isfile(os.path.join(real, "recast_ms", "__init__.py")):
        return "it holds the recast_ms package"
    try:
        with open(os.path.join(real, "pyproject.toml")) as f:
            if re.search(r"""^name\s*=\s*["']recast[_-]ms["']""", f.read(), re.M):
                return "it holds recast_ms's pyproject.toml"
    except OSError:
        pass
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if real == package or real.startswith(package + os.sep):
        return f"it is inside the installed package {package}"
    source = os.path.dirname(package)
    if real.startswith(source + os.sep) and os.path.exists(os.path.join(source, ".git")):
        import subprocess

        try:  # exit 0: ignored (runs/, output/), 1: a path git would track; the separator marks a directory
            ignored = subprocess.run(["git", "-C", source, "check-ignore", "-q", real + os.sep],
                                     capture_output=True).returncode
        except OSError:  # no git: the path checks above still hold
            return None
        if ignored == 1:
            return f"it is inside the git tree {source} and not git-ignored"
    return None


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


def _names(directory: str) -> List[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _is_our_state(path: str, step: int) -> bool:
    """A ``step_N`` directory this project wrote: its meta.json names a phase of ours and step N."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("phase") in PHASES and meta.get("step") == step


def _read_marker(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, RUN_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and marker.get("project") == "recast_ms" else {}


def _in_the_way(run_dir: str, outputs) -> List[Tuple[str, bool]]:
    """``(name, ours)`` of what a new run in ``run_dir`` would overwrite or mix with. Ours means a run of this
    project wrote it, known by content: checkpoint meta.json, or the run marker listing the name."""
    wrote = set(_read_marker(run_dir).get("wrote", []))
    found = [(name, name in wrote) for name in (CONFIG_FILE, *outputs)
             if os.path.lexists(os.path.join(run_dir, name))]
    root = os.path.join(run_dir, "checkpoints")
    for name in _names(root):
        m = _STEP_RE.match(name)
        if m:
            found.append((f"checkpoints/{name}", _is_our_state(os.path.join(root, name), int(m.group(1)))))
        elif _TMP_RE.match(name):  # a save killed mid-write: ours by name and place
            found.append((f"checkpoints/{name}", True))
    return found


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def claim_run_dir(run_dir: str, cfg, resumed: bool, *, outputs=(), overwrite: bool = False) -> None:
    """Make ``run_dir`` this run's. A run that does not resume first removes what an earlier run of this
    project left there (else pruning by step number would delete the new run's own checkpoints, the old
    ``step_N`` would stay "latest", old curves would mix with the new); anything else in the way is an error
    naming it unless ``overwrite``. ``outputs`` names what the run writes besides ``config.yaml`` and
    ``checkpoints/`` (metrics, ``tb``, ...). A resumed run removes only half-written saves. Then the run
    marker and ``config.yaml`` are written. Call after data and model were built and before the first save."""
    from recast_ms.config import save_config

    os.makedirs(run_dir, exist_ok=True)
    if resumed:
        doomed = [(f"checkpoints/{n}", True) for n in _names(os.path.join(run_dir, "checkpoints")) if _TMP_RE.match(n)]
    else:
        doomed = _in_the_way(run_dir, outputs)
    foreign = [name for name, ours in doomed if not ours]
    if foreign and not overwrite:
        raise ConfigError(f"{run_dir}: a new run would overwrite {', '.join(foreign)}, which no recast_ms run "
                          f"wrote there; move it away, use another --run-dir, or pass --overwrite")
    for name, _ in doomed:
        _remove(os.path.join(run_dir, name))
    if doomed:
        logger.warning("%s: %s; removed %s", run_dir, "resuming" if resumed else "a new run starts here",
                       [name for name, _ in doomed])
    old = _read_marker(run_dir) if resumed else {}
    marker = {"project": "recast_ms", "run_id": old.get("run_id") or uuid.uuid4().hex,
              "started": old.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "wrote": sorted(set(old.get("wrote", [])) | {CONFIG_FILE, *outputs})}
    tmp = os.path.join(run_dir, RUN_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f)
    os.replace(tmp, os.path.join(run_dir, RUN_MARKER))
    save_config(cfg, os.path.join(run_dir, CONFIG_FILE))


class RunDirBusy(ConfigError):
    """Another live run holds the run directory's lock."""


def _lock(run_dir: str) -> Tuple[int, str]:
    """Take ``<run_dir>/.lock`` (flock: the kernel drops it when its process dies, so a killed run's leftover
    file never blocks a resume) and write the holder into it for the next run's error."""
    import fcntl

    path = os.path.join(run_dir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not written its pid yet"
            os.close(fd)
            raise RunDirBusy(f"{run_dir} is in use by {holder} ({path}): stop that run or use another "
                             f"--run-dir") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # a finishing run removed the file between our open and flock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd, path


@contextmanager
def hold_run_dir(run_dir: str, *, writer: bool = True):
    """Hold ``run_dir`` for one run: the writing process (``writer``; under msrun rank 0, so data-parallel
    ranks never lock each other out) takes its lock, and a second run is refused with
    :class:`RunDirBusy` naming the holder's pid. SIGINT / SIGTERM print one line (the step reached and the
    checkpoint a rerun resumes from) and exit 130 / 143. Yields an object whose ``step`` the loop keeps at
    its number of finished steps. Call after :func:`check_run_dir`."""
    import signal
    import threading

    held = SimpleNamespace(step=None)
    os.makedirs(run_dir, exist_ok=True)
    lock = _lock(run_dir) if writer else None

    def interrupted(signum, frame):
        raise RunInterrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT of a background job: stays ignored
                previous[sig] = signal.signal(sig, interrupted)
    try:
        yield held
    except RunInterrupted as e:
        signum = e.args[0]
        where = latest_checkpoint(run_dir)
        at = "while starting up" if held.step is None else f"at step {held.step}"
        print(f"{run_dir}: interrupted by {signal.Signals(signum).name} {at}; a rerun without --fresh resumes "
              f"{'from ' + where if where else 'from scratch'}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if lock is not None:
            fd, path = lock
            try:
                os.unlink(path)  # while still locked: a run that opened it meanwhile retries on the new file
            except FileNotFoundError:
                pass
            os.close(fd)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = _list(os.path.join(run_dir, "checkpoints"))
    return found[-1][1] if found else None


def checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """``(step, dir)`` of every complete checkpoint a run kept, by step."""
    return _list(os.path.join(run_dir, "checkpoints"))


def resolve_init(path: str) -> Tuple[str, Optional[str]]:
    """``(run dir, checkpoint)`` an RL ``--init`` names: a run directory (its newest checkpoint), or one of its
    saved ``checkpoints/step_N`` (that one: a start chosen among a run's checkpoints, e.g. by a valid metric);
    the checkpoint is None when there is none."""
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    if _STEP_RE.match(os.path.basename(path)) and os.path.basename(parent) == "checkpoints":
        ok = os.path.exists(os.path.join(path, "meta.json"))
        return os.path.dirname(parent), path if ok else None
    return path, latest_checkpoint(path)


def load_state(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """``(tensors, meta)`` of a checkpoint directory; a corrupt file is an error naming it. A sharded step
    (``recast_ms.trainer.sharded_checkpoint``) gives its merged model weights."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: meta.json unreadable ({type(e).__name__}: {e})") from None
    if meta.get("sharded"):  # a semi-auto-parallel run's per-rank slices: merged here (weights only)
        from recast_ms.trainer.sharded_checkpoint import merged_model_tensors

        return merged_model_tensors(path), meta
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
                     init_checkpoint: Optional[str] = None, keep: int = 2) -> str:
    """Save weights and optimizer moments at ``step`` (``meta`` must carry ``phase``), after checking
    every tensor is finite (``what`` names the loop in the error: "SFT", "RL"); the newest ``keep`` stay (0 = all)."""
    from recast_ms.trainer import guard

    tensors = model_tensors(model)
    tensors.update({"optim/" + k: v for k, v in opt.state_dict().items()})
    guard.check_state(what, step, tensors, run_dir, init_checkpoint)  # never write a blown-up state
    return save_state(run_dir, step, tensors, meta, keep=keep)


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
