"""Sharded checkpoints of semi-auto-parallel runs (Ascend TP / PP / optimizer parallel): every rank writes its own
slices with its strategy file; MindSpore's checkpoint transformation merges them into one full checkpoint (for
``recast-eval`` on one device or CPU) or re-slices them for another layout; a full checkpoint (an SFT run's, a
Hugging Face import) gives each rank only its slices.

Layout of one step (``<run>/checkpoints/step_<N>/``, the local path's directory name, so ``latest_checkpoint``,
``--init`` and resume find it the same way)::

    rank_<r>/state_<r>.ckpt   this rank's slices: weights, AdamW moments, step counters (MindSpore .ckpt)
    rank_<r>/strategy.ckpt    the layout those slices follow (the actor update graph's strategy file)
    rank_<r>/meta.json        {"step", "rank", "world_size", ...}
    meta.json                 written by rank 0 after its own rank directory: marks the step as ours

Each ``rank_<r>`` is written under a temporary name and renamed into place, so a kill never leaves a half slice
under the final name. Under a pipeline the strategy files differ per stage: :func:`merged_strategy` merges them
(``mindspore.merge_pipeline_strategys``) before a transformation.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from typing import Dict, Iterable, Optional

import numpy as np

STATE = "state_{rank}.ckpt"
STRATEGY = "strategy.ckpt"
META = "meta.json"


def rank_dir(step_dir: str, rank: int) -> str:
    return os.path.join(step_dir, f"rank_{rank}")


def strategy_file(run_dir: str, rank: int) -> str:
    """Where a run's rank ``rank`` keeps the strategy file of its actor update graph."""
    return os.path.join(run_dir, "strategy", f"train_rank_{rank}.ckpt")


def save_rank_state(run_dir: str, step: int, cell, meta: dict, rank: int, world_size: Optional[int] = None,
                    keep: int = 2) -> str:
    """Write this rank's slices of ``cell``'s parameters (the train cell: weights and optimizer state) at ``step``."""
    import mindspore as ms
    from mindspore.communication import get_group_size

    from recast_ms.trainer.checkpoint import atomic_dir, prune  # pylint: disable=import-outside-toplevel

    world = world_size or (get_group_size() if _comm_ready() else 1)
    step_dir = os.path.join(run_dir, "checkpoints", f"step_{step}")
    final = rank_dir(step_dir, rank)
    with atomic_dir(final, prefix=f".rank_{rank}.") as tmp:
        ms.save_checkpoint(cell, os.path.join(tmp, STATE.format(rank=rank)))
        src = strategy_file(run_dir, rank)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(tmp, STRATEGY))
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump({"step": int(step), "rank": int(rank), "world_size": int(world), **meta}, f)
    if rank == 0:
        with open(os.path.join(step_dir, META), "w", encoding="utf-8") as f:
            json.dump({"step": int(step), "world_size": int(world), "sharded": True, **meta}, f)
        prune(os.path.join(run_dir, "checkpoints"), step, keep)
    return final


def _comm_ready() -> bool:
    try:
        from mindspore.communication import GlobalComm

        return bool(GlobalComm.INITED)
    except ImportError:
        return False


def load_rank_state(step_dir: str, cell, rank: Optional[int] = None) -> dict:
    """Load this rank's slices into ``cell`` (the same layout); returns the step's meta. A different layout is
    first re-sliced with :func:`transform`."""
    import mindspore as ms
    from mindspore.communication import get_rank

    rank = (get_rank() if _comm_ready() else 0) if rank is None else rank
    rdir = rank_dir(step_dir, rank)
    path = os.path.join(rdir, STATE.format(rank=rank))
    if not os.path.exists(path):
        raise FileNotFoundError(f"sharded checkpoint {step_dir}: no slices for rank {rank} ({path}); a checkpoint "
                                "of another layout must be transformed first (recast_ms.trainer.sharded_checkpoint)")
    ms.load_param_into_net(cell, ms.load_checkpoint(path), strict_load=False)
    with open(os.path.join(rdir, META), encoding="utf-8") as f:
        return json.load(f)


