"""Supervised warm start: next-token loss on the response (target SID + EOS) only.

Static shapes: every batch is ``[batch_size, seq_length]`` (one length bucket: prompts drop their
oldest history items to fit ``seq_length - (L + 1)`` tokens), so the train step compiles once and
the validation forward once. AdamW with linear warm-up and cosine decay. A checkpoint (weights,
optimizer moments, step; the batch order is a pure function of (seed, step)) every ``save_every`` steps; a
killed run resumes from the newest one and loses at most ``save_every`` steps.

Data parallel under msrun (``recast-sft --distributed``): ``sft.batch_size`` is the global batch of a step;
each rank takes its slice of the same seeded order, the loss is normalised by the global batch's response
tokens, the optimizer cell averages the gradients and rank 0 alone writes (tokenizer, metrics, checkpoints).
Under Ascend semi-auto parallel (TP / PP > 1, optimizer parallel) every rank feeds the whole global batch to the
sharded engine (``recast_ms.trainer.engines.ShardedSFT``), each rank writes its own checkpoint slices, and a run
from ``hf_checkpoint`` loads only this rank's slices after the train graph compiled. The loop below is the same for
both engines (``build_sft_engine``).
"""
from __future__ import annotations

import logging
import os
import zlib
from typing import Dict, Optional

import numpy as np

from recast_ms.config import RunConfig
from recast_ms.data.batching import EpochSampler, encode_prompts, encode_targets, pack
from recast_ms.trainer import checkpoint as ckpt
from recast_ms.trainer import guard
from recast_ms.trainer.distributed import mean_over_ranks, rank_slice
from recast_ms.trainer.engines import build_sft_engine
from recast_ms.trainer.optim import cosine_lr
from recast_ms.trainer.setup import (build_model, deferred_parameters, get_tokenizer, hf_start_sources, init_runtime,
                                     load_splits, response_len)
from recast_ms.trainer.sharded_checkpoint import strategy_file
from recast_ms.utils.tracking import MetricsLogger, StageTimer, peak_rss_mb

logger = logging.getLogger(__name__)


