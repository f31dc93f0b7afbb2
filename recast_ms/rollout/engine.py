"""Rollout engine: SID-constrained sampling of G responses per prompt, beam search, and groups made of beams.

The engine sees only token ids and next-token logits. A decoder (``recast_ms/rollout/decoder.py``)
encodes each prompt ONCE, expands its cache to the G samples / K beams, and then feeds one token per
step, so prompt work is P rows, not P*G. Sampling and the trie constraint run on the host in numpy:
a response is L+1 tokens (L SID codes, then EOS), so the per-step host work is one ``[B, V]``
array, and a seeded ``numpy.random.Generator`` makes rollouts exactly reproducible on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple

import numpy as np

from recast_ms.sid import PrefixTrie, SIDTokenMap

NEG_INF = -1e30


class IncrementalDecoder(Protocol):
    """What the engine needs from a model.

    ``start`` encodes ``prompt_ids [B, Tp]`` (right-padded, lengths ``prompt_lens [B]``) once, repeats
    each prompt's state ``expand`` times (row ``b * expand + j``) and returns the next-token logits
    ``[B * expand, V]``. ``step`` appends ``tokens [N]`` and returns the next logits ``[N, V]``.
    ``reorder(index [N])`` permutes rows (beam search).
    """

    def start(self, prompt_ids: np.ndarray, prompt_lens: np.ndarray, expand: int) -> np.ndarray: ...

    def step(self, tokens: np.ndarray) -> np.ndarray: ...

    def reorder(self, index: np.ndarray) -> None: ...


class SIDConstraint:
    """Per-step allowed-token masks from the prefix trie: level-l code tokens, then EOS.

    ``mask(step, prev_tokens)`` -> ``[N, V]`` bool for rows whose already-generated token ids are
    ``prev_tokens [N, step]``. Masks for each trie node are built lazily and cached.
    """

    def __init__(self, trie: PrefixTrie, token_map: SIDTokenMap, eos_id: int, vocab_size: int):
        self.trie = trie
        self.map = token_map
        self.eos_id = int(eos_id)
        self.V = int(vocab_size)
        self.L = token_map.fmt.num_levels
        self._cache: Dict[Tuple[int, ...], np.ndarray] = {}
        self._eos_row = np.zeros(self.V, bool)
        self._eos_row[self.eos_id] = True
        self._code_of = np.full(max(self.V, int(token_map.code_to_id.max()) + 1), -1, np.int64)  # token id -> code
        for tid, (_, code) in token_map.id_to_level_code.items():
            self._code_of[tid] = code

    def _row(self, prefix: Tuple[int, ...]) -> np.ndarray:
        row = self._cache.get(prefix)
        if row is None:
            row = np.zeros(self.V, bool)
            codes = self.trie.allowed(prefix)
            row[self.map.code_to_id[len(prefix), codes]] = True
            self._cache[prefix] = row
        return row

    def mask(self, step: int, prev_tokens: np.ndarray) -> np.ndarray:
        n = prev_tokens.shape[0]
        if step >= self.L:
            return np.broadcast_to(self._eos_row, (n, self.V))
        codes = self._code_of[prev_tokens[:, :step]]  # [N, step]
        return np.stack([self._row(tuple(codes[i].tolist())) for i in range(n)])


def _fit(mask: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """A ``[N, V_tok]`` constraint mask widened to ``[N, V_model]`` logits: a model may have more embedding rows
    than its tokenizer has tokens (Qwen3: 151,936 rows, 151,669 tokens); rows past the tokenizer are never allowed."""
    extra = logits.shape[1] - mask.shape[1]
    if extra < 0:
        raise ValueError(f"constraint mask has {mask.shape[1]} columns, the model's logits only {logits.shape[1]}")
    return np.pad(mask, ((0, 0), (0, extra))) if extra else mask


def _top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    if top_k and top_k < logits.shape[1]:
        kth = np.partition(logits, -top_k, axis=1)[:, -top_k][:, None]
        logits = np.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=1)
        sorted_logits = np.take_along_axis(logits, order, axis=1)
        probs = _softmax(sorted_logits)
        cum = np.cumsum(probs, axis=1)
        drop_sorted = cum - probs > top_p  # keep the smallest set whose mass reaches top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=1)
        logits = np.where(drop, NEG_INF, logits)
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@dataclass
class Rollout:
    """``response_ids [N, R]`` (pad after EOS), ``response_mask [N, R]`` (1 up to and incl. EOS),
    ``logps [N, R]`` sampling-distribution log-probs (for diagnostics; the trainer recomputes)."""

    response_ids: np.ndarray
    response_mask: np.ndarray
    logps: np.ndarray


def sample_groups(
    decoder: IncrementalDecoder,
    prompt_ids: np.ndarray,
    prompt_lens: np.ndarray,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    rng: Optional[np.random.Generator],
    constraint: Optional[SIDConstraint] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_rows: int = 0,
    uniforms: Optional[np.ndarray] = None,
) -> Rollout:
    """G samples per prompt: rows ``p*G .. p*G+G-1`` belong to prompt p. Shapes: ``[P*G, R]``.

    ``max_rows > 0`` decodes at most that many rows at a time (whole prompts, at least one), every chunk with
    the same static shape (the last is filled with copies of its first prompt, dropped): on the CPU backend a
    decode graph keeps memory in proportion to its rows. The samples do not depend on the chunking: the
    uniforms of all rows and steps are drawn up front, in the order an unchunked run draws them.
    ``uniforms [max_new_tokens, P*G]`` replaces the draw from ``rng`` (a data-parallel rank passes its columns
    of the global batch's draw, so its samples equal those of one process over the global batch).
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use beam_search for greedy)")
    P, G = prompt_ids.shape[0], group_size
    if uniforms is None:
        uniforms = rng.random((max_new_tokens, P * G))  # [R, P*G], row t = what step t of one pass draws
    elif uniforms.shape != (max_new_tokens, P * G):
        raise ValueError(f"uniforms must be [max_new_tokens, P*G] = [{max_new_tokens}, {P * G}], got {uniforms.shape}")
    per_chunk = P if max_rows <= 0 else max(1, min(P, max_rows // G))
    parts = []
    for start in range(0, P, per_chunk):
        idx = np.arange(start, min(start + per_chunk, P))
        fill = np.concatenate([idx, np.repeat(idx[:1], per_chunk - len(idx))])  # one static chunk shape
        cols = (fill[:, None] * G + np.arange(G)[None]).reshape(-1)  # [chunk*G] columns of `uniforms`
        part = _sample_rows(decoder, prompt_ids[fill], prompt_lens[fill], G, uniforms[:, cols], max_new_tokens,
                            eos_id, pad_id, constraint, temperature, top_k, top_p)
        keep = len(idx) * G
        parts.append(Rollout(part.response_ids[:keep], part.response_mask[:keep], part.logps[:keep]))
    return Rollout(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("response_ids", "response_mask",
                                                                                "logps")))


def _sample_rows(decoder, prompt_ids, prompt_lens, group_size, uniforms, max_new_tokens, eos_id, pad_id,
                 constraint, temperature, top_k, top_p) -> Rollout:
    """One decoder pass over ``P`` prompts x ``G`` samples, with the given ``uniforms [R, P*G]``."""
    N = prompt_ids.shape[0] * group_size
    logits = decoder.start(prompt_ids, prompt_lens, group_size)  # [N, V]
    out = np.full((N, max_new_tokens), pad_id, np.int64)
    mask = np.zeros((N, max_new_tokens), np.float32)
    logps = np.zeros((N, max_new_tokens), np.float32)
    done = np.zeros(N, bool)
    for t in range(max_new_tokens):
        lg = logits.astype(np.float64) / temperature
        if constraint is not None:
            lg = np.where(_fit(constraint.mask(t, out[:, :t]), lg), lg, NEG_INF)
        lg = _top_k_top_p(lg, top_k, top_p)
        probs = _softmax(lg)
        u = uniforms[t][:, None]
        tok = np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)  # inverse-CDF draw
        tok = np.where(done, pad_id, tok)
        out[:, t] = tok
        mask[:, t] = ~done
        logps[:, t] = np.where(done, 0.0, np.log(np.maximum(probs[np.arange(N), tok], 1e-30)))
        done |= tok == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        logits = decoder.step(tok)
    return Rollout(out, mask, logps)


