"""Build MindFormers' training-graph Qwen3 from the project's model YAMLs (``model_configs/*.yaml``).

A model YAML follows MindFormers' layout: ``model: model_config: {...}`` (Hugging Face Qwen3 keys plus
MindFormers keys), and for Ascend ``parallel_config`` and ``recompute_config``. Every key is checked: an
unknown one raises ``ValueError`` naming it.

Token convention shared by the policy and the trainer: every input row is exactly ``seq_length`` tokens,
right-padded with a dedicated ``pad_token_id`` (never an EOS id). MindFormers builds its causal mask once for
``seq_length`` and masks every key equal to ``pad_token_id``; positions are absolute, so padding goes right.

On CPU the model is built in fp32 with the CPU patches of :mod:`recast_ms.models.cpu_compat` applied; settings
that have no CPU implementation (bf16 compute, flash attention, attention dropout, model/pipeline parallelism,
recompute) are overridden and logged.

Set ``MS_DEV_HOST_BLOCKING_RUN=1`` before MindSpore starts its runtime (the commands do, through
``recast_ms.cli.configure_environment``; ``tests/conftest.py`` does too): without it the runtime's queue
busy-waits on one of the CPU cores.
"""
import copy
import inspect
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import yaml
import mindspore as ms

from recast_ms.models import cpu_compat

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs"

# ``parallel``: MindFormers' set_auto_parallel_context section (keys in recast_ms.runtime.PARALLEL_SECTION_KEYS),
# read by the runtime plan, not by the model build
TOP_LEVEL_KEYS = frozenset({"model", "parallel_config", "recompute_config", "parallel"})
MODEL_SECTION_KEYS = frozenset({"model_config"})

# settings without a CPU implementation, and the value the CPU build uses instead
CPU_MODEL_OVERRIDES = {
    "params_dtype": "float32",
    "compute_dtype": "float32",
    "layernorm_compute_dtype": "float32",
    "softmax_compute_dtype": "float32",
    "rotary_dtype": "float32",
    "use_flash_attention": False,
    "attention_dropout": 0.0,  # the CPU core attention has none; hidden_dropout is kept (cpu_compat.CpuDropout)
    "offset": 0,
}
CPU_PARALLEL_OVERRIDES = {"model_parallel": 1, "pipeline_stage": 1, "context_parallel": 1, "use_seq_parallel": False,
                          "micro_batch_num": 1}


def _mode_name(mode: Union[int, str]) -> str:
    if isinstance(mode, str):
        return mode
    return {ms.GRAPH_MODE: "GRAPH_MODE", ms.PYNATIVE_MODE: "PYNATIVE_MODE"}[mode]


def build_context(device_target: str = "CPU", mode: Union[int, str] = ms.GRAPH_MODE, *,
                  parallel: Optional[dict] = None, postprocess_use_numpy: bool = True,
                  run_mode: str = "train", use_parallel: bool = False, parallel_config: Optional[dict] = None,
                  **context):
    """Build MindFormers' (singleton) context for the training-graph Qwen3.

    ``use_legacy: False`` selects the training-graph model (the legacy path fails on this model);
    ``postprocess_use_numpy`` makes ``generate()`` sample on the host (its ``mint.topk`` has no CPU kernel).
    Extra keyword arguments go to the ``context`` section (MindSpore ``set_context`` keys). ``use_parallel`` /
    ``parallel`` / ``parallel_config`` are MindFormers' own sections (with ``use_parallel`` MindFormers runs
    ``communication.init()`` and ``set_auto_parallel_context(**parallel)``): the runtime plan's on Ascend. A second call with
    the same device target returns the existing context; a different one raises ``RuntimeError``.
    On CPU the :mod:`cpu_compat` patches are applied.
    """
    # pylint: disable=import-outside-toplevel
    import mindformers
    from mindformers.core.context.build_context import Context, get_context
    if Context.is_exists():
        current = ms.get_context("device_target")
        if current.upper() != device_target.upper() or get_context("use_legacy") is not False:
            raise RuntimeError(f"MindFormers context already built (device_target={current}, "
                               f"use_legacy={get_context('use_legacy')}); it is a process-wide singleton.")
        ctx = Context()
    else:
        config = {
            "context": {"mode": _mode_name(mode), "device_target": device_target, **context},
            "parallel": dict(parallel or {}),
            "use_parallel": bool(use_parallel),
            "parallel_config": dict(parallel_config or {}),
            "use_legacy": False,
            "run_mode": run_mode,
            "postprocess_use_numpy": postprocess_use_numpy,
        }
        ctx = mindformers.build_context(config)
    cpu_compat.apply_cpu_patches(device_target)
    return ctx


