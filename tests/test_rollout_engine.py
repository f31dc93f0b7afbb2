"""Rollout engine on a toy bigram decoder: constraints, sampling distribution, exact beam search."""

import numpy as np
import pytest

from recast_ms.rollout.engine import SIDConstraint, beam_search, sample_groups
from recast_ms.sid import MINIONEREC_FORMAT, PrefixTrie, SIDTokenMap

C = 4  # codes per level
PAD, EOS = 0, 1


class BigramDecoder:
    """logits depend only on the previous token: W[prev]. Counts the rows it encodes."""

    def __init__(self, W):
        self.W = W
        self.encoded_rows = 0

    def start(self, prompt_ids, prompt_lens, expand):
        self.encoded_rows += prompt_ids.shape[0]
        last = prompt_ids[np.arange(len(prompt_ids)), prompt_lens - 1]
        self.prev = np.repeat(last, expand)
        return self.W[self.prev]

    def step(self, tokens):
        self.prev = np.asarray(tokens)
        return self.W[self.prev]

    def reorder(self, index):
        self.prev = self.prev[index]


@pytest.fixture
def setup():
    vocab = {"<pad>": PAD, "<eos>": EOS, "x": 2}
    for tok in MINIONEREC_FORMAT.all_tokens(C):
        vocab[tok] = len(vocab)
    tmap = SIDTokenMap(MINIONEREC_FORMAT, C, vocab)
    rng = np.random.default_rng(0)
    sids = sorted({tuple(rng.integers(0, C, 3)) for _ in range(20)})
    trie = PrefixTrie(sids)
    V = len(vocab)
    W = rng.normal(0, 2, (V, V))
    cons = SIDConstraint(trie, tmap, EOS, V)
    return tmap, trie, sids, W, cons, V


def test_constrained_sampling_only_valid_items(setup):
    tmap, trie, sids, W, cons, V = setup
    dec = BigramDecoder(W)
    prompts = np.array([[2, 2, 0], [2, 5, 0]])
    ro = sample_groups(dec, prompts, np.array([2, 2]), group_size=16, max_new_tokens=4, eos_id=EOS, pad_id=PAD,
                       rng=np.random.default_rng(1), constraint=cons)
    assert ro.response_ids.shape == (32, 4)
    assert dec.encoded_rows == 2  # each prompt encoded once, not G times
    for row in ro.response_ids:
        parsed = tmap.parse_ids(row)
        assert len(parsed) == 1 and parsed[0] in set(sids)
        assert row[3] == EOS
    np.testing.assert_array_equal(ro.response_mask, 1.0)


