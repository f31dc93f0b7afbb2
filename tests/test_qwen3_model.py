"""MindFormers Qwen3 on CPU: numpy parity, training, policy log-probs, model YAMLs, CPU compatibility patches.

MS_DEV_HOST_BLOCKING_RUN=1 comes from tests/conftest.py (and recast_ms.models.qwen3 sets it if unset).
"""
import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import nn

from recast_ms.models import cpu_compat
from recast_ms.models.policy import Policy, TokenLogProbs, freeze_copy
from recast_ms.models.qwen3 import (MODEL_CONFIG_DIR, build_context, build_qwen3, build_qwen3_config, count_parameters,
                                    load_model_yaml, right_pad)

VOCAB, SEQ, PAD, EOS = 300, 16, 0, 2
TINY_YAML = MODEL_CONFIG_DIR / "qwen3_tiny.yaml"


# ---------------------------------------------------------------- independent numpy Qwen3 (float64)

def _rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def numpy_qwen3_logits(params, ids, cfg, pad_id):
    """HF Qwen3 forward: RMSNorm, RoPE (rotate-half), GQA with q/k RMSNorm, SwiGLU. Returns [B, S, V].

    MindFormers layout: ``linear_qkv`` rows are grouped per kv head g as [q heads g*rep..g*rep+rep-1, k_g, v_g];
    ``linear_fc1`` rows are [gate; up] (contiguous) or gate/up interleaved row by row; keys equal to the pad id
    are masked (MindFormers' causal mask does this).
    """
    hidden, heads, kv_heads, dim = (cfg[k] for k in ("hidden_size", "num_attention_heads",
                                                        "num_key_value_heads", "head_dim"))
    eps, rep = cfg["rms_norm_eps"], heads // kv_heads
    bsz, seq = ids.shape
    p64 = {name: value.astype(np.float64) for name, value in params.items()}
    x = p64["model.embedding.word_embeddings.weight"][ids]  # (B, S, H)
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(seq)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(t):  # (B, n, S, D)
        return t * cos + np.concatenate([-t[..., dim // 2:], t[..., :dim // 2]], -1) * sin

    allowed = np.tril(np.ones((seq, seq), bool))[None] & (ids != pad_id)[:, None, :]  # (B, S, S)
    for layer in range(cfg["num_hidden_layers"]):
        w = {name.split(f"layers.{layer}.", 1)[1]: v for name, v in p64.items() if f"layers.{layer}." in name}
        h = _rms_norm(x, w["input_layernorm.weight"], eps)
        qkv = (h @ w["self_attention.linear_qkv.weight"].T).reshape(bsz, seq, kv_heads, rep + 2, dim)
        q = _rms_norm(qkv[:, :, :, :rep].reshape(bsz, seq, heads, dim), w["self_attention.q_layernorm.weight"], eps)
        k = _rms_norm(qkv[:, :, :, rep], w["self_attention.k_layernorm.weight"], eps)
        q, k = rope(q.transpose(0, 2, 1, 3)), rope(k.transpose(0, 2, 1, 3))
        v = qkv[:, :, :, rep + 1].transpose(0, 2, 1, 3)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # kv head g serves q heads g*rep..
        scores = np.where(allowed[:, None], q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, heads * dim) @ w[
            "self_attention.linear_proj.weight"].T
        gate_up = _rms_norm(x, w["pre_mlp_layernorm.weight"], eps) @ w["mlp.linear_fc1.weight"].T
        if cfg["use_interleaved_weight_layout_mlp"]:
            gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        else:
            gate, up = np.split(gate_up, 2, axis=-1)
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w["mlp.linear_fc2.weight"].T
    x = _rms_norm(x, p64["model.decoder.final_layernorm.weight"], eps)
    out = p64.get("model.output_layer.weight", p64["model.embedding.word_embeddings.weight"])
    return x @ out.T


def numpy_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = yaml.safe_load(TINY_YAML.read_text())["model"]["model_config"]
    assert not cfg["use_interleaved_weight_layout_mlp"] and cfg["num_attention_heads"] > cfg["num_key_value_heads"]
    return cfg


@pytest.fixture(scope="module")
def tiny():
    """The tiny YAML model with random weights (norm weights away from 1, so every norm is exercised)."""
    build_context("CPU")
    model = build_qwen3(TINY_YAML, vocab_size=VOCAB, seq_length=SEQ, pad_token_id=PAD, eos_token_id=EOS, seed=0)
    rng = np.random.default_rng(0)
    for name, param in model.parameters_and_names():
        if "layernorm" in name:
            value = 1.0 + 0.2 * rng.standard_normal(param.shape)
        else:
            value = 0.05 * rng.standard_normal(param.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def policy(tiny):
    return Policy(tiny)  # one instance: its graphs compile once for the module


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    lengths = [SEQ, 11, 4, 7]
    rows = [list(rng.integers(3, VOCAB, n)) for n in lengths]
    rows[1][-1] = EOS
    return right_pad(rows, SEQ, PAD), np.array(lengths, np.int32)


def _params(model):
    return {name: param.asnumpy().copy() for name, param in model.parameters_and_names()}


# ---------------------------------------------------------------- model parity, policy, training

def test_logits_match_numpy_reference(tiny, tiny_cfg, batch):
    ids, _ = batch
    tiny.set_train(False)
    logits = tiny(ms.Tensor(ids)).asnumpy().reshape(len(ids), SEQ, VOCAB)
    expected = numpy_qwen3_logits(_params(tiny), ids, tiny_cfg, PAD)
    assert np.abs(expected).max() > 1.0  # weights large enough for the comparison to mean something
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


def test_policy_logps_and_logits_at_match_numpy(tiny, tiny_cfg, policy, batch):
    ids, lengths = batch
    logits = numpy_qwen3_logits(_params(tiny), ids, tiny_cfg, PAD)
    expected = np.take_along_axis(numpy_log_softmax(logits)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    logps = policy.logps(ids).asnumpy()
    assert logps.shape == (len(ids), SEQ - 1) and logps.dtype == np.float32
    np.testing.assert_allclose(logps, expected, rtol=0, atol=1e-5)
    last = lengths - 1
    next_logits = policy.logits_at(ids, last).asnumpy()
    np.testing.assert_allclose(next_logits, logits[np.arange(len(ids)), last], rtol=0, atol=1e-5)
    hot = TokenLogProbs(tiny, temperature=2.0)(ms.Tensor(ids)).asnumpy()
    expected_hot = np.take_along_axis(numpy_log_softmax(logits / 2.0)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(hot, expected_hot, rtol=0, atol=1e-5)


class _MaskedNLL(nn.Cell):
    def __init__(self, token_logps):
        super().__init__()
        self.token_logps = token_logps

    def construct(self, input_ids, mask):
        return -(self.token_logps(input_ids) * mask).sum() / mask.sum()


def test_gradients_finite_and_adamw_lowers_loss(tiny, policy, batch):
    ids, _ = batch
    saved = _params(tiny)
    try:
        loss_cell = _MaskedNLL(policy.token_logps)
        loss_cell.set_train(True)
        assert not tiny.training  # the model stays in logits mode under a training parent
        optimizer = nn.AdamWeightDecay(policy.trainable_params(), learning_rate=1e-3, weight_decay=0.0)
        grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters)

        @ms.jit
        def train_step(input_ids, mask):
            loss, grads = grad_fn(input_ids, mask)
            optimizer(grads)
            return loss, grads

        input_ids, mask = ms.Tensor(ids), ms.Tensor((ids[:, 1:] != PAD).astype(np.float32))
        losses = []
        for step in range(6):
            loss, grads = train_step(input_ids, mask)
            losses.append(float(loss))
            if step == 0:
                assert all(np.isfinite(g.asnumpy()).all() for g in grads)
                assert all(np.abs(g.asnumpy()).max() > 0 for g in grads)
        assert np.isfinite(losses).all()
        assert losses[-1] < losses[0] - 0.5, losses
        assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # small lr: monotone
        changed = {name for name, value in _params(tiny).items() if not np.array_equal(value, saved[name])}
        assert changed == set(saved)
    finally:
        for name, param in tiny.parameters_and_names():
            param.set_data(ms.Tensor(saved[name]))


def test_freeze_copy_is_a_frozen_reference(tiny, policy, batch):
    ids, _ = batch
    reference = freeze_copy(tiny)
    ref_params, params = _params(reference), _params(tiny)
    assert ref_params.keys() == params.keys()
    assert all(np.array_equal(ref_params[name], params[name]) for name in params)
    assert not reference.trainable_params()
    assert all(p.name.startswith("ref.") for p in reference.get_parameters())
    np.testing.assert_allclose(TokenLogProbs(reference)(ms.Tensor(ids)).asnumpy(), policy.logps(ids).asnumpy(),
                               rtol=0, atol=1e-6)
    # the copy owns its storage: changing the policy leaves the reference untouched
    name, param = next(iter(tiny.parameters_and_names()))
    original = param.asnumpy().copy()
    try:
        param.set_data(ms.Tensor(original + 1.0))
        assert np.array_equal(_params(reference)[name], ref_params[name])
    finally:
        param.set_data(ms.Tensor(original))


def test_right_pad_convention():
    out = right_pad([[5, 6, 7], [8]], 4, PAD)
    assert out.dtype == np.int32 and out.tolist() == [[5, 6, 7, PAD], [8, PAD, PAD, PAD]]
    with pytest.raises(ValueError, match="seq_length=2"):
        right_pad([[1, 2, 3]], 2, PAD)


# ---------------------------------------------------------------- model YAMLs

# published Qwen3 sizes (billions): total and non-embedding, as the HF model cards round them
PUBLISHED = {"qwen3_0_6b": (0.6, 0.44), "qwen3_1_7b": (1.7, 1.4), "qwen3_8b": (8.2, 6.95), "qwen3_14b": (14.8, 13.2)}


def _analytic_params(cfg):
    hidden, inter, heads, kv_heads, dim = (cfg[k] for k in ("hidden_size", "intermediate_size",
                                                               "num_attention_heads", "num_key_value_heads",
                                                               "head_dim"))
    layer = hidden * (heads + 2 * kv_heads) * dim + heads * dim * hidden + 3 * hidden * inter + 2 * hidden + 2 * dim
    embedding = cfg["vocab_size"] * hidden * (1 if cfg["tie_word_embeddings"] else 2)
    return embedding, cfg["num_hidden_layers"] * layer + hidden


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_size_yaml_builds_its_config(name):
    raw = load_model_yaml(f"{name}.yaml")
    config = build_qwen3_config(MODEL_CONFIG_DIR / f"{name}.yaml", device_target="Ascend")
    assert config.compute_dtype == "bfloat16" and config.use_flash_attention
    transformer = config.convert_to_transformer_config()
    parallel = raw["parallel_config"]
    assert transformer.data_parallel_size == parallel["data_parallel"]
    assert transformer.tensor_model_parallel_size == parallel["model_parallel"]
    assert transformer.pipeline_model_parallel_size == parallel["pipeline_stage"]
    assert transformer.recompute == raw["recompute_config"]["recompute"]
    assert transformer.num_query_groups == 8 and transformer.kv_channels == 128
    assert transformer.rotary_base == 1e6 and transformer.layernorm_epsilon == 1e-6
    embedding, body = _analytic_params(raw["model"]["model_config"])
    total, non_embedding = PUBLISHED[name]
    assert abs((embedding + body) / 1e9 - total) < 0.06 and abs(body / 1e9 - non_embedding) < 0.06
    # the same YAML on CPU: fp32, no flash attention, no model/pipeline parallelism
    cpu = build_qwen3_config(MODEL_CONFIG_DIR / f"{name}.yaml", device_target="CPU").convert_to_transformer_config()
    assert cpu.compute_dtype == ms.float32 and not cpu.use_flash_attention
    assert cpu.tensor_model_parallel_size == 1 and cpu.pipeline_model_parallel_size == 1 and not cpu.recompute


@pytest.mark.parametrize("name, low, high", [("qwen3_mini", 2e5, 1e6), ("qwen3_tiny", 1e6, 4e6), ("qwen3_10m", 8e6, 12e6)])
def test_cpu_yaml_builds_model(name, low, high):
    build_context("CPU")
    raw = load_model_yaml(f"{name}.yaml")
    assert raw["model"]["model_config"]["vocab_size"] is None  # set from the tokenizer at run time
    model = build_qwen3(f"{name}.yaml", vocab_size=1000, pad_token_id=0, eos_token_id=2)
    n_params = count_parameters(model)
    embedding, body = _analytic_params({**raw["model"]["model_config"], "vocab_size": 1000})
    assert n_params == embedding + body and low < n_params < high
    assert all(p.dtype == ms.float32 for p in model.get_parameters())


def test_every_yaml_is_covered():
    names = {path.stem for path in Path(MODEL_CONFIG_DIR).glob("*.yaml")}
    assert names == set(PUBLISHED) | {"qwen3_mini", "qwen3_tiny", "qwen3_10m", "qwen3_micro"}


def test_yaml_validation_errors():
    raw = load_model_yaml(TINY_YAML)
    typo = {**raw, "model": {"model_config": {**raw["model"]["model_config"], "hiden_size": 64}}}
    with pytest.raises(ValueError, match="hiden_size"):
        load_model_yaml(typo)
    with pytest.raises(ValueError, match="trainer"):
        load_model_yaml({**raw, "trainer": {}})
    with pytest.raises(ValueError, match="data_paralel"):
        load_model_yaml({**raw, "parallel_config": {"data_paralel": 2}})
    with pytest.raises(ValueError, match="vocab_size"):
        build_qwen3_config(raw, seq_length=SEQ, pad_token_id=PAD, device_target="CPU")
    with pytest.raises(ValueError, match="EOS"):
        build_qwen3_config(raw, vocab_size=VOCAB, pad_token_id=EOS, eos_token_id=[EOS], device_target="CPU")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_qwen3_config(raw, vocab_size=VOCAB, seq_length=4096, pad_token_id=PAD, device_target="CPU")


# ---------------------------------------------------------------- CPU compatibility patches

def _targets():
    return {(module, attr): getattr(importlib.import_module(module), attr)
            for _, module, attr, _ in cpu_compat.PATCH_TARGETS}


def test_cpu_patches_apply_idempotently():
    assert cpu_compat.apply_cpu_patches("CPU")
    first = _targets()
    assert cpu_compat.apply_cpu_patches("CPU") and cpu_compat.apply_cpu_patches("cpu")
    assert _targets() == first
    assert cpu_compat.cpu_patches_applied()
    assert cpu_compat.applied_patches() == tuple(name for name, *_ in cpu_compat.PATCH_TARGETS)
    assert all(obj.__name__.startswith("Cpu") for obj in first.values())


def test_version_pin(monkeypatch):
    import mindformers  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(mindformers, "__version__", "1.8.0")
    with pytest.raises(cpu_compat.CpuCompatError, match="mindformers 1.8.0"):
        cpu_compat.check_pinned_versions()
    with pytest.raises(cpu_compat.CpuCompatError):
        cpu_compat.apply_cpu_patches("CPU")
    monkeypatch.setattr(mindformers, "__version__", cpu_compat.PINNED_MINDFORMERS)
    monkeypatch.setattr(ms, "__version__", "2.8.0")
    with pytest.raises(cpu_compat.CpuCompatError, match="mindspore 2.8.0"):
        cpu_compat.check_pinned_versions()


def test_nothing_patched_off_cpu():
    assert cpu_compat.needs_cpu_patches("CPU") and cpu_compat.needs_cpu_patches("cpu")
    assert not cpu_compat.needs_cpu_patches("Ascend") and not cpu_compat.needs_cpu_patches("GPU")
    cpu_compat.remove_cpu_patches()
    try:
        originals = _targets()
        assert not cpu_compat.cpu_patches_applied() and cpu_compat.applied_patches() == ()
        assert not cpu_compat.apply_cpu_patches("Ascend")
        assert _targets() == originals and not cpu_compat.cpu_patches_applied()
        assert all(not obj.__name__.startswith("Cpu") for obj in originals.values())
    finally:
        cpu_compat.apply_cpu_patches("CPU")


def test_built_model_uses_only_cpu_layers(tiny):
    kinds = {type(cell).__name__ for _, cell in tiny.cells_and_names()}
    assert {"CpuRMSNorm", "CpuOuter", "CpuCoreAttention", "CpuSelfAttention", "CpuDropout",
            "CpuVocabParallelEmbedding"} <= kinds
    assert not kinds & {"FusedRMSNorm", "FlashAttention", "Dropout", "VocabParallelEmbedding"}


def test_cpu_split_paths_agree(tiny, batch):
    """The CPU q/k/v and SwiGLU patches split the weights when a graph has more token rows than the hidden
    size, else the activations: a row's logits must not depend on which path its batch took."""
    ids, _ = batch
    tiny.set_train(False)
    hidden = tiny.config.hidden_size
    few = tiny(ms.Tensor(ids)).asnumpy()  # 4 x SEQ rows <= hidden: activation split
    reps = -(-(hidden + 1) // (len(ids) * SEQ))
    assert len(ids) * SEQ <= hidden < reps * len(ids) * SEQ
    many = tiny(ms.Tensor(np.tile(ids, (reps, 1)))).asnumpy()[: len(ids) * SEQ]  # weight split
    np.testing.assert_allclose(many, few, rtol=0, atol=2e-5)