def merged_strategy(step_dir: str, out_file: str) -> str:
    """One strategy file for every rank of ``step_dir``: a rank's own when all ranks share a layout (no pipeline),
    else MindSpore's merge of the per-stage files."""
    import mindspore as ms

    files = sorted(glob.glob(os.path.join(step_dir, "rank_*", STRATEGY)))
    if not files:
        raise FileNotFoundError(f"{step_dir}: no rank_*/{STRATEGY} (not a sharded checkpoint)")
    with open(files[0], "rb") as f:
        first = f.read()
    if all(open(p, "rb").read() == first for p in files[1:]):  # pylint: disable=consider-using-with
        shutil.copyfile(files[0], out_file)
        return out_file
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(files):
            shutil.copyfile(p, os.path.join(tmp, f"strategy_{i}.ckpt"))
        ms.merge_pipeline_strategys(tmp, out_file)
    return out_file


def transform(src_step_dir: str, dst_dir: str, dst_strategy_file: Optional[str] = None, prefix: str = "state_") -> str:
    """Re-slice the checkpoint of ``src_step_dir`` with MindSpore's ``transform_checkpoints``: onto the layout of
    ``dst_strategy_file`` (``dst_dir/rank_<r>/<prefix><r>.ckpt`` per destination rank), or, with None, merged
    into one full checkpoint ``dst_dir/rank_0/<prefix>0.ckpt``. Returns ``dst_dir``."""
    import mindspore as ms

    os.makedirs(dst_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src_strategy = merged_strategy(src_step_dir, os.path.join(tmp, "src_strategy.ckpt"))
        # transform_checkpoints reads every file of each rank_<r>/: give it the slices only
        src = os.path.join(tmp, "src")
        for rdir in sorted(glob.glob(os.path.join(src_step_dir, "rank_*"))):
            os.makedirs(os.path.join(src, os.path.basename(rdir)))
            for ck in glob.glob(os.path.join(rdir, "state_*.ckpt")):
                os.symlink(os.path.abspath(ck), os.path.join(src, os.path.basename(rdir), os.path.basename(ck)))
        ms.transform_checkpoints(src, dst_dir, prefix, src_strategy_file=src_strategy,
                                 dst_strategy_file=dst_strategy_file)
    return dst_dir


def merge(src_step_dir: str, out_file: str) -> Dict[str, np.ndarray]:
    """The full tensors of a sharded checkpoint, also written to ``out_file`` (a MindSpore .ckpt)."""
    import mindspore as ms

    with tempfile.TemporaryDirectory() as tmp:
        transform(src_step_dir, tmp)
        files = glob.glob(os.path.join(tmp, "rank_0", "*.ckpt"))
        if len(files) != 1:
            raise RuntimeError(f"merging {src_step_dir}: expected one merged file, got {files}")
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        shutil.copyfile(files[0], out_file)
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(out_file).items()}


# the top-level modules of MindFormers' GPTModel: a merged train-cell checkpoint's model weights (the rest are
# AdamW moments, step counters, the RL statistics buffer)
MODEL_ROOTS = ("embedding", "decoder", "output_layer")


def merged_model_tensors(step_dir: str) -> Dict[str, np.ndarray]:
    """The full model weights of a sharded step, named as the project's own checkpoints name them (``model/...``),
    so ``recast-eval`` and ``--init`` read a sharded step like any other (merged on this host, whole)."""
    with tempfile.TemporaryDirectory() as tmp:
        full = merge(step_dir, os.path.join(tmp, "merged.ckpt"))
    out = {"model/" + k: v for k, v in full.items() if k.split(".")[0] in MODEL_ROOTS}
    if not out:
        raise RuntimeError(f"{step_dir}: the merged slices hold no model weights ({sorted(full)[:5]} ...)")
    return out


def layouts(strategy: str) -> dict:
    """``{parameter: (dev_matrix, tensor_map, full_shape)}`` of a strategy file (MindSpore's own reading)."""
    import mindspore as ms

    out = {}
    for name, lay in ms.build_searched_strategy(strategy).items():
        dev = list(lay.dev_matrix[0].dim)
        tmap = list(lay.tensor_map[0].dim)
        shape = list(lay.tensor_shape[0].dim) if hasattr(lay, "tensor_shape") and len(lay.tensor_shape) else None
        out[name] = (dev, tmap, shape)
    return out


