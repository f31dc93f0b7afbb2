"""Qwen3KVDecoder (KV cache over the MindFormers model's own parameters) against the full MindFormers forward.

One tiny model (vocab 300, seq_length 32) and one set of shapes (B=3 prompts of different lengths, 4 rows
per prompt) so each graph compiles once for the whole module.
"""
import numpy as np
import pytest
from mindspore import Tensor
from mindspore.graph.api import ms_compile_cache

from recast_ms.models.qwen3 import MODEL_CONFIG_DIR, build_qwen3
from recast_ms.models.qwen3_kv import Qwen3KVDecoder
from recast_ms.rollout.decoder import FullForwardDecoder
from recast_ms.rollout.engine import SIDConstraint, beam_search, sample_groups
from recast_ms.sid import MINIONEREC_FORMAT, PrefixTrie, SIDTokenMap

VOCAB, SEQ, PAD, EOS = 300, 32, 0, 1
MAX_PROMPT, MAX_NEW = 12, 6
LENS = np.array([5, 9, 12])
EXPAND = 4  # rows per prompt: samples in sample_groups, beams in beam_search
TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    model = build_qwen3(MODEL_CONFIG_DIR / "qwen3_tiny.yaml", vocab_size=VOCAB, seq_length=SEQ, pad_token_id=PAD,
                        eos_token_id=EOS, seed=7)
    rng = np.random.default_rng(0)
    prompts = np.full((len(LENS), MAX_PROMPT), PAD, np.int64)  # right-padded, different lengths
    for row, length in enumerate(LENS):
        prompts[row, :length] = rng.integers(2, VOCAB, length)
    names = [param.name for param in model.get_parameters()]
    kv = Qwen3KVDecoder(model, MAX_PROMPT, MAX_NEW, PAD)
    full = FullForwardDecoder(model, SEQ, PAD)
    assert [param.name for param in model.get_parameters()] == names  # sharing renames nothing
    return model, prompts, kv, full


def _run_both(kv, full, prompts, steps, rng, reorder_at=(), pad_rows=(), expand=EXPAND):
    """start + steps on both decoders with the same tokens; returns per-call max abs differences."""
    a = kv.start(prompts, LENS, expand)
    b = full.start(prompts, LENS, expand)
    assert a.shape == b.shape == (len(LENS) * expand, VOCAB) and a.dtype == np.float32
    errors = [np.abs(a - b).max()]
    rows = a.shape[0]
    for t in range(steps):
        if t in reorder_at:
            # a beam-search-like gather: repeats allowed, rows stay in their prompt's group
            index = np.arange(rows) // expand * expand + rng.integers(0, expand, rows)
            kv.reorder(index)
            full.reorder(index)
        tokens = rng.integers(2, VOCAB, rows)
        tokens[list(pad_rows)] = PAD  # finished rows are fed the pad id
        a, b = kv.step(tokens), full.step(tokens)
        errors.append(np.abs(a - b).max())
    return errors, a


def test_kv_decoder_matches_full_forward(setup):
    model, prompts, kv, full = setup
    rng = np.random.default_rng(1)
    errors, _ = _run_both(kv, full, prompts, MAX_NEW, rng, reorder_at=(2, 3), pad_rows=(1, 6))
    assert max(errors) <= TOL, errors
    # the cache is full after MAX_NEW steps past the longest prompt
    with pytest.raises(RuntimeError, match="cache full"):
        kv.step(np.full(len(LENS) * EXPAND, 5))

    # expanded rows equal their prompt's row; prompts are encoded once, then copied
    first = kv.start(prompts, LENS, EXPAND)
    for p in range(len(LENS)):
        for j in range(1, EXPAND):
            np.testing.assert_array_equal(first[p * EXPAND + j], first[p * EXPAND])
    assert len({tuple(np.round(first[p * EXPAND, :8], 4)) for p in range(len(LENS))}) == len(LENS)

    # no recompilation for the same shapes (prefill, step, reordering step)
    compiled = len(ms_compile_cache)
    errors, _ = _run_both(kv, full, prompts, 3, rng, reorder_at=(1,))
    assert max(errors) <= TOL
    assert len(ms_compile_cache) == compiled


def test_split_weights_path_matches(setup):
    # with these small row counts "auto" splits the activations; the fused-weight split must agree too
    model, prompts, _, full = setup
    kv = Qwen3KVDecoder(model, MAX_PROMPT, MAX_NEW, PAD, split="weights")
    errors, _ = _run_both(kv, full, prompts, 2, np.random.default_rng(6))
    assert max(errors) <= TOL, errors


