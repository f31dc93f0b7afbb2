"""Evaluation: beam search (K beams, optionally SID-constrained) over a model, then Pass/Recall/NDCG@K.

Beams are read by ``recast_ms.rewards.response_sids``, the parser RL rewards use: a beam is a hit here
exactly when the same response would earn reward 1.

Batches have a fixed size (the last one is filled with repeated prompts whose results are dropped),
so the decoder compiles once per run.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from recast_ms.config import EvalConfig
from recast_ms.data.batching import encode_prompts
from recast_ms.metrics import aggregate_metrics, most_popular_ranking
from recast_ms.rewards import response_length, response_sids
from recast_ms.rollout.engine import SIDConstraint, beam_search
from recast_ms.sid import SIDTokenMap


def eval_subset(samples: Sequence, max_prompts: int, seed: int = -1) -> list:
    """The evaluation prompts: all of ``samples`` when ``max_prompts`` is 0 (or not below their number);
    else the first ``max_prompts`` rows (``seed < 0``, the historical default), or a random subset of
    ``max_prompts`` rows drawn without replacement by ``numpy.random.default_rng(seed)`` and kept in
    split order (``seed >= 0``). A pure function of (split, size, seed): every arm of an experiment
    evaluates on the same rows, and the first rows (one user-id range) no longer stand in for the split."""
    samples = list(samples)
    if not max_prompts or max_prompts >= len(samples):
        return samples
    if seed < 0:
        return samples[:max_prompts]
    rows = np.sort(np.random.default_rng(seed).choice(len(samples), size=max_prompts, replace=False))
    return [samples[i] for i in rows]


def generate_rankings(decoder, samples, codebook, tokenizer, token_map: SIDTokenMap, *, seq_length: int,
                      ecfg: EvalConfig, with_titles: bool = False, progress: bool = False) -> List[List]:
    """Beam-ordered SIDs (None for an unparseable beam) for each sample."""
    from tqdm import tqdm

    R = response_length(codebook)
    prompts = encode_prompts(samples, codebook, tokenizer, seq_length - R, with_titles)
    cons = SIDConstraint(codebook.trie, token_map, tokenizer.eos_id, tokenizer.vocab_size) if ecfg.constrained else None
    out: List[List] = []
    B = ecfg.batch_size
    for start in tqdm(range(0, len(samples), B), desc="eval", disable=not progress, dynamic_ncols=True):
        ids, lens = prompts.ids[start : start + B], prompts.lens[start : start + B]
        n = len(ids)
        if n < B:  # fixed batch shape: fill with copies of the first row, dropped below
            ids = np.concatenate([ids, np.repeat(ids[:1], B - n, 0)])
            lens = np.concatenate([lens, np.repeat(lens[:1], B - n, 0)])
        seqs, scores = beam_search(decoder, ids, lens, beam_width=ecfg.beam_width, max_new_tokens=R,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, constraint=cons)
        for b in range(n):
            live = scores[b] > -1e29  # beams that exist (a tiny catalogue may have fewer than K items)
            codes, parsed = response_sids(seqs[b][live], token_map)  # the parser RL rewards use
            out.append([tuple(int(c) for c in sid) if ok else None for sid, ok in zip(codes, parsed)])
    return out


def evaluate(decoder, samples, codebook, tokenizer, *, seq_length: int, ecfg: EvalConfig, prefix: str = "eval",
             with_titles: bool = False, progress: bool = False) -> Tuple[Dict[str, float], List[List]]:
    from recast_ms.models.tokenizer import sid_token_map

    tmap = sid_token_map(tokenizer, codebook)
    rankings = generate_rankings(decoder, samples, codebook, tokenizer, tmap, seq_length=seq_length, ecfg=ecfg,
                                 with_titles=with_titles, progress=progress)
    metrics = aggregate_metrics(rankings, [s.target_sids for s in samples], ecfg.ks, prefix=prefix, codebook=codebook)
    return metrics, rankings


def popularity_baseline(train, samples, ks: Sequence[int], prefix: str = "popular") -> Dict[str, float]:
    ranking = most_popular_ranking(train, max(ks))
    return aggregate_metrics([ranking] * len(samples), [s.target_sids for s in samples], ks, prefix=prefix)


def format_table(rows: Dict[str, Dict[str, float]], ks: Sequence[int]) -> str:
    """Markdown table: one row per system, Pass/Recall/NDCG at each K."""
    cols = [f"pass@{k}" for k in ks] + [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        vals = []
        for c in cols:
            key = next((k for k in m if k.endswith("/" + c)), None)
            vals.append(f"{m[key]:.4f}" if key is not None else "-")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