def _allowed_model_config_keys() -> frozenset:
    # pylint: disable=import-outside-toplevel
    from mindformers.models.qwen3 import Qwen3Config
    from mindformers.models.qwen3.config_converter_qwen3 import Qwen3ConfigConverter
    from mindformers.parallel_core.transformer_config_utils import DEFAULT_WHITE_KEY, ConfigLogHandler
    mapped = Qwen3ConfigConverter._get_final_mapping(ConfigLogHandler())  # pylint: disable=protected-access
    init_args = set(inspect.signature(Qwen3Config.__init__).parameters) - {"self", "kwargs"}
    return frozenset(set(mapped) | set(DEFAULT_WHITE_KEY) | init_args)


def _allowed_parallel_keys() -> frozenset:
    from mindformers.parallel_core.transformer_config_utils import PARALLEL_CONFIG_KEY  # pylint: disable=C0415
    return frozenset(PARALLEL_CONFIG_KEY)


def _allowed_recompute_keys() -> frozenset:
    from mindformers.modules.transformer import TransformerRecomputeConfig  # pylint: disable=C0415
    return frozenset(inspect.signature(TransformerRecomputeConfig.__init__).parameters) - {"self"}


def _reject_unknown(section: str, keys, allowed) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) in {section}: {', '.join(map(repr, unknown))}")


def load_model_yaml(model_yaml: Union[str, Path, dict]) -> dict:
    """Read (or copy) a model YAML and check every key; returns a plain dict."""
    if isinstance(model_yaml, dict):
        raw = copy.deepcopy(model_yaml)
        source = "model config"
    else:
        path = Path(model_yaml)
        if not path.exists() and (MODEL_CONFIG_DIR / path).exists():
            path = MODEL_CONFIG_DIR / path
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
        source = str(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) \
            or not isinstance(raw["model"].get("model_config"), dict):
        raise ValueError(f"{source}: expected a mapping with 'model: model_config: {{...}}'")
    _reject_unknown(f"{source} (top level)", raw, TOP_LEVEL_KEYS)
    _reject_unknown(f"{source} 'model'", raw["model"], MODEL_SECTION_KEYS)
    _reject_unknown(f"{source} 'model.model_config'", raw["model"]["model_config"], _allowed_model_config_keys())
    _reject_unknown(f"{source} 'parallel_config'", raw.get("parallel_config") or {}, _allowed_parallel_keys())
    _reject_unknown(f"{source} 'recompute_config'", raw.get("recompute_config") or {}, _allowed_recompute_keys())
    from recast_ms.runtime import PARALLEL_SECTION_KEYS  # pylint: disable=import-outside-toplevel
    _reject_unknown(f"{source} 'parallel'", raw.get("parallel") or {}, PARALLEL_SECTION_KEYS)
    return raw


