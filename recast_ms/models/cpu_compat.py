"""CPU compatibility patches for MindFormers' training-graph Qwen3 (pinned to mindformers 1.9.0 / mindspore 2.9.0).

``mindformers.models.qwen3.Qwen3ForCausalLM`` under ``use_legacy: False`` builds
``TrainingQwen3ForCausalLM``, whose graph uses five operators without a CPU kernel. On a CPU device target
:func:`apply_cpu_patches` swaps the MindFormers module attributes that construct them for reference
implementations with the same parameters (names, shapes) and the same maths. Each swap replaces one name in
one MindFormers module, looked up when a model is *constructed*: apply the patches before building the
model (``recast_ms.models.qwen3.build_qwen3`` does). On any other device target nothing is patched.

The patches target the exact sources of the pinned versions; :func:`check_pinned_versions` refuses others.
"""
import functools
import importlib
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops

PINNED_MINDSPORE = "2.9.0"
PINNED_MINDFORMERS = "1.9.0"

_TG = "mindformers.parallel_core.training_graph"
# (patch name, module, attribute, expected original __name__)
PATCH_TARGETS = (
    ("rms_norm", f"{_TG}.transformer.norm", "FusedRMSNorm", "FusedRMSNorm"),
    ("rope_outer", f"{_TG}.base_models.common.embeddings.rotary_pos_embedding", "Outer", "Outer"),
    ("core_attention", f"{_TG}.base_models.gpt.gpt_layer_specs", "FlashAttention", "FlashAttention"),
    ("self_attention", f"{_TG}.base_models.gpt.gpt_layer_specs", "SelfAttention", "SelfAttention"),
    ("self_attention_contiguous", f"{_TG}.base_models.gpt.gpt_layer_specs", "SelfAttentionContiguous",
     "SelfAttentionContiguous"),
    ("mlp", f"{_TG}.base_models.gpt.gpt_layer_specs", "MLP", "MLP"),
    ("mlp_interleaved", f"{_TG}.base_models.gpt.gpt_layer_specs", "MLPInterleaved", "MLPInterleaved"),
    ("dropout_layer", f"{_TG}.transformer.transformer_layer", "Dropout", "Dropout"),
    ("dropout_embedding", f"{_TG}.base_models.common.embeddings.language_model_embedding", "Dropout", "Dropout"),
    ("embedding", f"{_TG}.base_models.common.embeddings.language_model_embedding", "VocabParallelEmbedding",
     "VocabParallelEmbedding"),
)

_ORIGINALS = {}  # (module, attribute) -> original object, filled while patches are applied


class CpuCompatError(RuntimeError):
    """The installed MindSpore/MindFormers are not the versions these patches were written against."""


def check_pinned_versions() -> None:
    """Raise :class:`CpuCompatError` unless mindspore == 2.9.0 and mindformers == 1.9.0."""
    import mindformers  # pylint: disable=import-outside-toplevel
    found = {"mindspore": ms.__version__, "mindformers": mindformers.__version__}
    pinned = {"mindspore": PINNED_MINDSPORE, "mindformers": PINNED_MINDFORMERS}
    wrong = [f"{name} {found[name]} (pinned {pinned[name]})" for name in pinned if found[name] != pinned[name]]
    if wrong:
        raise CpuCompatError(
            "recast_ms.models.cpu_compat patches MindFormers internals of exact versions; found "
            + ", ".join(wrong) + ". Re-check each patch target against the installed sources and update the pins.")


def needs_cpu_patches(device_target: str) -> bool:
    """Whether ``device_target`` needs the patches: only the CPU backend lacks the kernels."""
    return str(device_target).upper() == "CPU"


def cpu_patches_applied() -> bool:
    """True while the patches are in place."""
    return bool(_ORIGINALS)


def applied_patches() -> tuple:
    """Names of the patches in place (empty when none)."""
    applied = {(module, attr) for module, attr in _ORIGINALS}
    return tuple(name for name, module, attr, _ in PATCH_TARGETS if (module, attr) in applied)


