"""Advantage estimators for SID recommendation RL: GRPO, repair-only, boundary-only, ReCast (+ adaptive),
anchor-only, declared once in a registry (:data:`ESTIMATORS`, verl's ``core_algos`` pattern).

Numpy reference implementation. Every estimator is a pure function of ``[P, G]`` arrays (P prompts,
G samples each; rewards and structural scores come from ``recast_ms/rewards.py``); groups are the rows,
or are given explicitly as ``group_ids`` to :func:`group_rows`. The graph-mode MindSpore twin of the
selection lives in ``recast_ms/signals_ms.py`` and is tested for exact agreement with this file. Every
estimator's output becomes one :class:`Selection` (actor rows, advantages, loss rows), and
:func:`gather_rows` is the one physical filter from rollout rows to actor rows.

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

Two knobs of the negative row (issue 24; the defaults are ReCast): ``negative_weight`` scales its
advantage to ``-alpha * negative_weight`` (0 makes the row loss-free, as ``anchor_only``), and the trainer's
``rl.negative_mask=divergent`` (:func:`divergent_mask`) keeps its loss only from the first token where it
leaves its group's positive: on-policy, +alpha and -alpha on shared prefix tokens cancel, so under full
masking ReCast never reinforces the target's first codes when the negative shares them.

GRPO normalises with the unbiased standard deviation (``ddof=1``), as verl's GRPO estimator
(which OpenOneRec-RL uses) and TRL do; pass ``ddof=0`` for the population form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

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
    negative_weight: float = 1.0,
    repair_mask: Optional[np.ndarray] = None,
    eps: float = 1e-6,
    ddof: int = 1,
) -> RecastSignal:
    """Repair-then-contrast signal for ``[P, G]`` binary rewards and structural scores.

    ``repair`` / ``boundary`` select the estimator: both True is ReCast, ``repair`` alone is
    repair-only (GRPO normalisation over the repaired group), ``boundary`` alone is boundary-only
    (all-zero groups skipped), neither is plain GRPO. ``negative=False`` (boundary only) gives the
    hardest negative advantage 0 instead of ``-alpha`` (``anchor_only``); ``negative_weight`` scales the negative's
    advantage to ``-alpha * negative_weight``. ``repair_mask`` (``[P]`` bool
    or None) lets an adaptive scheduler veto repair per group; None repairs every all-zero group.
    """
    r = _check_rewards(rewards)
    s = _check_scores(scores, r.shape)
    if not negative and not boundary:
        raise ValueError("negative=False (no contrast row) only applies to boundary estimators")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if not (0 <= negative_weight < np.inf):
        raise ValueError(f"negative_weight must be a finite number >= 0, got {negative_weight}")
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
        adv[act, neg[act]] = -alpha * negative_weight if negative else 0.0
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


# ----------------------------------------------------------------------------- the actor batch's rows


@dataclass
class Selection:
    """Which rows of a step's rollout the actor trains on, and with what advantage: one structure for
    every estimator. ``B = 2P`` for boundary estimators (row ``2p`` = group p's strongest positive, ``2p+1``
    its hardest negative), ``B = P*G`` for whole-group ones (GRPO, repair-only).

    row_index:    ``[B]`` int, flat rollout row (``p*G + j``) each actor row is taken from.
    from_anchor:  ``[B]`` bool, the row's tokens are its prompt's ground-truth anchor (a repaired slot).
    prompt_index: ``[B]`` int, the group p of each row.
    advantages:   ``[B]`` float32.
    live:         ``[B]`` bool, the row carries loss (False: a skipped group's filler rows, ``anchor_only``'s
                  negative).
    repaired, active_mask: ``[P]`` bool; anchor_index ``[P]`` (-1: not repaired); active_index ``[P, 2]``
    (strongest positive, hardest negative; -1 where absent).
    """

    row_index: np.ndarray
    from_anchor: np.ndarray
    prompt_index: np.ndarray
    advantages: np.ndarray
    live: np.ndarray
    repaired: np.ndarray
    active_mask: np.ndarray
    anchor_index: np.ndarray
    active_index: np.ndarray

    @classmethod
    def build(cls, boundary: bool, group_size: int, repaired, anchor_index, active_mask, active_index,
              advantages) -> "Selection":
        """``advantages`` is ``[P, 2]`` (the active pair) for boundary estimators, ``[P, G]`` otherwise."""
        repaired = np.asarray(repaired, bool)
        active_mask = np.asarray(active_mask, bool)
        active_index = np.asarray(active_index, np.int64)
        anchor_index = np.asarray(anchor_index, np.int64)
        adv = np.asarray(advantages, np.float32)
        P, G = repaired.shape[0], int(group_size)
        if boundary:
            row_index = (np.arange(P)[:, None] * G + np.clip(active_index, 0, None)).reshape(-1)  # [2P]
            from_anchor = np.stack([repaired, np.zeros(P, bool)], axis=1).reshape(-1)  # the positive is the anchor
            prompt_index = np.repeat(np.arange(P), 2)
            adv_rows = adv.reshape(-1)
            # skipped groups, and anchor_only's negative row (advantage 0), carry no loss at all
            live = np.repeat(active_mask, 2) & (adv_rows != 0)
        else:
            row_index = np.arange(P * G)
            from_anchor = ((np.arange(G)[None, :] == anchor_index[:, None]) & repaired[:, None]).reshape(-1)
            prompt_index = np.repeat(np.arange(P), G)
            adv_rows = adv.reshape(-1)
            live = np.ones(P * G, bool)  # zero-advantage rows still carry the KL term
        return cls(row_index=row_index, from_anchor=from_anchor, prompt_index=prompt_index, advantages=adv_rows,
                   live=live, repaired=repaired, active_mask=active_mask, anchor_index=anchor_index,
                   active_index=active_index)

    @classmethod
    def from_signal(cls, sig: RecastSignal) -> "Selection":
        adv = sig.pair_advantages if sig.boundary else sig.advantages
        return cls.build(sig.boundary, sig.advantages.shape[1], sig.repaired, sig.anchor_index, sig.active_mask,
                         sig.active_index, adv)


def gather_rows(rows, anchor_rows, sel: Selection) -> np.ndarray:
    """The physical filter: ``[P*G, ...]`` rollout rows -> ``[B, ...]`` actor rows, a repaired slot's row
    replaced by its prompt's ``anchor_rows [P, ...]`` (the ground truth rendered as a response). The one
    place the anchor's tokens enter the batch (token ids and masks alike)."""
    rows, anchor_rows = np.asarray(rows), np.asarray(anchor_rows)
    P = sel.repaired.shape[0]
    if anchor_rows.shape[0] != P or rows.shape[1:] != anchor_rows.shape[1:] or rows.shape[0] <= sel.row_index.max():
        raise ValueError(f"rows {rows.shape} / anchor_rows {anchor_rows.shape} do not fit a selection over {P} groups")
    out = rows[sel.row_index].copy()  # [B, ...]
    out[sel.from_anchor] = anchor_rows[sel.prompt_index[sel.from_anchor]]
    return out


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator, declared once: what it does to a group and how it runs.

    repair:   an all-zero group gets its least target-like response swapped for the ground-truth anchor.
    boundary: only the (strongest positive, hardest negative) pair per group is trained (+alpha / -alpha),
              a static ``[2P, T]`` actor batch; otherwise GRPO normalisation over the whole ``[P*G, T]``.
    negative: the hardest negative gets -alpha (False: 0 and no loss, ``anchor_only``).
    adaptive: repair is vetoed per group by the trainer's receding schedule (``AdaptiveRepair``).
    ablation: not one of the paper's estimators (grid presets leave it out of their "all estimators" blocks).

    :meth:`signal` is the numpy reference; :meth:`cell` the graph-mode selection the trainer runs for
    boundary estimators (``recast_ms.signals_ms.RecastSelect``, tested equal to :meth:`signal`); both
    become the same :class:`Selection` in :func:`select`.
    """

    name: str
    repair: bool
    boundary: bool
    negative: bool = True
    adaptive: bool = False
    ablation: bool = False
    help: str = ""

    def signal(self, rewards, scores, *, alpha: float = 1.0, negative_weight: float = 1.0, repair_mask=None,
               eps: float = 1e-6, ddof: int = 1) -> RecastSignal:
        return recast_signal(rewards, scores, alpha=alpha, repair=self.repair, boundary=self.boundary,
                             negative=self.negative, negative_weight=negative_weight, repair_mask=repair_mask,
                             eps=eps, ddof=ddof)

    def cell(self, group_size: int, alpha: float = 1.0, negative_weight: float = 1.0):
        """The graph-mode selection Cell (static ``[P, G]`` in, ``[P, 2]`` out), or None for whole-group
        estimators (their advantages are a plain GRPO normalisation)."""
        if not self.boundary:
            return None
        from recast_ms.signals_ms import RecastSelect  # mindspore only when a graph is wanted

        return RecastSelect(group_size, alpha, repair=self.repair, negative=self.negative,
                            negative_weight=negative_weight)

    def actor_rows(self, prompts: int, group_size: int) -> int:
        """Rows of the actor batch: ``2P`` (boundary) or ``P*G``."""
        return 2 * prompts if self.boundary else prompts * group_size


_REGISTRY = (
    Estimator("grpo", repair=False, boundary=False, help="GRPO: group-normalised advantages over all G samples"),
    Estimator("repair_only", repair=True, boundary=False,
              help="anchor swap in all-zero groups, then GRPO normalisation over the repaired group"),
    Estimator("boundary_only", repair=False, boundary=True,
              help="(strongest positive, hardest negative) at +alpha/-alpha; all-zero groups skipped"),
    Estimator("recast", repair=True, boundary=True, help="ReCast: repair, then contrast the boundary pair"),
    Estimator("recast_adaptive", repair=True, boundary=True, adaptive=True,
              help="ReCast whose repair recedes as groups become trainable on their own"),
    # repair, then +alpha on the strongest positive only: ReCast minus its contrast row
    Estimator("anchor_only", repair=True, boundary=True, negative=False, ablation=True,
              help="ablation: ReCast's repair and positive, no negative (the negative row has no loss)"),
)
ESTIMATORS: Dict[str, Estimator] = {e.name: e for e in _REGISTRY}


def get_estimator(name: str) -> Estimator:
    """The registered estimator ``name``; a clear error for an unknown name."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None


