"""Graph-mode MindSpore twin of the repair-and-contrast selection in ``signals.py``.

Static shapes throughout: ``[P, G]`` in, ``[P, 2]`` / ``[P]`` out, so the compiled graph never changes
with the data. The trainer turns its outputs into ``signals.Selection`` and gathers the ``[2P, T]`` actor rows
with ``signals.gather_rows``, exactly as for the numpy reference. Ties are broken towards the lowest index exactly as the numpy reference does: the
chosen index is the minimum index among the entries equal to the extreme value, computed with a
masked ``ReduceMin`` over an index ramp rather than relying on ``Argmax``'s tie behaviour.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import nn, ops


class RecastSelect(nn.Cell):
    r"""Repair-then-contrast selection on a step's rewards and structural scores.

    Args:
        group_size (int): G, samples per prompt (>= 2).
        alpha (float): contrastive weight; the pair gets ``+alpha / -alpha``.
        repair (bool): replace the lowest-score response of an all-zero group by the anchor.
        negative (bool): give the hardest negative ``-alpha``; False gives it 0 (``anchor_only``: the
            positive alone is pushed up, the pair's second row carries no signal).
        negative_weight (float): the negative gets ``-alpha * negative_weight`` (>= 0; 1 = ReCast).

    Inputs:
        - **rewards** (Tensor) - ``[P, G]`` float32 binary hits.
        - **scores** (Tensor) - ``[P, G]`` float32 structural scores.
        - **repair_mask** (Tensor) - ``[P]`` bool, groups allowed to be repaired (all True for
          static ReCast; an adaptive schedule may veto some).

    Outputs:
        Tuple of ``active_index [P, 2] int32`` (positive, negative; -1 where absent),
        ``pair_advantages [P, 2] float32`` (0 for skipped groups), ``active_mask [P] bool``,
        ``repaired [P] bool``, ``anchor_index [P] int32`` (-1 where not repaired),
        ``rewards [P, G]`` and ``scores [P, G]`` after repair.

    Examples:
        >>> sel = RecastSelect(group_size=4)
        >>> r = ms.Tensor([[0, 0, 0, 0], [0, 1, 0, 1]], ms.float32)
        >>> s = ms.Tensor([[.3, 0, .6, 0], [.6, 1, .3, 1]], ms.float32)
        >>> idx, adv, mask, *_ = sel(r, s, ms.Tensor([True, True]))
    """

    def __init__(self, group_size: int, alpha: float = 1.0, repair: bool = True, negative: bool = True,
                 negative_weight: float = 1.0):
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group size G must be >= 2, got {group_size}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= negative_weight < float("inf"):
            raise ValueError(f"negative_weight must be a finite number >= 0, got {negative_weight}")
        self.group_size = int(group_size)
        self.alpha = float(alpha)
        self.repair = bool(repair)
        self.negative = bool(negative)
        self.negative_weight = float(negative_weight)
        # rounded to float32 by numpy, as the reference's advantages are (a python list may round differently)
        self.sign = ms.Tensor(np.array([[self.alpha, -self.alpha * self.negative_weight if self.negative else 0.0]],
                                       np.float32))  # [1, 2]
        self.ramp = ms.Tensor(list(range(group_size)), ms.float32)  # [G]
        self.big = float(group_size)  # "no index" sentinel, larger than any real index

    def _first_index(self, values, valid):
        """Lowest index attaining the max of ``values`` over ``valid``: ([P] int32, [P] bool)."""
        neg_inf = ops.full_like(values, -3.0e38)
        masked = ops.where(valid, values, neg_inf)  # [P, G]
        best = masked.max(axis=1, keepdims=True)  # [P, 1]
        hit = ops.logical_and(valid, masked == best)  # [P, G]
        idx = ops.where(hit, self.ramp.expand_as(values), ops.full_like(values, self.big)).min(axis=1)  # [P]
        has = valid.any(axis=1)  # [P]
        return ops.where(has, idx, ops.full_like(idx, -1.0)).astype(ms.int32), has

    def construct(self, rewards, scores, repair_mask):
        hit = rewards > 0.5  # [P, G]
        all_zero = ops.logical_not(hit.any(axis=1))  # [P]
        if self.repair:
            repaired = ops.logical_and(all_zero, repair_mask)
        else:
            repaired = ops.logical_and(all_zero, ops.zeros_like(repair_mask))
        # anchor = lowest-index argmin of the score == lowest-index argmax of -score
        anchor, _ = self._first_index(-scores, ops.ones_like(hit))
        onehot = ops.logical_and(self.ramp.expand_as(scores) == anchor.astype(ms.float32).expand_dims(1),
                                 repaired.expand_dims(1))  # [P, G]
        rewards = ops.where(onehot, ops.ones_like(rewards), rewards)
        scores = ops.where(onehot, ops.ones_like(scores), scores)
        hit = rewards > 0.5
        pos, has_pos = self._first_index(scores, hit)
        neg, has_neg = self._first_index(scores, ops.logical_not(hit))
        active_mask = ops.logical_and(has_pos, has_neg)  # [P]
        active_index = ops.stack([pos, neg], axis=1)  # [P, 2]
        pair_adv = self.sign * active_mask.astype(ms.float32).expand_dims(1)  # [P, 2]
        anchor_index = ops.where(repaired, anchor, ops.full_like(anchor, -1))
        return active_index, pair_adv, active_mask, repaired, anchor_index, rewards, scores
