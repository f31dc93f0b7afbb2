"""Weights: Hugging Face Qwen3 checkpoints into MindFormers' Qwen3 (numpy parity, layouts, shards, bf16), vocabulary
extension with SID tokens, the project's own checkpoints (round trip, atomic writes, exact optimizer resume), and
errors that name the tensor and the file.

The Hugging Face checkpoints are tiny random ones written here with numpy + safetensors; the reference is the
independent numpy forward of tests/qwen3_numpy_ref.py on the Hugging Face parameter names.
"""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from qwen3_numpy_ref import hf_qwen3_logits, random_hf_weights, tiny_hf_config, write_hf_checkpoint
from recast_ms.models.qwen3 import build_context, build_qwen3, right_pad
from recast_ms.models.weights import (CheckpointError, SafetensorsFile, extend_rows, hf_model_yaml, load_hf_qwen3,
                                      named_parameters)
from recast_ms.trainer.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

VOCAB, SEQ, PAD, EOS, EXTRA = 96, 12, 0, 2, 10


@pytest.fixture(scope="module", autouse=True)
def _context():
    build_context("CPU")


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(7)
    rows = [list(rng.integers(3, VOCAB, n)) for n in (SEQ, 9, 4)]
    return right_pad(rows, SEQ, PAD)


def _checkpoint(tmp_path_factory, name, tie, seed, **write_kwargs):
    config = tiny_hf_config(vocab_size=VOCAB, tie=tie)
    weights = random_hf_weights(config, seed)
    directory = write_hf_checkpoint(tmp_path_factory.mktemp(name), config, weights, **write_kwargs)
    return directory, config, weights


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "hf_tied", True, 1)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "hf_untied", False, 2)


@pytest.fixture(scope="module")
def tied_model(tied):
    return load_hf_qwen3(tied[0], seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS)


@pytest.fixture(scope="module")
def untied_extended(untied):
    return load_hf_qwen3(untied[0], seq_length=SEQ, vocab_size=VOCAB + EXTRA, pad_token_id=PAD, eos_token_id=EOS)


def _logits(model, ids):
    model.set_train(False)
    return model(Tensor(ids)).asnumpy().reshape(len(ids), SEQ, -1)


def _params(model):
    return {name: param.asnumpy().copy() for name, param in named_parameters(model).items()}


# ------------------------------------------------------------------------------ Hugging Face -> MindFormers

def test_tied_logits_match_numpy_reference(tied, tied_model, ids):
    _, config, weights = tied
    assert "output_layer.weight" not in _params(tied_model)
    expected = hf_qwen3_logits(weights, ids, config, pad_id=PAD)
    assert np.abs(expected).max() > 1.0  # large enough for the comparison to mean something
    np.testing.assert_allclose(_logits(tied_model, ids), expected, rtol=0, atol=1e-5)


def test_untied_extended_logits_match_numpy_reference(untied, untied_extended, ids):
    """Untied checkpoint loaded with EXTRA SID rows: the old tokens' logits are those of the unextended
    checkpoint (numpy reference), the embedding and lm_head both grow, their old rows untouched."""
    _, config, weights = untied
    model = untied_extended
    params = _params(model)
    for mf_name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                             ("output_layer.weight", "lm_head.weight")):
        assert params[mf_name].shape == (VOCAB + EXTRA, config["hidden_size"])
        np.testing.assert_array_equal(params[mf_name][:VOCAB], weights[hf_name])
    logits = _logits(model, ids)
    assert logits.shape[-1] == VOCAB + EXTRA
    np.testing.assert_allclose(logits[..., :VOCAB], hf_qwen3_logits(weights, ids, config, pad_id=PAD),
                               rtol=0, atol=1e-5)


def test_other_weight_layouts_match_numpy_reference(tied, ids):
    """Interleaved gate/up and contiguous [Q; K; V]: the other MindFormers layouts load correctly too."""
    directory, config, weights = tied
    model = load_hf_qwen3(directory, seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS, contiguous_mlp=False,
                          use_contiguous_weight_layout_attention=True)
    kinds = {type(cell).__name__ for _, cell in model.cells_and_names()}
    assert {"CpuMLPInterleaved", "CpuSelfAttentionContiguous"} <= kinds  # the CPU subclasses of both layouts
    np.testing.assert_allclose(_logits(model, ids), hf_qwen3_logits(weights, ids, config, pad_id=PAD),
                               rtol=0, atol=1e-5)


