"""Data parallelism under msrun: communication init and rank info.

Each worker rolls out its own prompts (its sampler and RNGs are seeded with the rank) and the
optimizer cell averages the accumulated gradients with ``AllReduce`` before clipping, so every
rank applies the same update and the weights stay identical.

MindSpore and MindFormers stay in stand-alone parallel mode (no ``DATA_PARALLEL`` context, no
MindFormers ``parallel_config``, lazy inline untouched): the only collective is that ``AllReduce``,
which works in stand-alone mode once ``communication.init()`` has run. Launch with
``scripts/launch_msrun.sh`` (msrun, one process per rank). ``init()`` fixes the device with the
rank's negotiated device id, so later ``set_device`` calls must not change it (``init_runtime``
tolerates the already-set device).
"""
from __future__ import annotations

from typing import Tuple


def init_data_parallel(device_target: str = "CPU") -> Tuple[int, int]:
    """``communication.init()`` on ``device_target`` (the run's resolved ``runtime.device_target``); returns
    (rank, world size). On CPU this is the data-parallel path above. On Ascend (written, not executed here)
    the same call comes first, then ``init_runtime`` builds MindFormers' context with ``use_parallel`` and the
    semi-auto-parallel layout of the runtime plan (MindFormers' second ``init()`` only warns on Ascend)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_device(device_target)
    init()
    return get_rank(), get_group_size()
