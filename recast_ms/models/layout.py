"""MindFormers' fused weight layouts, in one place: how q/k/v share ``linear_qkv`` and gate/up share ``linear_fc1``.

``linear_qkv`` rows are grouped per kv head g as ``[q heads g*rep .. g*rep+rep-1, k_g, v_g]`` (MindFormers'
``concat_qkv_interleaved``, the default) or ``[Q; K; V]`` (``use_contiguous_weight_layout_attention``);
``linear_fc1`` rows are ``[gate; up]`` (our CPU YAMLs) or alternate gate/up row by row
(``use_interleaved_weight_layout_mlp``).

Three users read these layouts and must agree: the Hugging Face import (:func:`fuse_qkv` /
:func:`fuse_gate_up`, numpy), the CPU attention/MLP of ``cpu_compat.py`` and the KV-cache decode graphs of
``qwen3_kv.py`` (the ``split_*`` functions, MindSpore ops usable inside ``construct``). A split happens on
2-D views either of the fused WEIGHT (cost ~ the weight) or of the 2-D activation after one fused matmul
(cost ~ rows x width): :func:`weights_cheaper` picks the weight when a call has more token rows than the
hidden size (the tiny model's micro-batches); Qwen3-0.6B at a few rows was 4x slower splitting its weights
every call (measured). Both give the same numbers.
"""
from __future__ import annotations

import numpy as np
from mindspore import ops


SPLITS = ("auto", "weights", "activations")


def weights_cheaper(rows: int, hidden: int, split: str = "auto") -> bool:
    """Split the fused weight (True) or the activation (False) for a call over ``rows`` token rows;
    ``split`` = ``"weights"`` / ``"activations"`` forces one (tests, benchmarks)."""
    if split == "weights":
        return True
    if split == "activations":
        return False
    return rows > hidden


# ----------------------------------------------------------------------------- numpy: building fused weights


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int, *, contiguous: bool = False) -> np.ndarray:
    """``linear_qkv`` rows from separate q/k/v projections ``[N*D, H]``: grouped per kv head, or [Q; K; V]."""
    if contiguous:
        return np.concatenate([q, k, v], 0)
    hidden = q.shape[1]
    return np.concatenate([q.reshape(kv_heads, -1, hidden), k.reshape(kv_heads, -1, hidden),
                           v.reshape(kv_heads, -1, hidden)], 1).reshape(-1, hidden)


def fuse_gate_up(gate: np.ndarray, up: np.ndarray, *, interleaved: bool = False) -> np.ndarray:
    """``linear_fc1`` rows: [gate; up], or gate/up alternating row by row when ``interleaved``."""
    if interleaved:
        return np.stack([gate, up], 1).reshape(-1, gate.shape[1])
    return np.concatenate([gate, up], 0)


# ----------------------------------------------------------------------------- graph ops: splitting them again


def split_qkv_weight(weight, nkv: int, rep: int, dim: int, contiguous: bool):
    """``linear_qkv.weight [(Nq + 2Nkv)*D, H]`` -> ``wq [Nq*D, H]``, ``wk``, ``wv [Nkv*D, H]``."""
    if contiguous:
        return weight[: nkv * rep * dim], weight[nkv * rep * dim : nkv * (rep + 1) * dim], weight[nkv * (rep + 1) * dim :]
    hidden = weight.shape[1]
    grouped = ops.reshape(weight, (nkv, (rep + 2) * dim, hidden))
    return (ops.reshape(grouped[:, : rep * dim], (-1, hidden)),
            ops.reshape(grouped[:, rep * dim : (rep + 1) * dim], (-1, hidden)),
            ops.reshape(grouped[:, (rep + 1) * dim :], (-1, hidden)))


def split_qkv_activation(qkv, nkv: int, rep: int, dim: int, contiguous: bool):
    """The fused projection's output ``[M, (Nq + 2Nkv)*D]`` -> ``q [M, Nq*D]``, ``k``, ``v [M, Nkv*D]``."""
    if contiguous:
        return qkv[:, : nkv * rep * dim], qkv[:, nkv * rep * dim : nkv * (rep + 1) * dim], qkv[:, nkv * (rep + 1) * dim :]
    rows = qkv.shape[0]
    grouped = ops.reshape(qkv, (rows, nkv, (rep + 2) * dim))
    return (ops.reshape(grouped[:, :, : rep * dim], (rows, nkv * rep * dim)),
            ops.reshape(grouped[:, :, rep * dim : (rep + 1) * dim], (rows, nkv * dim)),
            ops.reshape(grouped[:, :, (rep + 1) * dim :], (rows, nkv * dim)))


def split_gate_up_weight(weight, interleaved: bool):
    """``linear_fc1.weight [2F, H]`` -> ``w_gate``, ``w_up [F, H]``."""
    if interleaved:  # rows gate_0, up_0, gate_1, up_1, ...
        pairs = ops.reshape(weight, (-1, 2, weight.shape[1]))
        return pairs[:, 0], pairs[:, 1]
    half = weight.shape[0] // 2
    return weight[:half], weight[half:]


def split_gate_up_activation(both, interleaved: bool):
    """The fused fc1 output ``[M, 2F]`` -> ``gate``, ``up [M, F]``."""
    half = both.shape[1] // 2
    if interleaved:
        pairs = ops.reshape(both, (both.shape[0], half, 2))
        return pairs[:, :, 0], pairs[:, :, 1]
    return both[:, :half], both[:, half:]


def qkv_2d(mm, x, weight, nkv: int, rep: int, dim: int, contiguous: bool, split: str = "auto"):
    """q ``[M, Nq*D]``, k/v ``[M, Nkv*D]`` of 2-D hidden states ``x [M, H]`` (``mm``: MatMul(transpose_b))."""
    if weights_cheaper(x.shape[0], x.shape[1], split):
        wq, wk, wv = split_qkv_weight(weight, nkv, rep, dim, contiguous)
        return mm(x, wq), mm(x, wk), mm(x, wv)
    return split_qkv_activation(mm(x, weight), nkv, rep, dim, contiguous)


def swiglu_2d(mm, x, weight, interleaved: bool, split: str = "auto"):
    """``silu(gate) * up`` ``[M, F]`` of 2-D hidden states ``x [M, H]`` and the fused ``linear_fc1`` weight."""
    if weights_cheaper(x.shape[0], x.shape[1], split):
        w_gate, w_up = split_gate_up_weight(weight, interleaved)
        gate, up = mm(x, w_gate), mm(x, w_up)
    else:
        gate, up = split_gate_up_activation(mm(x, weight), interleaved)
    return ops.silu(gate) * up
