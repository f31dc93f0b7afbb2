"""Data parallelism under msrun: communication init, the rank's share of a global batch, metric reduction.

One batch semantics on every backend: ``rl.prompts_per_step`` and ``sft.batch_size`` are GLOBAL per
optimizer step. Every rank draws the same seeded global order and takes its own contiguous slice
(:func:`rank_slice`: whole groups, P / DP prompts), so every prompt appears once per step across ranks;
the rollout RNG of a prompt depends on (seed, step, global prompt index) only. The optimizer cell
averages the accumulated gradients with ``AllReduce`` before clipping (each rank's loss is normalised
over its equal share, so the mean is the global batch's), every rank applies the same update and the
weights stay identical; logged metrics are averaged over ranks (:func:`mean_over_ranks`).

MindSpore and MindFormers stay in stand-alone parallel mode (no ``DATA_PARALLEL`` context, no
semi-auto parallel, lazy inline untouched): the only collectives are those ``AllReduce`` s, which work
in stand-alone mode once ``communication.init()`` has run, MCCL on CPU and HCCL on Ascend (the same
code path). Launch with ``scripts/launch_msrun.sh`` (msrun, one process per rank). ``init()`` fixes
the device with the rank's negotiated device id, so later ``set_device`` calls must not change it
(``init_runtime`` and MindFormers' context tolerate the already-set device).
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np


def init_data_parallel(device_target: str = "CPU") -> Tuple[int, int]:
    """``communication.init()`` on ``device_target`` (the run's resolved ``runtime.device_target``); returns
    (rank, world size). Comes before ``init_runtime``; under MindSpore's DryRun (``MS_SIMULATION_LEVEL``) the
    Ascend init is simulated and needs no device."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_device(device_target)
    init()
    return get_rank(), get_group_size()


def rank_slice(global_rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of one step's global rows (``len % world == 0``, checked by the plan)."""
    n = len(global_rows) // world
    return global_rows[rank * n : (rank + 1) * n]


_ALLREDUCE = None


def mean_over_ranks(metrics: Dict[str, float], world: int, sums: Iterable[str] = ()) -> Dict[str, float]:
    """``metrics`` averaged over the ranks (``sums``: summed, e.g. row counts); ``timing_s/*`` and ``perf/*``
    stay this rank's. Every rank must call it with the same keys (it is a collective)."""
    global _ALLREDUCE  # pylint: disable=global-statement
    if world == 1:
        return dict(metrics)
    import mindspore as ms
    from mindspore import nn, ops

    if _ALLREDUCE is None:
        class _Sum(nn.Cell):
            def __init__(self):
                super().__init__()
                self.op = ops.AllReduce()

            def construct(self, x):
                return self.op(x)

        _ALLREDUCE = _Sum()
    keys = sorted(k for k in metrics if not k.startswith(("timing_s/", "perf/")))
    total = _ALLREDUCE(ms.Tensor(np.array([metrics[k] for k in keys], np.float32))).asnumpy()
    sums = set(sums)
    out = dict(metrics)
    out.update({k: float(t if k in sums else t / world) for k, t in zip(keys, total)})
    return out
