"""The KV-cache decode graphs of Qwen3 (an incremental decoder for :mod:`recast_ms.rollout.engine`).

:class:`Qwen3KVDecoder` is a graph-mode Qwen3 inference path with a KV cache that reads the parameters of
MindFormers' training-graph Qwen3 (``TrainingQwen3ForCausalLM``): it holds the model itself and uses its
``Parameter`` objects, so after an optimizer step (or ``set_data``) the decoder computes with the new weights
without any copy or sync. MindFormers' own KV-cache model (``InferenceQwen3ForCausalLM``) has no CPU kernels.

:class:`recast_ms.rollout.decoder.FullForwardDecoder` implements the same protocol by rerunning the full
MindFormers model each step (no cache): the reference the decode graphs are parity-tested against. The fused
q/k/v and gate/up weights are read through :mod:`recast_ms.models.layout`, the same helpers the Hugging Face
import and the CPU attention/MLP use.

Cache layout (tuples passed with ``ms.mutable``; total length ``max_prompt_len + max_new_tokens``):
- the prompt cache, K and V per layer ``[B*Nkv, Tp, D]``: computed once per prompt by the prefill and
  shared by the prompt's ``expand`` rows (no copies: G samples of a prompt attend to the same keys);
- the generated cache, K and V per layer ``[N*Nkv, Tn, D]``, one row per sample; step ``t`` writes slot t.
Prompt b keeps its right-padded tokens at positions ``0..len_b-1`` and generated token t sits at position
``len_b + t``, so RoPE positions equal the full model's on the right-padded sequence. Keys whose token is the
pad id are masked, as MindFormers' causal mask does (rows fed the pad id after EOS also match the full model).

Compiled graphs (static shapes): the prefill per prompt batch B; the step, and the step that first permutes
the generated cache (after ``reorder``), per (B, N). Repeated calls with the same shapes reuse them. On this
CPU a reshape of a graph input copies it, so the caches are kept in the layouts the kernels consume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from recast_ms.models.layout import SPLITS, qkv_2d, swiglu_2d

_MASK = -1e9  # additive key mask; the training graph's masked_fill uses the same finite value


@dataclass(frozen=True)
class Qwen3Spec:
    """Static architecture facts read from a built ``TrainingQwen3ForCausalLM``."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    qk_norm: bool
    contiguous_qkv: bool  # [Q; K; V] rows (SelfAttentionContiguous) vs per-kv-group [q_g..; k_g; v_g]
    interleaved_mlp: bool  # linear_fc1 rows gate/up interleaved vs [gate; up]
    tied: bool
    inv_freq: tuple
    max_positions: int

    @property
    def rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model(cls, model) -> "Qwen3Spec":
        # pylint: disable=import-outside-toplevel
        from mindformers.parallel_core.training_graph.transformer.attention import SelfAttentionContiguous
        from mindformers.parallel_core.training_graph.transformer.mlp import MLP, MLPInterleaved
        gpt = getattr(model, "model", None)
        if gpt is None or not hasattr(gpt, "decoder") or not hasattr(gpt, "embedding"):
            raise TypeError(f"expected MindFormers' TrainingQwen3ForCausalLM, got {type(model).__name__}")
        layers = gpt.decoder.layers
        first = layers[0]
        att, mlp = first.self_attention, first.mlp
        unsupported = []
        if not gpt.pre_process or not gpt.post_process or getattr(gpt, "mtp_process", False):
            unsupported.append("pipeline stages / multi-token prediction")
        if getattr(gpt, "position_embedding_type", "rope") != "rope" or not hasattr(gpt, "rotary_pos_emb"):
            unsupported.append("position embedding other than plain RoPE")
        rope = gpt.rotary_pos_emb
        if rope.rotary_interleaved or rope.seq_len_interpolation_factor is not None or rope.mscale != 1.0:
            unsupported.append("interleaved/interpolated/scaled RoPE")
        for index, layer in enumerate(layers):
            a = layer.self_attention
            if getattr(layer, "use_mla", False) or getattr(layer, "apply_residual_connection_post_norm", False):
                unsupported.append(f"layer {index}: MLA or post-norm residual")
            if getattr(a, "is_nope_layer", False) or a.cp != 1:
                unsupported.append(f"layer {index}: NoPE layer or context parallel")
            if a.linear_qkv.has_bias or a.linear_proj.has_bias:
                unsupported.append(f"layer {index}: attention biases")
            if not isinstance(layer.mlp, (MLP, MLPInterleaved)) or not layer.mlp.gated_linear_unit \
                    or layer.mlp.activation_type != "swiglu" or layer.mlp.linear_fc1.has_bias \
                    or layer.mlp.linear_fc2.has_bias:
                unsupported.append(f"layer {index}: MLP other than bias-free SwiGLU (MoE?)")
            if type(a) is not type(att) or type(layer.mlp) is not type(mlp) \
                    or (a.q_layernorm is None) != (att.q_layernorm is None):
                unsupported.append(f"layer {index}: differs from layer 0")
        if unsupported:
            raise NotImplementedError("Qwen3KVDecoder does not implement: " + "; ".join(sorted(set(unsupported))))
        head_dim = att.head_dim
        inv_freq = rope.inv_freq.asnumpy().astype(np.float32)
        if inv_freq.shape[0] * 2 != head_dim:
            raise NotImplementedError("partial rotary embedding (rotary_percent < 1) is not implemented")
        tied = bool(gpt.share_embeddings_and_output_weights)
        emb = gpt.embedding.word_embeddings.weight
        return cls(
            num_layers=len(layers), hidden=int(emb.shape[1]), num_heads=att.num_heads, num_kv_heads=att.kv_num_heads,
            head_dim=head_dim, ffn=int(mlp.linear_fc2.weight.shape[1]), vocab=int(emb.shape[0]),
            eps=float(first.input_layernorm.eps), qk_norm=att.q_layernorm is not None,
            contiguous_qkv=isinstance(att, SelfAttentionContiguous), interleaved_mlp=isinstance(mlp, MLPInterleaved),
            tied=tied, inv_freq=tuple(float(f) for f in inv_freq),
            max_positions=int(getattr(gpt.config, "max_position_embeddings", 0) or 0))


