"""Ranking metrics over one prompt's ranked SIDs, their aggregation, and a most-popular baseline.

A ranking is the list of SIDs in beam order. Duplicates are dropped, the first occurrence kept (the
spec's "top K from 32 beams, de-duplicated, beam order"). ``None`` marks a beam that named no SID
(unparseable): it keeps its rank slot and never matches. Targets are a set of SIDs (``ID(y*)``).

* ``pass@K``   = 1 if any of the top K is a target (= HR@K for single-target data).
* ``recall@K`` = |top K ∩ targets| / |targets|.
* ``ndcg@K``   = DCG@K / IDCG@K with binary relevance, ``DCG = sum_{rank r <= K, hit} 1/log2(r+1)``
  and IDCG over ``min(K, |targets|)`` hits.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from recast_ms.sid import SID, SIDCodebook

DEFAULT_KS = (1, 5, 10, 32)


def _as_sid(x) -> Optional[SID]:
    if x is None:
        return None
    try:
        sid = tuple(int(c) for c in x)
    except (TypeError, ValueError):
        return None
    return sid or None


def dedup_ranking(ranked: Iterable) -> List[Optional[SID]]:
    """``ranked`` with repeated SIDs removed (first occurrence kept); ``None`` entries keep their slot."""
    out: List[Optional[SID]] = []
    seen = set()
    for x in ranked:
        sid = _as_sid(x)
        if sid is None:
            out.append(None)
        elif sid not in seen:
            seen.add(sid)
            out.append(sid)
    return out


def _targets(targets: Iterable) -> set:
    t = {s for s in (_as_sid(x) for x in targets) if s is not None}
    if not t:
        raise ValueError("a prompt needs at least one target SID")
    return t


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def pass_at_k(ranked: Sequence, targets: Iterable, k: int) -> float:
    _check_k(k)
    t = _targets(targets)
    return float(any(s in t for s in dedup_ranking(ranked)[:k]))


def recall_at_k(ranked: Sequence, targets: Iterable, k: int) -> float:
    _check_k(k)
    t = _targets(targets)
    return len({s for s in dedup_ranking(ranked)[:k] if s in t}) / len(t)


def ndcg_at_k(ranked: Sequence, targets: Iterable, k: int) -> float:
    _check_k(k)
    t = _targets(targets)
    dcg = sum(1.0 / math.log2(r + 2) for r, s in enumerate(dedup_ranking(ranked)[:k]) if s in t)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(t))))
    return dcg / idcg


def valid_ratio(generated: Sequence, codebook: SIDCodebook) -> float:
    """Fraction of generated outputs that name a catalogue item.

    An output is a SID (tuple of codes), ``None`` (unparseable) or a text (valid if it names at least
    one catalogue SID). 0.0 for an empty list.
    """
    if not len(generated):
        return 0.0
    ok = 0
    for g in generated:
        if isinstance(g, str):
            ok += bool(codebook.parse(g))
        else:
            sid = _as_sid(g)
            ok += sid is not None and codebook.is_valid(sid)
    return ok / len(generated)


def aggregate_metrics(rankings: Sequence[Sequence], target_sets: Sequence[Iterable], ks: Sequence[int] = DEFAULT_KS,
                      prefix: str = "eval", codebook: Optional[SIDCodebook] = None) -> Dict[str, float]:
    """Mean ``pass@K``, ``recall@K``, ``ndcg@K`` over prompts, keys ``f"{prefix}/pass@{K}"`` etc.

    Also ``{prefix}/num_prompts``, and ``{prefix}/valid_ratio`` over all raw beams when ``codebook``
    is given. A K larger than a ranking simply uses the whole ranking.
    """
    if len(rankings) != len(target_sets):
        raise ValueError(f"{len(rankings)} rankings but {len(target_sets)} target sets")
    n = len(rankings)
    out: Dict[str, float] = {}
    sums = {(name, k): 0.0 for name in ("pass", "recall", "ndcg") for k in ks}
    for ranked, targets in zip(rankings, target_sets):
        for k in ks:
            sums[("pass", k)] += pass_at_k(ranked, targets, k)
            sums[("recall", k)] += recall_at_k(ranked, targets, k)
            sums[("ndcg", k)] += ndcg_at_k(ranked, targets, k)
    for name in ("pass", "recall", "ndcg"):
        for k in ks:
            out[f"{prefix}/{name}@{k}"] = sums[(name, k)] / n if n else 0.0
    out[f"{prefix}/num_prompts"] = float(n)
    if codebook is not None:
        beams = [b for r in rankings for b in r]
        out[f"{prefix}/valid_ratio"] = valid_ratio(beams, codebook)
    return out


def popularity_counts(train_samples: Iterable) -> Counter:
    """How often each SID is a training target (``Sample.target_sids``)."""
    counts: Counter = Counter()
    for s in train_samples:
        counts.update(s.target_sids)
    return counts


def most_popular_ranking(train_samples: Iterable, k: int = 32) -> List[SID]:
    """The ``k`` most frequent training-target SIDs; ties broken by SID order (deterministic)."""
    counts = popularity_counts(train_samples)
    ranked: List[Tuple[int, SID]] = sorted(((-c, sid) for sid, c in counts.items()))
    return [sid for _, sid in ranked[:k]]