@pytest.mark.parametrize("max_rows", [16, 40, 48])
def test_chunked_sampling_equals_one_pass(setup, max_rows):
    """max_rows decodes whole prompts per chunk, one static chunk shape; the samples are the same."""
    tmap, trie, sids, W, cons, V = setup
    prompts = np.array([[2, 2, 0], [2, 5, 0], [2, 7, 0], [5, 2, 2]])
    kw = dict(group_size=16, max_new_tokens=4, eos_id=EOS, pad_id=PAD, constraint=cons)
    whole = sample_groups(BigramDecoder(W), prompts, np.array([2, 2, 2, 3]), rng=np.random.default_rng(3), **kw)
    dec = BigramDecoder(W)
    part = sample_groups(dec, prompts, np.array([2, 2, 2, 3]), rng=np.random.default_rng(3), max_rows=max_rows, **kw)
    for field in ("response_ids", "response_mask", "logps"):
        np.testing.assert_array_equal(getattr(part, field), getattr(whole, field))
    per_chunk = max(1, max_rows // 16)
    assert dec.encoded_rows == -(-4 // per_chunk) * per_chunk  # the short last chunk is filled to one shape


def test_sampling_matches_model_distribution(setup):
    tmap, trie, sids, W, cons, V = setup
    dec = BigramDecoder(W)
    n = 4000
    ro = sample_groups(dec, np.array([[2]]), np.array([1]), group_size=n, max_new_tokens=1, eos_id=EOS, pad_id=PAD,
                       rng=np.random.default_rng(2), temperature=1.0)
    p = np.exp(W[2] - W[2].max())
    p /= p.sum()
    freq = np.bincount(ro.response_ids[:, 0], minlength=V) / n
    assert np.abs(freq - p).max() < 0.03
    # the recorded log-probs are the model's
    np.testing.assert_allclose(ro.logps[:, 0], np.log(p[ro.response_ids[:, 0]]), rtol=1e-5)


def test_top_k_restricts_support(setup):
    tmap, trie, sids, W, cons, V = setup
    ro = sample_groups(BigramDecoder(W), np.array([[2]]), np.array([1]), group_size=500, max_new_tokens=1, eos_id=EOS,
                       pad_id=PAD, rng=np.random.default_rng(3), top_k=3)
    assert set(ro.response_ids[:, 0].tolist()) <= set(np.argsort(-W[2])[:3].tolist())


def test_sampling_is_reproducible_for_a_seed(setup):
    tmap, trie, sids, W, cons, V = setup
    kw = dict(group_size=8, max_new_tokens=4, eos_id=EOS, pad_id=PAD, constraint=cons)
    a = sample_groups(BigramDecoder(W), np.array([[2]]), np.array([1]), rng=np.random.default_rng(7), **kw)
    b = sample_groups(BigramDecoder(W), np.array([[2]]), np.array([1]), rng=np.random.default_rng(7), **kw)
    np.testing.assert_array_equal(a.response_ids, b.response_ids)


def test_beam_search_is_exact_when_beams_cover_the_catalogue(setup):
    """With K >= #items no prefix is ever pruned, so beam search must return the exact ranking;
    with a smaller K every returned beam must carry its true score, best first."""
    tmap, trie, sids, W, cons, V = setup
    K = len(sids)

    def logsm(x):
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    for first in (2, 7):
        seqs, scores = beam_search(BigramDecoder(W), np.array([[first]]), np.array([1]), beam_width=K,
                                   max_new_tokens=4, eos_id=EOS, pad_id=PAD, constraint=cons)
        # brute force: score of every valid item under the constrained (renormalised) model
        brute = []
        for sid in sids:
            toks = tmap.sid_to_ids(sid) + [EOS]
            prev, total, prefix = first, 0.0, []
            for t, tok in enumerate(toks):
                lp = logsm(W[prev])
                allowed = cons.mask(t, np.array([prefix]) if prefix else np.zeros((1, 0), np.int64))[0]
                # the engine masks after normalising, so the score is the raw log-prob
                total += lp[tok]
                assert allowed[tok]
                prefix.append(tok)
                prev = tok
            brute.append((total, sid))
        brute.sort(key=lambda x: -x[0])
        got = [tmap.parse_ids(s)[0] for s in seqs[0]]
        assert got == [sid for _, sid in brute[:K]]
        np.testing.assert_allclose(scores[0], [s for s, _ in brute[:K]], rtol=1e-9)
        true = dict((sid, sc) for sc, sid in brute)
        seqs4, scores4 = beam_search(BigramDecoder(W), np.array([[first]]), np.array([1]), beam_width=4,
                                     max_new_tokens=4, eos_id=EOS, pad_id=PAD, constraint=cons)
        got4 = [tmap.parse_ids(s)[0] for s in seqs4[0]]
        np.testing.assert_allclose(scores4[0], [true[g] for g in got4], rtol=1e-9)
        assert np.all(np.diff(scores4[0]) <= 0)


def test_beam_search_surplus_beams_sorted_last(setup):
    tmap, trie, sids, W, cons, V = setup
    K = len(sids) + 5
    seqs, scores = beam_search(BigramDecoder(W), np.array([[2]]), np.array([1]), beam_width=K, max_new_tokens=4,
                               eos_id=EOS, pad_id=PAD, constraint=cons)
    assert np.isfinite(scores[0, : len(sids)]).all() and (scores[0, : len(sids)] > -1e29).all()
    assert (scores[0, len(sids):] <= -1e29).all()
    assert {tmap.parse_ids(s)[0] for s in seqs[0, : len(sids)]} == set(sids)
