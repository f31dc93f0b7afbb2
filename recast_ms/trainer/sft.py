"""Supervised warm start: next-token loss on the response (target SID + EOS) only.

Static shapes: every batch is ``[batch_size, seq_length]`` (one length bucket: prompts drop their
oldest history items to fit ``seq_length - (L + 1)`` tokens), so the train step compiles once and
the validation forward once. AdamW with linear warm-up and cosine decay. A checkpoint (weights,
optimizer moments, step; the batch order is a pure function of (seed, step)) every ``save_every`` steps; a
killed run resumes from the newest one and loses at most ``save_every`` steps.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import numpy as np

from recast_ms.config import RunConfig
from recast_ms.data.batching import EpochSampler, encode_prompts, encode_targets, pack
from recast_ms.trainer import checkpoint as ckpt
from recast_ms.trainer import guard
from recast_ms.trainer.optim import Optimizer, cosine_lr
from recast_ms.trainer.setup import build_model, get_tokenizer, init_runtime, load_splits, response_len
from recast_ms.utils.tracking import MetricsLogger, StageTimer, peak_rss_mb

logger = logging.getLogger(__name__)


def _sft_loss_cell(model, response_len: int):
    from mindspore import nn, ops

    from recast_ms.models.policy import ResponseLogProbs

    class SFTLoss(nn.Cell):
        """Token-mean NLL over response tokens. Inputs ``input_ids [B, S]``, ``resp_start [B]``,
        ``loss_mask [B, R]``."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.logps = ResponseLogProbs(model, response_len)

        def construct(self, input_ids, resp_start, loss_mask):
            lp = self.logps(input_ids, resp_start)  # [B, R]
            n = loss_mask.sum()
            return -(lp * loss_mask).sum() / ops.maximum(n, ops.ones_like(n)), n

    return SFTLoss()


def encode_split(samples, splits, tok, cfg: RunConfig):
    """``input_ids [N, S]``, ``resp_start [N]`` (prompt lengths) and ``loss_mask [N, R]`` of a split."""
    R = response_len(splits)
    prompts = encode_prompts(samples, splits.codebook, tok, cfg.seq_length - R, cfg.data.with_titles)
    targets = encode_targets(samples, splits.codebook, tok, R)
    mask = (targets != tok.pad_id).astype(np.float32)
    ids, _ = pack(prompts.ids, prompts.lens, targets, mask, cfg.seq_length, tok.pad_id)
    return ids, prompts.lens.astype(np.int32), mask