def _sft_loss_cell(model, response_len: int):
    from mindspore import nn, ops

    from recast_ms.models.policy import ResponseLogProbs

    class SFTLoss(nn.Cell):
        """Token-mean NLL over response tokens. Inputs ``input_ids [B, S]``, ``resp_start [B]``,
        ``loss_mask [B, R]``, optional ``num_tokens`` scalar: the global batch's loss tokens / ranks (the
        optimizer averages the ranks' gradients, so their mean is the global token mean); default this batch's."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.logps = ResponseLogProbs(model, response_len)

        def construct(self, input_ids, resp_start, loss_mask, num_tokens=None):
            lp = self.logps(input_ids, resp_start)  # [B, R]
            n = loss_mask.sum()
            if num_tokens is None:
                num_tokens = ops.maximum(n, ops.ones_like(n))
            return -(lp * loss_mask).sum() / num_tokens, n

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
            stop_after: Optional[int] = None, overwrite: bool = False, rank: int = 0,
            world_size: int = 1) -> Dict[str, float]:
    """Train; returns the last logged metrics. ``stop_after`` ends early after that many steps in this
    call (used by the kill-and-resume test); ``overwrite`` lets a new run replace files in ``run_dir`` that
    no recast_ms run wrote (``checkpoint.claim_run_dir``)."""
    ckpt.check_run_dir(run_dir)
    # rank 0 alone writes, so it alone locks: msrun's data-parallel ranks never lock each other out
    with ckpt.hold_run_dir(run_dir, writer=rank == 0) as held:  # one run per directory; Ctrl-C / SIGTERM: one line
        return _run_sft(cfg, run_dir, held, resume, progress and rank == 0, stop_after, overwrite, rank, world_size)


def _run_sft(cfg: RunConfig, run_dir: str, held, resume: bool, progress: bool, stop_after: Optional[int],
             overwrite: bool, rank: int, world: int) -> Dict[str, float]:
    from tqdm import tqdm

    from recast_ms.models.policy import set_dropout

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
    plan = init_runtime(cfg, world, stage="sft")
    # each rank made the tokenizer from the same data; a different one would train other ids (not under DryRun:
    # its collectives return dummies)
    if world > 1 and not os.environ.get("MS_SIMULATION_LEVEL"):
        pieces = repr([tok.id_to_token(i) for i in range(tok.vocab_size)]).encode()
        mine = {"tok/vocab": float(tok.vocab_size), "tok/crc": float(zlib.crc32(pieces) % 65536)}  # exact in fp32
        if mean_over_ranks(mine, world) != mine:
            raise RuntimeError(f"rank {rank}: its tokenizer differs from the other ranks' (vocab {tok.vocab_size})")
    # semi-auto parallel from a Hugging Face checkpoint (and not resuming): no host holds the whole model; the train
    # graph compiles first, then each parameter gets this rank's slice
    sliced_start = bool(plan.use_parallel and cfg.hf_checkpoint and not last)
    with deferred_parameters(sliced_start):
        model = build_model(cfg, tok, seed=cfg.seed, dropout=s.dropout, load_weights=not sliced_start)
    train_ids, train_start, train_mask = encode_split(splits.train, splits, tok, cfg)
    n_val = min(len(splits.valid), 4 * s.batch_size)
    val_ids, val_start, val_mask = encode_split(splits.valid[:n_val], splits, tok, cfg)

    R = response_len(splits)
    engine = build_sft_engine(plan, model, s, response_len=R, rows=s.batch_size, world_size=world)
    if engine.kind == "sharded":
        engine.set_strategy_file(strategy_file(run_dir, rank))
    if sliced_start:
        set_dropout(model, True)  # the train graph compiles (once) as it will run
        engine.compile_update(cfg.seq_length)
        n = engine.load_slices(hf_start_sources(cfg, model, cfg.seed), rank)
        logger.info("rank %d: sliced start from %s: %d parameters", rank, cfg.hf_checkpoint, n)
    # the batch of step t is a pure function of (seed, t): a resume needs the step alone
    batches = EpochSampler(len(train_ids), s.batch_size, cfg.seed, chained=True)
    step = 0
    if last:
        step = engine.load(last)["step"]
        logger.info("resumed SFT from %s (step %d)", last, step)
    writer = rank == 0  # under msrun rank 0 alone writes the run directory (and each rank its own slices)
    if writer:
        ckpt.claim_run_dir(run_dir, cfg, resumed=bool(last), outputs=("tokenizer", "sft_metrics.jsonl", "tb"),
                           overwrite=overwrite)  # a new run clears the old run's files first
        if not last:
            tok.save(tok_dir)
    if step >= s.steps:
        logger.warning("%s: SFT is already at step %d (sft.steps=%d): nothing to train", run_dir, step, s.steps)
    log = MetricsLogger(run_dir, resume_step=step if last else None, filename="sft_metrics.jsonl") if writer else None
    timer = StageTimer()

    def save(at_step):
        engine.save(run_dir, at_step, {"phase": "sft"}, rank, keep=s.keep_checkpoints)

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
            lp = engine.logps(ids, start)
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
        held.step = step
        lr = cosine_lr(step, s.steps, s.lr, s.warmup_steps, s.min_lr_ratio)
        global_idx = batches.at(step)
        # this rank's rows of the global batch (all of them under semi-auto parallel: host_world = 1)
        idx = rank_slice(global_idx, rank if engine.host_world > 1 else 0, engine.host_world)
        num_tokens = max(float(train_mask[global_idx].sum()), 1.0) / engine.host_world
        with timer("step"):
            loss, grad_norm = engine.train_step(train_ids[idx], train_start[idx], train_mask[idx], num_tokens, lr)
        guard.check_step("SFT", step + 1, {"loss": loss, "grad_norm": grad_norm}, run_dir)
        grad_norms.append(grad_norm)
        step += 1
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % s.log_every == 0 or step == s.steps:
            since = step - last_log
            last_log = step
            # the global batch's token mean (under semi-auto parallel each rank already holds it)
            loss = mean_over_ranks({"sft/loss": loss}, engine.host_world)["sft/loss"]
            metrics = {"sft/loss": loss, "sft/lr": lr, "sft/grad_norm": grad_norm, "sft/epoch": batches.epoch_of(step - 1),
                       "perf/peak_rss_mb": peak_rss_mb(),
                       # seconds per step over the interval; memory_mb/* as measured
                       **{k: v / since if k.startswith("timing_s/") else v for k, v in timer.pop().items()}}
            if step % s.eval_every == 0 or step == s.steps:
                metrics["sft/val_loss"] = val_loss()
            if log is not None:
                log.log(step, metrics)
        if step % s.save_every == 0 or step == s.steps:
            save(step)
        if stop_after is not None and done_here >= stop_after:
            break
    bar.close()
    if log is not None:
        log.close()
    guard.warn_if_no_update("SFT", grad_norms)
    return metrics
