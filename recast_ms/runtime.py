"""The runtime plan: from (run config, device, world size) to every device-dependent setting of a run.

:func:`plan_runtime` is a pure function (it reads the model YAML, nothing else; no MindSpore context is
touched): it returns a :class:`RuntimePlan` holding the MindSpore / MindFormers context settings, the
parallel layout (MindFormers ``parallel_config`` + ``recompute_config``, the ``parallel`` section that goes
to ``set_auto_parallel_context``), dtypes, the CPU patches, the training wrapper and the rollout engine.
:func:`resolve_device` turns ``runtime.device_target: auto`` into CPU or Ascend (the only part that asks
MindSpore). ``recast_ms.trainer.setup.init_runtime`` applies a plan; ``scripts/launch_msrun.sh --dry-run``
prints one.

Batch semantics, one for every backend: ``rl.prompts_per_step`` (P) and ``sft.batch_size`` are GLOBAL per
optimizer step. Each data-parallel rank owns whole groups (P / DP prompts, refused when not divisible), the
ranks draw disjoint slices of the same seeded global order, the loss is normalised over the global batch and
the logged metrics are reduced over ranks.

Two paths, kept explicit:

* **Data parallel** (TP = PP = 1, no optimizer parallel): CPU (executed here) and Ascend (the 0.6B / 1.7B
  layouts as shipped). Stand-alone parallel mode: one msrun rank per device, each runs the whole model on
  its P / DP prompts, and the optimizer cell all-reduces the accumulated gradients (MCCL on CPU, HCCL on
  Ascend; ``communication.init()`` in ``recast_ms.trainer.distributed``). CPU adds fp32 and the patches of
  :mod:`recast_ms.models.cpu_compat`; Ascend keeps the model YAML's dtypes, flash attention and recompute.
  Model / pipeline parallel are refused on CPU: MindSpore 2.9 on CPU rejects ``SEMI_AUTO_PARALLEL`` under
  msrun ("Invalid backend: CPU").
* **Semi-auto parallel** (Ascend with TP or PP > 1 or optimizer parallel: the 8B / 14B layouts): MindFormers'
  own machinery, as in its Qwen3 YAMLs and MindRLHF: ``use_parallel`` + ``parallel_mode: semi_auto_parallel``,
  ``TransformerOpParallelConfig`` DP x TP x PP from the model YAML, optimizer parallel, ``full_batch: True``
  (every rank feeds the same global micro-batch and the framework slices it by DP, so the actor batch and its
  micro-batches must be divisible by DP x pipeline micro-batches). Its engines are
  ``recast_ms.trainer.engines`` (sharded set): compiled per rank under DryRun, never executed on a device.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from recast_ms.config import ConfigError
from recast_ms.models.cpu_compat import PATCH_TARGETS
from recast_ms.signals import get_estimator  # the one registry, shared with the trainer

logger = logging.getLogger(__name__)

DEVICES = ("CPU", "Ascend")
# names of recast_ms.models.cpu_compat.PATCH_TARGETS (kept equal by tests/test_runtime_plan.py; listed here
# so that planning needs no MindSpore import)
# the patches recast_ms.models.cpu_compat applies on CPU (named there, once)
CPU_PATCHES = tuple(name for name, *_ in PATCH_TARGETS)
FP32_DTYPES = {"params_dtype": "float32", "compute_dtype": "float32", "layernorm_compute_dtype": "float32",
               "softmax_compute_dtype": "float32", "rotary_dtype": "float32"}
# MindFormers' Qwen3 training YAML (configs/qwen3/finetune_qwen3.yaml, mindformers 1.9.0) on 64 GB devices
ASCEND_CONTEXT = {"max_device_memory": "58GB", "memory_optimize_level": "O0", "jit_config": {"jit_level": "O0"}}
# the ``parallel`` section keys a model YAML may hold (MindFormers' names, passed to set_auto_parallel_context)
PARALLEL_SECTION_KEYS = frozenset({"enable_parallel_optimizer", "parallel_optimizer_config", "gradients_mean",
                                   "enable_alltoall", "search_mode", "strategy_ckpt_config"})


class PlanError(ConfigError):
    """The run configuration cannot run on this device / world size; the message names the numbers."""


@dataclass(frozen=True)
class Layout:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    optimizer_parallel: bool
    recompute: bool

    @property
    def devices(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


@dataclass
class RuntimePlan:
    device_target: str
    world_size: int
    layout: Layout
    context: Dict[str, Any]  # MindFormers build_context 'context' section (MindSpore set_context keys)
    use_parallel: bool  # MindFormers' use_parallel: it then runs communication.init() itself
    parallel: Dict[str, Any]  # MindFormers 'parallel' section -> mindspore set_auto_parallel_context
    parallel_config: Dict[str, Any]  # TransformerOpParallelConfig kwargs given to build_qwen3 ({} = none)
    recompute_config: Dict[str, Any]  # TransformerRecomputeConfig kwargs ({} = none)
    dtypes: Dict[str, str]
    use_flash_attention: bool
    cpu_patches: Tuple[str, ...]
    gradient_reduction: str
    train_wrapper: str
    rollout_engine: str
    rollout_reason: str
    actor_batch: Dict[str, int]
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layout"]["devices"] = self.layout.devices
        d["cpu_patches"] = list(self.cpu_patches)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ----------------------------------------------------------------------------- model YAML


def read_model_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or not isinstance((raw.get("model") or {}).get("model_config"), dict):
        raise ValueError(f"{path}: expected a mapping with 'model: model_config: {{...}}'")
    return raw


def model_shape(model_yaml: dict, hf_checkpoint: str = "") -> Dict[str, int]:
    """Heads, KV heads and layers of the model (a HF checkpoint's ``config.json`` wins over the YAML)."""
    mc = dict(model_yaml["model"]["model_config"])
    if hf_checkpoint and os.path.exists(os.path.join(hf_checkpoint, "config.json")):
        with open(os.path.join(hf_checkpoint, "config.json"), encoding="utf-8") as f:
            mc.update(json.load(f))
    return {"num_attention_heads": int(mc["num_attention_heads"]),
            "num_key_value_heads": int(mc.get("num_key_value_heads") or mc["num_attention_heads"]),
            "num_hidden_layers": int(mc["num_hidden_layers"])}


def yaml_layout(model_yaml: dict) -> Layout:
    """The layout a model YAML declares (its ``parallel_config``, ``recompute_config``, ``parallel``)."""
    pc = model_yaml.get("parallel_config") or {}
    rc = model_yaml.get("recompute_config") or {}
    par = model_yaml.get("parallel") or {}
    return Layout(int(pc.get("data_parallel", 1)), int(pc.get("model_parallel", 1)), int(pc.get("pipeline_stage", 1)),
                  int(pc.get("micro_batch_num", 1)), bool(par.get("enable_parallel_optimizer", False)),
                  bool(rc.get("recompute", False)))


def check_layout(shape: Dict[str, int], layout: Layout, devices: Optional[int] = None, where: str = "") -> None:
    """Raise :class:`PlanError` unless heads and KV heads divide by TP, layers by PP and (when ``devices`` is
    given) DP x TP x PP equals the device count. The message names the numbers."""
    pre = f"{where}: " if where else ""
    tp, pp = layout.model_parallel, layout.pipeline_stage
    if min(layout.data_parallel, tp, pp, layout.micro_batch_num) < 1:
        raise PlanError(f"{pre}every parallel degree must be >= 1, got {layout}")
    for key in ("num_attention_heads", "num_key_value_heads"):
        if shape[key] % tp:
            raise PlanError(f"{pre}{key}={shape[key]} is not divisible by model_parallel={tp}")
    if shape["num_hidden_layers"] % pp:
        raise PlanError(f"{pre}num_hidden_layers={shape['num_hidden_layers']} is not divisible by pipeline_stage={pp}")
    if pp > 1 and layout.micro_batch_num < pp:
        raise PlanError(f"{pre}micro_batch_num={layout.micro_batch_num} < pipeline_stage={pp}: the pipeline "
                        "would idle (MindFormers needs micro_batch_num >= pipeline_stage)")
    if devices is not None and layout.devices != devices:
        raise PlanError(f"{pre}data_parallel x model_parallel x pipeline_stage = {layout.data_parallel} x {tp} x {pp} "
                        f"= {layout.devices} != {devices} devices")


# ----------------------------------------------------------------------------- device


def resolve_device(requested: str) -> Tuple[str, str]:
    """``auto`` -> ``Ascend`` when MindSpore's Ascend backend is usable, else ``CPU``; returns (device, reason)."""
    req = {"auto": "auto", "cpu": "CPU", "ascend": "Ascend"}.get(str(requested).lower())
    if req is None:
        raise ValueError(f"device_target must be auto, CPU or Ascend, got {requested!r}")
    if req != "auto":
        return req, "runtime.device_target"
    if _ascend_available():
        return "Ascend", "auto: MindSpore's Ascend backend is available"
    return "CPU", "auto: MindSpore's Ascend backend is not available (no CANN), using CPU"


def _ascend_available() -> bool:
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ms_logger = logging.getLogger("mindspore")
    level = ms_logger.level
    ms_logger.setLevel(logging.ERROR)  # is_available() warns about the missing plugin on every call
    try:
        return bool(ms.device_context.ascend.is_available())
    finally:
        ms_logger.setLevel(level)


def require_device(device: str) -> None:
    """Before a run touches the device: Ascend asked for on a machine without it is a :class:`ConfigError`
    (one line), not MindSpore's 40-line load trace. Skipped under ``MS_SIMULATION_LEVEL`` (the dry run
    simulates Ascend on a CPU machine). Planning alone (``show_plan``) never calls this."""
    if device == "Ascend" and not os.environ.get("MS_SIMULATION_LEVEL") and not _ascend_available():
        raise ConfigError("runtime.device_target=Ascend, but MindSpore finds no Ascend device here (its Ascend "
                          "backend does not load: no CANN / driver); use runtime.device_target=CPU or auto")


# ----------------------------------------------------------------------------- the plan


def _tri(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "true"


def actor_batch(cfg) -> Dict[str, int]:
    """Rows of the actor batch for the run's estimator (``[2P, T]`` or ``[P*G, T]``) and its micro-batches."""
    r = cfg.rl
    rows = get_estimator(r.estimator).actor_rows(r.prompts_per_step, r.group_size)
    micro = min(r.micro_batch_size, rows)
    return {"rows": rows, "micro_batch_rows": micro, "num_micro_batches": -(-rows // micro),
            "rollout_rows": r.prompts_per_step * r.group_size, "seq_length": cfg.seq_length}


def check_batch(cfg, layout: Layout) -> None:
    """Ascend under semi-auto-parallel: the global actor batch, each micro-batch and the rollout batch are
    sliced by DP (x pipeline micro-batches); raise :class:`PlanError` naming the numbers otherwise."""
    b, r = actor_batch(cfg), cfg.rl
    dp = layout.data_parallel
    split = dp * (layout.micro_batch_num if layout.pipeline_stage > 1 else 1)
    what = "[2P, T] = [2 x {}, T]".format(r.prompts_per_step) if get_estimator(r.estimator).boundary \
        else "[P*G, T] = [{} x {}, T]".format(r.prompts_per_step, r.group_size)
    if b["rows"] % b["micro_batch_rows"]:
        raise PlanError(f"rl.estimator={r.estimator}: actor batch {what} has {b['rows']} rows, not a multiple of "
                        f"the micro-batch min(rl.micro_batch_size={r.micro_batch_size}, rows) = {b['micro_batch_rows']}")
    if b["micro_batch_rows"] % split:
        detail = f"data_parallel={dp}" + (f" x micro_batch_num={layout.micro_batch_num}" if split != dp else "")
        raise PlanError(f"rl.estimator={r.estimator}: actor micro-batch of {b['micro_batch_rows']} rows (batch {what}, "
                        f"rl.micro_batch_size={r.micro_batch_size}) is not divisible by {detail} = {split}")
    if b["rollout_rows"] % dp:
        raise PlanError(f"rollout batch P*G = {r.prompts_per_step} x {r.group_size} = {b['rollout_rows']} rows is not "
                        f"divisible by data_parallel={dp}")


def check_sft_batch(cfg, layout: Layout) -> None:
    """Ascend under semi-auto parallel: the global SFT batch (and the validation forward's, the same size) is
    sliced by DP, under a pipeline also into ``micro_batch_num`` micro-batches."""
    b, dp = cfg.sft.batch_size, layout.data_parallel
    if layout.pipeline_stage > 1 and b % (dp * layout.micro_batch_num):
        raise PlanError(f"sft.batch_size={b} (global) is not divisible by data_parallel={dp} x micro_batch_num="
                        f"{layout.micro_batch_num} = {dp * layout.micro_batch_num}: the pipeline splits each rank's "
                        "rows into micro-batches")


def check_groups(cfg, dp: int, stage: str = "rl") -> None:
    """The global batch of one step splits into whole groups (RL) / whole rows (SFT) per data-parallel rank."""
    if stage == "sft":
        if cfg.sft.batch_size % dp:
            raise PlanError(f"sft.batch_size={cfg.sft.batch_size} (global) is not divisible by data_parallel={dp}: "
                            "each rank takes batch_size / data_parallel rows")
    elif cfg.rl.prompts_per_step % dp:
        raise PlanError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} (global) is not divisible by data_parallel={dp}: "
                        "each rank owns prompts_per_step / data_parallel whole groups")


def plan_runtime(cfg, device_target: str, world_size: int, model_yaml: Optional[dict] = None,
                 stage: str = "rl") -> RuntimePlan:
    """The full runtime plan of run config ``cfg`` on ``device_target`` (``CPU`` or ``Ascend``, already resolved)
    with ``world_size`` ranks, for the ``stage`` ``rl`` or ``sft`` (whose global batch is split over the ranks).
    Pure: reads the model YAML (``model_yaml`` dict, default ``cfg.model_config``).
    Raises :class:`PlanError` naming the numbers when the layout or the batch does not fit."""
    if device_target not in DEVICES:
        raise ValueError(f"device_target must be one of {DEVICES} (resolve 'auto' with resolve_device), "
                         f"got {device_target!r}")
    if world_size < 1:
        raise PlanError(f"world_size must be >= 1, got {world_size}")
    rt = cfg.runtime
    if rt.world_size and rt.world_size != world_size:
        raise PlanError(f"runtime.world_size={rt.world_size} but the launch gives {world_size} ranks")
    raw = model_yaml if model_yaml is not None else read_model_yaml(cfg.model_config_path)
    mc = raw["model"]["model_config"]
    shape = model_shape(raw, cfg.hf_checkpoint)
    base = yaml_layout(raw)
    batch = actor_batch(cfg)
    notes: List[str] = []

    if device_target == "CPU":
        for key in ("model_parallel", "pipeline_stage"):
            if getattr(rt, key) > 1:
                raise PlanError(f"runtime.{key}={getattr(rt, key)} on CPU: MindSpore 2.9 refuses SEMI_AUTO_PARALLEL on "
                                "the CPU backend ('Invalid backend: CPU'); only data parallel runs on CPU")
        if rt.data_parallel and rt.data_parallel != world_size:
            raise PlanError(f"runtime.data_parallel={rt.data_parallel} on CPU must equal the msrun world size "
                            f"{world_size} (one data-parallel rank per worker)")
        if rt.optimizer_parallel == "true" or rt.recompute == "true":
            raise PlanError("runtime.optimizer_parallel / runtime.recompute = true need semi-auto-parallel on Ascend; "
                            "on CPU they do not exist")
        layout = Layout(world_size, 1, 1, 1, False, False)
        check_groups(cfg, world_size, stage)
        if base.devices > 1 or base.recompute or base.optimizer_parallel:
            notes.append(f"model YAML layout DP x TP x PP = {base.data_parallel} x {base.model_parallel} x "
                         f"{base.pipeline_stage} (recompute {base.recompute}, optimizer parallel "
                         f"{base.optimizer_parallel}) is for Ascend: dropped on CPU")
        dropped = {k: mc[k] for k in FP32_DTYPES if k in mc and mc[k] != FP32_DTYPES[k]}
        if dropped:
            notes.append(f"CPU build is fp32 (YAML dtypes {dropped} overridden)")
        if mc.get("use_flash_attention"):
            notes.append("flash attention has no CPU kernel: causal softmax attention (cpu_compat)")
        return RuntimePlan(
            device_target="CPU", world_size=world_size, layout=layout,
            context={"mode": "GRAPH_MODE", "device_target": "CPU"}, use_parallel=False, parallel={},
            parallel_config={}, recompute_config={}, dtypes=dict(FP32_DTYPES), use_flash_attention=False,
            cpu_patches=CPU_PATCHES,
            gradient_reduction="AllReduce of the accumulated gradients in the optimizer cell (AdamWApply)"
            if world_size > 1 else "none (one process)",
            train_wrapper="recast_cells: GradAccumulator + AdamWApply (recast_ms/trainer/optim.py)",
            rollout_engine="kv_decoder",
            rollout_reason="Qwen3KVDecoder over the actor's own Parameters (no copy, no sync): MindFormers' "
                           "InferenceQwen3ForCausalLM has no CPU kernels (ApplyRotaryPosEmb, PagedAttention, ...)",
            actor_batch=batch, notes=notes)

    # ------------------------------------------------------------------ Ascend
    tp = rt.model_parallel or base.model_parallel
    pp = rt.pipeline_stage or base.pipeline_stage
    mbn = rt.micro_batch_num or base.micro_batch_num
    if world_size % (tp * pp):
        raise PlanError(f"world size {world_size} is not divisible by model_parallel x pipeline_stage = {tp} x {pp} "
                        f"= {tp * pp}")
    if rt.data_parallel:
        dp = rt.data_parallel
    elif base.data_parallel * tp * pp == world_size:
        dp = base.data_parallel
    else:
        dp = world_size // (tp * pp)
        notes.append(f"data_parallel = world {world_size} / (TP {tp} x PP {pp}) = {dp} (the model YAML's "
                     f"{base.data_parallel} is for {base.data_parallel * tp * pp} devices)")
    layout = Layout(dp, tp, pp, mbn, _tri(rt.optimizer_parallel, base.optimizer_parallel),
                    _tri(rt.recompute, base.recompute))
    check_layout(shape, layout, world_size, where=os.path.basename(cfg.model_config))
    check_groups(cfg, dp, stage)
    # every device holds the full weights: the data-parallel path CPU msrun runs, with HCCL for MCCL
    data_parallel_only = tp == 1 and pp == 1 and not layout.optimizer_parallel
    if not data_parallel_only and stage == "sft":
        check_sft_batch(cfg, layout)
    elif not data_parallel_only:
        check_batch(cfg, layout)

    parallel_config = dict(raw.get("parallel_config") or {})
    if data_parallel_only:  # stand-alone mode: each rank's graph is one device's, DP lives in the optimizer cell
        parallel_config.update(data_parallel=1, model_parallel=1, pipeline_stage=1, micro_batch_num=1)
    else:
        parallel_config.update(data_parallel=dp, model_parallel=tp, pipeline_stage=pp, micro_batch_num=mbn)
    if pp > 1 and parallel_config.get("vocab_emb_dp", False):
        parallel_config["vocab_emb_dp"] = False  # as MindFormers' build_parallel_config does for pipelines
        notes.append("vocab_emb_dp reset to False (pipeline_stage > 1), as MindFormers does")
    if tp == 1:
        parallel_config["use_seq_parallel"] = False
    recompute_config = dict(raw.get("recompute_config") or {})
    recompute_config["recompute"] = layout.recompute
    par_yaml = dict(raw.get("parallel") or {})
    parallel: Dict[str, Any] = {}
    if world_size > 1 and not data_parallel_only:
        parallel = {"parallel_mode": "semi_auto_parallel", "full_batch": True, "gradients_mean": False,
                    "search_mode": "sharding_propagation", "enable_alltoall": False,
                    "strategy_ckpt_config": {"save_file": "./strategy/ckpt_strategy.ckpt", "only_trainable_params": False}}
        parallel.update({k: v for k, v in par_yaml.items() if k in PARALLEL_SECTION_KEYS})
        parallel["enable_parallel_optimizer"] = layout.optimizer_parallel
        if pp > 1:
            parallel["pipeline_stages"] = pp
            # the forward graphs' outputs (rollout logits, log-probs) from the last stage to every stage's host
            parallel["pipeline_result_broadcast"] = True
    dtypes = {k: str(mc.get(k, FP32_DTYPES[k])) for k in FP32_DTYPES}
    if data_parallel_only:
        engine = "kv_decoder"
        reason = ("TP = PP = 1 and no optimizer parallel: every device holds the full weights, so the project's "
                  "KV decoder runs over the actor's own Parameters (MatMul / Softmax / Gather have Ascend kernels); "
                  "no weight sync")
        reduction = ("AllReduce (HCCL) of the accumulated gradients in the optimizer cell (AdamWApply / FusedStep), "
                     "stand-alone mode as on CPU" if world_size > 1 else "none (one device)")
        wrapper = "recast_cells: GradAccumulator + AdamWApply, or FusedStep (recast_ms/trainer/optim.py)"
    else:
        engine = "sharded_full_forward"
        reason = (f"TP={tp}, PP={pp}, optimizer parallel={layout.optimizer_parallel}: under semi-auto-parallel each "
                  "device holds only its slice of each weight. The rollout reruns the actor's own semi-auto graph "
                  "(MindFormers' tensor-parallel layers, recast_ms.models.sharded.ShardedLogitsAt) on the whole "
                  "sequence per new token, each prompt encoded once for its G rows at the first token: no second "
                  "copy of the weights, no weight sync, no resharding. A response is L + 1 = 4 tokens, so the price "
                  "of having no KV cache is ~(L + 1) x the prompt forward per sample (docs/ascend.md); SID "
                  "constraints are applied to the host-side logits")
        reduction = "inserted by semi-auto-parallel (DP AllReduce / ReduceScatter with optimizer parallel)"
        wrapper = ("mindformers: MFTrainOneStepCell + AdamW (optimizer parallel from the context)" +
                   (f" over PipelineCellWithMultiOutputs(micro_batch_num={mbn})" if pp > 1 else
                    " over GradAccumulationCellWithMultiOutputs(actor micro-batches)") +
                   "; RL loss adapted to its contract (recast_ms/trainer/engines.py)")
    return RuntimePlan(
        device_target="Ascend", world_size=world_size, layout=layout,
        context={"mode": "GRAPH_MODE", "device_target": "Ascend", **ASCEND_CONTEXT},
        use_parallel=bool(parallel), parallel=parallel, parallel_config=parallel_config,
        recompute_config=recompute_config, dtypes=dtypes, use_flash_attention=bool(mc.get("use_flash_attention", False)),
        cpu_patches=(), gradient_reduction=reduction, train_wrapper=wrapper,
        rollout_engine=engine, rollout_reason=reason, actor_batch=batch, notes=notes)


def plan_from_config(cfg, world_size: int = 1, stage: str = "rl") -> Tuple[RuntimePlan, str]:
    """Resolve ``cfg.runtime.device_target`` and plan; returns (plan, why this device)."""
    device, why = resolve_device(cfg.runtime.device_target)
    require_device(device)
    return plan_runtime(cfg, device, world_size, stage=stage), why
