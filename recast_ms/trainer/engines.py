"""The engines of one RL step, chosen by the runtime plan: the RL step (``recast_ms.trainer.rl``) calls them
and never branches on the backend, as MindRLHF keeps one worker per role.

* **rollout**: a decoder for :mod:`recast_ms.rollout.engine` (``start`` / ``step`` / ``reorder``);
* **policy**: the actor's log-probs (old log-probs when off-policy) and the update;
* **reference**: the frozen reference's log-probs (None when ``rl.kl_coef = 0``).

Two sets, one per path of :mod:`recast_ms.runtime`:

``local`` (CPU, and Ascend data parallel with TP = PP = 1): each process holds the whole model. Rollout is
the KV decoder over the actor's own Parameters; the policy is :class:`recast_ms.trainer.optim.Optimizer`
(gradient accumulation + torch-exact AdamW, the data-parallel AllReduce inside); the reference is a frozen
copy of the actor.

``sharded`` (Ascend semi-auto parallel: TP > 1, PP > 1 or optimizer parallel; the 8B / 14B layouts): every
graph is MindSpore's semi-auto parallel over MindFormers' own tensor-parallel layers, fed the GLOBAL batch
(``full_batch``: the framework slices it by DP). The policy is MindFormers' ``MFTrainOneStepCell`` with its
``AdamW`` (optimizer parallel from the context) over ``GradAccumulationCellWithMultiOutputs`` (or
``PipelineCellWithMultiOutputs`` under PP); the RL loss is adapted to their contract (one loss output,
the statistics kept in a Parameter the host reads). Log-probs use :mod:`recast_ms.models.sharded`
(vocabulary-parallel). The reference is a second model with the same layout, forward only. A run from
``hf_checkpoint`` never holds the whole model on a host: the actor update and reference graphs compile first,
then each of their parameters gets this rank's slice, read one checkpoint tensor at a time
(:func:`load_sliced_start`); an ``--init`` of the project's full checkpoint is read whole, the reference
copying the actor before the first compile. Rollout is :class:`recast_ms.rollout.decoder.FullForwardDecoder` over
:class:`recast_ms.models.sharded.ShardedLogitsAt` on the actor's own sharded Parameters: no second copy of the
weights, no weight sync and no resharding; see ``docs/ascend.md`` for what that costs against a KV cache.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """The actor batch of one step on the policy engine's device side: ``micro`` holds the per-micro-batch
    tensors ``(input_ids [m, S], resp_start [m])`` the log-prob engines read; the arrays are the whole padded
    batch (``B`` rows) the update reads."""

    input_ids: np.ndarray  # [B, S] int32
    resp_start: np.ndarray  # [B] int32
    advantages: np.ndarray  # [B] float32
    loss_mask: np.ndarray  # [B, R] float32
    num_seqs: int  # sequences of the step batch before padding (the loss's normaliser)
    micro: List[tuple]  # per micro-batch (input_ids, resp_start) device tensors


class _Policy:
    """What both policy engines share: old log-probs per micro-batch, and the zeros that stand in for them."""

    micro: int
    R: int

    def old_logps(self, batch: StepBatch) -> list:
        return [self.logps_fn(i, s) for i, s in batch.micro]

    def zeros(self, batch: StepBatch) -> list:
        import mindspore as ms

        z = ms.Tensor(np.zeros((self.micro, self.R), np.float32))
        return [z] * len(batch.micro)


class _Reference:
    def logps(self, batch: StepBatch) -> list:
        out = [self.logps_fn(i, s) for i, s in batch.micro]
        out[-1].asnumpy()  # graph calls are asynchronous: the caller times the stage, not its launch
        return out


# ----------------------------------------------------------------------------- local: whole model per process


class LocalPolicy(_Policy):
    """The actor on one device (CPU / data-parallel Ascend): :class:`recast_ms.trainer.optim.Optimizer` over the
    RL loss cell, ``micro`` rows per forward/backward, fused into one graph when one micro-batch covers the step."""

    kind = "local"

    def __init__(self, model, rcfg, response_len: int, rows: int, world_size: int = 1):
        from recast_ms.models.policy import ResponseLogProbs
        from recast_ms.trainer.optim import Optimizer
        from recast_ms.trainer.rl import _rl_loss_cell

        self.model, self.rcfg, self.R = model, rcfg, int(response_len)
        self.rows = int(rows)
        self.micro = min(rcfg.micro_batch_size, self.rows)
        self.num_micro = -(-self.rows // self.micro)
        self.on_policy = rcfg.ppo_epochs == 1
        self.logps_fn = ResponseLogProbs(model, self.R, rcfg.temperature)
        self.opt = Optimizer(_rl_loss_cell(model, rcfg, self.R, self.on_policy), model.trainable_params(),
                             lr=rcfg.lr, weight_decay=rcfg.weight_decay, grad_clip=rcfg.grad_clip, name="rl",
                             world_size=world_size, fused=self.num_micro == 1)

    def prepare(self, input_ids, resp_start, loss_mask, advantages) -> StepBatch:
        """Pad the ``B`` rows to whole micro-batches of a fixed shape (masked filler rows) and make the tensors."""
        import mindspore as ms

        B, R = len(input_ids), self.R
        pad_rows = self.num_micro * self.micro - B
        if pad_rows:
            input_ids = np.concatenate([input_ids, np.repeat(input_ids[:1], pad_rows, 0)])
            resp_start = np.concatenate([resp_start, np.repeat(resp_start[:1], pad_rows)])
            loss_mask = np.concatenate([loss_mask, np.zeros((pad_rows, R), np.float32)])
            advantages = np.concatenate([advantages, np.zeros(pad_rows, np.float32)])
        mbs = [slice(k * self.micro, (k + 1) * self.micro) for k in range(self.num_micro)]
        micro = [(ms.Tensor(input_ids[m]), ms.Tensor(resp_start[m])) for m in mbs]
        return StepBatch(input_ids, resp_start, advantages, loss_mask, B, micro)

    def update(self, batch: StepBatch, old: list, ref: list, lr: float) -> Tuple[np.ndarray, float]:
        """``rl.ppo_epochs`` optimizer steps; returns ``(loss, pg_loss, kl, clip_frac)`` and the pre-clip norm."""
        import mindspore as ms

        n_mb = len(batch.micro)
        num_seqs = ms.Tensor(np.float32(batch.num_seqs))
        mbs = [slice(k * self.micro, (k + 1) * self.micro) for k in range(n_mb)]
        micro_batches = [(i, s, old[k], ref[k], ms.Tensor(batch.advantages[m]), ms.Tensor(batch.loss_mask[m]),
                          num_seqs) for k, ((i, s), m) in enumerate(zip(batch.micro, mbs))]
        stats, grad_norm = np.zeros(4), 0.0
        for _ in range(self.rcfg.ppo_epochs):
            outs, grad_norm = self.opt.train_step(micro_batches, lr)
            for out in outs:
                # loss terms add up over micro-batches; kl / clip_frac are per-micro-batch means
                stats += np.array([float(o.asnumpy()) for o in out]) * np.array([1, 1, 1.0 / n_mb, 1.0 / n_mb])
        return stats / self.rcfg.ppo_epochs, grad_norm

    # checkpoints: rank 0 writes the whole state (every rank holds the same weights)
    def save(self, run_dir: str, step: int, meta: dict, rank: int, init_checkpoint: Optional[str]) -> None:
        from recast_ms.trainer import checkpoint as ckpt

        if rank == 0:
            ckpt.save_train_state(run_dir, step, self.model, self.opt, meta, what="RL", init_checkpoint=init_checkpoint)

    def load(self, path: str) -> dict:
        from recast_ms.trainer import checkpoint as ckpt

        return ckpt.load_train_state(path, self.model, self.opt)


class LocalReference(_Reference):
    """The frozen reference on one device: a copy of the actor's weights (``freeze_copy``), response log-probs."""

    kind = "local"

    def __init__(self, model, rcfg, response_len: int):
        from recast_ms.models.policy import ResponseLogProbs, freeze_copy
        from recast_ms.trainer.setup import quiet_stdout

        with quiet_stdout():  # MindFormers print()s its config table on every model build
            self.model = freeze_copy(model)
        self.logps_fn = ResponseLogProbs(self.model, response_len, rcfg.temperature)


