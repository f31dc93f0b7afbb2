"""A seeded synthetic catalogue and users, needing no files: the embedded default data set.

Catalogue: a code tree of ``num_levels`` levels over a codebook of ``codebook_size`` codes a level.
Level 0 uses ``branches[0]`` codes, every node at depth d < L-1 has ``branches[d]`` children, and
every deepest group (all levels but the last fixed) holds ``leaf_range`` items. Each leaf is one
item; item ids are a seeded shuffle of 0..N-1 so the id says nothing about the SID.

Users: each user has ``preferred_top`` preferred level-0 branches and, under each, one preferred
group. A sequence starts in a preferred group; the next item, given the last item ``s``, is

* with ``p_successor``: the successor of ``s`` in its group's fixed (seeded) cyclic order
  (predictable from the last item alone);
* with ``p_sibling``: another item of the same group (shares L-1 codes: a near miss for the
  successor);
* with ``p_branch``: an item of the user's preferred group under ``s``'s level-0 branch (or a random
  group there if that is ``s``'s own group): shares the level-0 code;
* with ``p_jump``: an item of the user's preferred group under another preferred branch;
* otherwise a uniformly random item (noise).

So a good policy hits often, a near miss shares one or two codes with the target, and a weak policy
(uniform over ~300 items) hits about 0.3% of the time. Split per user, leave-last-out: the last
transition is ``test``, the one before ``valid``, all earlier ones (history = previous
``max_history`` items) ``train``; train histories and targets therefore never reach a valid or test
target of the same user. Deterministic for a given config (seed included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from recast_ms.data.sample import LoadReport, Sample, Splits
from recast_ms.sid import SID, SIDCodebook, SIDFormat

_TOP_WORDS = ("tape", "glue", "pen", "paper", "ink", "label", "clip", "file", "lamp", "cable", "valve", "drill",
              "scale", "glove", "brush", "mask", "filter", "pump", "knife", "rope", "bolt", "fan", "lens", "wax",
              "foam", "tube", "sensor", "meter", "hose", "seal", "sheet", "box")
_MID_WORDS = ("red", "blue", "mini", "pro", "heavy", "soft", "clear", "black", "steel", "eco", "wide", "fine",
              "dual", "flex", "max", "lite", "gold", "grey", "long", "flat", "thin", "tall", "bulk", "dry",
              "wet", "cold", "warm", "sharp", "round", "square", "smart", "basic")


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_levels: int = 3
    codebook_size: int = 16
    branches: Tuple[int, ...] = (8, 4)  # children per node at depths 0..L-2 (level 0: codes used)
    leaf_range: Tuple[int, int] = (5, 14)  # items per deepest group, inclusive range
    num_users: int = 600
    seq_len_range: Tuple[int, int] = (6, 14)  # items per user, inclusive range
    max_history: int = 10
    preferred_top: int = 2
    p_successor: float = 0.4
    p_sibling: float = 0.2
    p_branch: float = 0.15
    p_jump: float = 0.12  # the rest (0.13 by default) is uniform noise

    def __post_init__(self):
        if self.num_levels < 2:
            raise ValueError("the synthetic hierarchy needs num_levels >= 2")
        if len(self.branches) != self.num_levels - 1:
            raise ValueError(f"branches needs {self.num_levels - 1} entries (depths 0..L-2), got {self.branches}")
        if any(b < 1 or b > self.codebook_size for b in self.branches):
            raise ValueError(f"branches {self.branches} must lie in [1, codebook_size={self.codebook_size}]")
        lo, hi = self.leaf_range
        if not 1 <= lo <= hi <= self.codebook_size:
            raise ValueError(f"leaf_range {self.leaf_range} must satisfy 1 <= lo <= hi <= codebook_size")
        if self.seq_len_range[0] < 4:
            raise ValueError("sequences need >= 4 items (train, valid and test transitions)")
        if self.preferred_top > self.branches[0]:
            raise ValueError("preferred_top exceeds the number of level-0 branches")
        p = self.p_successor + self.p_sibling + self.p_branch + self.p_jump
        if min(self.p_successor, self.p_sibling, self.p_branch, self.p_jump) < 0 or p > 1.0 + 1e-9:
            raise ValueError("transition probabilities must be >= 0 and sum to <= 1")


def _build_catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> Dict[SID, List[SID]]:
    """Deepest group prefix (L-1 codes) -> its items' SIDs in the group's cyclic successor order."""
    prefixes: List[Tuple[int, ...]] = [()]
    for width in cfg.branches:
        prefixes = [p + (int(c),) for p in prefixes for c in sorted(rng.choice(cfg.codebook_size, width, replace=False))]
    groups: Dict[SID, List[SID]] = {}
    for p in prefixes:
        n = int(rng.integers(cfg.leaf_range[0], cfg.leaf_range[1] + 1))
        codes = rng.choice(cfg.codebook_size, n, replace=False)  # a random order: the successor cycle
        groups[p] = [p + (int(c),) for c in codes]
    return groups


def make_synthetic(cfg: SyntheticConfig = SyntheticConfig()) -> Splits:
    """Catalogue, users and leave-last-out train/valid/test splits for ``cfg`` (deterministic)."""
    rng = np.random.default_rng(cfg.seed)
    groups = _build_catalogue(cfg, rng)
    group_keys = list(groups)
    all_sids = [s for g in group_keys for s in groups[g]]
    item_ids = rng.permutation(len(all_sids))
    sid_to_item = {sid: int(i) for sid, i in zip(all_sids, item_ids)}
    fmt = SIDFormat(num_levels=cfg.num_levels)
    titles = {sid_to_item[s]: " ".join([_TOP_WORDS[s[0] % len(_TOP_WORDS)]]
                                       + [_MID_WORDS[c % len(_MID_WORDS)] for c in s[1:-1]] + [str(s[-1])])
              for s in all_sids}
    codebook = SIDCodebook({sid_to_item[s]: s for s in all_sids}, fmt=fmt, codebook_size=cfg.codebook_size,
                           item_titles=titles)
    position = {s: (g, k) for g in group_keys for k, s in enumerate(groups[g])}
    tops = sorted({g[0] for g in group_keys})
    groups_under_top = {t: [g for g in group_keys if g[0] == t] for t in tops}
    # skewed branch popularity so a most-popular baseline is a meaningful (weak) reference
    top_weights = 1.0 / np.arange(1, len(tops) + 1)
    top_weights = rng.permutation(top_weights / top_weights.sum())

    def random_item(group: SID) -> SID:
        items = groups[group]
        return items[int(rng.integers(len(items)))]

    train: List[Sample] = []
    valid: List[Sample] = []
    test: List[Sample] = []
    for u in range(cfg.num_users):
        user = f"U{u}"
        pref_tops = [int(t) for t in rng.choice(tops, cfg.preferred_top, replace=False, p=top_weights)]
        pref_group = {t: groups_under_top[t][int(rng.integers(len(groups_under_top[t])))] for t in tops}
        n = int(rng.integers(cfg.seq_len_range[0], cfg.seq_len_range[1] + 1))
        seq = [random_item(pref_group[pref_tops[0]])]
        while len(seq) < n:
            last = seq[-1]
            group, k = position[last]
            r = rng.random()
            if r < cfg.p_successor:
                nxt = groups[group][(k + 1) % len(groups[group])]
            elif r < cfg.p_successor + cfg.p_sibling:
                nxt = random_item(group)
            elif r < cfg.p_successor + cfg.p_sibling + cfg.p_branch:
                target_group = pref_group[last[0]]
                if target_group == group:
                    target_group = groups_under_top[last[0]][int(rng.integers(len(groups_under_top[last[0]])))]
                nxt = random_item(target_group)
            elif r < cfg.p_successor + cfg.p_sibling + cfg.p_branch + cfg.p_jump:
                others = [t for t in pref_tops if t != last[0]] or pref_tops
                nxt = random_item(pref_group[others[int(rng.integers(len(others)))]])
            else:
                nxt = all_sids[int(rng.integers(len(all_sids)))]
            seq.append(nxt)
        items = [sid_to_item[s] for s in seq]
        for pos in range(1, n):
            hist = items[max(0, pos - cfg.max_history):pos]
            sample = Sample.from_items(user, hist, [items[pos]], codebook, origin=f"synthetic:{user}@{pos}")
            (test if pos == n - 1 else valid if pos == n - 2 else train).append(sample)

    report = LoadReport()
    report.counts.update(items=len(all_sids), users=cfg.num_users, train=len(train), valid=len(valid),
                         test=len(test), malformed=0)
    return Splits(codebook=codebook, train=train, valid=valid, test=test, report=report, name=f"synthetic-{cfg.seed}")