def _eos_ids(eos) -> list:
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def build_qwen3_config(model_yaml: Union[str, Path, dict], *, vocab_size: Optional[int] = None,
                       seq_length: Optional[int] = None, pad_token_id: Optional[int] = None,
                       eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                       parallel_config: Optional[dict] = None, device_target: Optional[str] = None,
                       recompute_config: Optional[dict] = None, **model_overrides):
    """The ``Qwen3Config`` of a model YAML with run-time values filled in; builds no model.

    ``vocab_size``/``seq_length``/``pad_token_id``/``eos_token_id`` and ``model_overrides`` replace the YAML's
    ``model_config`` values; ``parallel_config`` / ``recompute_config`` replace its sections (the runtime plan's,
    ``recast_ms.runtime.plan_runtime``). On a CPU
    ``device_target`` (default: the MindSpore context's) the CPU overrides are applied and the YAML's
    ``parallel_config``/``recompute_config`` (Ascend layouts) are dropped: CPU data parallelism under msrun is
    opt-in, ``parallel_config={"data_parallel": N}``.
    """
    from mindformers.models.qwen3 import Qwen3Config  # pylint: disable=import-outside-toplevel
    raw = load_model_yaml(model_yaml)
    model_config = dict(raw["model"]["model_config"])
    runtime = {"vocab_size": vocab_size, "seq_length": seq_length, "pad_token_id": pad_token_id,
               "eos_token_id": eos_token_id, **model_overrides}
    _reject_unknown("model overrides", model_overrides, _allowed_model_config_keys())
    model_config.update({key: value for key, value in runtime.items() if value is not None})
    parallel = dict(raw.get("parallel_config") or {}) if parallel_config is None else dict(parallel_config)
    _reject_unknown("parallel_config", parallel, _allowed_parallel_keys())
    recompute = dict(raw.get("recompute_config") or {}) if recompute_config is None else dict(recompute_config)
    _reject_unknown("recompute_config", recompute, _allowed_recompute_keys())

    if device_target is None:
        device_target = ms.get_context("device_target")
    if cpu_compat.needs_cpu_patches(device_target):
        changed = {key: (model_config[key], value) for key, value in CPU_MODEL_OVERRIDES.items()
                   if key in model_config and model_config[key] != value}
        model_config.update(CPU_MODEL_OVERRIDES)
        if parallel_config is None:  # the YAML's parallel layout is for Ascend; CPU data parallelism is opt-in
            changed.update({f"parallel_config.{key}": (value, None) for key, value in parallel.items()})
            parallel = {}
        else:
            changed.update({f"parallel_config.{key}": (parallel[key], value) for key, value in
                            CPU_PARALLEL_OVERRIDES.items() if key in parallel and parallel[key] != value})
            parallel.update({key: value for key, value in CPU_PARALLEL_OVERRIDES.items() if key in parallel})
        changed.update({f"recompute_config.{key}": (value, None) for key, value in recompute.items()})
        recompute = {}
        if changed:
            logger.info("CPU build overrides (key: (yaml, used)): %s", changed)

    for key in ("vocab_size", "seq_length", "pad_token_id"):
        if model_config.get(key) is None:
            raise ValueError(f"{key} is not set: give it in the YAML or as build_qwen3({key}=...)")
    vocab, seq, pad = model_config["vocab_size"], model_config["seq_length"], model_config["pad_token_id"]
    if not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id={pad} outside the vocabulary [0, {vocab})")
    if pad in _eos_ids(model_config.get("eos_token_id")):
        raise ValueError(f"pad_token_id={pad} is also an EOS id: MindFormers masks every key equal to the pad id, "
                         "so the pad id must be a dedicated token")
    if seq > model_config.get("max_position_embeddings", seq):
        raise ValueError(f"seq_length={seq} exceeds max_position_embeddings={model_config['max_position_embeddings']}")
    if parallel or recompute:
        # pylint: disable=import-outside-toplevel
        from mindformers.modules.transformer import TransformerOpParallelConfig, TransformerRecomputeConfig
        model_config["parallel_config"] = TransformerOpParallelConfig(
            recompute=TransformerRecomputeConfig(**recompute), **parallel)
    return Qwen3Config(**model_config)


def build_qwen3(model_yaml: Union[str, Path, dict], *, vocab_size: Optional[int] = None,
                seq_length: Optional[int] = None, pad_token_id: Optional[int] = None,
                eos_token_id: Optional[Union[int, Sequence[int]]] = None, parallel_config: Optional[dict] = None,
                seed: Optional[int] = None, recompute_config: Optional[dict] = None, **model_overrides):
    """Build MindFormers' ``TrainingQwen3ForCausalLM`` from a model YAML (path, file name in
    ``model_configs/``, or dict).

    Builds the MindFormers context for the current MindSpore device target if none exists. On CPU: fp32,
    CPU patches applied. ``seed`` seeds the parameter initialisation. In eval mode (``set_train(False)``)
    ``model(input_ids)`` returns fp32 logits ``[B*S, V]`` for ``input_ids [B, S]`` int32 with S == seq_length.
    """
    # pylint: disable=import-outside-toplevel
    from mindformers.core.context.build_context import Context
    from mindformers.models.qwen3 import Qwen3ForCausalLM
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
    if not Context.is_exists():
        build_context(ms.get_context("device_target"))
    device_target = ms.get_context("device_target")
    config = build_qwen3_config(model_yaml, vocab_size=vocab_size, seq_length=seq_length,
                                pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                parallel_config=parallel_config, device_target=device_target,
                                recompute_config=recompute_config, **model_overrides)
    cpu_compat.apply_cpu_patches(device_target)
    if seed is not None:
        ms.set_seed(seed)
    model = Qwen3ForCausalLM(config)
    if not isinstance(model, TrainingQwen3ForCausalLM):
        raise RuntimeError(f"expected TrainingQwen3ForCausalLM, MindFormers built {type(model).__name__} "
                           "(RUN_MODE=predict or PyNative mode select other classes)")
    return model


def count_parameters(model) -> int:
    """Number of scalar parameters (a tied embedding counts once)."""
    return int(sum(np.prod(param.shape) for param in model.get_parameters()))


def right_pad(sequences: Sequence[Sequence[int]], seq_length: int, pad_token_id: int) -> np.ndarray:
    """Right-pad token lists to ``[B, seq_length]`` int32; a longer sequence raises ``ValueError``."""
    out = np.full((len(sequences), seq_length), pad_token_id, dtype=np.int32)
    for row, tokens in enumerate(sequences):
        if len(tokens) > seq_length:
            raise ValueError(f"sequence {row} has {len(tokens)} tokens > seq_length={seq_length}")
        out[row, :len(tokens)] = tokens
    return out