def compute_signal(name: str, rewards, scores, *, alpha: float = 1.0, **kw) -> RecastSignal:
    """Run the named estimator's numpy reference. ``grpo`` returns GRPO advantages in the same container."""
    return get_estimator(name).signal(rewards, scores, alpha=alpha, **kw)


def select(est: Estimator, rewards, scores, *, alpha: float = 1.0, negative_weight: float = 1.0, repair_mask=None,
           eps: float = 1e-6, cell=None) -> Selection:
    """A step's :class:`Selection` from ``[P, G]`` rewards and structural scores, for any estimator.

    With ``cell`` (``est.cell(G, alpha, negative_weight)``, boundary estimators) the selection runs as a compiled graph;
    otherwise the numpy reference runs. ``repair_mask [P]`` (None: all True) lets the adaptive schedule veto
    repair per group.
    """
    rewards = np.asarray(rewards)
    P, G = rewards.shape
    mask = np.ones(P, bool) if repair_mask is None else np.asarray(repair_mask, bool)
    if cell is None:
        return Selection.from_signal(est.signal(rewards, scores, alpha=alpha, negative_weight=negative_weight,
                                                repair_mask=mask, eps=eps))
    import mindspore as ms

    act_idx, pair_adv, act_mask, repaired, anchor = cell(ms.Tensor(rewards, ms.float32),
                                                         ms.Tensor(np.asarray(scores), ms.float32),
                                                         ms.Tensor(mask))[:5]
    return Selection.build(True, G, repaired.asnumpy(), anchor.asnumpy(), act_mask.asnumpy(), act_idx.asnumpy(),
                           pair_adv.asnumpy())


