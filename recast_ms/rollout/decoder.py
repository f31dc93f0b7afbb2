"""Decoders for the rollout engine (:class:`recast_ms.rollout.engine.IncrementalDecoder`) and their factory.

:func:`make_decoder` is how the trainer, evaluation and the benchmarks get a decoder over a model:
``"kv"`` is :class:`recast_ms.models.qwen3_kv.Qwen3KVDecoder` (graph-mode KV-cache decoding over the
model's own parameters, each prompt encoded once for its G rows); ``"full"`` is :class:`FullForwardDecoder`
(the reference: the full MindFormers model rerun on the right-padded sequence each step, no cache).
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor

from recast_ms.models.policy import LogitsAt

DECODERS = ("kv", "full")


def make_decoder(model, max_prompt_len: int, max_new_tokens: int, pad_id: int, kind: str = "kv"):
    """A decoder over ``model`` for prompts of up to ``max_prompt_len`` tokens and ``max_new_tokens`` new ones."""
    if kind == "kv":
        from recast_ms.models.qwen3_kv import Qwen3KVDecoder

        return Qwen3KVDecoder(model, max_prompt_len, max_new_tokens, pad_id)
    if kind == "full":
        return FullForwardDecoder(model, max_prompt_len + max_new_tokens, pad_id)
    raise ValueError(f"unknown decoder kind {kind!r} (one of {DECODERS})")


class FullForwardDecoder:
    """The reference decoder: reruns the full MindFormers model on the right-padded ``[N, seq_length]``
    sequences every step (no cache), taking the logits at each row's last token via
    :class:`recast_ms.models.policy.LogitsAt`. ``start`` encodes B rows, not B*expand.

    Args:
        policy_or_model: a :class:`recast_ms.models.policy.Policy` (its ``next_logits``), the MindFormers model,
            or a next-token cell with ``is_logits_at = True`` (:class:`recast_ms.models.sharded.ShardedLogitsAt`).
        seq_length (int): the model's ``seq_length`` (its causal mask is built for exactly this length).
        pad_id (int): the pad token.
    """

    def __init__(self, policy_or_model, seq_length: int, pad_id: int):
        if getattr(policy_or_model, "is_logits_at", False):  # a next-token cell already (ShardedLogitsAt)
            self._logits_at = policy_or_model
        else:
            next_logits = getattr(policy_or_model, "next_logits", None)
            self._logits_at = next_logits if isinstance(next_logits, LogitsAt) else LogitsAt(policy_or_model)
        self.seq_length = int(seq_length)
        self.pad_id = int(pad_id)
        self._ids = None
        self._pos = None

    def _run(self, ids, positions):
        return self._logits_at(Tensor(ids.astype(np.int32)), Tensor(positions.astype(np.int32))).asnumpy()

    def start(self, prompt_ids: np.ndarray, prompt_lens: np.ndarray, expand: int) -> np.ndarray:
        ids = np.asarray(prompt_ids)
        lens = np.asarray(prompt_lens, np.int64).reshape(-1)
        bsz, width = ids.shape
        if lens.min() < 1 or lens.max() > min(width, self.seq_length):
            raise ValueError(f"prompt lengths must be in [1, {min(width, self.seq_length)}]")
        padded = np.full((bsz, self.seq_length), self.pad_id, np.int32)
        use = min(width, self.seq_length)
        cols = np.arange(use)[None, :] < lens[:, None]
        padded[:, :use] = np.where(cols, ids[:, :use], self.pad_id)
        logits = self._run(padded, lens - 1)
        self._ids = np.repeat(padded, expand, axis=0)
        self._pos = np.repeat(lens, expand)
        return np.repeat(logits, expand, axis=0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.shape[0] != self._ids.shape[0]:
            raise ValueError(f"expected {self._ids.shape[0]} tokens, got {tokens.shape[0]}")
        if self._pos.max() >= self.seq_length:
            raise RuntimeError(f"sequence full (seq_length={self.seq_length})")
        self._ids[np.arange(len(tokens)), self._pos] = tokens
        logits = self._run(self._ids, self._pos)
        self._pos = self._pos + 1
        return logits

    def reorder(self, index: np.ndarray) -> None:
        index = np.asarray(index, np.int64).reshape(-1)
        self._ids = self._ids[index]
        self._pos = self._pos[index]
