"""The outer RL objective, unchanged between GRPO and ReCast: PPO-clip + k3 KL, token-mean per sequence."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class PolicyLoss(nn.Cell):
    r"""Clipped policy-gradient loss with a k3 KL penalty to the frozen reference.

    Per token: ``max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)) + kl_coef * k3``, with
    ``rho = exp(logp - old_logp)`` and ``k3 = exp(ref - logp) - (ref - logp) - 1``. Tokens are averaged
    within a sequence (``1/|y_i| sum_t``), then sequences are summed and divided by ``num_seqs``, the
    number of sequences of the whole step batch (``P*G`` for GRPO, ``2P`` for ReCast), so that
    micro-batch losses add up to the step loss.

    Args:
        clip_low (float): lower clip range epsilon.
        clip_high (float): upper clip range epsilon (clip-higher, DAPO-style).
        kl_coef (float): beta, weight of the KL penalty.

    Inputs:
        - **logps** (Tensor) - ``[B, T]`` float32 log-probs of the response tokens under the actor.
        - **old_logps** (Tensor) - ``[B, T]`` under the rollout policy (equal to ``logps`` on-policy).
        - **ref_logps** (Tensor) - ``[B, T]`` under the frozen reference.
        - **advantages** (Tensor) - ``[B]`` one advantage per sequence.
        - **mask** (Tensor) - ``[B, T]`` float32, 1 on response tokens of rows that train.
        - **num_seqs** (Tensor) - scalar float32.

    Outputs:
        Tuple ``(loss, pg_loss, kl, clip_frac)``: scalars; ``kl`` and ``clip_frac`` are token means
        over the masked tokens of this batch, for logging.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.28, kl_coef: float = 0.001):
        super().__init__()
        if not (0 <= clip_low < 1 and clip_high >= 0 and kl_coef >= 0):
            raise ValueError(f"bad loss settings clip_low={clip_low} clip_high={clip_high} kl_coef={kl_coef}")
        self.lo = 1.0 - clip_low
        self.hi = 1.0 + clip_high
        self.kl_coef = kl_coef

    def construct(self, logps, old_logps, ref_logps, advantages, mask, num_seqs):
        adv = advantages.expand_dims(1)  # [B, 1]
        ratio = ops.exp(logps - old_logps)  # [B, T]
        pg1 = -adv * ratio
        pg2 = -adv * ops.clamp(ratio, self.lo, self.hi)
        pg = ops.maximum(pg1, pg2)  # [B, T]
        delta = ref_logps - logps
        kl = ops.exp(delta) - delta - 1.0  # k3, >= 0
        per_tok = pg + self.kl_coef * kl  # [B, T]
        ntok = mask.sum(axis=1)  # [B]
        denom = ops.maximum(ntok, ops.ones_like(ntok))
        seq_loss = (per_tok * mask).sum(axis=1) / denom  # [B]
        loss = seq_loss.sum() / num_seqs
        seq_pg = (pg * mask).sum(axis=1) / denom
        all_tok = ops.maximum(mask.sum(), ops.ones_like(mask.sum()))
        kl_mean = (kl * mask).sum() / all_tok
        clipped = ops.logical_and(pg2 > pg1, mask > 0).astype(ms.float32)
        return loss, seq_pg.sum() / num_seqs, kl_mean, clipped.sum() / all_tok