def apply_cpu_patches(device_target: Optional[str] = None) -> bool:
    """Apply the CPU patches if ``device_target`` (default: the MindSpore context's) is CPU.

    Idempotent. Must run before the model is constructed. Returns whether the patches are in place.
    Raises :class:`CpuCompatError` on unpinned versions or when a patch target is not what it should be.
    """
    if device_target is None:
        device_target = ms.get_context("device_target")
    if not needs_cpu_patches(device_target):
        return False
    check_pinned_versions()
    if _ORIGINALS:
        return True
    replacements = _replacements()
    targets = []
    for name, module_name, attr, expected in PATCH_TARGETS:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, None)
        if getattr(original, "__name__", None) != expected:
            raise CpuCompatError(f"patch {name!r}: {module_name}.{attr} is {original!r}, expected {expected}")
        targets.append((module, module_name, attr, original, replacements[name]))
    for module, module_name, attr, original, replacement in targets:
        _ORIGINALS[(module_name, attr)] = original
        setattr(module, attr, replacement)
    return True


def remove_cpu_patches() -> None:
    """Restore the original MindFormers attributes (models already built keep their CPU layers)."""
    for (module_name, attr), original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(module_name), attr, original)
        del _ORIGINALS[(module_name, attr)]


@functools.lru_cache(maxsize=None)
def _replacements() -> dict:
    """The replacement for each patch target; built lazily (once) so importing this module stays cheap."""
    # pylint: disable=import-outside-toplevel
    from mindformers.parallel_core.training_graph.transformer.norm import RMSNorm
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import VocabParallelEmbedding

    from recast_ms.models.layout import qkv_2d, swiglu_2d

    # Patch 1 (FusedRMSNorm -> reference RMSNorm): the RmsNorm primitive has no CPU kernel. The reference
    # RMSNorm of the same module keeps the parameter ("weight", shape (dim,)); the reductions run on a 2-D
    # (N, D) view because CPU reduce kernels on 3-D/4-D inputs are several times slower.
    class CpuRMSNorm(RMSNorm):
        """RMSNorm over the last axis, computed on a 2-D (N, D) view."""

        def construct(self, x):
            original_type = x.dtype
            shape = x.shape
            x2d = ops.reshape(self.cast(x, self.compute_type), (-1, shape[-1]))  # (N, D)
            norm_factor = self.rsqrt(self.add(self.mean(self.square(x2d), -1, keepdim=True), self.eps))
            output = self.mul2(self.mul(x2d, norm_factor), self.weight)
            return self.cast(ops.reshape(output, shape), original_type)

    # Patch 2 (Outer in the rotary embedding): the Outer primitive has no CPU kernel; a broadcast multiply
    # of a column by a row is the same outer product.
    class CpuOuter(nn.Cell):
        """outer(a, b) = a[:, None] * b[None, :]."""

        def construct(self, a, b):
            return ops.reshape(a, (-1, 1)) * ops.reshape(b, (1, -1))

        def shard(self, *args, **kwargs):  # the primitive's sharding API; nothing to shard on CPU
            return self

    # Patch 3 (FlashAttention core attention): FlashAttentionScore has no CPU kernel, the layer spec always
    # builds FlashAttention, and MindFormers' non-flash path (use_flash_attention=False) repeats k/v with a
    # (B, N, S, D) reshape on (S, B, N, D) tensors, which mixes batch rows under grouped-query attention.
    # This reference attention undoes that repeat and groups the query heads per kv head instead.
    class CpuCoreAttention(nn.Cell):
        """Causal softmax attention in fp32 with grouped-query heads.

        Inputs: query (S, B, N, D); key/value (S, B, Nkv, D), or (S, B*rep, Nkv, D) as MindFormers' ``_repeat_kv``
        leaves them; attention_mask (B, 1, S, S), 1 = masked. Output: (S, B, N*D).
        """

        def __init__(self, config, layer_number, attn_mask_type=None, attention_type=None,
                     attention_dropout=None, softmax_scale=None, cp_comm_type=None):
            super().__init__()
            del layer_number, attention_type, cp_comm_type
            if attn_mask_type:
                raise NotImplementedError("CpuCoreAttention: attn_mask_type is not supported")
            if config.use_flash_attention:
                raise ValueError("On CPU set use_flash_attention=False: with True, MindFormers casts q/k/v to fp16 "
                                 "before the core attention.")
            dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            if dropout:
                raise ValueError(f"attention_dropout={dropout}: dropout has no CPU kernel (HF Qwen3 uses none); "
                                 "set attention_dropout=0.0.")
            if config.window_size or config.multi_latent_attention or config.use_alibi_mask:
                raise NotImplementedError("CpuCoreAttention implements full causal attention only.")
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_query_groups or config.num_attention_heads
            self.rep = self.num_heads // self.num_kv_heads
            self.head_dim = config.kv_channels
            self.scale = 1.0 / np.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
            self.compute_dtype = config.compute_dtype
            self.bmm_tb = ops.BatchMatMul(transpose_b=True)

        def construct(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                      packed_seq_params=None, alibi_mask=None, prefix=None, padding_mask=None,
                      actual_seq_qlen=None, actual_seq_kvlen=None):
            seq, bsz, _, dim = query.shape
            nkv, rep = self.num_kv_heads, self.rep
            if key.shape[1] != bsz:  # undo _repeat_kv: (S, B*rep, Nkv, D), copy r of row b at index b*rep + r
                key = ops.reshape(key, (seq, bsz, rep, nkv, dim))[:, :, 0]
                value = ops.reshape(value, (seq, bsz, rep, nkv, dim))[:, :, 0]
            # query head h = g*rep + r attends with kv head g (MindFormers' interleaved qkv layout). The rep query
            # heads of a kv head are stacked as rows (i, r) of one matrix, so every transpose is the same 4-D one
            q = ops.transpose(ops.reshape(ops.cast(query, ms.float32), (seq, bsz, nkv, rep * dim)), (1, 2, 0, 3))
            q = ops.reshape(q, (bsz * nkv, seq * rep, dim))  # (B*Nkv, S*rep, D), rows (i, r)
            k = ops.reshape(ops.transpose(ops.cast(key, ms.float32), (1, 2, 0, 3)), (bsz * nkv, seq, dim))
            v = ops.reshape(ops.transpose(ops.cast(value, ms.float32), (1, 2, 0, 3)), (bsz * nkv, seq, dim))
            scores = self.bmm_tb(q, k) * self.scale  # (B*Nkv, S*rep, S); transpose_b: no transpose of k
            scores = ops.reshape(scores, (bsz, nkv, seq, rep, seq))
            masked = ops.reshape(attention_mask, (bsz, 1, seq, 1, seq)) > 0.5  # 1 = masked, query row i, key j
            # a finite fill keeps rows with every key masked (all-pad rows) finite
            scores = ops.masked_fill(scores, masked, ms.Tensor(-1e9, ms.float32))
            # the softmax on a 2-D (rows, S) view: 25% of the tiny model's forward time against the 5-D one
            probs = ops.reshape(ops.softmax(ops.reshape(scores, (-1, seq)), -1), (bsz * nkv, seq * rep, seq))
            context = ops.bmm(probs, v)  # (B*Nkv, S*rep, D)
            context = ops.transpose(ops.reshape(context, (bsz, nkv, seq, rep * dim)), (2, 0, 1, 3))  # (S, B, Nkv, rep*D)
            return ops.cast(ops.reshape(context, (seq, bsz, nkv * rep * dim)), self.compute_dtype)  # (S, B, N*D)

    # Patch 3b (grouped-query k/v left unrepeated): with use_flash_attention=False MindFormers' self-attention
    # tiles k and v n_rep times before the core attention (and sums the copies back in the backward), only for
    # CpuCoreAttention to undo it. The CPU attention classes skip the repeat: the same maths, without two tiles
    # and two reductions of [S, B, Nkv, D] tensors per layer and direction.
    from mindformers.parallel_core.training_graph.transformer.attention import SelfAttention, SelfAttentionContiguous

    # Patch 3c (q/k/v on 2-D views): MindFormers runs the fused q/k/v projection, then splits its 4-D
    # [S, B, Nkv, (rep+2)*D] output on the last axis, which is slow on CPU. Here the split is on 2-D views of
    # the fused weight or of the activation, whichever is cheaper (recast_ms/models/layout.py, shared with the
    # KV decode graphs). The same numbers either way.
    def _qkv_from_weights(att, hidden_states, contiguous):
        seq, bsz, hidden = hidden_states.shape
        x = ops.reshape(hidden_states, (-1, hidden))  # (S*B, H)
        nkv, rep, dim = att.kv_num_heads, att.n_rep, att.head_dim
        q2, k2, v2 = qkv_2d(att.cpu_mm, x, att.linear_qkv.weight, nkv, rep, dim, contiguous)
        query = ops.reshape(q2, (seq, bsz, nkv, rep * dim))
        key = ops.reshape(k2, (seq, bsz, nkv, dim))
        value = ops.reshape(v2, (seq, bsz, nkv, dim))
        if att.q_layernorm is not None:
            query = ops.reshape(att.q_layernorm(ops.reshape(query, (seq, bsz, -1, dim))), (seq, bsz, nkv, rep * dim))
        if att.k_layernorm is not None:
            key = ops.reshape(att.k_layernorm(key), (seq, bsz, nkv, dim))
        return query, key, value

    def _check_plain_qkv(att):
        if att.linear_qkv.has_bias or att.cp > 1:
            raise NotImplementedError("CPU self-attention: q/k/v bias and context parallelism are not supported")

    def _cpu_attention(base, contiguous: bool):
        class CpuAttention(base):
            """MindFormers' self-attention on CPU: q/k/v split on 2-D views, k/v left with their Nkv heads."""

            cpu_contiguous = contiguous

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                _check_plain_qkv(self)
                self.cpu_mm = ops.MatMul(transpose_b=True)

            def get_query_key_value_tensors(self, hidden_states, key_value_states=None, sharded_key=None,
                                            sharded_value=None):
                return _qkv_from_weights(self, hidden_states, self.cpu_contiguous)

            def _repeat_kv(self, x, rep):
                return x

        CpuAttention.__name__ = CpuAttention.__qualname__ = "Cpu" + base.__name__
        return CpuAttention

    CpuSelfAttention = _cpu_attention(SelfAttention, contiguous=False)
    CpuSelfAttentionContiguous = _cpu_attention(SelfAttentionContiguous, contiguous=True)

    # Patch 3d (SwiGLU on 2-D views): likewise MindFormers splits the [S, B, 2I] fc1 output (contiguous
    # [gate; up] rows) or reshapes it to [S, B, I, 2] (interleaved rows); on CPU the gate and up halves come
    # from the split weight or the 2-D activation, by the same rule as 3c.
    from mindformers.parallel_core.training_graph.transformer.mlp import MLP, MLPInterleaved

    def _swiglu_from_weights(mlp, hidden_states, interleaved):
        seq, bsz, hidden = hidden_states.shape
        inner = swiglu_2d(mlp.cpu_mm, ops.reshape(hidden_states, (-1, hidden)), mlp.linear_fc1.weight,
                          interleaved)  # (S*B, I)
        output, output_bias = mlp.linear_fc2(ops.reshape(inner, (seq, bsz, -1)))
        return output, output_bias

    def _check_plain_mlp(mlp):
        if not mlp.gated_linear_unit or mlp.activation_type != "swiglu" or mlp.mlp_has_bias:
            raise NotImplementedError("CPU MLP: only bias-free SwiGLU (Qwen3's) is supported")

    def _cpu_mlp(base, interleaved: bool):
        class CpuMlp(base):
            """MindFormers' MLP on CPU: SwiGLU's gate and up halves split on 2-D views."""

            cpu_interleaved = interleaved

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                _check_plain_mlp(self)
                self.cpu_mm = ops.MatMul(transpose_b=True)

            def construct(self, hidden_states, per_token_scale=None, extra_loss=0.):
                output, output_bias = _swiglu_from_weights(self, hidden_states, self.cpu_interleaved)
                return output, output_bias, extra_loss

        CpuMlp.__name__ = CpuMlp.__qualname__ = "Cpu" + base.__name__
        return CpuMlp

    CpuMLP = _cpu_mlp(MLP, interleaved=False)
    CpuMLPInterleaved = _cpu_mlp(MLPInterleaved, interleaved=True)

    # Patch 4 (Dropout): DropoutExt has no CPU kernel; ops.Dropout has one. MindFormers' Dropout is live in
    # train mode, but its model runs in eval mode here (in train mode it returns the LM loss, models/policy.py),
    # so the replacement has its own switch, ``active``, off by default: SFT turns it on for its training graph
    # only (policy.set_dropout); evaluation, validation loss, RL and the KV decoder never see dropout. A compiled
    # graph keeps the value its cell saw when it was compiled.
    class CpuDropout(nn.Cell):
        """Dropout through ``ops.Dropout`` (CPU kernel), live only while ``active`` (default off)."""

        cpu_dropout = True

        def __init__(self, drop_prob: float = 0.5):
            super().__init__()
            if not 0.0 <= drop_prob < 1.0:
                raise ValueError(f"dropout probability must be in [0, 1), got {drop_prob}")
            self.p = float(drop_prob)
            self.use_dropout = self.p > 0
            self.active = False
            self.dropout = ops.Dropout(keep_prob=1.0 - self.p) if self.use_dropout else None

        def construct(self, x):
            if self.use_dropout and self.active:
                out, _ = self.dropout(x)
                return out
            return x

        def shard(self, strategy):  # MindFormers' sharding API; nothing to shard on CPU
            del strategy

    # Patch 5 (VocabParallelEmbedding): the lookup's backward, EmbeddingDenseBackward, has no CPU kernel; a
    # gather of rows has one (a segment sum). Same parameter ("weight", (vocab, hidden)).
    class CpuVocabParallelEmbedding(VocabParallelEmbedding):
        """Embedding lookup by ``gather`` of rows; no tensor or sequence parallelism."""

        def __init__(self, num_embeddings, embedding_dim, init_method, config, reduce_scatter_embeddings=False):
            super().__init__(num_embeddings, embedding_dim, init_method, config, reduce_scatter_embeddings)
            if self.enable_embedding_tp or self.sequence_parallel:
                raise NotImplementedError("CpuVocabParallelEmbedding supports neither tensor nor sequence parallel.")

        def construct(self, input_):
            bsz, seq = input_.shape
            output = ops.gather(self.weight, ops.reshape(input_, (-1,)), 0)  # (B*S, H)
            return ops.reshape(output, (bsz, seq, self.embedding_dim))  # (B, S, H)

    return {
        "rms_norm": CpuRMSNorm,
        "rope_outer": CpuOuter,
        "core_attention": CpuCoreAttention,
        "self_attention": CpuSelfAttention,
        "self_attention_contiguous": CpuSelfAttentionContiguous,
        "mlp": CpuMLP,
        "mlp_interleaved": CpuMLPInterleaved,
        "dropout_layer": CpuDropout,
        "dropout_embedding": CpuDropout,
        "embedding": CpuVocabParallelEmbedding,
    }
