"""Optimisation machinery shared by SFT and RL: gradient accumulation, clipping, torch-exact AdamW.

Two graph-mode cells, so that a step of any number of micro-batches compiles exactly twice:

* :class:`GradAccumulator` runs ``value_and_grad`` of a loss cell on one micro-batch and adds the
  gradients into persistent buffers.
* :class:`AdamWApply` clips the accumulated gradient by global norm, applies AdamW and zeroes the
  buffers.

When one micro-batch covers the step (SFT; ReCast's ``[2P, T]`` batch) a third cell,
:class:`FusedStep`, does forward, backward, clipping and AdamW in ONE graph with no accumulation
buffers: the gradients live only inside the graph, which saves 4 bytes per parameter (2.4 GB at
Qwen3-0.6B) and one graph's kernel memory.

AdamW goes through the fused CPU primitive ``ops.AdamWeightDecay`` (``mint.optim.AdamW`` has no CPU
kernel; ``nn.AdamWeightDecay`` has no bias correction). The primitive computes
``p -= lr' * (m / (sqrt(v) + eps') + decay' * p)``; passing ``lr' = lr * sqrt(1 - b2^t) / (1 - b1^t)``,
``eps' = eps * sqrt(1 - b2^t)`` and ``decay' = lr * wd / lr'`` gives torch's bias-corrected AdamW
exactly. The three scalars are tensors fed per step, so the graph never recompiles.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import initializer


# Graph compile depth per parameter: the per-parameter loops (all-reduce, squared norm, AdamW, zeroing) unroll into
# nested calls, and MindSpore's default limit of 1000 stops near 300 parameters (measured on CPU: 200 compile, 300
# fail), i.e. below Qwen3-1.7B at full depth (28 layers, 311 tensors; its DryRun GRPO step failed on 2026-12-07).
# 600 parameters compiled at 4000 and 1,200 at 8000 on the default 8 MiB stack.
CALL_DEPTH_PER_PARAM = 4
CALL_DEPTH_BASE = 1000
_call_depth = [0]  # the limit this module set: ms.set_recursion_limit has no getter (get_context does not see it)


def ensure_call_depth(n_params: int) -> int:
    """Raise MindSpore's graph call-depth limit (never below what this process asked for already) so that a
    step over ``n_params`` tensors compiles; returns the limit in force."""
    need = CALL_DEPTH_BASE + CALL_DEPTH_PER_PARAM * int(n_params)
    have = max(_call_depth[0], int(ms.get_context("max_call_depth")))
    if need > have:
        ms.set_recursion_limit(need)
        have = need
    _call_depth[0] = have
    return have


def _zeros_like_params(params, prefix: str) -> ms.ParameterTuple:
    # a lazy initializer, not ops.zeros: on CPU a Parameter made from an ops.zeros tensor holds two copies
    # (2 GiB for a 1 GiB state, measured), and the lazy one is allocated once, at the first graph run
    return ms.ParameterTuple(
        [ms.Parameter(initializer("zeros", p.shape, ms.float32), name=f"{prefix}.{p.name}", requires_grad=False)
         for p in params]
    )


class GradAccumulator(nn.Cell):
    """``construct(*inputs)``: forward + backward of ``loss_cell(*inputs)``; grads added to buffers.

    ``loss_cell`` returns ``(loss, *aux)``; the outputs are returned unchanged for logging.
    """

    def __init__(self, loss_cell: nn.Cell, params: Sequence[ms.Parameter], buffers: ms.ParameterTuple):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.params = ms.ParameterTuple(params)
        self.buffers = buffers
        self.grad_fn = ms.value_and_grad(self.loss_cell, None, self.params, has_aux=True)

    def construct(self, *inputs):
        out, grads = self.grad_fn(*inputs)
        for buf, g in zip(self.buffers, grads):
            ops.assign_add(buf, g)
        return out


class _ClipAdamW(nn.Cell):
    """Global-norm clipping + torch-exact AdamW of ``grads`` into ``params``; returns the pre-clip norm."""

    def __init__(self, params, m, v, decay_mask: List[bool], beta1: float, beta2: float):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.m, self.v = m, v
        self.decay_mask = tuple(decay_mask)
        self.beta1 = ms.Tensor(beta1, ms.float32)
        self.beta2 = ms.Tensor(beta2, ms.float32)
        self.adamw = ops.AdamWeightDecay()
        # [1, N] x [1, N]^T as one MatMul with transpose_b: a 2-D matmul beats sum(g*g) on CPU, and an explicit
        # .T would run a Transpose kernel, which keeps a private buffer of ~2.5x each gradient on CPU
        self.sq = ops.MatMul(transpose_b=True)

    def construct(self, grads, lr, eps, decay, max_norm):
        sq = ops.zeros((), ms.float32)
        for g in grads:
            # depend on the running sum: one flattened gradient at a time (a reshape copies on CPU; unordered,
            # every copy was alive at once: +0.5x the parameter bytes, measured)
            flat = ops.depend(g, sq).reshape(1, -1)
            sq = sq + self.sq(flat, flat).reshape(())
        norm = ops.sqrt(sq)
        scale = ops.minimum(max_norm / (norm + 1e-6), ops.ones((), ms.float32))
        zero = ops.zeros((), ms.float32)
        done = scale
        for i in range(len(self.params)):
            d = decay if self.decay_mask[i] else zero
            # one parameter after another: the clipped gradient g*scale of parameter i is made only after
            # parameter i-1's update, so one such temporary is alive at a time (not one per parameter: 1x the
            # model's size, measured, when the scheduler ran every multiply first)
            g = ops.depend(grads[i], done) * scale
            done = self.adamw(self.params[i], self.m[i], self.v[i], lr, self.beta1, self.beta2, eps, d, g)
        return ops.depend(norm, done)


class FusedStep(nn.Cell):
    """``construct(lr, eps, decay, max_norm, *inputs)`` -> ``(loss outputs, pre-clip grad norm)``: forward,
    backward, (data-parallel mean,) clipping and AdamW in one graph, without gradient buffers."""

    def __init__(self, loss_cell: nn.Cell, params, m, v, decay_mask: List[bool], beta1: float, beta2: float,
                 world_size: int = 1):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.params = ms.ParameterTuple(params)
        self.grad_fn = ms.value_and_grad(self.loss_cell, None, self.params, has_aux=True)
        self.clip_adamw = _ClipAdamW(params, m, v, decay_mask, beta1, beta2)
        self.world_size = int(world_size)
        if self.world_size > 1:
            self.allreduce = ops.AllReduce()

    def construct(self, lr, eps, decay, max_norm, *inputs):
        out, grads = self.grad_fn(*inputs)
        if self.world_size > 1:
            grads = tuple(self.allreduce(g) / self.world_size for g in grads)
        return out, self.clip_adamw(grads, lr, eps, decay, max_norm)


class AdamWApply(nn.Cell):
    """``construct(lr, eps, decay, max_norm)`` -> pre-clip global grad norm; updates params, zeroes buffers."""

    def __init__(self, params, buffers, m, v, decay_mask: List[bool], beta1: float, beta2: float, world_size: int = 1):
        super().__init__(auto_prefix=False)
        self.world_size = int(world_size)
        if self.world_size > 1:  # data parallel: average the accumulated gradients over ranks first
            self.allreduce = ops.AllReduce()
        self.params = ms.ParameterTuple(params)
        self.buffers = buffers
        self.m, self.v = m, v
        self.clip_adamw = _ClipAdamW(params, m, v, decay_mask, beta1, beta2)

    def construct(self, lr, eps, decay, max_norm):
        if self.world_size > 1:
            for buf in self.buffers:
                ops.assign(buf, self.allreduce(buf) / self.world_size)
        norm = self.clip_adamw(self.buffers, lr, eps, decay, max_norm)
        done = norm
        for buf in self.buffers:
            # buf -= buf in place, one buffer after another: zeros_like would allocate a model-sized temporary
            # (measured +1x the parameter bytes); a non-finite gradient stops the run before this matters
            done = ops.assign_sub(buf, ops.depend(buf, done))
        return ops.depend(norm, done)


class Optimizer:
    """Torch-exact AdamW with gradient accumulation over micro-batches, driven from Python.

    ``fused=True`` (one micro-batch per step): :meth:`train_step` runs :class:`FusedStep`, no gradient
    buffers exist and :meth:`accumulate` / :meth:`step` are unavailable. Otherwise :meth:`accumulate` per
    micro-batch, then :meth:`step`; :meth:`train_step` does both. The maths is identical either way.
    ``state_dict()`` / ``load_state_dict()`` cover the moments and the step count, for exact resume.
    """

    def __init__(self, loss_cell: nn.Cell, params: Sequence[ms.Parameter], *, lr: float, weight_decay: float = 0.0,
                 betas=(0.9, 0.999), eps: float = 1e-8, grad_clip: float = 1.0, name: str = "optim",
                 world_size: int = 1, fused: bool = False):
        params = list(params)
        if not params:
            raise ValueError("no trainable parameters")
        ensure_call_depth(len(params))
        self.lr, self.weight_decay, self.betas, self.eps, self.grad_clip = lr, weight_decay, betas, eps, grad_clip
        self.m = _zeros_like_params(params, f"{name}.m")
        self.v = _zeros_like_params(params, f"{name}.v")
        # norms' gains (1-D) are not decayed, as in nanoGPT / HF
        decay_mask = [len(p.shape) >= 2 for p in params]
        self.fused = bool(fused)
        if self.fused:
            self.buffers = None
            self.fused_cell = FusedStep(loss_cell, params, self.m, self.v, decay_mask, betas[0], betas[1], world_size)
        else:
            self.buffers = _zeros_like_params(params, f"{name}.grad")
            self.accumulate_cell = GradAccumulator(loss_cell, params, self.buffers)
            self.apply_cell = AdamWApply(params, self.buffers, self.m, self.v, decay_mask, betas[0], betas[1],
                                         world_size)
        self.step_count = 0

    def _scalars(self, lr: float):
        """Advance the step count; the per-step tensors ``(lr', eps', decay', max_norm)`` of the fused
        AdamW primitive that make it torch's bias-corrected AdamW (module docstring)."""
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        bc2 = math.sqrt(1.0 - b2**t)
        lr_eff = lr * bc2 / (1.0 - b1**t)
        f = lambda x: ms.Tensor(np.float32(x))
        return (f(lr_eff), f(self.eps * bc2), f(lr * self.weight_decay / lr_eff),
                f(self.grad_clip if self.grad_clip > 0 else 3.0e38))

    def accumulate(self, *inputs):
        """Forward + backward of one micro-batch; gradients added to the buffers. Returns the loss outputs."""
        if self.fused:
            raise RuntimeError("a fused optimizer has no gradient buffers: use train_step()")
        return self.accumulate_cell(*inputs)

    def step(self, lr: float) -> float:
        """Apply the accumulated gradient with learning rate ``lr``; returns the pre-clip grad norm."""
        if self.fused:
            raise RuntimeError("a fused optimizer has no gradient buffers: use train_step()")
        return float(self.apply_cell(*self._scalars(lr)).asnumpy())

    def train_step(self, micro_batches: Sequence[tuple], lr: float):
        """One optimizer step over ``micro_batches`` (tuples of loss-cell inputs).

        Returns ``(outputs, grad_norm)``: the loss cell's outputs per micro-batch, the pre-clip norm.
        """
        if self.fused:
            if len(micro_batches) != 1:
                raise ValueError(f"a fused optimizer takes exactly one micro-batch per step, got {len(micro_batches)}")
            outs, norm = self.fused_cell(*self._scalars(lr), *micro_batches[0])
            return [outs], float(norm.asnumpy())
        outs = [self.accumulate_cell(*mb) for mb in micro_batches]
        return outs, self.step(lr)

    def state_dict(self) -> Dict[str, np.ndarray]:
        out = {p.name: p.asnumpy() for p in list(self.m) + list(self.v)}
        out["__step__"] = np.array(self.step_count, np.int64)
        return out

    def load_state_dict(self, state: Dict[str, np.ndarray]):
        for p in list(self.m) + list(self.v):
            if p.name not in state:
                raise KeyError(f"optimizer state has no tensor {p.name!r}")
            if tuple(state[p.name].shape) != tuple(p.shape):
                raise ValueError(f"optimizer tensor {p.name!r}: shape {state[p.name].shape} != {tuple(p.shape)}")
            p.set_data(ms.Tensor(state[p.name], ms.float32))
        self.step_count = int(state["__step__"])


def cosine_lr(step: int, total: int, base_lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine decay to ``min_ratio * base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
