"""Learning signals for SID recommendation RL: rewards, structural scores and advantage estimators.

Numpy reference implementation. Every estimator is a pure function of ``[P, G]`` arrays (P prompts,
G samples each); groups are the rows, or are given explicitly as ``group_ids`` to
:func:`group_rows`. The graph-mode MindSpore twin of the selection lives in
``recast_ms/signals_ms.py`` and is tested for exact agreement with this file.

Where ReCast departs from GRPO (``../shared/RECAST_SPEC.md``):

1. Repair: a group with no hit gets its least target-like response (argmin structural score,
   ties -> lowest index) replaced by a ground-truth anchor with reward 1 and score 1.
2. Contrast: only the strongest positive (argmax score among hits) and the hardest negative
   (argmax score among misses) get advantages +alpha / -alpha; ties -> lowest index. A group with
   no miss (all hits) -- or, without repair, no hit -- is skipped (``active_mask`` False).
3. Everything else in the group gets advantage 0 and is physically dropped from the actor batch:
   ``active_index`` names the 2 surviving rows per prompt, giving a static ``[2P, T]`` batch.

``anchor_only`` (an ablation, not in the paper) is ReCast without the negative: the same repair, the
same active groups and the same strongest positive (+alpha: the anchor in a repaired group, the
strongest natural hit in a group that has one), but the hardest negative gets advantage 0 and no loss
(its row stays in the static ``[2P, T]`` batch with a zero loss mask). It separates "ReCast adds
ground-truth labels" from "the contrast helps"; all-hit groups are skipped exactly as in ReCast, so
the two estimators differ only in the negative row.

GRPO normalises with the unbiased standard deviation (``ddof=1``), as verl's GRPO estimator
(which OpenOneRec-RL uses) and TRL do; pass ``ddof=0`` for the population form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

SID = Tuple[int, ...]

# ----------------------------------------------------------------------------- rewards and scores


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


def score_responses(responses, targets, token_map, codebook) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reward, structural score and validity of each generated response row ``[N, R]`` against its
    target SIDs (``targets[n]``): ``(rewards [N], scores [N], valid [N])``. A row names one SID, read by
    ``token_map.response_sid`` (the parser evaluation uses); an unparseable or out-of-catalogue SID
    scores 0 and is not valid."""
    n = len(responses)
    r, s, valid = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    for k in range(n):
        sid = token_map.response_sid(responses[k])
        sids = [sid] if sid is not None and codebook.is_valid(sid) else []
        valid[k] = bool(sids)
        r[k] = task_reward(sids, targets[k])
        s[k] = structural_score(sids, targets[k])
    return r, s, valid


# ----------------------------------------------------------------------------- input checks


def _check_rewards(rewards, name: str = "rewards") -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"{name} must be [P, G], got shape {r.shape}")
    if r.shape[0] < 1:
        raise ValueError(f"{name} has no groups (P = 0)")
    if r.shape[1] < 2:
        raise ValueError(f"group size G must be >= 2, got G = {r.shape[1]}")
    if not np.all(np.isfinite(r)) or not np.all((r == 0.0) | (r == 1.0)):
        bad = r[~((r == 0.0) | (r == 1.0))]
        raise ValueError(f"{name} must be binary 0/1 hits; found {bad.ravel()[:5].tolist()}")
    return r


