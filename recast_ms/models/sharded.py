"""The policy's log-prob and next-token cells for MindFormers' Qwen3 under semi-auto parallel (Ascend TP / PP).

:class:`recast_ms.models.policy.ResponseLogProbs` gathers hidden rows with a flat ``Gather`` and takes a full
log-softmax: under semi-auto parallel those ops get MindSpore's default strategies, which gather the
vocabulary-parallel head's ``[B*R, V]`` logits whole on every device (152k columns at Qwen3 scale). The cells
here give every op they add a shard strategy that follows MindFormers' own layouts:

* hidden states ``[S, B, H]`` are sharded ``(1, dp, 1)`` (MindFormers' ``(cp, dp, None)``, cp = 1);
* the response positions are picked by a one-hot batched matmul ``[B, R, S] x [B, S, H]``, sharded by dp
  (a gather on a flattened ``[S*B, H]`` would redistribute the whole activation);
* MindFormers' ``output_layer`` (ColumnParallelLinear) takes them as a ``[1, B*R, H]`` sequence and makes
  ``[B*R, V]`` logits sharded ``(dp, tp)``;
* the log-softmax and the target pick stay vocabulary-parallel: max, sum of exp and the one-hot product are
  reduced over the sharded V axis, so each device touches V / tp columns and MindSpore inserts the two
  AllReduces (max and sum) over the tp group.

Off semi-auto parallel (CPU, stand-alone Ascend) the ``shard`` calls do nothing and the cells equal
:class:`~recast_ms.models.policy.ResponseLogProbs` / :class:`~recast_ms.models.policy.LogitsAt` (tested on CPU).
Under pipeline parallelism (``stage``), every op here belongs to the last stage, where the head is.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from recast_ms.models.policy import _OverModel


class _VocabParallelLogProb(nn.Cell):
    """``logits [N, V]`` (sharded ``(dp, tp)``), ``targets [N]`` -> ``log p(target)`` ``[N]`` (MindFormers'
    vocabulary-parallel cross-entropy pattern: MindSpore's parallel OneHot takes 1-D indices only)."""

    def __init__(self, vocab_size: int, dp: int, tp: int, inv_temperature: float):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.inv_temperature = float(inv_temperature)
        s2 = (dp, tp)
        self.scale = ops.Mul().shard((s2, ()))
        self.max = ops.ReduceMax(keep_dims=True).shard((s2,))
        self.sub = ops.Sub().shard((s2, (dp, 1)))
        self.exp = ops.Exp().shard((s2,))
        self.sum = ops.ReduceSum(keep_dims=False).shard((s2,))
        self.log = ops.Log().shard(((dp,),))
        self.onehot = ops.OneHot(axis=-1).shard((s2, (), ()))
        self.mul = ops.Mul().shard((s2, s2))
        self.pick = ops.ReduceSum(keep_dims=False).shard((s2,))
        self.diff = ops.Sub().shard(((dp,), (dp,)))
        self.on = ms.Tensor(1.0, ms.float32)
        self.off = ms.Tensor(0.0, ms.float32)

    def construct(self, logits, targets):
        logits = ops.cast(logits, ms.float32)
        if self.inv_temperature != 1.0:
            logits = self.scale(logits, self.inv_temperature)
        shifted = self.sub(logits, ops.stop_gradient(self.max(logits, -1)))  # [N, V]
        lse = self.log(self.sum(self.exp(shifted), -1))  # [N]
        hot = self.onehot(targets, self.vocab_size, self.on, self.off)  # [N, V]
        return self.diff(self.pick(self.mul(shifted, hot), -1), lse)  # [N]


class _PickPositions(nn.Cell):
    """``hidden [S, B, H]``, ``pos [B, R]`` -> ``hidden[pos[b, j], b]`` as ``[B, R, H]`` (a one-hot batched matmul:
    shardable by dp, exact in fp32, and no larger than the hidden states for R << S)."""

    def __init__(self, seq_length: int, dp: int):
        super().__init__()
        self.seq_length = int(seq_length)
        self.onehot = ops.OneHot(axis=-1).shard(((dp, 1, 1), (), ()))  # the output's [B, R, S] strategy
        self.to_bsh = ops.Transpose().shard(((1, dp, 1),))
        self.bmm = ops.BatchMatMul().shard(((dp, 1, 1), (dp, 1, 1)))
        self.on = ms.Tensor(1.0, ms.float32)
        self.off = ms.Tensor(0.0, ms.float32)

    def construct(self, hidden, pos):
        # OneHot has no bf16 kernel: one-hot in fp32, then the hidden states' dtype (0 / 1 are exact in bf16)
        sel = ops.cast(self.onehot(pos, self.seq_length, self.on, self.off), hidden.dtype)  # [B, R, S]
        return self.bmm(sel, self.to_bsh(hidden, (1, 0, 2)))  # [B, R, H]


class _ShardedHead(_OverModel):
    """Shared by the two cells: the decoder stack, then the head on the picked positions only."""

    def __init__(self, model, seq_length: int, dp: int, tp: int, stage: int = -1):
        super().__init__(model)
        gpt = model.model
        self.tied = bool(gpt.share_embeddings_and_output_weights)
        self.pick = _PickPositions(seq_length, dp)
        self.dp, self.tp = int(dp), int(tp)
        if stage >= 0:  # pipeline: the head's stage (MindFormers puts output_layer on the last one)
            self.pick.pipeline_stage = stage

    def head(self, input_ids, pos):
        """``[B*R, V]`` logits (vocabulary-parallel, row ``b*R + j``) predicting the tokens after ``pos [B, R]``."""
        gpt = self.model.model
        bsz, r = pos.shape
        _, attention_mask, _, _, _ = gpt.preprocess_labels_and_masks(input_ids, None, None, None)
        hidden, _, _, _ = gpt.language_model(input_ids, None, attention_mask, None)  # [S, B, H]
        picked = self.pick(hidden, pos)  # [B, R, H]
        # [1, B*R, H]: the head's [S, B, H] input layout (cp, dp, None) with the picked rows as the batch
        picked = ops.reshape(picked, (1, bsz * r, -1))
        weight = gpt.shared_embedding_or_output_weight() if self.tied else None
        logits, _ = gpt.output_layer(picked, weight)  # [1, B*R, V]
        return ops.reshape(logits, (bsz * r, -1))  # [B*R, V]


class ShardedResponseLogProbs(_ShardedHead):
    r""":class:`recast_ms.models.policy.ResponseLogProbs` with shard strategies (module docstring).

    Inputs: ``input_ids [B, S]`` int32 right-padded, ``resp_start [B]`` int32. Output: ``[B, R]`` float32.
    """

    def __init__(self, model, response_len: int, temperature: float = 1.0, *, dp: int = 1, tp: int = 1,
                 stage: int = -1):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if response_len < 1:
            raise ValueError(f"response_len must be >= 1, got {response_len}")
        cfg = model.config
        super().__init__(model, int(cfg.seq_length), dp, tp, stage)
        self.response_len = int(response_len)
        self.offsets = ms.Tensor([list(range(self.response_len))], ms.int32)  # [1, R]
        self.logprob = _VocabParallelLogProb(int(cfg.vocab_size), dp, tp, 1.0 / float(temperature))
        self.add = ops.Add().shard(((dp, 1), (1, 1)))
        self.gather_t = ops.GatherD().shard(((dp, 1), (dp, 1)))
        if stage >= 0:
            self.logprob.pipeline_stage = stage

    def construct(self, input_ids, resp_start):
        pos = self.add(ops.reshape(resp_start, (-1, 1)), self.offsets)  # [B, R] response positions
        logits = self.head(input_ids, pos - 1)  # [B*R, V]: position t-1 predicts token t
        targets = self.gather_t(input_ids, 1, pos)  # [B, R]
        logp = self.logprob(logits, ops.reshape(targets, (-1,)))  # [B*R]
        return ops.reshape(logp, (-1, self.response_len))  # [B, R]


class ShardedLogitsAt(_ShardedHead):
    r""":class:`recast_ms.models.policy.LogitsAt` with shard strategies: the next-token logits after
    ``positions[b]``, the head run on those B positions only (not on all B*S, as ``LogitsAt`` does).

    Inputs: ``input_ids [B, S]`` int32, ``positions [B]`` int32. Output: ``[B, V]`` float32 (gathered whole:
    the host samples from it).
    """

    is_logits_at = True  # FullForwardDecoder takes it as its next-token cell

    def __init__(self, model, *, dp: int = 1, tp: int = 1, stage: int = -1):
        super().__init__(model, int(model.config.seq_length), dp, tp, stage)

    def construct(self, input_ids, positions):
        logits = self.head(input_ids, ops.reshape(positions, (-1, 1)))  # [B, V]
        return ops.cast(logits, ms.float32)


class _InlineForward(nn.Cell):
    """The forward cell as the micro-batch body of :class:`PipelineForward`."""

    def __init__(self, cell):
        super().__init__(auto_prefix=False)
        self.cell = cell

    def construct(self, input_ids, positions):
        return self.cell(input_ids, positions)


class _LazyInlineForward(_InlineForward):
    """The body as a ``lazy_inline`` cell, as MindSpore pipelines want their repeated body (the training side has
    the RL loss network there). The CPU backend cannot run a lazy-inline cell called more than once ("Input[0] must
    be a Primitive ValueNode", segment_runner.cc), so CPU tests take the plain body: the same values."""

    @ms.lazy_inline
    def __init__(self, cell):
        super().__init__(cell)


class PipelineForward(nn.Cell):
    r"""A forward cell of the sharded engines under pipeline parallelism (``pipeline_stage > 1``): MindSpore's
    pipeline inference pattern (``mindspore.parallel.sync_pipeline_shared_parameters``' example
    ``PipelineCellInference``): a ``lazy_inline`` body called once per micro-batch on row slices of the inputs, the
    outputs concatenated. With ``pipeline_result_broadcast`` in the auto-parallel context (the runtime plan sets it)
    the last stage's result reaches every stage.

    Inputs / output: those of ``cell`` (``input_ids [B, S]``, ``[B]`` positions -> ``[B, ...]``). ``micro``
    micro-batches when they divide ``B``, else one.
    """

    def __init__(self, cell, micro: int, lazy_inline: bool = True):
        super().__init__(auto_prefix=False)
        self.network = _LazyInlineForward(cell) if lazy_inline else _InlineForward(cell)
        self.micro = max(1, int(micro))
        self.is_logits_at = bool(getattr(cell, "is_logits_at", False))

    def construct(self, input_ids, positions):
        rows = input_ids.shape[0]
        micro = self.micro if rows % self.micro == 0 else 1
        size = rows // micro
        outs = ()
        for i in range(micro):
            outs = outs + (self.network(input_ids[i * size:(i + 1) * size], positions[i * size:(i + 1) * size]),)
        if micro == 1:
            return outs[0]
        return ops.concat(outs, 0)


def pure_morphs(model) -> int:
    """Drop the side-effect flags of the ``Morph`` primitives in ``model``'s layers (MindFormers wraps every linear
    layer's matmul in one; MindSpore marks each Morph ``side_effect_mem`` / ``side_effect_io``), the embedding's
    excepted; returns how many. Needed under pipeline parallelism for the forward graphs of the last stages: there
    every sub-graph is inlined into one, MindSpore's pipeline split replaces the monad coming from the previous
    stage with a ``UMonad`` value node that has no abstract, and the first Morph of the stage then fails to expand
    ("The pointer[abs] is null", ``morph.cc`` ``AddMonadParameterForFuncGraph``, seen under DryRun). The linear
    layers' functions are pure (a matmul, and in ``RowParallelLinear`` its tensor-parallel AllReduce), so no order
    is lost. The embedding's Morph stays as built: it is on the first stage, and without the flags its function
    does not compile ("The parameters number of the function is 3, but the number of provided arguments is 2")."""
    from mindspore.ops.operations import Morph

    count = 0
    for _, cell in model.cells_and_names():
        if "Embedding" in type(cell).__name__:
            continue
        for prim in getattr(cell, "_primitives", {}).values():
            if isinstance(prim, Morph):
                prim.add_prim_attr("side_effect_mem", False)
                prim.add_prim_attr("side_effect_io", False)
                count += 1
    return count