def _rope_tables(spec: Qwen3Spec, length: int):
    """cos/sin ``[length, D]`` as MindFormers computes them: fp32 ``positions * inv_freq``, then cat(f, f)."""
    inv_freq = np.asarray(spec.inv_freq, np.float32)
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]  # fp32 product, like CpuOuter
    emb = np.concatenate([freqs, freqs], axis=-1)
    return Tensor(np.cos(emb).astype(np.float32)), Tensor(np.sin(emb).astype(np.float32))


class _Qwen3Graph(nn.Cell):
    """Shared maths over the MindFormers model's parameters (2-D views for matmuls, norms and splits)."""

    def __init__(self, model, spec: Qwen3Spec, cache_len: int, split: str):
        # auto_prefix=False: the model's parameter names stay as built (same convention as policy._OverModel)
        super().__init__(auto_prefix=False)
        self.model = model
        self.spec = spec
        self.num_layers = spec.num_layers
        self.hidden, self.nq, self.nkv, self.dim, self.rep = (spec.hidden, spec.num_heads, spec.num_kv_heads,
                                                               spec.head_dim, spec.rep)
        self.half = spec.head_dim // 2
        self.ffn = spec.ffn
        self.eps = spec.eps
        self.qk_norm = spec.qk_norm
        self.contiguous_qkv = spec.contiguous_qkv
        self.interleaved_mlp = spec.interleaved_mlp
        self.tied = spec.tied
        self.cache_len = cache_len
        self.split = split
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        cos, sin = _rope_tables(spec, cache_len)
        self.cos_table = cos
        self.sin_table = sin
        self.mm = ops.MatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()
        self.bmm_tb = ops.BatchMatMul(transpose_b=True)

    # ------------------------------------------------------------------ parameters (shared, never copied)
    def _embedding(self):
        return self.model.model.embedding.word_embeddings.weight

    def _output_weight(self):
        if self.tied:
            return self.model.model.embedding.word_embeddings.weight
        return self.model.model.output_layer.weight

    # ------------------------------------------------------------------ building blocks on 2-D views
    def _rms(self, x, weight):
        """RMSNorm over the last axis of a 2-D ``[M, D]`` tensor (CpuRMSNorm's order of operations)."""
        factor = ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + self.eps)
        return (x * factor) * weight

    def _rope(self, x, cos, sin):
        """Rotate-half RoPE on ``[M, D]`` rows with per-row ``cos``/``sin`` ``[M, D]``."""
        rotated = ops.concat((-x[:, self.half:], x[:, :self.half]), 1)
        return x * cos + rotated * sin

    def _qkv(self, h, weight):
        """q ``[M, Nq*D]``, k/v ``[M, Nkv*D]`` from the fused ``linear_qkv`` weight (``layout.qkv_2d``)."""
        return qkv_2d(self.mm, h, weight, self.nkv, self.rep, self.dim, self.contiguous_qkv, self.split)

    def _mlp(self, h, mlp):
        """SwiGLU: silu(gate) * up (``layout.swiglu_2d``), then ``linear_fc2``."""
        inner = swiglu_2d(self.mm, h, mlp.linear_fc1.weight, self.interleaved_mlp, self.split)
        return self.mm(inner, mlp.linear_fc2.weight)

    def _qk_heads(self, att, q, k, rows, cos_q, sin_q, cos_k, sin_k):
        """Per-head q/k RMSNorm and RoPE on ``[rows*N, D]`` views."""
        q = ops.reshape(q, (rows * self.nq, self.dim))
        k = ops.reshape(k, (rows * self.nkv, self.dim))
        if self.qk_norm:
            q = self._rms(q, att.q_layernorm.weight)
            k = self._rms(k, att.k_layernorm.weight)
        return self._rope(q, cos_q, sin_q), self._rope(k, cos_k, sin_k)

    def _per_head(self, table, rows, heads):
        """``[rows, W]`` -> ``[rows*heads, W]`` (each row repeated for its heads)."""
        width = table.shape[1]
        return ops.reshape(ops.broadcast_to(ops.reshape(table, (rows, 1, width)), (rows, heads, width)),
                           (rows * heads, width))

    def _kv_rows(self, rows):
        """Row indices ``[N]`` -> indices ``[N*Nkv]`` of a cache laid out ``[rows*Nkv, length, D]``."""
        count = rows.shape[0]
        base = ops.reshape(ops.broadcast_to(ops.reshape(rows * self.nkv, (count, 1)), (count, self.nkv)), (-1,))
        return base + ops.tile(ops.arange(self.nkv, dtype=ms.int32), (count,))

    def _logits(self, x):
        x = self._rms(x, self.model.model.decoder.final_layernorm.weight)
        return self.mm(x, self._output_weight())