def axis_splits(dev_matrix, tensor_map, rank: int) -> list:
    """``[(parts, index)]`` per tensor axis: into how many parts (``dev_matrix``, ``tensor_map``) splits it and which
    of them ``rank`` holds (MindSpore's rule: ``tensor_map[i]`` names the device-matrix axis, counted from the right,
    that splits tensor axis ``i``; -1 = not split). Two layouts that give every rank the same splits are the same
    layout, however their device matrices are written (``[2, 2]`` or ``[2, 1, 2]``)."""
    dev = list(dev_matrix)
    coord, r = [], rank
    for size in reversed(dev):  # rank -> device-matrix coordinate (the last axis varies fastest)
        coord.append(r % size)
        r //= size
    coord = coord[::-1]
    return [(1, 0) if m == -1 else (dev[len(dev) - 1 - m], coord[len(dev) - 1 - m]) for m in tensor_map]


def slice_for_rank(full: np.ndarray, dev_matrix, tensor_map, rank: int) -> np.ndarray:
    """The slice of ``full`` that ``rank`` holds under (``dev_matrix``, ``tensor_map``) (:func:`axis_splits`)."""
    index = []
    for axis, (parts, i) in enumerate(axis_splits(dev_matrix, tensor_map, rank)):
        n = full.shape[axis] // parts
        index.append(slice(i * n, (i + 1) * n))
    return full[tuple(index)]


def write_rank_slices(full: Dict[str, np.ndarray], strategy: str, ranks: Iterable[int], step_dir: str) -> None:
    """Each of ``ranks`` gets only its slices of the ``full`` tensors (an HF import or a merged checkpoint
    going onto a layout), written as a sharded step directory with ``strategy`` as every rank's layout."""
    import mindspore as ms

    lay = layouts(strategy)
    for rank in ranks:
        rdir = rank_dir(step_dir, rank)
        os.makedirs(rdir, exist_ok=True)
        items = []
        for name, value in full.items():
            if name in lay:
                dev, tmap, _ = lay[name]
                value = slice_for_rank(value, dev, tmap, rank)
            items.append({"name": name, "data": ms.Tensor(np.ascontiguousarray(value))})
        ms.save_checkpoint(items, os.path.join(rdir, STATE.format(rank=rank)))
        shutil.copyfile(strategy, os.path.join(rdir, STRATEGY))


def load_slices(params, layouts: dict, sources, rank: int, *, strip: str = "") -> int:
    """Give each parameter of a compiled semi-auto-parallel graph only its slice, read one full tensor at a time.

    ``params``: ``{name: Parameter}`` after the graph compiled (MindSpore then holds each parameter at its slice
    shape); ``layouts``: that graph's ``parameter_layout_dict``; ``sources``: ``{name: (make, origin)}`` whose
    ``make()`` reads one full tensor (``recast_ms.models.weights.hf_sources``: a memory-mapped Hugging Face
    checkpoint); a parameter's source name is its own with the prefix ``strip`` removed (the reference model's
    ``ref.``). The slice is MindSpore's own (``_load_tensor_by_layout``, what the framework does to a full
    parameter when a graph compiles, optimizer-parallel split included), so a rank's host never holds more than
    one full tensor beside its slices. Every name is checked before anything is read, every slice's shape before
    it is set. Returns how many parameters were set."""
    import mindspore as ms
    from mindspore.parallel._tensor import _load_tensor_by_layout

    from recast_ms.models.weights import CheckpointError, _check_names

    wanted = {name: name[len(strip):] if strip and name.startswith(strip) else name for name in params}
    # the check every weight load makes (weights.set_parameters); the checkpoint may hold more than this rank uses
    _check_names("checkpoint", list(wanted.values()), sources, False, "no tensor for model parameter(s) ", "")
    for name, param in params.items():
        make, origin = sources[wanted[name]]
        array = make()
        lay = layouts.get(name)
        want = tuple(lay[6]) if lay is not None and len(lay) > 6 and len(lay[6]) else tuple(param.shape)
        if tuple(array.shape) != want:
            raise CheckpointError(f"{origin or wanted[name]}: tensor for {name!r} has shape {list(array.shape)}, "
                                  f"the model needs {list(want)}")
        full = ms.Tensor(np.ascontiguousarray(array))
        piece = _load_tensor_by_layout(full, tuple(lay), rank) if lay is not None else full
        piece = piece.asnumpy() if hasattr(piece, "asnumpy") else np.asarray(piece)
        if tuple(piece.shape) != tuple(param.shape):
            raise CheckpointError(f"{origin or wanted[name]}: rank {rank}'s slice of {name!r} has shape "
                                  f"{list(piece.shape)}, the compiled graph holds {list(param.shape)}")
        param.set_data(ms.Tensor(np.ascontiguousarray(piece), param.dtype), param.sliced)
        if getattr(param, "init_param", True) is False:  # as load_param_into_net does for no_init_parameters
            param.init_param = True
    return len(params)


