"""Data parallelism under msrun: communication init and rank info.

Each worker rolls out its own prompts (its sampler and RNGs are seeded with the rank) and the
optimizer cell averages the accumulated gradients with ``AllReduce`` before clipping, so every
rank applies the same update and the weights stay identical.
"""
from __future__ import annotations

from typing import Tuple


def init_data_parallel() -> Tuple[int, int]:
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_device("CPU")
    init()
    return get_rank(), get_group_size()