class _PrefillGraph(_Qwen3Graph):
    """Encode B right-padded prompts ``[B, Tp]`` once: logits ``[B, V]`` after each prompt's last token
    (``last_pos [B]``) and the prompt caches, K and V per layer as ``[B*Nkv, Tp, D]``."""

    def __init__(self, model, spec, prompt_len, split):
        super().__init__(model, spec, prompt_len, split)
        self.causal = Tensor(np.tril(np.ones((prompt_len, prompt_len), np.bool_)))

    def construct(self, input_ids, last_pos, key_valid):
        bsz, seq = input_ids.shape
        rows = bsz * seq
        nq, nkv, dim, rep = self.nq, self.nkv, self.dim, self.rep
        x = ops.gather(self._embedding(), ops.reshape(input_ids, (-1,)), 0)  # [B*T, H]
        cos = ops.reshape(ops.broadcast_to(ops.reshape(self.cos_table, (1, seq, dim)), (bsz, seq, dim)), (rows, dim))
        sin = ops.reshape(ops.broadcast_to(ops.reshape(self.sin_table, (1, seq, dim)), (bsz, seq, dim)), (rows, dim))
        cos_q, sin_q = self._per_head(cos, rows, nq), self._per_head(sin, rows, nq)
        cos_k, sin_k = self._per_head(cos, rows, nkv), self._per_head(sin, rows, nkv)
        allowed = ops.logical_and(ops.reshape(self.causal, (1, seq, seq)), ops.reshape(key_valid, (bsz, 1, seq)))
        bias = ops.cast(ops.logical_not(allowed), ms.float32) * _MASK  # [B, T, T]: 0 or -1e9
        bias = ops.reshape(ops.broadcast_to(ops.reshape(bias, (bsz, 1, seq, seq)), (bsz, nq, seq, seq)),
                           (bsz * nq * seq, seq))
        caches = ()
        for i in range(self.num_layers):
            layer = self.model.model.decoder.layers[i]
            att = layer.self_attention
            h = self._rms(x, layer.input_layernorm.weight)
            q, k, v = self._qkv(h, att.linear_qkv.weight)
            q, k = self._qk_heads(att, q, k, rows, cos_q, sin_q, cos_k, sin_k)
            # grouped-query attention: q head g*rep + r uses kv head g
            q = ops.reshape(ops.transpose(ops.reshape(q, (bsz, seq, nkv, rep, dim)), (0, 2, 3, 1, 4)),
                            (bsz * nkv, rep * seq, dim))
            k = ops.reshape(ops.transpose(ops.reshape(k, (bsz, seq, nkv, dim)), (0, 2, 1, 3)), (bsz * nkv, seq, dim))
            v = ops.reshape(ops.transpose(ops.reshape(v, (bsz, seq, nkv, dim)), (0, 2, 1, 3)), (bsz * nkv, seq, dim))
            scores = self.bmm_tb(q, k) * self.scale  # [B*Nkv, rep*T, T]
            probs = ops.softmax(ops.reshape(scores, (bsz * nq * seq, seq)) + bias, -1)
            context = self.bmm(ops.reshape(probs, (bsz * nkv, rep * seq, seq)), v)  # [B*Nkv, rep*T, D]
            context = ops.reshape(ops.transpose(ops.reshape(context, (bsz, nkv, rep, seq, dim)), (0, 3, 1, 2, 4)),
                                  (rows, nq * dim))
            x = x + self.mm(context, att.linear_proj.weight)
            x = x + self._mlp(self._rms(x, layer.pre_mlp_layernorm.weight), layer.mlp)
            caches = caches + (k, v)
        last = ops.arange(bsz, dtype=ms.int32) * seq + last_pos  # [B]
        return self._logits(ops.gather(x, last, 0)), caches


