"""Prompt and response rendering, the ONE place it happens: SFT, RL rollouts and evaluation all call here.

Template (no titles)::

    history: <a_1><b_2><c_3> <a_4><b_5><c_6> next:

With titles, each history item is followed by its (shortened) title and items are separated by
``" | "``::

    history: <a_1><b_2><c_3> Scotch tape | <a_4><b_5><c_6> Blue pen next:

The response is the target SID exactly as the codebook renders it (``<a_7><b_8><c_9>``); the EOS id
is appended at tokenization, so an L-level SID in MiniOneRec format is L code tokens + EOS. Prompt
and response are tokenized separately and concatenated by the caller, so a repaired anchor
(``encode_response`` of the target) is token-for-token what a correct rollout would produce.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recast_ms.data.sample import Sample
from recast_ms.sid import SIDCodebook

PROMPT_PREFIX = "history:"
PROMPT_SUFFIX = "next:"
TEMPLATE_WORDS = (PROMPT_PREFIX, PROMPT_SUFFIX)  # fixed words of the template (tokenizers may pin them)
TITLE_SEPARATOR = " | "
MAX_TITLE_CHARS = 40
DEFAULT_PROMPT_BUCKETS = (32, 64, 128)


def _short_title(title: str, max_chars: int) -> str:
    title = " ".join(str(title).split())  # no newlines or runs of spaces inside a prompt
    return title if len(title) <= max_chars else title[:max_chars].rstrip()


def render_prompt(sample: Sample, codebook: SIDCodebook, with_titles: bool = False,
                  max_items: Optional[int] = None, max_title_chars: int = MAX_TITLE_CHARS) -> str:
    """The prompt text of ``sample``: its history (the last ``max_items`` items if given) as SIDs."""
    sids = sample.history_sids
    items = sample.history_items
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        sids, items = sids[-max_items:], items[-max_items:]
    if with_titles:
        parts = []
        for item, sid in zip(items, sids):
            title = codebook.item_titles.get(item, "")
            parts.append(f"{codebook.render(sid)} {_short_title(title, max_title_chars)}" if title else codebook.render(sid))
        body = TITLE_SEPARATOR.join(parts)
    else:
        body = " ".join(codebook.render(sid) for sid in sids)
    return f"{PROMPT_PREFIX} {body} {PROMPT_SUFFIX}"


def render_response(target_sid: Sequence[int], codebook: SIDCodebook) -> str:
    """The response text for one target SID (no EOS: that is a token id, added by ``encode_response``)."""
    return codebook.render(target_sid)


# ---------------------------------------------------------------------------------------------- token ids


def encode_prompt(sample: Sample, codebook: SIDCodebook, tokenizer, max_len: Optional[int] = None,
                  with_titles: bool = False) -> List[int]:
    """Prompt token ids (BOS first if the tokenizer has one) of the MOST RECENT history items that fit
    ``max_len`` tokens; a SID is never cut. ValueError if one item does not fit.

    The work is bounded by ``max_len``, not by the history length: every item renders to at least one
    token, so at most ``max_len`` items are ever rendered, and the number kept is found by bisection
    (about log2(max_len) tokenizer calls; dropping one item per call made a 10,000-item history hang SFT).
    """
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    n = len(sample.history_sids)
    if n == 0:
        raise ValueError(f"{sample.origin}: empty history, nothing to prompt with")

    def encode(keep: int) -> List[int]:
        return bos + tokenizer.encode(render_prompt(sample, codebook, with_titles, max_items=keep))

    if max_len is None:
        return encode(n)
    hi = min(n, max_len)
    ids = encode(hi)
    if len(ids) <= max_len:
        return ids
    # invariant: ``lo`` items fit (0: none known yet), ``hi`` items do not; prompt length grows with items kept
    lo, best = 0, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = encode(mid)
        if len(ids) <= max_len:
            lo, best = mid, ids
        else:
            hi = mid
    if best is None:
        raise ValueError(f"{sample.origin}: even a one-item prompt exceeds max_len={max_len} tokens (a prompt gets "
                         f"seq_length minus the L + 1 response tokens: raise seq_length)")
    return best


def encode_response(target_sid: Sequence[int], codebook: SIDCodebook, tokenizer) -> List[int]:
    """Response token ids: the rendered target SID, then EOS."""
    return tokenizer.encode(render_response(target_sid, codebook)) + [tokenizer.eos_id]


def encode_sample(sample: Sample, codebook: SIDCodebook, tokenizer, max_prompt_len: Optional[int] = None,
                  with_titles: bool = False, target_index: int = 0) -> Tuple[List[int], List[int]]:
    """``(prompt_ids, response_ids)`` of one sample; the response names ``target_sids[target_index]``."""
    return (encode_prompt(sample, codebook, tokenizer, max_prompt_len, with_titles),
            encode_response(sample.target_sids[target_index], codebook, tokenizer))


def pad_to_bucket(seqs: Sequence[Sequence[int]], pad_id: int, buckets: Optional[Sequence[int]] = None,
                  side: str = "right") -> Tuple[np.ndarray, np.ndarray]:
    """Pads ``seqs`` to the smallest bucket length that holds the longest one (the exact max if
    ``buckets`` is None). Returns ``ids`` and ``mask`` (1 = real token), both int32 ``[B, T]``.

    ``side="left"`` pads on the left (batched generation); ValueError if a sequence exceeds every bucket.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    if buckets is None:
        T = longest
    else:
        fitting = [b for b in sorted(buckets) if b >= longest]
        if not fitting:
            raise ValueError(f"a sequence of {longest} tokens exceeds the largest bucket {max(buckets)}")
        T = fitting[0]
    ids = np.full((len(seqs), T), pad_id, dtype=np.int32)  # [B, T]
    mask = np.zeros((len(seqs), T), dtype=np.int32)  # [B, T]
    for row, s in enumerate(seqs):
        if not len(s):
            continue
        if side == "right":
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        else:
            ids[row, T - len(s):] = s
            mask[row, T - len(s):] = 1
    return ids, mask


def encode_batch(samples: Sequence[Sample], codebook: SIDCodebook, tokenizer,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 response_buckets: Optional[Sequence[int]] = None, with_titles: bool = False,
                 prompt_side: str = "right") -> Dict[str, np.ndarray]:
    """``prompt_ids, prompt_mask [B, Tp]`` and ``response_ids, response_mask [B, Tr]`` for a batch.

    Prompts longer than the largest prompt bucket lose their oldest history items (``encode_prompt``).
    """
    max_prompt = max(prompt_buckets)
    prompts, responses = zip(*(encode_sample(s, codebook, tokenizer, max_prompt, with_titles) for s in samples))
    prompt_ids, prompt_mask = pad_to_bucket(prompts, tokenizer.pad_id, prompt_buckets, side=prompt_side)
    response_ids, response_mask = pad_to_bucket(responses, tokenizer.pad_id, response_buckets)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "response_ids": response_ids, "response_mask": response_mask}


def prompt_corpus(samples: Sequence[Sample], codebook: SIDCodebook, with_titles: bool = False) -> List[str]:
    """Prompt and response texts of ``samples``: what a tokenizer is trained on."""
    out: List[str] = []
    for s in samples:
        out.append(render_prompt(s, codebook, with_titles))
        out.extend(render_response(t, codebook) for t in s.target_sids)
    return out