def beam_search(
    decoder: IncrementalDecoder,
    prompt_ids: np.ndarray,
    prompt_lens: np.ndarray,
    *,
    beam_width: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    constraint: Optional[SIDConstraint] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Beam search, K beams per prompt. Returns ``sequences [P, K, R]`` best first and their
    summed log-probs ``[P, K]``. Finished beams (EOS) keep their score and are padded.

    With the SID constraint every beam is a valid item; if a prefix has fewer than K continuations in
    total, the surplus beams carry ``-inf`` scores and should be ignored (they are sorted last).
    """
    P, K = prompt_ids.shape[0], beam_width
    logits = decoder.start(prompt_ids, prompt_lens, K)  # [P*K, V]
    V = logits.shape[1]
    seqs = np.full((P * K, max_new_tokens), pad_id, np.int64)
    scores = np.full((P, K), NEG_INF)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    done = np.zeros(P * K, bool)
    for t in range(max_new_tokens):
        lp = _log_softmax(logits.astype(np.float64))  # [P*K, V]
        if constraint is not None:
            lp = np.where(_fit(constraint.mask(t, seqs[:, :t]), lp), lp, NEG_INF)
        # a finished beam continues only with pad at zero cost
        lp = np.where(done[:, None], NEG_INF, lp)
        lp[done, pad_id] = 0.0
        cand = (scores.reshape(-1, 1) + lp).reshape(P, K * V)  # [P, K*V]
        top = np.argpartition(-cand, K - 1, axis=1)[:, :K]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(cand, top, 1), axis=1, kind="stable"), 1)
        new_scores = np.take_along_axis(cand, top, 1)  # [P, K]
        parent = top // V  # [P, K]
        tok = top % V
        flat_parent = (np.arange(P)[:, None] * K + parent).reshape(-1)  # [P*K]
        seqs = seqs[flat_parent]
        tok = tok.reshape(-1)
        prev_done = done[flat_parent]
        seqs[:, t] = np.where(prev_done, pad_id, tok)
        done = prev_done | (tok == eos_id)
        scores = np.where(new_scores <= NEG_INF / 2, NEG_INF, new_scores)
        if done.all() or t == max_new_tokens - 1:
            break
        decoder.reorder(flat_parent)
        logits = decoder.step(seqs[:, t])
    return seqs.reshape(P, K, max_new_tokens), scores


def beam_groups(
    decoder: IncrementalDecoder,
    prompt_ids: np.ndarray,
    prompt_lens: np.ndarray,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    constraint: Optional[SIDConstraint] = None,
) -> Rollout:
    """A group per prompt made of the G best beams of :func:`beam_search` (``rl.rollout=beam``), best
    first: rows ``p*G .. p*G+G-1`` are prompt p's beams 0..G-1, exactly ``beam_search(beam_width=G)``'s
    sequences. Shapes as :func:`sample_groups`: ``[P*G, R]``; ``logps`` are zeros (``beam_search`` keeps
    only summed scores, and the trainer recomputes log-probs anyway).

    Temperature and length normalisation: none. The beams are ranked by the policy's own summed
    log-probs at temperature 1 -- the search evaluation runs -- so a group is what Pass@G measures and
    an all-zero group is a Pass@G miss (all-zero ~= 1 - Pass@G, OpenOneRec-RL's recipe and the paper's
    Table 2). Under the SID constraint every complete beam has exactly L codes + EOS, so length
    normalisation could not reorder them. ``rl.temperature`` still scales the trainer's log-probs.
    With ties in the estimators going to the lowest index, a tie goes to the more likely beam.

    Raises ``ValueError`` when some prompt has fewer than G live beams (a catalogue smaller than G).
    """
    seqs, scores = beam_search(decoder, prompt_ids, prompt_lens, beam_width=group_size,
                               max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, constraint=constraint)
    if np.any(scores <= NEG_INF / 2):
        raise ValueError(f"beam rollouts need G = {group_size} distinct responses per prompt, but the beam "
                         f"search found fewer (catalogue smaller than G?); lower rl.group_size")
    P, G, R = seqs.shape
    ids = seqs.reshape(P * G, R)  # [P*G, R]
    is_eos = ids == eos_id
    # 1 up to and including the first EOS (all R positions when a beam never ends), as sample_groups
    first_eos = np.where(is_eos.any(1), is_eos.argmax(1), R - 1)  # [P*G]
    mask = (np.arange(R)[None, :] <= first_eos[:, None]).astype(np.float32)  # [P*G, R]
    return Rollout(ids, mask, np.zeros((P * G, R), np.float32))