class _StepGraph(_Qwen3Graph):
    """One token per row; rows ``b*G .. b*G+G-1`` belong to prompt b.

    Attention runs over the prompt's cache (``[B*Nkv, Tp, D]``, shared by its G rows, never copied) and the
    row's own generated-token cache (``[N*Nkv, Tn, D]``), into which this token's K/V go at slot ``t``
    (the same for every row). Inputs: ``tokens [N]``; ``pos [N]`` the token's absolute position (RoPE);
    ``t`` int32 ``[1]``; ``prompt_bias [B, Tp]`` and ``gen_bias [N, Tn]``, 0 for keys to attend to and -1e9
    otherwise; ``parent [N]`` (with ``gather_rows``: the generated caches are first permuted by it, beam
    search's reorder applied lazily); the prompt caches; the generated caches (returned updated)."""

    def __init__(self, model, spec, prompt_len, new_len, split, gather_rows: bool):
        super().__init__(model, spec, prompt_len + new_len, split)
        self.prompt_len = prompt_len
        self.new_len = new_len
        self.gather_rows = gather_rows

    def construct(self, tokens, pos, t, prompt_bias, gen_bias, parent, prompt_caches, gen_caches):
        rows = tokens.shape[0]
        nq, nkv, dim, rep = self.nq, self.nkv, self.dim, self.rep
        plen, glen = self.prompt_len, self.new_len
        bsz = prompt_caches[0].shape[0] // nkv
        group = rows // bsz
        x = ops.gather(self._embedding(), tokens, 0)  # [N, H]
        cos = ops.gather(self.cos_table, pos, 0)  # [N, D]
        sin = ops.gather(self.sin_table, pos, 0)
        cos_q, sin_q = self._per_head(cos, rows, nq), self._per_head(sin, rows, nq)
        cos_k, sin_k = self._per_head(cos, rows, nkv), self._per_head(sin, rows, nkv)
        # prompt-key bias in the grouped layout [B, Nkv, G*rep] x Tp, generated-key bias per row and head
        p_bias = ops.reshape(ops.broadcast_to(ops.reshape(prompt_bias, (bsz, 1, plen)), (bsz, nkv * group * rep, plen)),
                             (bsz * nkv * group * rep, plen))
        g_bias = self._per_head(gen_bias, rows, nq)  # [N*Nq, Tn]
        write = ops.concat((ops.reshape(ops.arange(rows * nkv, dtype=ms.int32), (rows * nkv, 1)),
                            ops.broadcast_to(ops.reshape(t, (1, 1)), (rows * nkv, 1))), 1)  # (row, t)
        if self.gather_rows:
            parent_rows = self._kv_rows(parent)
        out = ()
        for i in range(self.num_layers):
            layer = self.model.model.decoder.layers[i]
            att = layer.self_attention
            k_prompt = prompt_caches[2 * i]
            v_prompt = prompt_caches[2 * i + 1]
            k_gen = gen_caches[2 * i]
            v_gen = gen_caches[2 * i + 1]
            if self.gather_rows:
                k_gen = ops.gather(k_gen, parent_rows, 0)
                v_gen = ops.gather(v_gen, parent_rows, 0)
            h = self._rms(x, layer.input_layernorm.weight)
            q, k, v = self._qkv(h, att.linear_qkv.weight)
            q, k = self._qk_heads(att, q, k, rows, cos_q, sin_q, cos_k, sin_k)  # [N*Nq, D], [N*Nkv, D]
            k_gen = ops.tensor_scatter_update(k_gen, write, k)
            v_gen = ops.tensor_scatter_update(v_gen, write, ops.reshape(v, (rows * nkv, dim)))
            # scores against the prompt keys: batch (b, g), queries (j, r)
            q_grouped = ops.reshape(ops.transpose(ops.reshape(q, (bsz, group, nkv, rep, dim)), (0, 2, 1, 3, 4)),
                                    (bsz * nkv, group * rep, dim))
            s_prompt = ops.reshape(self.bmm_tb(q_grouped, k_prompt), (bsz * nkv * group * rep, plen)) * self.scale \
                + p_bias
            s_prompt = ops.reshape(ops.transpose(ops.reshape(s_prompt, (bsz, nkv, group, rep, plen)), (0, 2, 1, 3, 4)),
                                   (rows * nq, plen))
            s_gen = ops.reshape(self.bmm_tb(ops.reshape(q, (rows * nkv, rep, dim)), k_gen), (rows * nq, glen)) \
                * self.scale + g_bias
            probs = ops.softmax(ops.concat((s_prompt, s_gen), 1), -1)  # [N*Nq, Tp+Tn]
            p_prompt = ops.reshape(ops.transpose(ops.reshape(probs[:, :plen], (bsz, group, nkv, rep, plen)),
                                                 (0, 2, 1, 3, 4)), (bsz * nkv, group * rep, plen))
            c_prompt = ops.reshape(ops.transpose(ops.reshape(self.bmm(p_prompt, v_prompt), (bsz, nkv, group, rep, dim)),
                                                 (0, 2, 1, 3, 4)), (rows, nq * dim))
            c_gen = ops.reshape(self.bmm(ops.reshape(probs[:, plen:], (rows * nkv, rep, glen)), v_gen),
                                (rows, nq * dim))
            x = x + self.mm(c_prompt + c_gen, att.linear_proj.weight)
            x = x + self._mlp(self._rms(x, layer.pre_mlp_layernorm.weight), layer.mlp)
            out = out + (k_gen, v_gen)
        return self._logits(x), out


