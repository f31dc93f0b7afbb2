"""GRPO-style RL post-training with a replaceable advantage estimator (GRPO, repair-only,
boundary-only, ReCast, adaptive ReCast, anchor-only).

One step (``RLTrainer.step``)::

    rollout   P prompts x G samples (``rl.rollout=sample``) or the G best beams of the constrained beam
              search (``rl.rollout=beam``), each prompt encoded once (KV decoder)
    reward    binary hit + structural score per sample                               [P, G]
    signal    estimator -> advantages; boundary estimators select (pos, neg) per group [P, 2]
    gather    boundary estimators keep only the active pair: [P*G, T] -> [2P, T], BEFORE any actor work
    ref       frozen reference log-probs over the (gathered) batch
    update    PPO-clip + k3 KL, token-mean per sequence, AdamW over micro-batches
    metrics   slash-namespaced, JSONL + TensorBoard

GRPO and repair-only keep the full ``[P*G, T]`` batch; boundary estimators always have ``[2P, T]``
(skipped groups stay as rows with a zero loss mask), so no estimator recompiles after step 1. The
update is on-policy (one optimizer step per rollout), so old log-probs equal the actor's and no old-
policy forward is run (``ppo_epochs > 1`` computes them). Data parallel (``recast_ms.trainer.distributed``):
``P = rl.prompts_per_step`` is the global batch of one step; each rank rolls out, rewards, selects and updates
its own P / DP whole groups (disjoint slices of the same seeded order, each prompt's samples drawn from
(seed, step, global prompt index)), gradients are averaged across ranks inside the optimizer cell and the
logged metrics are averaged over ranks, so a step equals one process's step over the global batch.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from recast_ms.config import RunConfig, check_compatible
from recast_ms.data.batching import EpochSampler, encode_prompts, encode_targets, pack
from recast_ms.evaluation import PER_PROMPT_DIR, eval_subset, eval_subset_rows
from recast_ms.rewards import score_responses
from recast_ms.data.reserved import reserve_valid
from recast_ms.signals import (Selection, divergent_mask, entropy_rows, gather_rows, get_estimator, prefix_histogram,
                               select, signal_diagnostics)
from recast_ms.trainer import checkpoint as ckpt
from recast_ms.trainer import guard
from recast_ms.trainer.distributed import mean_over_ranks, rank_slice
from recast_ms.trainer.setup import (build_model, check_rl_inputs, deferred_parameters, get_tokenizer, init_runtime, load_splits,
                                     quiet_stdout, response_len)
from recast_ms.utils.tracking import MetricsLogger, StageTimer, current_rss_mb, peak_rss_mb

logger = logging.getLogger(__name__)
BARREN_STEPS = 5  # consecutive steps with no valid response and a zero update before the run stops


def _rl_loss_cell(model, rcfg, response_len: int, on_policy: bool):
    from mindspore import nn, ops

    from recast_ms.models.policy import ResponseLogProbs
    from recast_ms.trainer.loss import PolicyLoss

    class RLLoss(nn.Cell):
        """Inputs: ``input_ids [B, S]``, ``resp_start [B]``, ``old_logps / ref_logps / loss_mask [B, R]``,
        ``advantages [B]``, ``num_seqs`` scalar. Outputs ``(loss, pg_loss, kl, clip_frac)``."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.logps = ResponseLogProbs(model, response_len, rcfg.temperature)
            self.loss = PolicyLoss(rcfg.clip_low, rcfg.clip_high, rcfg.kl_coef)

        def construct(self, input_ids, resp_start, old_logps, ref_logps, advantages, loss_mask, num_seqs):
            lp = self.logps(input_ids, resp_start)  # [B, R]
            old = ops.stop_gradient(lp) if on_policy else old_logps
            return self.loss(lp, old, ref_logps, advantages, loss_mask, num_seqs)

    return RLLoss()