def run_sft(cfg: RunConfig, run_dir: str, *, resume: bool = True, progress: bool = True,
            stop_after: Optional[int] = None) -> Dict[str, float]:
    """Train; returns the last logged metrics. ``stop_after`` ends early after that many steps in this
    call (used by the kill-and-resume test)."""
    import mindspore as ms
    from tqdm import tqdm

    from recast_ms.models.policy import ResponseLogProbs, set_dropout

    ckpt.check_run_dir(run_dir)
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if last:  # before anything is built: a checkpoint cannot continue under another shape
        ckpt.check_resume(run_dir, cfg, last, "sft")
    splits = load_splits(cfg.data)
    s = cfg.sft
    if len(splits.train) < s.batch_size:
        raise ValueError(f"{len(splits.train)} training samples < sft.batch_size={s.batch_size}")
    tok_dir = os.path.join(run_dir, "tokenizer")
    # the tokenizer belongs to the run: reused on resume, made anew (and saved with config.yaml) otherwise
    tok = get_tokenizer(splits, tok_dir, cfg, reuse=bool(last), save=False)
    init_runtime(cfg)
    model = build_model(cfg, tok, seed=cfg.seed, dropout=s.dropout)
    train_ids, train_start, train_mask = encode_split(splits.train, splits, tok, cfg)
    n_val = min(len(splits.valid), 4 * s.batch_size)
    val_ids, val_start, val_mask = encode_split(splits.valid[:n_val], splits, tok, cfg)

    R = response_len(splits)
    # one micro-batch per step: forward, backward and AdamW in one graph, no gradient buffers
    opt = Optimizer(_sft_loss_cell(model, R), model.trainable_params(), lr=s.lr, weight_decay=s.weight_decay,
                    grad_clip=s.grad_clip, name="sft", fused=True)
    # the batch of step t is a pure function of (seed, t): a resume needs the step alone
    batches = EpochSampler(len(train_ids), s.batch_size, cfg.seed, chained=True)
    step = 0
    if last:
        step = ckpt.load_train_state(last, model, opt)["step"]
        logger.info("resumed SFT from %s (step %d)", last, step)
    ckpt.claim_run_dir(run_dir, cfg, resumed=bool(last))  # a new run clears the old checkpoints first
    if not last:
        tok.save(tok_dir)
    if step >= s.steps:
        logger.warning("%s: SFT is already at step %d (sft.steps=%d): nothing to train", run_dir, step, s.steps)
    logps_fn = ResponseLogProbs(model, R)
    log = MetricsLogger(run_dir, resume_step=step if last else None, filename="sft_metrics.jsonl")
    timer = StageTimer()

    def save(at_step):
        ckpt.save_train_state(run_dir, at_step, model, opt, {"phase": "sft"}, what="SFT")

    def val_loss() -> float:
        set_dropout(model, False)  # the validation graph compiles (and so stays) without dropout
        tot, cnt = 0.0, 0.0
        for i in range(0, n_val, s.batch_size):
            sl = slice(i, i + s.batch_size)
            ids, start, mask = val_ids[sl], val_start[sl], val_mask[sl]
            pad = s.batch_size - len(ids)
            if pad:  # keep the compiled shape: repeat rows with a zero mask
                ids = np.concatenate([ids, ids[:pad]])
                start = np.concatenate([start, start[:pad]])
                mask = np.concatenate([mask, np.zeros_like(mask[:pad])])
            lp = logps_fn(ms.Tensor(ids), ms.Tensor(start)).asnumpy()
            tot += float(-(lp * mask).sum())
            cnt += float(mask.sum())
        set_dropout(model, True)  # back to the training step's graph (compiled with dropout; a no-op at 0)
        return tot / max(cnt, 1.0)

    metrics: Dict[str, float] = {}
    bar = tqdm(total=s.steps, initial=step, desc="sft", disable=not progress, dynamic_ncols=True)
    done_here = 0
    last_log = step
    grad_norms = []
    set_dropout(model, True)  # the training step's graph compiles with dropout (a no-op at sft.dropout=0)
    while step < s.steps:
        lr = cosine_lr(step, s.steps, s.lr, s.warmup_steps, s.min_lr_ratio)
        idx = batches.at(step)
        with timer("step"):
            outs, grad_norm = opt.train_step(
                [(ms.Tensor(train_ids[idx]), ms.Tensor(train_start[idx]), ms.Tensor(train_mask[idx]))], lr)
        loss = float(outs[0][0].asnumpy())
        guard.check_step("SFT", step + 1, {"loss": loss, "grad_norm": grad_norm}, run_dir)
        grad_norms.append(grad_norm)
        step += 1
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % s.log_every == 0 or step == s.steps:
            since = step - last_log
            last_log = step
            metrics = {"sft/loss": loss, "sft/lr": lr, "sft/grad_norm": grad_norm, "sft/epoch": batches.epoch_of(step - 1),
                       "perf/peak_rss_mb": peak_rss_mb(),
                       # seconds per step over the interval; memory_mb/* as measured
                       **{k: v / since if k.startswith("timing_s/") else v for k, v in timer.pop().items()}}
            if step % s.eval_every == 0 or step == s.steps:
                metrics["sft/val_loss"] = val_loss()
            log.log(step, metrics)
        if step % s.save_every == 0 or step == s.steps:
            save(step)
        if stop_after is not None and done_here >= stop_after:
            break
    bar.close()
    log.close()
    guard.warn_if_no_update("SFT", grad_norms)
    return metrics
