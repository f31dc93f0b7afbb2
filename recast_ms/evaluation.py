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
    return [samples[i] for i in eval_subset_rows(len(samples), max_prompts, seed)]


def eval_subset_rows(n: int, max_prompts: int, seed: int = -1) -> np.ndarray:
    """The rows of a pool of ``n`` samples that ``eval_subset`` keeps, in split order ``[N] int64``: what a
    per-prompt record names its prompts by (the same rows, in the same order, for every arm of an experiment)."""
    if not max_prompts or max_prompts >= n:
        return np.arange(n, dtype=np.int64)
    if seed < 0:
        return np.arange(max_prompts, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_prompts, replace=False)).astype(np.int64)


def per_prompt_metrics(rankings: Sequence[Sequence], target_sets: Sequence, ks: Sequence[int]) -> Dict[str, np.ndarray]:
    """Per prompt, in ``rankings``' order: ``pass@K`` (1/0, ``[N] uint8``) and ``ndcg@K`` (``[N] float64``) for each K;
    their means are ``aggregate_metrics``' values. A paired bootstrap over prompts needs these, not the means."""
    from recast_ms.metrics import ndcg_at_k, pass_at_k

    if len(rankings) != len(target_sets):
        raise ValueError(f"{len(rankings)} rankings but {len(target_sets)} target sets")
    out: Dict[str, np.ndarray] = {}
    for k in ks:
        out[f"pass@{k}"] = np.array([pass_at_k(r, t, k) for r, t in zip(rankings, target_sets)], np.uint8)
        out[f"ndcg@{k}"] = np.array([ndcg_at_k(r, t, k) for r, t in zip(rankings, target_sets)], np.float64)
    return out


PER_PROMPT_DIR = "eval_per_prompt"  # <run_dir>/eval_per_prompt/step_<N>.npz, one per RL evaluation


def per_prompt_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, PER_PROMPT_DIR, f"step_{int(step)}.npz")


def write_per_prompt(path: str, rows: np.ndarray, values: Dict[str, np.ndarray], split: str) -> None:
    """``path`` (compressed npz): ``prompt_index [N]`` (rows of the evaluated pool, ``eval_subset_rows``), ``split``
    and one ``[N]`` array per metric; written whole or not at all (a kill mid-write leaves the old file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, prompt_index=np.asarray(rows, np.int64), split=np.array(split), **values)
    os.replace(tmp, path)


def read_per_prompt(path: str) -> Tuple[np.ndarray, str, Dict[str, np.ndarray]]:
    """``(prompt_index [N], split, metric -> [N] float64)`` of a file ``write_per_prompt`` wrote."""
    with np.load(path, allow_pickle=False) as z:
        values = {k: z[k].astype(np.float64) for k in z.files if k not in ("prompt_index", "split")}
        return z["prompt_index"], str(z["split"]), values


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
