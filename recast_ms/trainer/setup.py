"""Shared run set-up for SFT, RL and evaluation: data splits, tokenizer, runtime context, model."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Optional

from recast_ms.config import DataConfig, RunConfig
from recast_ms.data import SyntheticConfig, load_amazon, make_synthetic
from recast_ms.data.prompts import prompt_corpus
from recast_ms.data.sample import Splits

logger = logging.getLogger(__name__)


def load_splits(dcfg: DataConfig) -> Splits:
    if dcfg.source == "synthetic":
        return make_synthetic(SyntheticConfig(
            seed=dcfg.seed, codebook_size=dcfg.codebook_size, num_users=dcfg.num_users,
            p_successor=dcfg.p_successor, p_sibling=dcfg.p_sibling, p_branch=dcfg.p_branch, p_jump=dcfg.p_jump))
    splits = load_amazon(dcfg.dataset, root=dcfg.root or None, valid_in_train=dcfg.valid_in_train)
    if splits.report.num_malformed:
        logger.warning("%s: skipped %d malformed rows: %s", dcfg.dataset, splits.report.num_malformed, splits.report.malformed)
    return splits


def check_rl_inputs(cfg: RunConfig, splits: Splits) -> None:
    """Pre-flight of what only the data can refuse in an RL config, before a tokenizer, model or run file.

    ``rl.rollout=beam`` takes the G best SID-constrained beams, which are distinct catalogue SIDs: a
    catalogue with fewer than G failed at the first rollout, after the run directory was written."""
    from recast_ms.config import ConfigError

    num_sids = len(splits.codebook.sid_to_items)
    if cfg.rl.rollout == "beam" and cfg.rl.group_size > num_sids:
        raise ConfigError(f"rl.group_size={cfg.rl.group_size} exceeds the {num_sids} distinct item SIDs of the "
                          f"{splits.name or cfg.data.source} catalogue: rl.rollout=beam needs that many distinct "
                          "beams per prompt; lower rl.group_size or use rl.rollout=sample")


def get_tokenizer(splits: Splits, tokenizer_dir: str, cfg: RunConfig, *, reuse: bool = True, save: bool = True):
    """The run's tokenizer, made once per run directory and reused (SFT, RL and evaluation share ids).

    ``reuse=False`` makes a new one even when ``tokenizer_dir`` holds one (a new SFT run in an old
    directory); ``save=False`` leaves writing it to the caller (SFT writes it with ``config.yaml``,
    once data and model were built).

    With ``cfg.hf_checkpoint``: the checkpoint's ``tokenizer.json`` with the SID codes added as special
    tokens and a dedicated pad token (Qwen3's own pad is its EOS, which the model must not mask).
    Otherwise the embedded default: sentencepiece trained on the SFT prompt corpus with every SID code
    as one user-defined symbol.
    """
    from recast_ms.models.tokenizer import META_FILE, HFSIDTokenizer, SentencePieceSIDTokenizer, load_tokenizer

    dcfg = cfg.data
    if reuse and os.path.exists(os.path.join(tokenizer_dir, META_FILE)):
        return load_tokenizer(tokenizer_dir)
    if cfg.hf_checkpoint:
        tok = HFSIDTokenizer.from_pretrained(cfg.hf_checkpoint, splits.codebook.code_tokens(),
                                             pad_token=HFSIDTokenizer.DEFAULT_PAD)
    else:
        tok = SentencePieceSIDTokenizer.train(
            prompt_corpus(splits.train, splits.codebook, dcfg.with_titles),
            splits.codebook.code_tokens(),
            text_vocab_size=dcfg.text_vocab_size,
        )
    if save:
        tok.save(tokenizer_dir)
    return tok


_PLAN = None  # the RuntimePlan applied by init_runtime (read by build_model)


def current_plan():
    """The :class:`recast_ms.runtime.RuntimePlan` of this process (None before ``init_runtime``)."""
    return _PLAN


def init_runtime(cfg_or_device=None, world_size: int = 1, parallel: Optional[dict] = None, stage: str = "rl"):
    """Set up MindSpore + MindFormers for a run; returns the applied :class:`recast_ms.runtime.RuntimePlan`.

    With a :class:`RunConfig`: its ``runtime`` section chooses the device (``auto`` resolved and logged) and the
    layout (``recast_ms.runtime.plan_runtime`` for ``world_size`` ranks and ``stage`` ``rl`` / ``sft``). With a
    device string (or None = CPU): the default runtime section on that device (tests, benches).
    Data-parallel layouts (CPU; Ascend with TP = PP = 1): stand-alone mode; with ``world_size > 1``
    ``recast_ms.trainer.distributed.init_data_parallel`` must have run first (MCCL / HCCL), the optimizer
    cell all-reduces the gradients. CPU adds its patches and fp32. Ascend semi-auto layouts (TP / PP > 1,
    optimizer parallel): MindFormers' ``use_parallel`` context (it runs ``communication.init()`` and
    ``set_auto_parallel_context``); the engines are ``recast_ms.trainer.engines``' sharded set.
    """
    global _PLAN  # pylint: disable=global-statement
    import mindspore as ms

    from recast_ms.cli import quiet_mindformers
    from recast_ms.config import RunConfig
    from recast_ms.models.qwen3 import build_context
    from recast_ms.runtime import plan_from_config, plan_runtime

    if isinstance(cfg_or_device, RunConfig):
        plan, why = plan_from_config(cfg_or_device, world_size, stage)
        logger.info("device %s (%s); layout DP x TP x PP = %d x %d x %d; rollout engine %s", plan.device_target, why,
                    plan.layout.data_parallel, plan.layout.model_parallel, plan.layout.pipeline_stage,
                    plan.rollout_engine)
        for note in plan.notes:
            logger.info("runtime plan: %s", note)
    else:
        plan = plan_runtime(RunConfig(), cfg_or_device or "CPU", world_size, stage=stage)
    if plan.world_size > 1 and not plan.use_parallel:  # MindFormers' use_parallel runs init() itself
        from mindspore.communication import GlobalComm

        if not GlobalComm.INITED:  # the optimizer's AllReduce would fail inside its first graph
            raise RuntimeError(f"{plan.world_size} ranks but communication is not initialised: call "
                               "recast_ms.trainer.distributed.init_data_parallel first (under msrun)")
    device_target = plan.device_target
    if device_target == "CPU":
        try:
            ms.set_device(device_target)
        except RuntimeError as err:
            # under msrun ``communication.init()`` has already fixed the device with a negotiated device id
            # (the rank's); setting it again with the default id 0 raises. The same target is fine.
            # The same holds once any kernel ran in this process (e.g. an earlier test): the runtime is fixed.
            already = "can not be modified" in str(err) or "runtime has been initialized" in str(err)
            if not already or ms.get_context("device_target").upper() != device_target.upper():
                raise
        build_context(device_target, ms.GRAPH_MODE, parallel=parallel)
    else:  # Ascend, stand-alone mode: data parallelism is the optimizer cell's HCCL AllReduce, as on CPU
        extra = {k: v for k, v in plan.context.items() if k not in ("mode", "device_target")}
        parallel = dict(plan.parallel)
        if "parallel_mode" in parallel:  # MindFormers' validator takes its YAMLs' integer codes, not the names
            parallel["parallel_mode"] = {"data_parallel": 0, "semi_auto_parallel": 1, "auto_parallel": 2,
                                         "hybrid_parallel": 3}[parallel["parallel_mode"]]
        build_context(device_target, ms.GRAPH_MODE, parallel=parallel, use_parallel=plan.use_parallel,
                      parallel_config=plan.parallel_config, **extra)
    quiet_mindformers()
    _PLAN = plan
    return plan


def quiet_stdout():
    """MindFormers print()s a ~60-line config-conversion table on every model build; swallow it."""
    return contextlib.redirect_stdout(io.StringIO())


def model_layout_kwargs(plan) -> dict:
    """What the runtime plan gives the model build, the same for a model YAML and a HF checkpoint: on Ascend the
    plan's dtypes, flash attention, parallel and recompute config; on CPU (or before ``init_runtime``) nothing,
    ``build_qwen3`` applies the CPU overrides (fp32, no flash, no layout) itself."""
    if plan is None or plan.device_target == "CPU":
        return {}
    return {"parallel_config": plan.parallel_config, "recompute_config": plan.recompute_config, **plan.dtypes,
            "use_flash_attention": plan.use_flash_attention}


def build_model(cfg: RunConfig, tokenizer, seed: int, dropout: float = 0.0, load_weights: bool = True):
    """The actor: MindFormers Qwen3 from ``cfg.model_config`` (random init), or from the HF checkpoint
    ``cfg.hf_checkpoint`` (its shapes; its vocabulary grown to the tokenizer's, new rows: mean + noise). Either
    way the runtime plan's dtypes, flash attention, parallel and recompute config reach the model
    (:func:`model_layout_kwargs`). ``dropout`` (SFT only) builds its dropout cells with that probability, off
    until ``policy.set_dropout`` turns them on. ``load_weights=False``: the checkpoint's shapes only (a sharded
    run loads each rank's slices after its graphs compiled, :func:`hf_start_sources`)."""
    extra = {"hidden_dropout": float(dropout)} if dropout else {}
    extra.update(model_layout_kwargs(_PLAN))
    from recast_ms.models.qwen3 import build_qwen3

    vocab = cfg.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    if cfg.hf_checkpoint:
        from recast_ms.models.weights import load_hf_qwen3

        with quiet_stdout():
            return load_hf_qwen3(cfg.hf_checkpoint, seq_length=cfg.seq_length, vocab_size=vocab,
                                 pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                                 new_token_ids=range(_hf_base_vocab(cfg), vocab), init_seed=seed,
                                 load_weights=load_weights, **extra)
    with quiet_stdout():
        return build_qwen3(cfg.model_config_path, vocab_size=vocab, seq_length=cfg.seq_length,
                           pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id, seed=seed, **extra)


@contextlib.contextmanager
def deferred_parameters(on: bool = True):
    """MindSpore's ``no_init_parameters`` when ``on`` and not already inside one (its exit would end the outer
    one too): the parameters built here hold no values until loaded or compiled."""
    from mindspore import Parameter
    from mindspore.nn.utils import no_init_parameters

    if not on or getattr(Parameter, "init_param", True) is False:
        yield
        return
    with no_init_parameters():
        yield


def _hf_base_vocab(cfg: RunConfig) -> int:
    """Tokens of the checkpoint's own tokenizer: the rows from here on are the SID / pad tokens added to it."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(cfg.hf_checkpoint, "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def hf_start_sources(cfg: RunConfig, model, seed: int) -> dict:
    """``{parameter: (make, origin)}`` of ``cfg.hf_checkpoint`` for ``model`` (built with ``load_weights=False``),
    each tensor read and converted on demand, the new vocabulary rows drawn as :func:`build_model` draws them."""
    from recast_ms.models.weights import hf_model_sources

    vocab = int(model.get_gpt_transformer_config().vocab_size)
    return hf_model_sources(model, cfg.hf_checkpoint, new_token_ids=range(_hf_base_vocab(cfg), vocab), seed=seed)


def response_len(splits: Splits) -> int:
    """L code tokens + EOS (``recast_ms.rewards.response_length``: one slice length everywhere)."""
    from recast_ms.rewards import response_length

    return response_length(splits.codebook)