@dataclass
class ActorBatch:
    """One step's actor batch and what produced it. ``B = 2P`` (boundary estimators) or ``P*G``; S = seq_length,
    R = response length (L codes + EOS)."""

    input_ids: np.ndarray  # [B, S] int32, prompt + response, right-padded
    resp_start: np.ndarray  # [B] int32, where each row's response starts (its prompt length)
    loss_mask: np.ndarray  # [B, R] float32, response tokens that carry loss (0 for non-live rows)
    advantages: np.ndarray  # [B] float32
    selection: Selection  # which rollout rows became actor rows (repaired / active groups, anchors)
    rewards: np.ndarray  # [P, G] binary hits before repair
    scores: np.ndarray  # [P, G] structural scores before repair
    valid: np.ndarray  # [P, G] bool, the response names a catalogue SID
    prompt_index: np.ndarray  # [P] rows of the RL prompt set drawn this step
    rollout_ids: np.ndarray  # [P*G, R] the sampled (or beam) responses
    diagnostics: Dict[str, float] = field(default_factory=dict)  # per-step signals/* and policy/* measures

    @property
    def repaired(self) -> np.ndarray:  # [P]
        return self.selection.repaired

    @property
    def active_mask(self) -> np.ndarray:  # [P]
        return self.selection.active_mask

    @property
    def active_index(self) -> np.ndarray:  # [P, 2]
        return self.selection.active_index


class AdaptiveRepair:
    """Repair that recedes as groups become trainable on their own (``recast_adaptive``).

    Rule: keep an exponential moving average ``n`` of the naturally-trainable group ratio; repair
    each all-zero group with probability ``p = clip(1 - n / target, floor, 1)``. While the policy
    rarely hits (n ~ 0) this is static ReCast; once ``n`` reaches ``target`` repair stops, so the
    anchor -- an off-policy sample -- no longer competes with natural positives (the paper's named
    failure of static repair on stronger backbones).
    """

    def __init__(self, target: float, floor: float, momentum: float):
        self.target, self.floor, self.momentum = target, floor, momentum
        self.ema: Optional[float] = None

    @property
    def prob(self) -> float:
        n = 0.0 if self.ema is None else self.ema
        return float(min(1.0, max(self.floor, 1.0 - n / self.target)))

    def update(self, natural_ratio: float):
        self.ema = natural_ratio if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * natural_ratio