# ----------------------------------------------------------------------------- sharded: semi-auto parallel


def _rl_network(model, rcfg, response_len: int, on_policy: bool, dp: int, tp: int, stage: int, micro_num: int):
    """The RL loss in MindFormers' mcore contract: ``MFTrainOneStepCell`` sums the network's four outputs
    (lm, mtp, aux, indexer losses) and asks ``network.network`` for the transformer config. The statistics
    (pg_loss, kl, clip_frac; kl and clip_frac as means over micro-batches) are added into ``rl_stats``."""
    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.common.initializer import initializer

    from recast_ms.models.sharded import ShardedResponseLogProbs
    from recast_ms.trainer.loss import PolicyLoss

    class RLNetwork(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.network = model  # get_real_models() walks .network to the mcore model
            self.logps = ShardedResponseLogProbs(model, response_len, rcfg.temperature, dp=dp, tp=tp, stage=stage)
            self.loss = PolicyLoss(rcfg.clip_low, rcfg.clip_high, rcfg.kl_coef)
            if stage >= 0:
                self.loss.pipeline_stage = stage
            self.rl_stats = ms.Parameter(initializer("zeros", (3,), ms.float32), name="rl_stats", requires_grad=False)
            self.inv_micro = 1.0 / float(micro_num)

        def get_gpt_transformer_config(self):
            return self.network.get_gpt_transformer_config()

        def construct(self, input_ids, resp_start, old_logps, ref_logps, advantages, loss_mask, num_seqs_rows):
            # num_seqs comes per row ([B], every entry the step's sequence count): MindFormers' micro-batch and
            # pipeline cells slice every input along axis 0, so a scalar input cannot pass them
            num_seqs = ops.reduce_max(num_seqs_rows)
            lp = self.logps(input_ids, resp_start)  # [B, R]
            old = ops.stop_gradient(lp) if on_policy else old_logps
            loss, pg, kl, clip = self.loss(lp, old, ref_logps, advantages, loss_mask, num_seqs)
            stats = ops.stop_gradient(ops.stack((pg, kl * self.inv_micro, clip * self.inv_micro)))
            loss = ops.depend(loss, ops.assign_add(self.rl_stats, stats))
            zero = ops.zeros((), ms.float32)
            return loss, zero, zero, zero

    if micro_num > 1 or stage >= 0:
        # MindSpore's gradient accumulation / pipeline under semi-auto parallel find the micro-step border through
        # a lazy-inline cell directly under the accumulation cell, as MindFormers' trainer has its model there
        # ("Cannot find grad_accumulation border node" without it, seen compiling). Only then: with one micro-batch
        # the inline border costs a TensorMove copy of the fp32 weights in the update (DryRun, 14B DP 1 x TP 8 at 2
        # layers: 7,770 MB with it, 6,713 MB without)
        RLNetwork.__init__ = ms.lazy_inline(RLNetwork.__init__)
    return RLNetwork()


def _train_one_step_cls():
    """MindFormers' ``MFTrainOneStepCell`` without its loss-scale / overflow branch: ``if not overflow`` on a tensor
    is a ConditionSwitch, which the O0 (kernel-by-kernel) jit level the Qwen3 recipe uses cannot build ("Can not
    build a sub graph which contains ConditionSwitch ... by kbk", seen compiling under DryRun). The RL step trains
    in fp32 / bf16 with a loss scale of 1, so there is no overflow to skip; the rest (mcore gradient contract, grad
    reducer, global-norm clipping, the optimizer) is MindFormers' own. Returns ``(loss, pre-clip global norm)``."""
    import mindspore as ms
    from mindspore import ops
    from mindformers.wrapper.wrapper import MFTrainOneStepCell

    class RLTrainOneStepCell(MFTrainOneStepCell):
        def construct(self, *inputs):
            loss, grads, _ = self.grads_for_mcore(self.scale_sense, *inputs)
            grads = self.grad_reducer(grads)
            global_norm = ops.zeros((), ms.float32)
            if self.use_clip_grad:
                grads, global_norm = self.clip_grad_norm(grads)
            loss = ops.depend(loss, self.optimizer(grads))
            return loss, global_norm

    return RLTrainOneStepCell


def _accumulating_step_cls():
    """MindFormers' ``MFPipelineWithLossScaleCell`` (the wrapper its trainer uses for gradient accumulation and
    pipelines: it owns the ``accu_grads`` buffers that optimizer parallel's micro-step AllGather needs, "You should
    define `accu_grads` when use _MicroStepAllGather" otherwise, seen compiling) without its overflow branch (see
    :func:`_train_one_step_cls`). The accumulated gradient is the sum over micro-batches: the RL loss of each
    micro-batch is already normalised by the step's sequence count. Returns ``(loss, pre-clip global norm)``."""
    import mindspore as ms
    from mindspore import ops
    from mindspore.ops import functional as F
    from mindformers.wrapper.wrapper import MFPipelineWithLossScaleCell, grad_scale, shard_grad_scale

    class RLAccumulatingStepCell(MFPipelineWithLossScaleCell):
        def construct(self, *inputs):
            scaling_sens = self.scale_sense
            loss, grads, grad_scale_factor = self.grads_for_mcore(scaling_sens, *inputs)
            if self.opt_shard:
                grads = self.grad_reducer(grads)
                grads = self.hyper_map(F.partial(shard_grad_scale, scaling_sens * self.degree, grad_scale_factor),
                                       grads, self.accu_grads)
            else:
                accu_grads = self.grad_reducer(self.accu_grads)
                grads = self.hyper_map(F.partial(grad_scale, scaling_sens * self.degree, grad_scale_factor), grads,
                                       accu_grads)
            global_norm = ops.zeros((), ms.float32)
            if self.use_clip_grad:
                grads, global_norm = self.clip_grad_norm(grads)
            loss = ops.depend(loss, self.optimizer(grads))
            return loss, global_norm

    return RLAccumulatingStepCell


def sharded_train_cell(model, network, lay, micro_num: int, *, lr: float, weight_decay: float, grad_clip: float):
    """``(optimizer, train cell)`` of a semi-auto-parallel step over ``network`` (MindFormers' mcore loss contract):
    MindFormers' AdamW over ``model``'s trainable parameters (1-D gains not decayed), wrapped in the one-step cell,
    or, for ``micro_num`` > 1 or a pipeline, the accumulating cell over MindFormers' gradient-accumulation /
    pipeline cell. The RL policy and SFT share it. Returns ``(loss, pre-clip global norm)`` per call."""
    import mindspore as ms
    from mindformers.core.optim import AdamW
    from mindformers.wrapper.wrapper import GradAccumulationCellWithMultiOutputs, PipelineCellWithMultiOutputs
    from mindspore.nn.wrap.cell_wrapper import _VirtualDatasetCell

    params = model.trainable_params()
    groups = [{"params": [p for p in params if len(p.shape) >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if len(p.shape) < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = AdamW(groups, learning_rate=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    clip = grad_clip > 0
    scale = ms.Tensor(1.0, ms.float32)
    pipeline = lay.pipeline_stage > 1
    if pipeline or micro_num > 1:
        net = PipelineCellWithMultiOutputs(network, micro_num) if pipeline \
            else GradAccumulationCellWithMultiOutputs(network, micro_num)
        cell = _accumulating_step_cls()(_VirtualDatasetCell(net), optimizer, use_clip_grad=clip,
                                        max_grad_norm=grad_clip or 1.0, scale_sense=scale, micro_batch_num=micro_num)
    else:  # one micro-batch per step (ReCast's [2P, T] at the default size, SFT): no accumulation buffers
        cell = _train_one_step_cls()(_VirtualDatasetCell(network), optimizer, use_clip_grad=clip,
                                     max_grad_norm=grad_clip or 1.0, scale_sense=scale)
    return optimizer, cell


class ShardedStep:
    """What the semi-auto-parallel train engines (RL policy, SFT) share around their ``train_cell``: the strategy
    file of the first compile (the sharded checkpoints' layout), compiling without running, this rank's slices of
    a full checkpoint, and the per-rank sharded checkpoints."""

    train_cell = None
    model = None
    phase = ""

    def set_strategy_file(self, path: str) -> None:
        """The train graph's strategy file goes to ``path`` (the sharded checkpoints' layout); graphs compiled
        after it write elsewhere, so a later forward graph never replaces it."""
        self.strategy_path = path

    def _first_compile(self, fn, inputs):
        """``fn(*inputs)``; the first time, with the strategy file going to ``strategy_path``."""
        if not self.compiled and self.strategy_path:
            import mindspore as ms

            os.makedirs(os.path.dirname(self.strategy_path), exist_ok=True)
            ms.set_auto_parallel_context(strategy_ckpt_config={"save_file": self.strategy_path,
                                                               "only_trainable_params": False})
            out = fn(*inputs)
            ms.set_auto_parallel_context(strategy_ckpt_config={
                "save_file": self.strategy_path.replace(".ckpt", ".later_graphs.ckpt"), "only_trainable_params": False})
            self.compiled = True
            return out
        self.compiled = True
        return fn(*inputs)

    def _compile_train(self, inputs) -> None:
        """Compile the train graph for ``inputs`` without running it: MindSpore then holds every parameter at this
        rank's slice shape (``train_cell.parameter_layout_dict``), ready for :meth:`load_slices`."""
        self._first_compile(lambda *args: _compile_only(self.train_cell, *args), inputs)

    def load_slices(self, sources, rank: int) -> int:
        """This rank's slices of the model's weights from ``sources`` (one full tensor read at a time), after the
        train graph compiled; the AdamW moments start at zero as with any fresh start."""
        from recast_ms.trainer import sharded_checkpoint as sc

        return sc.load_slices(_compiled_params(self.model, self.train_cell), self.train_cell.parameter_layout_dict,
                              sources, rank)

    def save(self, run_dir: str, step: int, meta: dict, rank: int, init_checkpoint: Optional[str] = None,
             keep: int = 2) -> None:
        """Every rank writes its slices (weights and optimizer state) with the strategy file."""
        from recast_ms.trainer import sharded_checkpoint as sc

        sc.save_rank_state(run_dir, step, self.train_cell, {**meta, "phase": meta.get("phase", self.phase)}, rank,
                           keep=keep)

    def load(self, path: str) -> dict:
        """This rank's slices of a step saved by :meth:`save`. The train cell's duplicate parameter names (the two
        ``learning_rate`` of MindFormers' one-step cell) are renamed first, as its first call renames them before
        any save: a resume loads before that call, and the checkpoint's names would not match otherwise."""
        from recast_ms.trainer import sharded_checkpoint as sc

        self.train_cell._self_check()  # pylint: disable=protected-access
        return sc.load_rank_state(path, self.train_cell)


class ShardedPolicy(_Policy, ShardedStep):
    """The actor under semi-auto parallel (module docstring). ``prepare`` keeps the whole global batch (the
    framework slices it by DP, then the accumulation / pipeline cell into micro-batches)."""

    kind = "sharded"
    phase = "rl"

    def __init__(self, model, rcfg, response_len: int, rows: int, plan):
        from recast_ms.models.sharded import ShardedResponseLogProbs

        lay = plan.layout
        self.model, self.rcfg, self.R, self.plan = model, rcfg, int(response_len), plan
        self.rows = int(rows)
        self.micro = min(rcfg.micro_batch_size, self.rows)  # rows per micro-batch (global, sliced by DP)
        self.num_micro = self.rows // self.micro  # the plan checked divisibility
        self.on_policy = rcfg.ppo_epochs == 1
        self.lr = float(rcfg.lr)
        dp, tp, pp = lay.data_parallel, lay.model_parallel, lay.pipeline_stage
        stage = _last_stage(lay)
        self.pipeline = pp > 1
        micro = lay.micro_batch_num if self.pipeline else self.num_micro
        self.network = _rl_network(model, rcfg, self.R, self.on_policy, dp, tp, stage, micro)
        self.logps_fn = _forward(ShardedResponseLogProbs(model, self.R, rcfg.temperature, dp=dp, tp=tp, stage=stage),
                                 lay)
        self.optimizer, self.train_cell = sharded_train_cell(model, self.network, lay, micro, lr=self.lr,
                                                             weight_decay=rcfg.weight_decay, grad_clip=rcfg.grad_clip)
        self.train_cell.set_train(True)
        self.strategy_path, self.compiled = "", False
        self.stage_group = _pipeline_stats_group(lay) if self.pipeline else None

    def prepare(self, input_ids, resp_start, loss_mask, advantages) -> StepBatch:
        import mindspore as ms

        if len(input_ids) != self.rows:
            raise RuntimeError(f"actor batch has {len(input_ids)} rows, the compiled shape is {self.rows}")
        mbs = [slice(k * self.micro, (k + 1) * self.micro) for k in range(self.num_micro)]
        micro = [(ms.Tensor(input_ids[m]), ms.Tensor(resp_start[m])) for m in mbs]
        return StepBatch(input_ids, resp_start, advantages, loss_mask, len(input_ids), micro)

    def train_step(self, *inputs):
        """One optimizer step of the whole global batch (the graph the dry run compiles)."""
        return self._first_compile(self.train_cell, inputs)

    def _inputs(self, batch: StepBatch, old: list, ref: list) -> tuple:
        """The train cell's inputs, the same for the compile-only pass and every step (one graph, no recompile)."""
        import mindspore as ms
        from mindspore import ops

        cat = (lambda xs: xs[0]) if len(old) == 1 else (lambda xs: ops.concat(xs, 0))
        return (ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start), cat(old), cat(ref),
                ms.Tensor(batch.advantages), ms.Tensor(batch.loss_mask),
                ms.Tensor(np.full(len(batch.input_ids), batch.num_seqs, np.float32)))

    def blank_batch(self, seq_length: int) -> StepBatch:
        """A batch of the compiled shape and dtypes (``recast_ms.trainer.rl.ActorBatch``), all zeros."""
        rows, R = self.rows, self.R
        return self.prepare(np.zeros((rows, seq_length), np.int32), np.zeros(rows, np.int32),
                            np.zeros((rows, R), np.float32), np.zeros(rows, np.float32))

    def compile_update(self, batch: StepBatch) -> None:
        """Compile the actor update graph without running it (then :meth:`load_slices`)."""
        zeros = self.zeros(batch)
        self._compile_train(self._inputs(batch, zeros, zeros))

    def update(self, batch: StepBatch, old: list, ref: list, lr: float) -> Tuple[np.ndarray, float]:
        import mindspore as ms

        if abs(lr - self.lr) > 1e-12 * max(1.0, abs(lr)):
            raise ValueError(f"the sharded policy's AdamW was built with lr={self.lr}; a step asked for {lr}")
        inputs = self._inputs(batch, old, ref)
        stats, grad_norm = np.zeros(4), 0.0
        for _ in range(self.rcfg.ppo_epochs):
            self.network.rl_stats.set_data(ms.Tensor(np.zeros(3, np.float32)))
            out = self.train_step(*inputs)
            loss, norm = out[0], out[-1]
            step_stats = np.concatenate([[_scalar(loss)], _array(self.network.rl_stats)])
            grad_norm = _scalar(norm) if norm is not None else 0.0
            if self.stage_group is not None:
                step_stats, grad_norm = _from_last_stage(step_stats, grad_norm, *self.stage_group)
            stats += step_stats
        return stats / self.rcfg.ppo_epochs, grad_norm


def _pipeline_stats_group(lay):
    """Under a pipeline the loss and ``rl_stats`` are computed on the last stage only, while every host logs and
    guards the step: (group name, is_last_stage) of this rank's column across the stages (MindSpore numbers stage
    ``s``'s ranks ``s * per_stage ... (s + 1) * per_stage - 1``), the group created once."""
    from mindspore.communication import create_group, get_group_size, get_rank

    column, last = stage_column(get_rank(), get_group_size(), lay.pipeline_stage)
    name = "recast_stage_column_" + "_".join(map(str, column))
    create_group(name, column)
    return name, last


def stage_column(rank: int, world: int, pp: int) -> Tuple[List[int], bool]:
    """The ranks holding ``rank``'s slot in every pipeline stage (stage ``s`` is ranks ``s * world / pp`` to
    ``(s + 1) * world / pp - 1``), and whether ``rank`` is on the last stage."""
    per_stage = world // pp
    return [rank % per_stage + k * per_stage for k in range(pp)], rank // per_stage == pp - 1


def _from_last_stage(stats: np.ndarray, grad_norm: float, group: str, last: bool) -> Tuple[np.ndarray, float]:
    """The last stage's step statistics on every stage: a sum over the stage column, where the other stages
    contribute zeros (what they hold is not the loss); the grad norm as the column's largest."""
    import mindspore as ms
    from mindspore.ops.communication import all_reduce

    mine = np.asarray(stats, np.float32) if last else np.zeros(len(stats), np.float32)
    summed = _reduced(all_reduce(ms.Tensor(mine), op="sum", group=group))
    norm = _reduced(all_reduce(ms.Tensor(np.array([grad_norm], np.float32)), op="max", group=group))
    if os.environ.get("MS_SIMULATION_LEVEL"):  # DryRun: the mocked collective ran, its output is uninitialised
        return np.asarray(stats, np.float64), float(grad_norm)
    return _array(summed).astype(np.float64), _scalar(norm)


def _last_stage(lay) -> int:
    """The stage the loss and log-prob ops go to: the last under a pipeline, -1 (none) without one."""
    return lay.pipeline_stage - 1 if lay.pipeline_stage > 1 else -1


def _pipeline_ready(model, lay) -> None:
    """Under a pipeline, before any graph of ``model`` compiles: its linear layers' Morph primitives lose their
    side-effect flags (:func:`recast_ms.models.sharded.pure_morphs`; the primitives are shared by every graph)."""
    if lay.pipeline_stage > 1:
        from recast_ms.models.sharded import pure_morphs

        pure_morphs(model)


def _reduced(out):
    """A collective's result: MindSpore's functional all_reduce returns (tensor, handle)."""
    return out[0] if isinstance(out, tuple) else out


def _forward(cell, lay):
    """A forward graph's cell as the layout runs it: under pipeline parallelism wrapped in
    :class:`recast_ms.models.sharded.PipelineForward` (``micro_batch_num`` micro-batches), as is otherwise."""
    if lay.pipeline_stage <= 1:
        return cell
    from recast_ms.models.sharded import PipelineForward

    return PipelineForward(cell, lay.micro_batch_num)


def _scalar(x) -> float:
    v = np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, np.float64).reshape(-1)
    return float(v[0]) if v.size else 0.0


def _array(x) -> np.ndarray:
    v = x.asnumpy() if hasattr(x, "asnumpy") else x
    return np.asarray(v, np.float64).reshape(-1)


class ShardedReference(_Reference):
    """The frozen reference under semi-auto parallel: a second model with the actor's config and layout
    (parameters named ``ref.*``), only ever in forward graphs, given the actor's starting weights before the first
    compile (:meth:`copy_from`; the framework slices both per rank)."""

    kind = "sharded"

    def __init__(self, model, rcfg, response_len: int, plan):
        from mindspore.nn.utils import no_init_parameters

        from recast_ms.models.policy import _eval_only
        from recast_ms.models.sharded import ShardedResponseLogProbs
        from recast_ms.trainer.setup import quiet_stdout

        lay = plan.layout
        with quiet_stdout(), no_init_parameters():
            self.model = type(model)(copy.deepcopy(model.config))
        for param in self.model.get_parameters():
            # requires_grad stays as built: this model is only ever in forward graphs (no gradient is taken), and
            # under pipeline stages MindSpore counts a stage's parameters by it ("Stage 0 should has at least 1
            # parameter", seen compiling under DryRun with every ref parameter frozen)
            param.name = "ref." + param.name
        _eval_only(self.model)
        _pipeline_ready(self.model, lay)
        self.logps_fn = _forward(ShardedResponseLogProbs(self.model, response_len, rcfg.temperature,
                                                         dp=lay.data_parallel, tp=lay.model_parallel,
                                                         stage=_last_stage(lay)), lay)

    def compile_forward(self, batch: StepBatch) -> None:
        """Compile the reference forward graph (one micro-batch's shape) without running it."""
        _compile_only(self.logps_fn, *batch.micro[0])

    def copy_from(self, actor) -> int:
        """Give the reference the actor's weights before any graph compiles (the framework then slices both per
        rank); returns how many tensors were copied. Parameters that hold no data yet (built under
        ``no_init_parameters``, as in the dry run) are left alone. This holds a second full copy on the host
        until the first compile; a run from ``hf_checkpoint`` loads slices instead (:func:`load_sliced_start`)."""
        import mindspore as ms

        source = {p.name: p for p in actor.get_parameters()}
        copied = 0
        for param in self.model.get_parameters():
            src = source.get(param.name[len("ref."):])
            if src is None:
                raise RuntimeError(f"reference parameter {param.name} has no counterpart in the actor")
            if getattr(src, "has_init", False):
                continue
            param.set_data(ms.Tensor(src.asnumpy()))
            copied += 1
        return copied



def _compile_only(cell, *args) -> None:
    """Compile ``cell`` for ``args`` without running it, with the checks its first call makes (``Cell.__call__``:
    duplicate parameter names are renamed there, e.g. the two ``learning_rate`` of MindFormers' one-step cell),
    so the later call finds the same graph compiled."""
    cell._check_construct_args(*args)  # pylint: disable=protected-access
    cell._self_check()  # pylint: disable=protected-access
    cell.compile(*args)


def _compiled_params(model, cell) -> dict:
    """``{name: Parameter}`` of ``model`` that ``cell``'s compiled graph holds on this rank (under a pipeline only
    this stage's layers; the others keep no data)."""
    held = cell.parameter_layout_dict
    if not held:
        raise RuntimeError(f"{type(cell).__name__} has no parameter layout: it was not compiled under semi-auto "
                           "parallel before its slices were loaded")
    in_graph = set(getattr(cell, "parallel_parameter_name_list", None) or held)  # a stage's own, under a pipeline
    return {p.name: p for p in model.get_parameters() if p.name in held and p.name in in_graph}


def _compile_then_load(engines, seq_length: int, load) -> dict:
    """Compile the actor update and the reference forward without running them, then ``load(params, layouts,
    strip)`` gives each of their parameters this rank's slice. Returns ``{"actor": n, "reference": n}``."""
    policy, reference = engines.policy, engines.reference
    batch = policy.blank_batch(seq_length)
    policy.compile_update(batch)
    if reference is not None:
        reference.compile_forward(batch)
    out = {"actor": load(_compiled_params(policy.model, policy.train_cell), policy.train_cell.parameter_layout_dict,
                         ""), "reference": 0}
    if reference is not None:
        cell = reference.logps_fn
        out["reference"] = load(_compiled_params(reference.model, cell), cell.parameter_layout_dict, "ref.")
    return out


def load_sliced_start(engines, make_sources, rank: int, seq_length: int) -> dict:
    """Start a semi-auto-parallel run from full weights that no host holds whole (``hf_checkpoint``): compile the
    actor update and the reference forward without running them, then give each of their parameters this rank's
    slice, read one full tensor at a time (``recast_ms.models.weights.hf_sources``). Every later
    graph (rollout, log-probs) finds the parameters already sliced. ``make_sources()`` is called once the graphs
    compiled (the first compile may rename parameters). Returns ``{"actor": n, "reference": n}``."""
    from recast_ms.trainer import sharded_checkpoint as sc

    sources = {}

    def load(params, layouts, strip):
        if not sources:
            sources.update(make_sources())
        return sc.load_slices(params, layouts, sources, rank, strip=strip)

    return _compile_then_load(engines, seq_length, load)


def load_sliced_init(engines, step_dir: str, rank: int, seq_length: int) -> dict:
    """Start a semi-auto-parallel run from the project's sharded checkpoint of a run on the same layout (``--init``
    of the 8B / 14B SFT run): the actor and the reference each take this rank's saved slices of the model weights
    (``sharded_checkpoint.load_rank_model_slices``), so no host merges or holds the whole model, and the reference
    never copies the actor on the host. Returns ``{"actor": n, "reference": n}``."""
    from recast_ms.trainer import sharded_checkpoint as sc

    return _compile_then_load(engines, seq_length, lambda params, layouts, strip: sc.load_rank_model_slices(
        params, layouts, step_dir, rank, strip=strip))


# ----------------------------------------------------------------------------- SFT: the same two paths


def _sft_network(model, response_len: int, dp: int, tp: int, stage: int, micro_num: int):
    """The SFT loss (token-mean NLL over response tokens, ``recast_ms.trainer.sft._sft_loss_cell``'s) in MindFormers'
    mcore contract, as :func:`_rl_network`: four outputs summed by the one-step cell; the loss of each micro-batch,
    normalised by the step's token count, is added into ``sft_stats`` for the host to read."""
    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.common.initializer import initializer

    from recast_ms.models.sharded import ShardedResponseLogProbs

    class SFTNetwork(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.network = model
            self.logps = ShardedResponseLogProbs(model, response_len, 1.0, dp=dp, tp=tp, stage=stage)
            self.sft_stats = ms.Parameter(initializer("zeros", (1,), ms.float32), name="sft_stats",
                                          requires_grad=False)

        def get_gpt_transformer_config(self):
            return self.network.get_gpt_transformer_config()

        def construct(self, input_ids, resp_start, loss_mask, num_tokens_rows):
            # the token count comes per row ([B]): the micro-batch and pipeline cells slice every input on axis 0
            lp = self.logps(input_ids, resp_start)  # [B, R]
            loss = -(lp * loss_mask).sum() / ops.reduce_max(num_tokens_rows)
            loss = ops.depend(loss, ops.assign_add(self.sft_stats, ops.stop_gradient(loss).reshape((1,))))
            zero = ops.zeros((), ms.float32)
            return loss, zero, zero, zero

    if micro_num > 1 or stage >= 0:  # the micro-step border, as _rl_network (and only then, for the same reason)
        SFTNetwork.__init__ = ms.lazy_inline(SFTNetwork.__init__)
    return SFTNetwork()


class LocalSFT:
    """SFT on one device (CPU / data-parallel Ascend): :class:`recast_ms.trainer.optim.Optimizer` fused over the SFT
    loss cell, each rank its ``rows / world`` rows of the global batch, the data-parallel mean in the optimizer."""

    kind = "local"

    def __init__(self, model, scfg, response_len: int, world_size: int = 1):
        from recast_ms.models.policy import ResponseLogProbs
        from recast_ms.trainer.optim import Optimizer
        from recast_ms.trainer.sft import _sft_loss_cell

        self.model, self.scfg = model, scfg
        self.host_world = int(world_size)
        # one micro-batch per step: forward, backward and AdamW in one graph, no gradient buffers
        self.opt = Optimizer(_sft_loss_cell(model, response_len), model.trainable_params(), lr=scfg.lr,
                             weight_decay=scfg.weight_decay, grad_clip=scfg.grad_clip, name="sft", fused=True,
                             world_size=world_size)
        self.logps_fn = ResponseLogProbs(model, response_len)

    def train_step(self, input_ids, resp_start, loss_mask, num_tokens: float, lr: float) -> Tuple[float, float]:
        """One step on this rank's rows; ``num_tokens``: the global batch's loss tokens / ranks. ``(loss, norm)``:
        this rank's share of the loss (its mean over ranks is the global token mean), the pre-clip grad norm."""
        import mindspore as ms

        outs, grad_norm = self.opt.train_step(
            [(ms.Tensor(input_ids), ms.Tensor(resp_start), ms.Tensor(loss_mask), ms.Tensor(np.float32(num_tokens)))], lr)
        return float(outs[0][0].asnumpy()), grad_norm

    def logps(self, input_ids, resp_start) -> np.ndarray:
        import mindspore as ms

        return self.logps_fn(ms.Tensor(input_ids), ms.Tensor(resp_start)).asnumpy()

    def save(self, run_dir: str, step: int, meta: dict, rank: int, keep: int) -> None:
        from recast_ms.trainer import checkpoint as ckpt

        if rank == 0:  # every rank holds the same weights
            ckpt.save_train_state(run_dir, step, self.model, self.opt, meta, what="SFT", keep=keep)

    def load(self, path: str) -> dict:
        from recast_ms.trainer import checkpoint as ckpt

        return ckpt.load_train_state(path, self.model, self.opt)


class ShardedSFT(ShardedStep):
    """SFT under semi-auto parallel (the 8B / 14B layouts): the RL policy's train cell (:func:`sharded_train_cell`)
    over :func:`_sft_network`, fed the GLOBAL batch (the framework slices it by DP, a pipeline into
    ``micro_batch_num`` micro-batches). The cosine schedule sets AdamW's ``learning_rate`` Parameter before each step
    (read by the graph, so it never recompiles). Validation log-probs through the vocabulary-parallel forward."""

    kind = "sharded"
    phase = "sft"

    def __init__(self, model, scfg, response_len: int, rows: int, plan):
        from recast_ms.models.sharded import ShardedResponseLogProbs

        lay = plan.layout
        self.model, self.scfg, self.R, self.rows = model, scfg, int(response_len), int(rows)
        self.host_world = 1  # every rank's host side feeds the whole global batch
        dp, tp = lay.data_parallel, lay.model_parallel
        stage = _last_stage(lay)
        self.pipeline = lay.pipeline_stage > 1
        micro = lay.micro_batch_num if self.pipeline else 1
        self.network = _sft_network(model, self.R, dp, tp, stage, micro)
        self.optimizer, self.train_cell = sharded_train_cell(model, self.network, lay, micro, lr=scfg.lr,
                                                             weight_decay=scfg.weight_decay, grad_clip=scfg.grad_clip)
        self.train_cell.set_train(True)
        self.logps_fn = _forward(ShardedResponseLogProbs(model, self.R, 1.0, dp=dp, tp=tp, stage=stage), lay)
        self.strategy_path, self.compiled = "", False
        self.stage_group = _pipeline_stats_group(lay) if self.pipeline else None

    def _inputs(self, input_ids, resp_start, loss_mask, num_tokens: float) -> tuple:
        import mindspore as ms

        if len(input_ids) != self.rows:
            raise RuntimeError(f"SFT batch has {len(input_ids)} rows, the compiled shape is {self.rows}")
        return (ms.Tensor(input_ids), ms.Tensor(resp_start), ms.Tensor(loss_mask),
                ms.Tensor(np.full(len(input_ids), num_tokens, np.float32)))

    def compile_update(self, seq_length: int) -> None:
        """Compile the train graph on a blank batch without running it (then :meth:`load_slices`)."""
        rows, R = self.rows, self.R
        self._compile_train(self._inputs(np.zeros((rows, seq_length), np.int32), np.zeros(rows, np.int32),
                                         np.zeros((rows, R), np.float32), 1.0))

    def train_step(self, input_ids, resp_start, loss_mask, num_tokens: float, lr: float) -> Tuple[float, float]:
        """One optimizer step over the global batch (``num_tokens``: its loss tokens): ``(loss, pre-clip norm)``,
        the global token mean on every rank."""
        import mindspore as ms

        self.optimizer.learning_rate.set_data(ms.Tensor(np.float32(lr)))
        self.network.sft_stats.set_data(ms.Tensor(np.zeros(1, np.float32)))
        out = self._first_compile(self.train_cell, self._inputs(input_ids, resp_start, loss_mask, num_tokens))
        stats, norm = _array(self.network.sft_stats), _scalar(out[-1])
        if self.stage_group is not None:  # computed on the last stage only
            stats, norm = _from_last_stage(stats, norm, *self.stage_group)
        return float(stats[0]), norm

    def logps(self, input_ids, resp_start) -> np.ndarray:
        import mindspore as ms

        return _array(self.logps_fn(ms.Tensor(input_ids), ms.Tensor(resp_start))).reshape(len(input_ids), self.R)

    def save(self, run_dir: str, step: int, meta: dict, rank: int, keep: int) -> None:  # pylint: disable=arguments-differ
        ShardedStep.save(self, run_dir, step, meta, rank, keep=keep)


def build_sft_engine(plan, model, scfg, *, response_len: int, rows: int, world_size: int):
    """The SFT engine the runtime ``plan`` names: :class:`ShardedSFT` under semi-auto parallel (``rows``: the global
    batch), else :class:`LocalSFT` (each of ``world_size`` data-parallel ranks its share of ``rows``)."""
    if plan is not None and plan.use_parallel:
        _pipeline_ready(model, plan.layout)
        return ShardedSFT(model, scfg, response_len, rows, plan)
    return LocalSFT(model, scfg, response_len, world_size)


# ----------------------------------------------------------------------------- the factory


@dataclass
class Engines:
    rollout: object  # an IncrementalDecoder
    policy: object  # LocalPolicy | ShardedPolicy
    reference: Optional[object]  # LocalReference | ShardedReference | None (kl_coef = 0)
    host_rank: int  # the rank whose share of the global batch this process rolls out and selects
    host_world: int  # ranks the host-side batch is split over (1 under semi-auto: every rank sees the whole batch)


def build_engines(plan, model, rcfg, *, response_len: int, prompt_len: int, pad_id: int, rows_per_host: int,
                  rank: int, world_size: int) -> Engines:
    """The engines the runtime ``plan`` names (``plan.rollout_engine``, ``plan.train_wrapper``) over ``model``.
    ``rows_per_host``: the actor rows of the batch this process's host side builds."""
    from recast_ms.rollout.decoder import FullForwardDecoder, make_decoder

    if plan is not None and plan.use_parallel:
        from recast_ms.models.sharded import ShardedLogitsAt

        lay = plan.layout
        _pipeline_ready(model, lay)
        policy = ShardedPolicy(model, rcfg, response_len, rows_per_host, plan)
        reference = ShardedReference(model, rcfg, response_len, plan) if rcfg.kl_coef > 0 else None
        if reference is not None:
            reference.copy_from(model)  # the actor's starting weights (--init), before any compile; none when sliced
        rollout = FullForwardDecoder(_forward(ShardedLogitsAt(model, dp=lay.data_parallel, tp=lay.model_parallel,
                                                              stage=_last_stage(lay)), lay),
                                     prompt_len + response_len, pad_id)
        return Engines(rollout, policy, reference, host_rank=0, host_world=1)
    policy = LocalPolicy(model, rcfg, response_len, rows_per_host, world_size)
    reference = LocalReference(model, rcfg, response_len) if rcfg.kl_coef > 0 else None
    rollout = make_decoder(model, prompt_len, response_len, pad_id)
    return Engines(rollout, policy, reference, host_rank=rank, host_world=world_size)