def common_prefix_len(a, b, mask=None) -> np.ndarray:
    """Leading tokens two ``[B, R]`` token rows share: ``[B]`` int in ``0..R``. ``mask [B, R]`` (1 on real
    tokens of ``b``) stops the count at ``b``'s end, so padding after two EOS never counts as shared."""
    a, b = np.asarray(a), np.asarray(b)
    same = a == b
    if mask is not None:
        same &= np.asarray(mask) > 0
    return np.cumprod(same, axis=1).sum(axis=1).astype(np.int64)


def divergent_mask(rows, loss_mask, sel: Selection) -> np.ndarray:
    """``rl.negative_mask=divergent``: the ``[B, R]`` loss mask with each boundary pair's negative row (row
    ``2p+1``) cut to its tokens from the first position where it differs from the pair's positive (row ``2p``,
    the anchor in a repaired group); positives and whole-group batches are returned unchanged."""
    rows, out = np.asarray(rows), np.array(loss_mask, dtype=np.float32, copy=True)
    if rows.shape[0] != 2 * sel.repaired.shape[0]:
        raise ValueError(f"divergent masking needs a boundary [2P, R] batch, got {rows.shape[0]} rows for "
                         f"{sel.repaired.shape[0]} groups")
    shared = common_prefix_len(rows[1::2], rows[0::2], out[1::2])  # [P]
    out[1::2] *= np.arange(rows.shape[1])[None, :] >= shared[:, None]
    return out


def prefix_histogram(rows, response_mask, sel: Selection, num_codes: int, prefix: str = "signals") -> Dict[str, float]:
    """Counts of active groups by the common-prefix length (in tokens, ``0..num_codes``) of their boundary pair
    (positive, hardest negative): how often +alpha and -alpha cancel on shared leading codes."""
    rows = np.asarray(rows)
    counts = np.zeros(num_codes + 1)
    if rows.shape[0] == 2 * sel.repaired.shape[0] and sel.active_mask.any():
        shared = np.minimum(common_prefix_len(rows[1::2], rows[0::2], np.asarray(response_mask)[1::2]), num_codes)
        counts = np.bincount(shared[sel.active_mask], minlength=num_codes + 1)[: num_codes + 1]
    return {f"{prefix}/pair_prefix_len_count/{k}": float(c) for k, c in enumerate(counts)}


def entropy_rows(logits, allowed=None) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits [N, V])`` per row; with ``allowed [N, V]`` bool, of the distribution
    renormalised over the allowed tokens (the SID-constrained policy the rollout and evaluation sample)."""
    lg = np.asarray(logits, np.float64)
    if allowed is not None:
        lg = np.where(allowed, lg, -np.inf)
    lg = lg - lg.max(axis=1, keepdims=True)
    p = np.exp(lg)
    p /= p.sum(axis=1, keepdims=True)
    return -(p * np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=1)


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