def test_same_weights_as_mindformers_loader_for_its_layout(tied):
    """MindFormers' load_hf_checkpoint handles only the interleaved-MLP / grouped-QKV layout (it interleaves
    gate/up whatever the config says); for that layout our conversion gives the same parameters."""
    from mindformers.checkpoint.checkpoint import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
    directory, config, _ = tied
    ours = load_hf_qwen3(directory, seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS, contiguous_mlp=False)
    theirs = build_qwen3(hf_model_yaml(config, contiguous_mlp=False), seq_length=SEQ, pad_token_id=PAD,
                         eos_token_id=EOS, seed=3)
    load_hf_checkpoint(str(directory), theirs)
    ours_params, theirs_params = _params(ours), _params(theirs)
    assert ours_params.keys() == theirs_params.keys()
    for name, value in ours_params.items():
        np.testing.assert_array_equal(value, theirs_params[name], err_msg=name)


def test_sharded_checkpoint_loads_the_same(tied, tied_model, tmp_path):
    directory, config, weights = tied
    sharded = write_hf_checkpoint(tmp_path / "sharded", config, weights, shards=3)
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    model = load_hf_qwen3(sharded, seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS)
    expected = _params(tied_model)
    for name, value in _params(model).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_bf16_and_fp16_tensors_are_widened_exactly(tmp_path):
    values = np.array([[1.5, -2.0, 0.15625], [0.09375, -7.5, 0.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal((bf16.astype(np.uint32) << 16).view(np.float32), values)  # exactly representable
    header = {"w_bf16": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
              "w_f16": {"dtype": "F16", "shape": [2, 3], "data_offsets": [12, 24]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bf16.tobytes() + values.astype(np.float16).tobytes())
    tensors = SafetensorsFile(path)
    assert tensors.dtype("w_bf16") == "BF16" and tensors.shape("w_bf16") == (2, 3)
    np.testing.assert_array_equal(tensors.get("w_bf16"), values)
    np.testing.assert_array_equal(tensors.get("w_f16"), values.astype(np.float16).astype(np.float32))


def test_on_demand_sources_equal_the_loaded_model_in_any_order(untied, untied_extended):
    """hf_model_sources (what a sharded run reads, one tensor at a time, after its graphs compiled) gives the
    tensors load_hf_qwen3 sets, the new vocabulary rows included, whichever head is made first."""
    from recast_ms.models.weights import hf_model_sources

    directory = untied[0]
    loaded = _params(untied_extended)  # init_seed 0
    bare = load_hf_qwen3(directory, seq_length=SEQ, vocab_size=VOCAB + EXTRA, pad_token_id=PAD, eos_token_id=EOS,
                         load_weights=False)
    sources = hf_model_sources(bare, directory, seed=0)  # new rows: those past the checkpoint's vocabulary
    assert set(sources) == set(loaded)
    for name in sorted(sources, reverse=True):  # output_layer before embedding: the generator is replayed
        make, origin = sources[name]
        np.testing.assert_array_equal(make(), loaded[name], err_msg=name)
        assert "safetensors" in origin
    assert not np.array_equal(loaded["output_layer.weight"][VOCAB:], loaded["embedding.word_embeddings.weight"][VOCAB:])


# ------------------------------------------------------------------------------ vocabulary extension

def test_vocab_extension_keeps_old_token_logits(tied, tied_model, ids):
    directory, config, weights = tied
    extended = load_hf_qwen3(directory, seq_length=SEQ, vocab_size=VOCAB + EXTRA, pad_token_id=PAD,
                             eos_token_id=EOS, init_seed=5)
    old, new = _logits(tied_model, ids), _logits(extended, ids)
    assert new.shape[-1] == VOCAB + EXTRA
    np.testing.assert_allclose(new[..., :VOCAB], old, rtol=0, atol=1e-6)
    # mean-initialised rows: every new token's logit lies inside the range of the old tokens' logits
    assert (new[..., VOCAB:] > old.min(-1, keepdims=True)).all()
    assert (new[..., VOCAB:] < old.max(-1, keepdims=True)).all()
    table = _params(extended)["embedding.word_embeddings.weight"]
    np.testing.assert_array_equal(table[:VOCAB], weights["model.embed_tokens.weight"])
    base = weights["model.embed_tokens.weight"].astype(np.float64)
    z_scores = (table[VOCAB:] - base.mean(0)) / base.std(0)
    assert 0.07 < z_scores.std() < 0.13 and abs(z_scores.mean()) < 0.03  # noise_scale 0.1 around the mean
    assert len({row.tobytes() for row in table[VOCAB:]}) == EXTRA  # distinct rows
    assert config["vocab_size"] == VOCAB


def test_extend_rows_is_seeded_and_can_reinitialise_rows_inside_the_old_vocab():
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((50, 8)) * np.linspace(0.5, 2, 8) + 3).astype(np.float32)
    first = extend_rows(matrix, 60, rng=np.random.default_rng(1))
    again = extend_rows(matrix, 60, rng=np.random.default_rng(1))
    other = extend_rows(matrix, 60, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[50:], other[50:])
    np.testing.assert_array_equal(first[:50], matrix)
    exact = extend_rows(matrix, 60, noise_scale=0.0)
    np.testing.assert_allclose(exact[50:], np.broadcast_to(matrix.mean(0), (10, 8)), rtol=1e-6)
    # padded vocabulary: rows 45..49 are tokens added inside the checkpoint's (padded) vocabulary
    inside = extend_rows(matrix, 60, range(45, 60), noise_scale=0.0)
    np.testing.assert_array_equal(inside[:45], matrix[:45])
    np.testing.assert_allclose(inside[45:], np.broadcast_to(matrix[:45].mean(0), (15, 8)), rtol=1e-6)
    with pytest.raises(ValueError, match="shrink"):
        extend_rows(matrix, 40)


# ------------------------------------------------------------------------------ own checkpoints

def test_save_load_round_trip(tied, tied_model, tmp_path):
    _, config, _ = tied
    path = tmp_path / "run" / "policy.ckpt"
    extra = {"step": 17, "tokenizer": "spm", "lr": 1e-5}
    assert save_checkpoint(tied_model, path, extra) == path
    assert sorted(os.listdir(path.parent)) == ["policy.ckpt"]  # no temporary file left behind
    fresh = build_qwen3(hf_model_yaml(config), seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS, seed=11)
    expected = _params(tied_model)
    assert any(not np.array_equal(value, expected[name]) for name, value in _params(fresh).items())
    assert load_checkpoint(fresh, path) == extra
    for name, value in _params(fresh).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    arrays, meta = read_checkpoint(path)
    assert meta == extra and arrays.keys() == expected.keys()
    plain = tmp_path / "plain.ckpt"  # written by MindSpore directly: no metadata, still checked and loaded
    ms.save_checkpoint(tied_model, str(plain))
    assert load_checkpoint(fresh, plain) == {}


def test_save_is_atomic(tied_model, tmp_path, monkeypatch):
    path = tmp_path / "policy.ckpt"
    save_checkpoint(tied_model, path, {"step": 1})
    before = path.read_bytes()

    def crash(_items, file_name, **_kwargs):
        with open(file_name, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ms, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tied_model, path, {"step": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["policy.ckpt"]
    monkeypatch.undo()
    assert read_checkpoint(path)[1] == {"step": 1}


def _write(directory, drop=(), replace=None, config=None, seed=3):
    """A tiny HF checkpoint (optionally with its own config) with tensors dropped or replaced."""
    config = config or tiny_hf_config(vocab_size=VOCAB, tie=True)
    weights = {k: v for k, v in random_hf_weights(config, seed).items() if k not in drop}
    weights.update(replace or {})
    return write_hf_checkpoint(directory, config, weights)


def _load(directory):
    return load_hf_qwen3(directory, seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS)


def test_hf_missing_and_misshaped_tensors_are_named(tmp_path):
    name = "model.layers.1.self_attn.k_norm.weight"
    directory = _write(tmp_path / "missing", drop=(name,))
    with pytest.raises(CheckpointError, match=rf"missing.*{name}"):
        _load(directory)
    name = "model.layers.0.mlp.up_proj.weight"
    directory = _write(tmp_path / "shape", replace={name: np.zeros((81, 48), np.float32)})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \[81, 48\]"):
        _load(directory)
    directory = _write(tmp_path / "extra", replace={"model.layers.2.mlp.up_proj.weight":
                                                                    np.zeros((80, 48), np.float32)})
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight"):
        _load(directory)


def test_hf_corrupt_and_truncated_files_are_named(tied, tmp_path):
    directory, config, weights = tied
    data = (directory / "model.safetensors").read_bytes()
    cases = {"garbage": os.urandom(4096), "tiny": data[:5], "truncated": data[:len(data) // 2]}
    for case, payload in cases.items():
        target = tmp_path / case
        target.mkdir()
        (target / "config.json").write_text(json.dumps(config))
        (target / "model.safetensors").write_bytes(payload)
        with pytest.raises(CheckpointError, match=rf"{target / 'model.safetensors'}") as info:
            _load(target)
        if case == "truncated":
            assert "truncated" in str(info.value) and "tensor '" in str(info.value)
    sharded = write_hf_checkpoint(tmp_path / "sharded", config, weights, shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = "model-00002-of-00002.safetensors" if index["weight_map"][name].startswith(
        "model-00001") else "model-00001-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing"):
        _load(sharded)


def test_hf_unsupported_config_is_refused(tmp_path):
    directory = _write(tmp_path / "moe", config=tiny_hf_config(vocab_size=VOCAB,
                                                                                model_type="qwen3_moe"))
    with pytest.raises(CheckpointError, match="qwen3_moe"):
        _load(directory)
    directory = _write(tmp_path / "yarn", config=tiny_hf_config(
        vocab_size=VOCAB, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        _load(directory)


def test_hf_config_that_is_not_a_json_object_is_named(tmp_path):
    """Issue 21: a config.json that is not JSON (or not an object) is an error naming the file."""
    directory = _write(tmp_path / "bad")
    path = directory / "config.json"
    for text in ("{\"model_type\": \"qwen3\"", "not json", "[1, 2]", "\"qwen3\""):  # truncated, garbage, list, string
        path.write_text(text)
        with pytest.raises(CheckpointError, match=rf"^{path}: (unreadable config|expected a JSON object)"):
            _load(directory)  # before: AttributeError 'list' object has no attribute 'get' for the last two


def test_ckpt_errors_name_tensor_and_file(tied_model, tmp_path):
    params = named_parameters(tied_model)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    missing = save_checkpoint({n: p for n, p in params.items() if n != name}, tmp_path / "missing.ckpt", {})
    with pytest.raises(CheckpointError, match=rf"missing\.ckpt: no tensor for model parameter\(s\) .*{name}"):
        load_checkpoint(tied_model, missing)
    shaped = save_checkpoint({**params, name: np.zeros((3, 3), np.float32)}, tmp_path / "shape.ckpt", {})
    with pytest.raises(CheckpointError, match=rf"shape\.ckpt: tensor for '{name}' has shape \[3, 3\]"):
        load_checkpoint(tied_model, shaped)
    extra = save_checkpoint({**params, "head2.weight": np.zeros(3, np.float32)}, tmp_path / "extra.ckpt", {})
    with pytest.raises(CheckpointError, match="head2.weight"):
        load_checkpoint(tied_model, extra)
    before = _params(tied_model)
    load_checkpoint(tied_model, extra, strict=False)
    good = save_checkpoint(tied_model, tmp_path / "good.ckpt", {"step": 3})
    data = good.read_bytes()
    for case, payload in {"garbage": os.urandom(2048), "truncated": data[:len(data) // 2],
                          "flipped": data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) +
                          data[len(data) // 2 + 1:]}.items():
        bad = tmp_path / f"{case}.ckpt"
        bad.write_bytes(payload)
        with pytest.raises(CheckpointError, match=rf"{bad}: corrupt or truncated"):
            load_checkpoint(tied_model, bad)
    for name, value in _params(tied_model).items():  # failed loads changed nothing
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tied_model, tmp_path / "absent.ckpt")


def test_training_state_restore_checks_everything_first(tied_model):
    """trainer.checkpoint.restore_model (resume, RL init, evaluation) shares the checks of load_checkpoint."""
    from recast_ms.trainer.checkpoint import restore_model

    before = _params(tied_model)
    state = {"model/" + n: v for n, v in before.items()}
    state["optim/adam_m.x"] = np.zeros(2, np.float32)  # other prefixes are not the model's business
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    missing = {k: v for k, v in state.items() if k != "model/" + name}
    with pytest.raises(CheckpointError, match=rf"step_7: no tensor for model parameter\(s\) {name}"):
        restore_model(tied_model, {k: v + 1 if k.startswith("model/") else v for k, v in missing.items()}, path="step_7")
    with pytest.raises(CheckpointError, match=rf"step_7: tensor for '{name}' has shape \[3\]"):
        restore_model(tied_model, {**state, "model/" + name: np.zeros(3, np.float32)}, path="step_7")
    with pytest.raises(CheckpointError, match="head2.weight"):
        restore_model(tied_model, {**state, "model/head2.weight": np.zeros(3, np.float32)}, path="step_7")
    for n, value in _params(tied_model).items():  # the failed restores set nothing, not even the +1 weights
        np.testing.assert_array_equal(value, before[n], err_msg=n)
    restore_model(tied_model, {k: v * 2 if k.startswith("model/") else v for k, v in state.items()})
    for n, value in _params(tied_model).items():
        np.testing.assert_array_equal(value, before[n] * 2, err_msg=n)
    restore_model(tied_model, state)