def is_sharded_step(path: str) -> bool:
    """Whether ``path`` is a step directory of per-rank slices (rank 0's ``meta.json`` marks it ``sharded``)."""
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            return bool(json.load(f).get("sharded"))
    except (OSError, ValueError):
        return False


def load_rank_model_slices(params, compiled_layouts: dict, step_dir: str, rank: int, *, strip: str = "") -> int:
    """Give each parameter of a compiled semi-auto-parallel graph the slice rank ``rank`` saved in ``step_dir`` (a
    run on the same layout, e.g. the SFT run an RL run starts from): model weights only, no host ever holding a
    whole tensor. ``params``, ``compiled_layouts`` (the graph's ``parameter_layout_dict``) and ``strip`` as
    :func:`load_slices`. The saved layout of every parameter must be the compiled one (the strategy file saved
    beside the slices); a step of another layout is refused, naming :func:`transform`. Where optimizer parallel
    splits a parameter once more over its group and the saved slice is the whole model-parallel slice (MindSpore's
    integrated save), this rank's part is cut from it along the first axis. Returns how many parameters were set."""
    import mindspore as ms

    from recast_ms.models.weights import CheckpointError, _check_names

    rdir = rank_dir(step_dir, rank)
    state, strategy = os.path.join(rdir, STATE.format(rank=rank)), os.path.join(rdir, STRATEGY)
    if not os.path.exists(state):
        raise CheckpointError(f"sharded checkpoint {step_dir}: no slices for rank {rank} ({state}); a step of "
                              "another world size must be transformed first (sharded_checkpoint.transform)")
    saved_layouts = layouts(strategy) if os.path.exists(strategy) else {}
    wanted = {name: name[len(strip):] if strip and name.startswith(strip) else name for name in params}
    saved = ms.load_checkpoint(state, choice_func=lambda n: n in set(wanted.values()))
    _check_names(state, list(wanted.values()), saved, False, "no slice for model parameter(s) ", "")
    for name, param in params.items():
        src = wanted[name]
        lay = compiled_layouts.get(name)
        if lay is not None and src in saved_layouts:
            dev, tmap, _ = saved_layouts[src]
            if axis_splits(dev, tmap, rank) != axis_splits(lay[0], lay[1], rank):
                raise CheckpointError(
                    f"{step_dir}: {src!r} was saved under device matrix {dev} / tensor map {tmap}, this graph "
                    f"holds it as {list(lay[0])} / {list(lay[1])}: transform the step onto this layout first "
                    "(recast_ms.trainer.sharded_checkpoint.transform) or start from its merged checkpoint")
        piece = saved[src].asnumpy()
        if tuple(piece.shape) != tuple(param.shape) and lay is not None and len(lay) > 5 and lay[5]:
            from mindspore.communication import get_group_size, get_rank

            piece = np.split(piece, get_group_size(lay[5]), axis=0)[get_rank(lay[5])]
        if tuple(piece.shape) != tuple(param.shape):
            raise CheckpointError(f"{state}: the slice of {src!r} has shape {list(piece.shape)}, the compiled graph "
                                  f"holds {list(param.shape)}: saved on another layout (transform it first)")
        param.set_data(ms.Tensor(np.ascontiguousarray(piece), param.dtype), param.sliced)
        if getattr(param, "init_param", True) is False:
            param.init_param = True
    return len(params)
