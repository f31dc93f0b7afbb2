"""An independent numpy (float64) Qwen3 forward on Hugging Face parameter names, and a writer of tiny random
Hugging Face Qwen3 checkpoints (config.json + safetensors), for tests.

The forward follows transformers' ``Qwen3ForCausalLM``: RMSNorm, q/k RMSNorm per head before RoPE (rotate-half),
grouped-query attention (kv head g serves q heads g*rep .. g*rep+rep-1), SwiGLU MLP, final norm, lm_head (or the
tied embedding). Keys equal to ``pad_id`` are masked, as MindFormers' mask does.
"""
import json
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np


def _rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def hf_qwen3_logits(weights: Mapping[str, np.ndarray], ids: np.ndarray, config: Mapping,
                    pad_id: Optional[int] = None) -> np.ndarray:
    """Logits ``[B, S, V]`` of a Hugging Face Qwen3 with parameters ``weights`` (HF names) for ``ids [B, S]``."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    eps, rep = config["rms_norm_eps"], heads // kv_heads
    w = {name: np.asarray(value, np.float64) for name, value in weights.items()}
    bsz, seq = ids.shape
    x = w["model.embed_tokens.weight"][ids]  # (B, S, H)
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(seq)[:, None] * inv_freq[None]  # (S, D/2)
    cos = np.cos(np.concatenate([angles, angles], -1))
    sin = np.sin(np.concatenate([angles, angles], -1))

    def rope(t):  # (B, n, S, D)
        return t * cos + np.concatenate([-t[..., dim // 2:], t[..., :dim // 2]], -1) * sin

    allowed = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (bsz, seq, seq))
    if pad_id is not None:
        allowed = allowed & (ids != pad_id)[:, None, :]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(bsz, seq, heads, dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(bsz, seq, kv_heads, dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(bsz, seq, kv_heads, dim)
        q = rope(_rms_norm(q, w[p + "self_attn.q_norm.weight"], eps).transpose(0, 2, 1, 3))  # (B, N, S, D)
        k = rope(_rms_norm(k, w[p + "self_attn.k_norm.weight"], eps).transpose(0, 2, 1, 3))  # (B, Nkv, S, D)
        v = v.transpose(0, 2, 1, 3)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # (B, N, S, D)
        scores = np.where(allowed[:, None], q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, heads * dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if not config.get("tie_word_embeddings", False) else w["model.embed_tokens.weight"]
    return x @ head.T


def tiny_hf_config(vocab_size=96, tie=True, **overrides) -> dict:
    """A tiny Qwen3 ``config.json`` (head_dim * heads != hidden_size, grouped-query attention)."""
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
        "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": tie,
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "initializer_range": 0.02, "torch_dtype": "float32", "transformers_version": "4.51.0", "use_cache": True,
    }
    config.update(overrides)
    return config


def random_hf_weights(config: Mapping, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random fp32 weights with HF names; norms away from 1 so every norm matters."""
    from recast_ms.models.weights import hf_tensor_shapes  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


def write_hf_checkpoint(directory, config: Mapping, weights: Mapping[str, np.ndarray], shards: int = 1,
                        dtype=np.float32) -> Path:
    """Write ``config.json`` and the weights as ``model.safetensors`` (or ``shards`` files plus an index)."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    arrays = {name: np.ascontiguousarray(value.astype(dtype)) for name, value in weights.items()}
    if shards == 1:
        save_file(arrays, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(arrays)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: arrays[name] for name in names[shard::shards]}
        save_file(part, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def write_hf_model_dir(directory, seed: int = 0, **config_overrides) -> Path:
    """A tiny Hugging Face Qwen3 directory a run can start from (``hf_checkpoint=``): random weights, a word-level
    ``tokenizer.json`` of 5 tokens (the SID codes are added to it at run time) and ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

    vocab = {"[UNK]": 0, "history:": 1, "next:": 2, "<|endoftext|>": 3, "<|im_end|>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = Path(directory)
    config = tiny_hf_config(**{"vocab_size": 8, "tie": True, "eos_token_id": 4, **config_overrides})  # 8 rows: padded
    write_hf_checkpoint(directory, config, random_hf_weights(config, seed=seed))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "pad_token": "<|endoftext|>"}))
    return directory