class RLTrainer:
    """Builds data, tokenizer, actor, frozen reference and optimizer; ``train()`` runs the loop."""

    def __init__(self, cfg: RunConfig, run_dir: str, init_checkpoint: Optional[str], tokenizer_dir: str, *,
                 progress: bool = True, rank: int = 0, world_size: int = 1):
        import mindspore as ms

        from recast_ms.models.tokenizer import sid_token_map
        from recast_ms.rollout.engine import SIDConstraint
        from recast_ms.trainer.engines import build_engines

        self.cfg, self.rcfg, self.run_dir = cfg, cfg.rl, run_dir
        self.progress, self.rank, self.world = progress and rank == 0, rank, world_size
        self.init_checkpoint = init_checkpoint
        ckpt.check_run_dir(run_dir)  # config.yaml is written by train(), once everything below was built
        if init_checkpoint:  # the SFT run's config must fit this one's shapes, else restoring would fail later
            init_cfg = os.path.join(os.path.dirname(os.path.dirname(init_checkpoint)), ckpt.CONFIG_FILE)
            if os.path.exists(init_cfg):
                check_compatible(init_cfg, cfg, f"--init checkpoint {init_checkpoint}")
        self.splits = load_splits(cfg.data)
        check_rl_inputs(cfg, self.splits)
        self.tok = get_tokenizer(self.splits, tokenizer_dir, cfg)
        plan = init_runtime(cfg, world_size)
        # semi-auto parallel from a Hugging Face checkpoint, or from a sharded checkpoint of the same layout (the
        # 8B / 14B SFT run): no host holds the whole model; each rank's graphs compile first, then each parameter
        # gets this rank's slice (engines.load_sliced_start / load_sliced_init)
        from recast_ms.trainer.sharded_checkpoint import is_sharded_step

        sliced_init = bool(plan.use_parallel and init_checkpoint and is_sharded_step(init_checkpoint))
        sliced_start = bool(plan.use_parallel and cfg.hf_checkpoint and not init_checkpoint)
        with deferred_parameters(sliced_start or sliced_init):
            self.model = build_model(cfg, self.tok, seed=cfg.seed, load_weights=not (sliced_start or sliced_init))
        if init_checkpoint and not sliced_init:  # weights only: the optimizer starts fresh
            tensors, _ = ckpt.load_state(init_checkpoint)
            ckpt.restore_model(self.model, tensors, path=init_checkpoint)
        cb = self.splits.codebook
        self.R = response_len(self.splits)
        self.Tp = cfg.seq_length - self.R
        # the reserved slice is cut before anything draws from valid: no RL step can ever see its rows
        rl_pool, self.reserved_samples = reserve_valid(self.splits.valid, cfg.data.reserved_valid_rows,
                                                       cfg.data.reserved_valid_seed)
        rl_samples = rl_pool[: cfg.data.max_rl_prompts or None]
        self.rl_samples = rl_samples
        self.rl_prompts = encode_prompts(rl_samples, cb, self.tok, self.Tp, cfg.data.with_titles)
        self.rl_anchors = encode_targets(rl_samples, cb, self.tok, self.R)  # ground-truth responses [N, R]
        eval_pool = self.reserved_samples if cfg.eval.split == "reserved" else self.splits.test
        self.eval_samples = eval_subset(eval_pool, cfg.data.max_eval_prompts, cfg.data.eval_subset_seed)
        # rows of eval_pool the evaluation scores [N]: names the prompts of the per-prompt records
        self.eval_rows = eval_subset_rows(len(eval_pool), cfg.data.max_eval_prompts, cfg.data.eval_subset_seed)
        self.token_map = sid_token_map(self.tok, cb)
        # also measures the SID-constrained entropy when rollouts are unconstrained
        self.sid_constraint = SIDConstraint(cb.trie, self.token_map, self.tok.eos_id, self.tok.vocab_size)
        self.constraint = self.sid_constraint if self.rcfg.constrained else None

        r = self.rcfg
        self.estimator = r.estimator
        self.est = get_estimator(r.estimator)
        self.P, self.G = r.prompts_per_step, r.group_size  # P is global
        self.adaptive = AdaptiveRepair(r.adaptive_target, r.adaptive_floor, r.adaptive_momentum) \
            if self.est.adaptive else None
        self.on_policy = r.ppo_epochs == 1
        # the plan's engines (recast_ms.trainer.engines): the step below never branches on the backend. Under
        # semi-auto parallel every rank's host side builds the whole global batch (host_world = 1) and the graphs
        # slice it by DP; on the local path this rank owns P / world whole groups
        # (the reference model is built before the optimizer state: MindFormers prints its config table per build)
        eng = build_engines(plan, self.model, r, response_len=self.R, prompt_len=self.Tp, pad_id=self.tok.pad_id,
                            rows_per_host=self.est.actor_rows(self.P // (1 if plan.use_parallel else world_size), self.G),
                            rank=rank, world_size=world_size)
        self.engines = eng
        # the layout of this rank's checkpoint slices (recast_ms.trainer.sharded_checkpoint): written by the actor
        # update's first compile, so named before a sliced start compiles it just below
        if plan.use_parallel:
            from recast_ms.trainer.sharded_checkpoint import strategy_file

            eng.policy.set_strategy_file(strategy_file(run_dir, rank))
        self.sliced_start = None
        if sliced_start:  # {"actor": n, "reference": n} parameters given their slices
            from recast_ms.trainer.engines import load_sliced_start
            from recast_ms.trainer.setup import hf_start_sources

            self.sliced_start = load_sliced_start(eng, lambda: hf_start_sources(cfg, self.model, cfg.seed), rank,
                                                  cfg.seq_length)
            logger.info("rank %d: sliced start from %s: %s", rank, cfg.hf_checkpoint, self.sliced_start)
        elif sliced_init:  # weights only, as any --init: the optimizer starts fresh
            from recast_ms.trainer.engines import load_sliced_init

            self.sliced_start = load_sliced_init(eng, init_checkpoint, rank, cfg.seq_length)
            logger.info("rank %d: sliced start from the sharded step %s: %s", rank, init_checkpoint, self.sliced_start)
        self.sliced_from = "init" if sliced_init else "hf_checkpoint" if sliced_start else None
        # graph-mode selection (None for whole-group estimators). Under semi-auto parallel the [P, G] selection is
        # the same host work on every rank: a graph there would be sliced over the devices for nothing, and under
        # pipeline stages a graph with no stage does not compile ("Stage num is 2 is not equal to stage used: 0");
        # the numpy reference runs instead (equal to the cell, tests/test_signals_ms.py)
        self.select_cell = None if plan.use_parallel else self.est.cell(self.G, r.alpha, r.negative_weight)
        self.decoder, self.policy, self.reference = eng.rollout, eng.policy, eng.reference
        self.host_rank, self.host_world = eng.host_rank, eng.host_world
        self.batch_rows = self.policy.rows  # this host's actor rows
        self.actor_logps_fn = self.policy.logps_fn  # [B, R] response log-probs under the actor (tests, dry run)
        if len(rl_samples) < self.P:
            raise ValueError(f"{len(rl_samples)} RL prompts < rl.prompts_per_step={self.P}")
        self.sampler = EpochSampler(len(rl_samples), self.P, cfg.seed)  # the global order, sliced per rank
        self.step_idx = 0
        self.last_prompt_index = np.zeros(0, np.int64)
        self.timer = StageTimer()
        self._ms = ms

    # ------------------------------------------------------------------ state

    def _global_draw(self, stream: int, shape, axis: int) -> np.ndarray:
        """This rank's share (along ``axis``, which runs over the global batch) of one draw of the GLOBAL batch
        for one stream (rollout, adaptive repair) at the current step: a pure function of (seed, stream, step,
        global index), so ranks agree with one process and resume is exact. The 0 is the slot the rank held
        before the global batch: one-process runs reproduce the committed results."""
        full = np.random.default_rng([self.cfg.seed, stream, 0, self.step_idx]).random(shape)
        n = shape[axis] // self.host_world
        return np.take(full, np.arange(self.host_rank * n, (self.host_rank + 1) * n), axis=axis)

    def state_meta(self) -> dict:
        # prompts and RNG streams derive from (seed, step), so the step is all a resume needs; the
        # adaptive-repair average follows the global (rank-averaged) ratio, the same on every rank
        return {"adaptive_ema": None if self.adaptive is None else self.adaptive.ema, "phase": "rl",
                "estimator": self.estimator}

    def save(self):
        # the policy engine decides who writes: rank 0 the whole state (local), every rank its slices (sharded)
        self.policy.save(self.run_dir, self.step_idx, self.state_meta(), self.rank, self.init_checkpoint)

    def resume(self) -> bool:
        last = ckpt.latest_checkpoint(self.run_dir)
        if not last:
            return False
        ckpt.check_resume(self.run_dir, self.cfg, last, "rl")
        meta = self.policy.load(last)
        if meta.get("estimator") != self.estimator:
            raise ValueError(f"{last} was written by estimator {meta.get('estimator')!r}, this run is {self.estimator!r}")
        if self.adaptive is not None:
            self.adaptive.ema = meta["adaptive_ema"]
        self.step_idx = meta["step"]
        logger.info("resumed RL from %s (step %d)", last, self.step_idx)
        return True

    # ------------------------------------------------------------------ one step

    def _rewards(self, responses: np.ndarray, samples) -> (np.ndarray, np.ndarray, np.ndarray):
        """Binary hits, structural scores and validity for ``[P*G, R]`` responses -> ``[P, G]``
        (``recast_ms.rewards``: the parser evaluation uses)."""
        P, G = len(samples), self.G
        targets = [samples[i].target_sids for i in range(P) for _ in range(G)]
        r, s, valid = score_responses(responses, targets, self.token_map, self.splits.codebook)
        return r.reshape(P, G), s.reshape(P, G), valid.reshape(P, G)

    def make_batch(self) -> ActorBatch:
        """Rollout, reward, selection and the physical gather: the actor batch, for every estimator alike.

        The estimator's :class:`Selection` names the actor rows (all ``P*G`` for GRPO / repair-only, the
        ``2P`` boundary pair otherwise), their advantages and which carry loss; :func:`gather_rows` then
        keeps only those rows (the anchor's tokens in repaired slots) BEFORE any actor work.
        """
        r, T = self.rcfg, self.timer
        G, S = self.G, self.cfg.seq_length
        pad = self.tok.pad_id
        idx = rank_slice(self.sampler.at(self.step_idx), self.host_rank, self.host_world)  # this host's whole groups
        P = len(idx)
        samples = [self.rl_samples[i] for i in idx]
        p_ids, p_lens = self.rl_prompts.ids[idx], self.rl_prompts.lens[idx]  # [P, Tp], [P]
        anchors = self.rl_anchors[idx]  # [P, R] the ground truth rendered exactly as a response
        with T("rollout"):
            from recast_ms.rollout.engine import beam_groups, sample_groups

            if r.rollout == "beam":  # the G best beams, best first (temperature 1, no length normalisation)
                ro = beam_groups(self.decoder, p_ids, p_lens, group_size=G, max_new_tokens=self.R,
                                 eos_id=self.tok.eos_id, pad_id=pad, constraint=self.constraint)
            else:
                uniforms = self._global_draw(0, (self.R, self.P * G), axis=1)  # this rank's P*G columns
                ro = sample_groups(self.decoder, p_ids, p_lens, group_size=G, max_new_tokens=self.R,
                                   eos_id=self.tok.eos_id, pad_id=pad, rng=None, constraint=self.constraint,
                                   temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, max_rows=r.rollout_rows,
                                   uniforms=uniforms)
        with T("reward"):
            rewards, scores, valid = self._rewards(ro.response_ids, samples)  # [P, G]
            repair_mask = np.ones(P, bool)
            if self.adaptive is not None:
                repair_mask = self._global_draw(1, (self.P,), axis=0) < self.adaptive.prob
        with T("signal"):
            sel = select(self.est, rewards, scores, alpha=r.alpha, negative_weight=r.negative_weight, eps=r.eps,
                         repair_mask=repair_mask, cell=self.select_cell)
            # the physical filter: only the selected rows survive, [P*G, R] -> [B, R]
            rows = gather_rows(ro.response_ids.astype(np.int32), anchors, sel)
            rmask = gather_rows(ro.response_mask, (anchors != pad).astype(np.float32), sel)
            input_ids, _ = pack(p_ids[sel.prompt_index], p_lens[sel.prompt_index], rows, rmask, S, pad)
            loss_mask = rmask.astype(np.float32) * sel.live.astype(np.float32)[:, None]  # [B, R]
            diag = {}
            if self.est.boundary:
                if r.negative_mask == "divergent":
                    loss_mask = divergent_mask(rows, loss_mask, sel)
                diag = prefix_histogram(rows, rmask, sel, self.R - 1)
        if self.rcfg.log_entropy:
            with T("entropy"):
                diag.update(self._entropy(p_ids[sel.prompt_index], p_lens[sel.prompt_index], rows, loss_mask))
        return ActorBatch(input_ids=input_ids, resp_start=p_lens[sel.prompt_index].astype(np.int32),
                          loss_mask=loss_mask, advantages=sel.advantages.astype(np.float32), selection=sel,
                          rewards=rewards, scores=scores, valid=valid, prompt_index=idx, rollout_ids=ro.response_ids,
                          diagnostics=diag)

    def _entropy(self, p_ids, p_lens, rows, loss_mask) -> Dict[str, float]:
        """Mean policy entropy (nats, at rl.temperature) over the actor rows' loss-carrying response positions,
        over the full vocabulary and over the SID-constrained one: whether pushing a negative down moves mass
        to tokens no SID uses. Teacher-forced through the rollout's KV decoder, which also covers beam groups
        (their search keeps no per-token distribution); B = 2P rows for boundary estimators."""
        mask = loss_mask  # all B rows decode (one static shape; a changing row count would recompile)
        if not mask.any():
            return {"policy/entropy_full": float("nan"), "policy/entropy_sid": float("nan")}
        from recast_ms.rollout.engine import _fit

        full, sid = np.zeros(mask.shape), np.zeros(mask.shape)
        logits = self.decoder.start(p_ids, p_lens, 1)  # [N, V]
        for t in range(rows.shape[1]):
            lg = logits.astype(np.float64) / self.rcfg.temperature
            full[:, t] = entropy_rows(lg)
            sid[:, t] = entropy_rows(lg, _fit(self.sid_constraint.mask(t, rows[:, :t]), lg))
            if t < rows.shape[1] - 1 and mask[:, t + 1:].any():
                logits = self.decoder.step(rows[:, t])
            else:
                break
        w = mask > 0
        return {"policy/entropy_full": float(full[w].mean()), "policy/entropy_sid": float(np.nanmean(sid[w]))}

    def update(self, batch: ActorBatch) -> Dict[str, float]:
        """Old/ref log-probs and the actor update, through the plan's policy and reference engines."""
        r, T = self.rcfg, self.timer
        B = len(batch.input_ids)
        if B != self.batch_rows:
            raise RuntimeError(f"actor batch has {B} rows, the compiled shape is {self.batch_rows}")
        sb = self.policy.prepare(batch.input_ids, batch.resp_start, batch.loss_mask, batch.advantages)
        with T("old_log_prob"):
            old = self.policy.zeros(sb) if self.on_policy else self.policy.old_logps(sb)
        with T("ref"):
            ref = self.reference.logps(sb) if self.reference is not None else self.policy.zeros(sb)
        with T("update_actor"):
            stats, grad_norm = self.policy.update(sb, old, ref, r.lr)
        loss_mask = batch.loss_mask
        guard.check_step("RL", self.step_idx + 1, {"loss": stats[0], "pg_loss": stats[1], "kl": stats[2],
                                                   "grad_norm": grad_norm}, self.run_dir, self.init_checkpoint)
        return {"actor/loss": stats[0], "actor/pg_loss": stats[1], "actor/kl": stats[2], "actor/clip_frac": stats[3],
                "actor/grad_norm": grad_norm,
                # 1 when the global-norm clip bound this step: its mean over steps is the fraction clipped
                "actor/grad_clipped": float(0 < r.grad_clip < grad_norm), "actor/rows": float(B),
                "actor/tokens": float(B * self.cfg.seq_length),  # tokens the actor's forward/backward processes
                "actor/response_tokens": float(loss_mask.sum()),  # tokens that carry loss
                "perf/rss_peak_step_mb": current_rss_mb()}

    def step(self) -> Dict[str, float]:
        T = self.timer
        with T("step"):
            batch = self.make_batch()
            upd = self.update(batch)
        self.step_idx += 1
        self.last_prompt_index = batch.prompt_index  # this rank's rows of the RL prompt set (msrun's checksum file)
        rewards = batch.rewards  # [P / host_world, G]: this host's groups
        diag = signal_diagnostics(rewards, repaired=batch.repaired if self.est.repair else np.zeros(len(rewards), bool))
        m = {
            "reward/mean": float(rewards.mean()),
            "reward/group_hit_rate": float((rewards.sum(1) > 0).mean()),
            "reward/struct_score_mean": float(batch.scores.mean()),
            "rollout/valid_ratio": float(batch.valid.mean()),
            **diag,
            "signals/active_group_ratio": float(np.mean(batch.active_mask)),
            **batch.diagnostics,
            **upd,
            "perf/peak_rss_mb": peak_rss_mb(),
            **T.pop(),
        }
        # the global batch's values: every rank holds an equal share, so the mean of rank means is the global mean
        m = mean_over_ranks(m, self.host_world, sums=("actor/rows", "actor/tokens", "actor/response_tokens",
                                                 *(k for k in m if k.startswith("signals/pair_prefix_len_count/"))))
        if self.adaptive is not None:  # the global ratio: every rank keeps the same repair probability
            self.adaptive.update(m["signals/naturally_trainable_ratio"])
            m["signals/adaptive_repair_prob"] = self.adaptive.prob
        return m

    # ------------------------------------------------------------------ eval + loop

    def evaluate(self, prefix: str = "eval", step: Optional[int] = None) -> Dict[str, float]:
        """The evaluation's mean metrics; with ``step``, also its per-prompt values in
        ``<run_dir>/eval_per_prompt/step_<step>.npz`` (``recast_ms.evaluation.write_per_prompt``): a paired
        bootstrap over prompts (``recast_ms.beyond``) needs them, and every arm scores the same rows in one order."""
        from recast_ms.evaluation import evaluate, per_prompt_metrics, per_prompt_path, write_per_prompt

        metrics, rankings = evaluate(self.decoder, self.eval_samples, self.splits.codebook, self.tok,
                                     seq_length=self.cfg.seq_length, ecfg=self.cfg.eval, prefix=prefix,
                                     with_titles=self.cfg.data.with_titles)
        if step is not None:
            values = per_prompt_metrics(rankings, [s.target_sids for s in self.eval_samples], self.cfg.eval.ks)
            write_per_prompt(per_prompt_path(self.run_dir, step), self.eval_rows, values, self.cfg.eval.split)
        return metrics

    def train(self, resume: bool = True, stop_after: Optional[int] = None, evaluate: bool = True,
              overwrite: bool = False) -> List[dict]:
        """``overwrite`` lets a new run replace files in the run dir that no recast_ms run wrote."""
        # rank 0 alone writes, so it alone locks: msrun's data-parallel ranks never lock each other out
        with ckpt.hold_run_dir(self.run_dir, writer=self.rank == 0) as held:
            return self._train(held, resume, stop_after, evaluate, overwrite)

    def _train(self, held, resume: bool, stop_after: Optional[int], evaluate: bool, overwrite: bool) -> List[dict]:
        from tqdm import tqdm

        resumed = self.resume() if resume else False
        if self.rank == 0:  # a new run clears an earlier run's checkpoints before it saves anything
            ckpt.claim_run_dir(self.run_dir, self.cfg, resumed, outputs=("metrics.jsonl", "tb", PER_PROMPT_DIR, "strategy"),
                               overwrite=overwrite)
        log = MetricsLogger(self.run_dir, resume_step=self.step_idx if resumed else None,
                            tensorboard=self.rank == 0) if self.rank == 0 else None
        history = []
        if evaluate and self.step_idx == 0 and self.rank == 0 and self.rcfg.eval_due(0):
            m0 = self.evaluate(step=0)
            log.log(0, m0)
            history.append({"step": 0, **m0})
        bar = tqdm(total=self.rcfg.steps, initial=self.step_idx, desc=f"rl[{self.estimator}]",
                   disable=not self.progress, dynamic_ncols=True)
        done = barren = 0
        while self.step_idx < self.rcfg.steps:
            held.step = self.step_idx
            m = self.step()
            if m["rollout/valid_ratio"] == 0:
                barren = barren + 1 if m["actor/grad_norm"] == 0 else 0
                if self.rank == 0:
                    logger.warning("RL[%s] step %d: no rollout response names a catalogue item (rl.constrained=%s)",
                                   self.estimator, self.step_idx, self.rcfg.constrained)
                if barren >= BARREN_STEPS:  # an error, not exit 0 after a run that never changed the weights
                    raise RuntimeError(
                        f"RL[{self.estimator}]: {barren} steps in a row without a valid rollout response and with a "
                        f"zero update (last step {self.step_idx}): the run trains on nothing; set rl.constrained=true "
                        "or start from a better SFT checkpoint")
            else:
                barren = 0
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", all0=f"{m['signals/all_zero_group_ratio']:.2f}",
                            loss=f"{m['actor/loss']:.3f}")
            s = self.step_idx
            if evaluate and self.rank == 0 and self.rcfg.eval_due(s):
                m.update(self.evaluate(step=s))
            if log is not None:
                log.log(s, m)
            history.append({"step": s, **m})
            if s % self.rcfg.save_every == 0 or s == self.rcfg.steps:
                self.save()
            done += 1
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        if log is not None:
            log.close()
        guard.warn_if_no_update(f"RL[{self.estimator}]", [m["actor/grad_norm"] for m in history if "actor/grad_norm" in m])
        return history
