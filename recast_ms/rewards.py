"""Rewards: generated response token ids -> SIDs -> binary hit, structural score, validity.

The one place a response is read. RL rewards and evaluation's rankings both parse a response with
:func:`response_sids` (a response is ``L`` code tokens then EOS: its first ``L`` tokens must be the codes of
levels 0..L-1 in order) over the same :func:`response_length` slice, so a response earns reward 1 exactly
when evaluation counts it as a hit; a SID found later in the response (after a stray token) is neither.

Reward and structural score (``../shared/RECAST_SPEC.md``):

- hit ``r = 1[ID(y) ∩ ID(y*) != ∅]``;
- structural score ``s = max_{u in ID(y), v in ID(y*)} LCP(u, v) / L`` (1.0 only for an exact match; 0.0
  for an unparseable or out-of-catalogue response).

:func:`score_responses` is vectorised over the ``[P*G, R]`` rows of a step; the scalar functions are the
readable definitions it is tested against.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

SID = Tuple[int, ...]


def response_length(codebook) -> int:
    """Tokens a response occupies: ``L`` code tokens + EOS (the decoders' ``max_new_tokens``)."""
    return codebook.num_levels + 1


# ----------------------------------------------------------------------------- scalar definitions


def _as_sid(x) -> SID:
    try:
        return tuple(int(c) for c in x)
    except (TypeError, ValueError):
        raise ValueError(f"not a SID (sequence of integer codes): {x!r}") from None


def _as_sid_set(xs) -> set:
    """Accept one SID (tuple of ints) or an iterable of SIDs; always return a set of SID tuples."""
    if xs is None:
        return set()
    xs = list(xs)
    if xs and all(isinstance(c, (int, np.integer)) for c in xs):
        return {_as_sid(xs)}
    return {_as_sid(x) for x in xs}


def sid_similarity(u: Sequence[int], v: Sequence[int]) -> float:
    """Normalised common-prefix depth: ``LCP(u, v) / L``; 1.0 for an exact match.

    SIDs of different lengths are normalised by the longer one, so only equal SIDs score 1.
    """
    u, v = _as_sid(u), _as_sid(v)
    L = max(len(u), len(v))
    if L == 0:
        raise ValueError("empty SID")
    lcp = 0
    for a, b in zip(u, v):
        if a != b:
            break
        lcp += 1
    return lcp / L


def task_reward(pred_sids, target_sids) -> float:
    """Binary hit ``1[ID(y) ∩ ID(y*) != ∅]``: 1.0 if any predicted SID is a target SID."""
    return 1.0 if _as_sid_set(pred_sids) & _as_sid_set(target_sids) else 0.0


def structural_score(pred_sids, target_sids) -> float:
    """``max_{u in ID(y), v in ID(y*)} sim(u, v)``; 0.0 when either set is empty."""
    preds, targets = _as_sid_set(pred_sids), _as_sid_set(target_sids)
    if not preds or not targets:
        return 0.0
    return max(sid_similarity(u, v) for u in preds for v in targets)


# ----------------------------------------------------------------------------- the parser


def response_sids(responses, token_map) -> Tuple[np.ndarray, np.ndarray]:
    """Parse ``[N, R]`` response token ids: ``(codes [N, L] int64, parsed [N] bool)``.

    Row n names a SID when its first ``L`` tokens are the code tokens of levels 0..L-1 in order; then
    ``codes[n]`` is that SID, else ``parsed[n]`` is False (and ``codes[n]`` is -1). Ids outside the
    vocabulary (negative, too large) are simply not code tokens. Never raises on content; a response
    shorter than ``L`` tokens parses as nothing.
    """
    L = token_map.fmt.num_levels
    ids = np.asarray(responses)
    if ids.ndim != 2:
        raise ValueError(f"responses must be [N, R] token ids, got shape {ids.shape}")
    n = ids.shape[0]
    if ids.shape[1] < L:
        return np.full((n, L), -1, np.int64), np.zeros(n, bool)
    head = ids[:, :L].astype(np.int64)  # [N, L]
    table_level, table_code = token_map.level_of_id, token_map.code_of_id
    inside = (head >= 0) & (head < table_level.shape[0])
    safe = np.where(inside, head, 0)
    level = np.where(inside, table_level[safe], -1)  # [N, L] level of each token, -1 if not a code token
    code = np.where(inside, table_code[safe], -1)
    parsed = (level == np.arange(L)[None, :]).all(axis=1)  # [N]
    return np.where(parsed[:, None], code, -1), parsed


def response_sid(row, token_map) -> Optional[SID]:
    """The SID one response names (``None`` when it names none): :func:`response_sids` on one row."""
    try:
        ids = np.asarray(list(row), dtype=np.int64).reshape(1, -1)
    except (TypeError, ValueError, OverflowError):
        return None
    codes, parsed = response_sids(ids, token_map)
    return tuple(int(c) for c in codes[0]) if parsed[0] else None


# ----------------------------------------------------------------------------- step scoring


def score_responses(responses, targets, token_map, codebook) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reward, structural score and validity of each response row ``[N, R]`` against its target SIDs
    (``targets[n]``, one SID or several for an item whose SID collides): ``(rewards [N], scores [N],
    valid [N])`` float64 / float64 / bool. An unparseable or out-of-catalogue response scores 0 and is not
    valid."""
    codes, parsed = response_sids(responses, token_map)  # [N, L], [N]
    n, L = codes.shape
    if len(targets) != n:
        raise ValueError(f"{n} responses but {len(targets)} target sets")
    valid = parsed & np.array([parsed[k] and codebook.is_valid(tuple(codes[k])) for k in range(n)], bool)
    target_sets = [sorted(_as_sid_set(t)) for t in targets]
    width = max((len(t) for t in target_sets), default=0)
    if width == 0:
        return np.zeros(n), np.zeros(n), valid
    tgt = np.full((n, width, L), -2, np.int64)  # -2 never equals a code (>= 0) nor an unparsed slot (-1)
    for k, ts in enumerate(target_sets):
        if ts:
            if any(len(t) != L for t in ts):
                raise ValueError(f"target SIDs of row {k} {ts} do not have the codebook's {L} levels")
            tgt[k, : len(ts)] = ts
    same = codes[:, None, :] == tgt  # [N, M, L]
    lcp = np.cumprod(same, axis=2).sum(axis=2)  # [N, M] common-prefix depth
    best = np.where(valid[:, None], lcp, 0).max(axis=1)  # [N]
    return (best == L).astype(np.float64), best / L, valid