def _check_scores(scores, shape) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != shape:
        raise ValueError(f"scores shape {s.shape} does not match rewards shape {shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def group_rows(values: np.ndarray, group_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Turn a flat ``[N]`` array with explicit ``group_ids [N]`` into ``[P, G]`` plus the row order.

    Groups must all have the same size G (the rollout samples G per prompt). Returns
    ``(grouped [P, G], order [P, G])`` where ``order`` holds the flat indices, so
    ``flat[order] == grouped`` and results can be scattered back with ``out[order] = grouped_out``.
    Within a group, samples keep their flat order (tie rules refer to it).
    """
    values = np.asarray(values)
    group_ids = np.asarray(group_ids)
    if values.shape[:1] != group_ids.shape or group_ids.ndim != 1:
        raise ValueError(f"values {values.shape} and group_ids {group_ids.shape} must be [N] and [N]")
    uniq, counts = np.unique(group_ids, return_counts=True)
    if not np.all(counts == counts[0]):
        raise ValueError(f"groups have unequal sizes {dict(zip(uniq.tolist(), counts.tolist()))}")
    order = np.argsort(group_ids, kind="stable").reshape(len(uniq), counts[0])
    return values[order], order


# ----------------------------------------------------------------------------- estimators


def grpo_advantage(rewards, eps: float = 1e-6, ddof: int = 1) -> np.ndarray:
    """GRPO: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each row. ``[P, G] -> [P, G]``."""
    r = _check_rewards(rewards)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=ddof, keepdims=True)
    return (r - mean) / (std + eps)


@dataclass
class RecastSignal:
    """Output of :func:`recast_signal`; all arrays are per step, P groups of G samples.

    rewards, scores: ``[P, G]`` after repair (the anchor's slot holds 1.0 / 1.0).
    repaired:        ``[P]`` bool, the group was all-zero and got an anchor.
    anchor_index:    ``[P]`` int, slot replaced by the anchor, -1 where not repaired.
    advantages:      ``[P, G]`` the advantage of every sample (zeros outside the active pair for
                     boundary estimators).
    active_index:    ``[P, 2]`` int, (strongest positive, hardest negative); -1 where the group
                     has no such sample. Meaningful where ``active_mask``.
    active_mask:     ``[P]`` bool, the group contributes to the update.
    boundary:        whether the update uses only the active pair (``[2P, T]`` actor batch) or
                     the whole group (``[P*G, T]``).
    """

    rewards: np.ndarray
    scores: np.ndarray
    repaired: np.ndarray
    anchor_index: np.ndarray
    advantages: np.ndarray
    active_index: np.ndarray
    active_mask: np.ndarray
    boundary: bool

    @property
    def pair_advantages(self) -> np.ndarray:
        """``[P, 2]`` advantages of the active pair (0 for skipped groups)."""
        idx = np.clip(self.active_index, 0, None)
        adv = np.take_along_axis(self.advantages, idx, axis=1)
        return np.where(self.active_mask[:, None], adv, 0.0)


def _first_argmax(values: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Row-wise argmax over ``valid`` entries with ties to the lowest index; -1 for rows with none."""
    masked = np.where(valid, values, -np.inf)
    idx = np.argmax(masked, axis=1)  # numpy returns the first maximum: lowest-index tie rule
    has = valid.any(axis=1)
    return np.where(has, idx, -1), has


def recast_signal(
    rewards,
    scores,
    *,
    alpha: float = 1.0,
    repair: bool = True,
    boundary: bool = True,
    negative: bool = True,
    repair_mask: Optional[np.ndarray] = None,
    eps: float = 1e-6,
    ddof: int = 1,
) -> RecastSignal:
    """Repair-then-contrast signal for ``[P, G]`` binary rewards and structural scores.

    ``repair`` / ``boundary`` select the estimator: both True is ReCast, ``repair`` alone is
    repair-only (GRPO normalisation over the repaired group), ``boundary`` alone is boundary-only
    (all-zero groups skipped), neither is plain GRPO. ``negative=False`` (boundary only) gives the
    hardest negative advantage 0 instead of ``-alpha`` (``anchor_only``). ``repair_mask`` (``[P]`` bool
    or None) lets an adaptive scheduler veto repair per group; None repairs every all-zero group.
    """
    r = _check_rewards(rewards)
    s = _check_scores(scores, r.shape)
    if not negative and not boundary:
        raise ValueError("negative=False (no contrast row) only applies to boundary estimators")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    P, G = r.shape
    r, s = r.copy(), s.copy()

    all_zero = r.sum(axis=1) == 0
    repaired = all_zero & bool(repair)
    if repair_mask is not None:
        veto = np.asarray(repair_mask, dtype=bool)
        if veto.shape != (P,):
            raise ValueError(f"repair_mask must be [P] = [{P}], got {veto.shape}")
        repaired &= veto
    # least target-like response; np.argmin takes the first minimum (lowest-index tie rule)
    anchor = np.where(repaired, np.argmin(s, axis=1), -1)
    rows = np.nonzero(repaired)[0]
    r[rows, anchor[rows]] = 1.0
    s[rows, anchor[rows]] = 1.0

    hit = r == 1.0
    pos, has_pos = _first_argmax(s, hit)
    neg, has_neg = _first_argmax(s, ~hit)
    active_index = np.stack([pos, neg], axis=1)
    mixed = has_pos & has_neg

    if boundary:
        active_mask = mixed
        adv = np.zeros((P, G))
        act = np.nonzero(active_mask)[0]
        adv[act, pos[act]] = alpha
        adv[act, neg[act]] = -alpha if negative else 0.0
    else:
        adv = grpo_advantage(r, eps=eps, ddof=ddof)
        active_mask = mixed  # uniform groups have zero advantage everywhere
    return RecastSignal(
        rewards=r,
        scores=s,
        repaired=repaired,
        anchor_index=anchor.astype(np.int64),
        advantages=adv,
        active_index=active_index.astype(np.int64),
        active_mask=active_mask,
        boundary=bool(boundary),
    )


def gather_active_rows(rows: np.ndarray, anchor_rows: np.ndarray, signal: RecastSignal) -> np.ndarray:
    """``[P*G, T]`` rollout rows -> ``[2P, T]`` active rows (positive, negative per prompt).

    A repaired group's positive is its anchor, taken from ``anchor_rows [P, T]``. Skipped groups
    keep two rows (their first sample) so the shape is static; their loss mask must be zero.
    """
    P, G = signal.advantages.shape
    rows = np.asarray(rows)
    anchor_rows = np.asarray(anchor_rows)
    if rows.shape[0] != P * G or anchor_rows.shape[0] != P or rows.shape[1:] != anchor_rows.shape[1:]:
        raise ValueError(f"rows {rows.shape} / anchor_rows {anchor_rows.shape} do not fit P={P}, G={G}")
    flat = (np.arange(P)[:, None] * G + np.clip(signal.active_index, 0, None)).reshape(-1)  # [2P]
    out = rows[flat].copy()  # [2P, T]
    out[0::2][signal.repaired] = anchor_rows[signal.repaired]
    return out


# ----------------------------------------------------------------------------- registry

ESTIMATORS: Dict[str, Dict[str, bool]] = {
    "grpo": dict(repair=False, boundary=False, negative=True),
    "repair_only": dict(repair=True, boundary=False, negative=True),
    "boundary_only": dict(repair=False, boundary=True, negative=True),
    "recast": dict(repair=True, boundary=True, negative=True),
    # repair, then +alpha on the strongest positive only: ReCast minus its contrast row
    "anchor_only": dict(repair=True, boundary=True, negative=False),
}

# estimators whose update uses only the active pair of each group: a static [2P, T] actor batch
BOUNDARY_ESTIMATORS = ("recast", "boundary_only", "recast_adaptive", "anchor_only")


def estimator_flags(name: str) -> Dict[str, bool]:
    """``repair`` / ``boundary`` / ``negative`` flags of a named estimator; a clear error for an unknown name."""
    try:
        return dict(ESTIMATORS[name])
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None


def compute_signal(name: str, rewards, scores, *, alpha: float = 1.0, **kw) -> RecastSignal:
    """Run the named estimator. ``grpo`` returns GRPO advantages in the same container."""
    return recast_signal(rewards, scores, alpha=alpha, **estimator_flags(name), **kw)


# ----------------------------------------------------------------------------- diagnostics


def signal_diagnostics(rewards, repaired: Optional[np.ndarray] = None, prefix: str = "signals") -> Dict[str, float]:
    """Per-step signal-degeneracy diagnostics from ``[P, G]`` binary rewards (before repair).

    ``repaired`` (``[P]`` bool) gives the groups that actually got an anchor; when None, every
    all-zero group is counted as repaired (ReCast's rule).
    """
    r = _check_rewards(rewards)
    n_hit = r.sum(axis=1)
    G = r.shape[1]
    all_zero = n_hit == 0
    natural = (n_hit > 0) & (n_hit < G)
    rep = all_zero if repaired is None else np.asarray(repaired, dtype=bool)
    if rep.shape != all_zero.shape:
        raise ValueError(f"repaired must be [P] = {all_zero.shape}, got {rep.shape}")
    if np.any(rep & ~all_zero):
        raise ValueError("repaired marks a group that has a hit; repair only applies to all-zero groups")
    return {
        f"{prefix}/all_zero_group_ratio": float(all_zero.mean()),
        f"{prefix}/single_hit_group_ratio": float((n_hit == 1).mean()),
        f"{prefix}/all_hit_group_ratio": float((n_hit == G).mean()),
        f"{prefix}/zero_reward_sample_ratio": float((r == 0).mean()),
        f"{prefix}/repair_trigger_ratio": float(rep.mean()),
        f"{prefix}/naturally_trainable_ratio": float(natural.mean()),
        # a repaired group holds one anchor hit and G - 1 >= 1 misses: always trainable
        f"{prefix}/trainable_ratio_after_repair": float((natural | rep).mean()),
    }
