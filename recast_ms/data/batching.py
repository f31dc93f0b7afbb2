"""Token-level batches with static shapes: prompt + response packed right-padded into ``[B, S]``.

Every model input is exactly ``seq_length`` tokens (MindFormers builds its causal mask once), right
padded with the dedicated pad id. ``loss_mask [B, S-1]`` marks the positions whose NEXT token is a
response token, i.e. it lines up with ``TokenLogProbs`` output ``logps[b, t] = log p(x[t+1] | x[:t+1])``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from recast_ms.data.prompts import encode_prompt, encode_response
from recast_ms.data.sample import Sample
from recast_ms.sid import SIDCodebook


@dataclass
class EncodedPrompts:
    """Prompts of a batch: ``ids [B, Tp]`` right-padded, ``lens [B]``; ``Tp = seq_length - response_len``."""

    ids: np.ndarray
    lens: np.ndarray


def encode_prompts(samples: Sequence[Sample], codebook: SIDCodebook, tokenizer, max_prompt_len: int,
                   with_titles: bool = False) -> EncodedPrompts:
    rows: List[List[int]] = [encode_prompt(s, codebook, tokenizer, max_prompt_len, with_titles) for s in samples]
    ids = np.full((len(rows), max_prompt_len), tokenizer.pad_id, np.int32)
    lens = np.zeros(len(rows), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        lens[i] = len(r)
    return EncodedPrompts(ids, lens)


def encode_targets(samples: Sequence[Sample], codebook: SIDCodebook, tokenizer, response_len: int) -> np.ndarray:
    """The ground-truth response (first target SID + EOS) of each sample, ``[B, R]`` padded."""
    out = np.full((len(samples), response_len), tokenizer.pad_id, np.int32)
    for i, s in enumerate(samples):
        r = encode_response(s.target_sids[0], codebook, tokenizer)
        if len(r) > response_len:
            raise ValueError(f"{s.origin}: response of {len(r)} tokens exceeds response_len={response_len}")
        out[i, : len(r)] = r
    return out


def pack(prompt_ids: np.ndarray, prompt_lens: np.ndarray, response_ids: np.ndarray, response_mask: np.ndarray,
         seq_length: int, pad_id: int):
    """``[B, Tp]`` prompts + ``[B, R]`` responses -> ``input_ids [B, S]`` int32 and ``loss_mask [B, S-1]`` float32.

    Response token j of row b sits at ``prompt_lens[b] + j``; its log-prob is at index
    ``prompt_lens[b] + j - 1`` of the ``[B, S-1]`` log-prob array.
    """
    B, R = response_ids.shape
    if prompt_ids.shape[1] + R > seq_length:
        raise ValueError(f"prompt width {prompt_ids.shape[1]} + response width {R} exceeds seq_length {seq_length}")
    ids = np.full((B, seq_length), pad_id, np.int32)
    ids[:, : prompt_ids.shape[1]] = np.where(np.arange(prompt_ids.shape[1])[None] < prompt_lens[:, None], prompt_ids, pad_id)
    cols = prompt_lens[:, None] + np.arange(R)[None]  # [B, R]
    rows = np.repeat(np.arange(B)[:, None], R, 1)
    live = response_mask > 0
    ids[rows[live], cols[live]] = response_ids[live]
    loss_mask = np.zeros((B, seq_length - 1), np.float32)
    loss_mask[rows[live], cols[live] - 1] = 1.0
    return ids, loss_mask


class EpochSampler:
    """Seeded epochs over ``n`` rows, ``per_step`` rows a step: the rows of step t are a pure function of
    (seed, t), so a resumed run (any data-parallel rank, its own seed) continues its stream exactly from the
    step number alone, with no sampler state in the checkpoint. The ragged tail of an epoch is skipped; the
    next epoch reshuffles.

    ``chained=False`` (RL): epoch e is ``default_rng([seed, e]).permutation(n)``. ``chained=True`` (SFT): epoch
    e is the (e+1)-th permutation drawn from one ``default_rng(seed)``, the order SFT always used (replayed
    from the seed, so still stateless; the SFT runs behind the committed results reproduce bit for bit).
    """

    def __init__(self, n: int, per_step: int, seed: int, *, chained: bool = False):
        if per_step < 1 or n < per_step:
            raise ValueError(f"{n} rows cannot fill steps of {per_step}")
        self.n, self.k, self.seed, self.chained = n, per_step, seed, chained
        self.per_epoch = n // per_step
        self._cached = (-1, None)  # (epoch, permutation): consecutive steps share an epoch

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cached[0] == epoch:
            return self._cached[1]
        if self.chained:
            rng = np.random.default_rng(self.seed)
            for _ in range(epoch):
                rng.permutation(self.n)
            perm = rng.permutation(self.n)
        else:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        self._cached = (epoch, perm)
        return perm

    def at(self, step: int) -> np.ndarray:
        """Row indices ``[per_step]`` of step ``step`` (0-based)."""
        epoch, slot = divmod(step, self.per_epoch)
        return self._perm(epoch)[slot * self.k : (slot + 1) * self.k]