def test_other_weight_layouts_and_untied_head():
    # [Q; K; V] qkv rows, interleaved gate/up rows, separate output layer; one layer keeps compiles short.
    # hidden_size 32: "auto" splits the weights in the prefill (36 rows) and the activations in steps (3 rows);
    # expand=1: the full forward compiles for one batch size only
    model = build_qwen3(MODEL_CONFIG_DIR / "qwen3_tiny.yaml", vocab_size=VOCAB, seq_length=SEQ, pad_token_id=PAD,
                        eos_token_id=EOS, seed=8, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                        use_contiguous_weight_layout_attention=True, use_interleaved_weight_layout_mlp=True,
                        tie_word_embeddings=False, untie_embeddings_and_output_weights=True)
    prompts = np.random.default_rng(9).integers(2, VOCAB, (len(LENS), MAX_PROMPT))
    kv = Qwen3KVDecoder(model, MAX_PROMPT, MAX_NEW, PAD)
    spec = kv.spec
    assert spec.contiguous_qkv and spec.interleaved_mlp and not spec.tied and spec.hidden == 32
    assert len(LENS) * MAX_PROMPT > spec.hidden >= len(LENS)
    errors, _ = _run_both(kv, FullForwardDecoder(model, SEQ, PAD), prompts, 2, np.random.default_rng(10), expand=1)
    assert max(errors) <= TOL, errors


def test_reorder_permutes_rows(setup):
    _, prompts, kv, _ = setup
    rows = len(LENS) * EXPAND
    tokens = np.arange(rows) + 10
    kv.start(prompts, LENS, EXPAND)
    base = kv.step(tokens)
    kv.start(prompts, LENS, EXPAND)
    rng = np.random.default_rng(2)
    perm = np.concatenate([p * EXPAND + rng.permutation(EXPAND) for p in range(len(LENS))])
    kv.reorder(perm)
    kv.reorder(np.arange(rows))  # composes with the pending one
    moved = kv.step(tokens[perm])
    np.testing.assert_allclose(moved, base[perm], atol=1e-5)
    with pytest.raises(ValueError):
        kv.reorder(np.arange(rows - 1))
    with pytest.raises(ValueError, match="group"):  # the prompt cache is shared by the prompt's rows
        kv.reorder(np.roll(np.arange(rows), EXPAND))


def test_decoder_reads_shared_parameters(setup):
    model, prompts, kv, full = setup
    params = dict(model.parameters_and_names())
    names = ["model.decoder.layers.1.self_attention.linear_qkv.weight", "model.decoder.layers.2.mlp.linear_fc1.weight",
             "model.decoder.final_layernorm.weight"]
    saved = {name: params[name].asnumpy().copy() for name in names}
    before = kv.start(prompts, LENS, EXPAND)
    try:
        for name in names:  # in place, as an optimizer step would
            params[name].set_data(Tensor(saved[name] * 1.5 + 0.01))
        after = kv.start(prompts, LENS, EXPAND)
        assert np.abs(after - before).max() > 1e-2
        np.testing.assert_allclose(after, full.start(prompts, LENS, EXPAND), atol=TOL)
        step_kv = kv.step(np.full(len(LENS) * EXPAND, 7))
        np.testing.assert_allclose(step_kv, full.step(np.full(len(LENS) * EXPAND, 7)), atol=TOL)
    finally:
        for name in names:
            params[name].set_data(Tensor(saved[name]))
    np.testing.assert_allclose(kv.start(prompts, LENS, EXPAND), before, atol=1e-6)


def _sid_setup():
    codes = 4
    vocab = {"<pad>": PAD, "<eos>": EOS}
    for token in MINIONEREC_FORMAT.all_tokens(codes):
        vocab[token] = len(vocab)
    token_map = SIDTokenMap(MINIONEREC_FORMAT, codes, vocab)
    rng = np.random.default_rng(3)
    sids = sorted({tuple(rng.integers(0, codes, 3)) for _ in range(12)})
    return token_map, sids, SIDConstraint(PrefixTrie(sids), token_map, EOS, VOCAB)


def test_engine_on_kv_decoder_matches_full_forward(setup):
    _, prompts, kv, full = setup
    token_map, sids, constraint = _sid_setup()
    response_len = MINIONEREC_FORMAT.num_levels + 1

    results = []
    for decoder in (kv, full):
        kwargs = dict(max_new_tokens=response_len, eos_id=EOS, pad_id=PAD)
        sampled = sample_groups(decoder, prompts, LENS, group_size=EXPAND, rng=np.random.default_rng(4),
                                constraint=constraint, temperature=1.0, **kwargs)
        free = sample_groups(decoder, prompts, LENS, group_size=EXPAND, rng=np.random.default_rng(5),
                             temperature=0.7, top_k=50, top_p=0.95, **kwargs)
        beams, scores = beam_search(decoder, prompts, LENS, beam_width=EXPAND, constraint=constraint, **kwargs)
        results.append((sampled, free, beams, scores))
    (s_kv, f_kv, b_kv, sc_kv), (s_ff, f_ff, b_ff, sc_ff) = results

    np.testing.assert_array_equal(s_kv.response_ids, s_ff.response_ids)
    np.testing.assert_allclose(s_kv.logps, s_ff.logps, atol=TOL)
    np.testing.assert_array_equal(f_kv.response_ids, f_ff.response_ids)
    np.testing.assert_array_equal(b_kv, b_ff)  # beam search: identical sequences
    finite = sc_ff > -1e29
    np.testing.assert_array_equal(sc_kv > -1e29, finite)
    np.testing.assert_allclose(sc_kv[finite], sc_ff[finite], atol=TOL)
    for row in s_kv.response_ids:  # constrained samples name catalogue items
        assert token_map.parse_ids(row)[0] in set(sids)
