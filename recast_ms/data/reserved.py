"""The reserved valid slice (issue 24): valid rows the RL sampler never draws, for selecting variants on
data neither RL training nor the test has seen.

Why valid and not train: the RL prompt pool IS the valid split (``RLTrainer`` draws its prompts from
``splits.valid``), so without a reserved slice every valid row can become an RL prompt and valid cannot
select RL variants. SFT never trains on valid rows unless ``data.valid_in_train`` (refused together with a
reserved slice, ``recast_ms.config``); its derived transitions are removed where they equal a valid triple.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


def reserve_valid(valid: Sequence, rows: int, seed: int) -> Tuple[List, List]:
    """``(rl_pool, reserved)``: ``rows`` valid samples drawn without replacement by
    ``numpy.random.default_rng(seed)``, and the rest; both in split order, disjoint, together the split.
    ``rows = 0`` reserves nothing (the pool is the whole split, the historical behaviour)."""
    valid = list(valid)
    if rows == 0:
        return valid, []
    if rows >= len(valid):
        raise ValueError(f"data.reserved_valid_rows={rows} leaves no RL prompt: the valid split has {len(valid)} rows")
    picked = np.zeros(len(valid), bool)
    picked[np.random.default_rng(seed).choice(len(valid), size=rows, replace=False)] = True
    return [s for s, p in zip(valid, picked) if not p], [s for s, p in zip(valid, picked) if p]