class Qwen3KVDecoder:
    """KV-cache decoding over the parameters of MindFormers' training-graph Qwen3 (shared, not copied).

    Args:
        model: ``TrainingQwen3ForCausalLM`` (e.g. from :func:`recast_ms.models.qwen3.build_qwen3`).
        max_prompt_len (int): prompts are padded to this many tokens (a static shape).
        max_new_tokens (int): cache slots for generated tokens; ``step`` may be called this many times.
        pad_id (int): the pad token; keys equal to it are masked, as in the training graph.
        split (str): ``"auto"`` (default) splits the fused qkv and gate/up weights when a call has more rows
            than the hidden size and the (then smaller) activations otherwise; ``"weights"``/``"activations"``
            force one.

    Implements :class:`recast_ms.rollout.engine.IncrementalDecoder`. Each prompt's cache is computed once and
    shared by its ``expand`` rows (not copied); each row has its own cache for generated tokens, so
    ``reorder`` may move rows only within their prompt's group (what beam search does).
    """

    def __init__(self, model, max_prompt_len: int, max_new_tokens: int, pad_id: int, split: str = "auto"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if max_prompt_len < 1 or max_new_tokens < 1:
            raise ValueError("max_prompt_len and max_new_tokens must be >= 1")
        self.spec = Qwen3Spec.from_model(model)
        model_pad = getattr(model.model.config, "pad_token_id", None)
        if model_pad is not None and int(model_pad) != int(pad_id):
            raise ValueError(f"pad_id={pad_id} differs from the model's pad_token_id={model_pad}")
        self.max_prompt_len = int(max_prompt_len)
        self.max_new_tokens = int(max_new_tokens)
        self.cache_len = self.max_prompt_len + self.max_new_tokens
        if self.spec.max_positions and self.cache_len > self.spec.max_positions:
            raise ValueError(f"max_prompt_len + max_new_tokens = {self.cache_len} exceeds max_position_embeddings="
                             f"{self.spec.max_positions}")
        self.pad_id = int(pad_id)
        self.model = model
        self._prefill = _PrefillGraph(model, self.spec, self.max_prompt_len, split)
        self._step = _StepGraph(model, self.spec, self.max_prompt_len, self.max_new_tokens, split, gather_rows=False)
        self._step_gather = _StepGraph(model, self.spec, self.max_prompt_len, self.max_new_tokens, split,
                                       gather_rows=True)
        self._expand = 0
        self._prompt_caches = None  # per layer K, V [B*Nkv, Tp, D]
        self._prompt_bias = None  # [B, Tp] Tensor
        self._gen_caches = None  # per layer K, V [N*Nkv, Tn, D]
        self._gen_valid = None  # [N, Tn] generated keys to attend to (host)
        self._pos = None  # [N] absolute position of the next token (host)
        self._t = 0  # generated tokens so far (the next generated-cache slot)
        self._parent = None  # pending reorder, applied by the next step

    @property
    def num_rows(self) -> int:
        return 0 if self._pos is None else int(self._pos.shape[0])

    def start(self, prompt_ids: np.ndarray, prompt_lens: np.ndarray, expand: int) -> np.ndarray:
        """Encode ``prompt_ids [B, T]`` (right-padded) once; rows ``b*expand + j`` continue prompt b.
        Returns next-token logits ``[B*expand, V]`` float32."""
        ids = np.asarray(prompt_ids)
        lens = np.asarray(prompt_lens, np.int64).reshape(-1)
        if ids.ndim != 2 or lens.shape[0] != ids.shape[0]:
            raise ValueError(f"prompt_ids must be [B, T] with prompt_lens [B]; got {ids.shape} and {lens.shape}")
        expand = int(expand)
        if expand < 1:
            raise ValueError(f"expand must be >= 1, got {expand}")
        bsz, width = ids.shape
        if lens.min() < 1 or lens.max() > min(width, self.max_prompt_len):
            raise ValueError(f"prompt lengths must be in [1, {min(width, self.max_prompt_len)}], got "
                             f"[{lens.min()}, {lens.max()}] (max_prompt_len={self.max_prompt_len})")
        use = min(width, self.max_prompt_len)
        padded = np.full((bsz, self.max_prompt_len), self.pad_id, np.int32)
        padded[:, :use] = np.where(np.arange(use)[None, :] < lens[:, None], ids[:, :use], self.pad_id)
        valid = padded != self.pad_id  # keys equal to the pad id are masked, as in the training graph
        logits, caches = self._prefill(Tensor(padded), Tensor((lens - 1).astype(np.int32)), Tensor(valid))
        rows = bsz * expand
        spec = self.spec
        zeros = np.zeros((rows * spec.num_kv_heads, self.max_new_tokens, spec.head_dim), np.float32)
        self._expand = expand
        self._prompt_caches = caches
        self._prompt_bias = Tensor(np.where(valid, 0.0, _MASK).astype(np.float32))
        self._gen_caches = tuple(Tensor(zeros) for _ in range(2 * spec.num_layers))
        self._gen_valid = np.zeros((rows, self.max_new_tokens), bool)
        self._pos = np.repeat(lens, expand)
        self._t = 0
        self._parent = None
        return np.repeat(logits.asnumpy(), expand, axis=0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens [N]`` (one per row) and return the next-token logits ``[N, V]`` float32."""
        if self._gen_caches is None:
            raise RuntimeError("call start() before step()")
        tokens = np.asarray(tokens).reshape(-1)
        rows = self.num_rows
        if tokens.shape[0] != rows:
            raise ValueError(f"expected {rows} tokens, got {tokens.shape[0]}")
        if self._t >= self.max_new_tokens:
            raise RuntimeError(f"cache full: max_new_tokens={self.max_new_tokens} tokens already appended")
        self._gen_valid[:, self._t] = tokens != self.pad_id
        gen_bias = np.where(self._gen_valid, 0.0, _MASK).astype(np.float32)
        args = (Tensor(tokens.astype(np.int32)), Tensor(self._pos.astype(np.int32)),
                Tensor(np.array([self._t], np.int32)), self._prompt_bias, Tensor(gen_bias))
        if self._parent is None:
            graph, parent = self._step, np.arange(rows)
        else:
            graph, parent = self._step_gather, self._parent
        logits, caches = graph(*args, Tensor(parent.astype(np.int32)), ms.mutable(self._prompt_caches),
                               ms.mutable(self._gen_caches))
        self._parent = None
        self._gen_caches = caches
        self._pos = self._pos + 1
        self._t += 1
        return logits.asnumpy()

    def reorder(self, index: np.ndarray) -> None:
        """Row i becomes old row ``index[i]`` (beam search); rows stay within their prompt's group
        (``index[i] // expand == i // expand``). The cache gather runs with the next step."""
        if self._gen_caches is None:
            raise RuntimeError("call start() before reorder()")
        index = np.asarray(index, np.int64).reshape(-1)
        rows = self.num_rows
        if index.shape[0] != rows or index.min() < 0 or index.max() >= rows:
            raise ValueError(f"reorder index must be {rows} rows in [0, {rows})")
        if np.any(index // self._expand != np.arange(rows) // self._expand):
            raise ValueError("reorder may move a row only within its prompt's group of expand rows "
                             "(the prompt cache is shared by the group)")
        self._pos = self._pos[index]
        self._gen_valid = self._gen_valid[index]
        self._parent = index if self._parent is None else self._parent[index]
