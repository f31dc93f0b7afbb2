"""Run configuration: validated dataclasses, YAML loading, command-line overrides.

Two levels, as in MindRLHF: a run YAML (data / sft / rl / eval / runtime sections) names a MindFormers model
YAML in ``model_configs/`` by path. Keys are identical in YAML, dataclass and command line
(``rl.group_size=32``). An unknown key anywhere is an error that names it; bad values are rejected
in ``__post_init__`` with the reason.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, get_args, get_origin, get_type_hints

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger(__name__)

# Keys a resumed run may not change: they fix the tokenizer, the vocabulary or a tensor shape, so a
# checkpoint written under one value cannot continue under another. Every other key may change on
# resume (e.g. rl.eval_every, sft.lr); the differences are logged.
SHAPE_KEYS = ("model_config", "hf_checkpoint", "seq_length", "data.source", "data.dataset", "data.codebook_size",
              "data.text_vocab_size")


def _require(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | amazon
    dataset: str = "Industrial_and_Scientific"
    root: str = ""  # amazon data root; "" -> $RECAST_DATA_ROOT or ../shared/data/minionerec_amazon
    seed: int = 0
    with_titles: bool = False
    text_vocab_size: int = 256  # learned sentencepiece pieces besides the SID tokens
    valid_in_train: bool = False  # amazon: add valid rows to SFT training (final runs only)
    # synthetic catalogue (recast_ms.data.synthetic.SyntheticConfig)
    codebook_size: int = 16
    num_users: int = 600
    # sparse-hit defaults: a calibrated policy hits ~3.5% of samples (most groups of 16 all-zero)
    # and the best last-item predictor reaches Pass@1 ~0.13, leaving room for RL
    p_successor: float = 0.1
    p_sibling: float = 0.3
    p_branch: float = 0.25
    p_jump: float = 0.15
    max_rl_prompts: int = 0  # 0 = every validation sample is an RL prompt
    max_eval_prompts: int = 300  # 0 = the whole test split
    # -1: evaluate on the first max_eval_prompts test rows; >= 0: on a random subset of that size drawn
    # with this seed (recast_ms.evaluation.eval_subset), the same rows for every run that sets it
    eval_subset_seed: int = -1

    def __post_init__(self):
        _require(self.source in ("synthetic", "amazon"), f"data.source must be 'synthetic' or 'amazon', got {self.source!r}")
        _require(self.codebook_size >= 2, "data.codebook_size must be >= 2")
        _require(self.max_rl_prompts >= 0 and self.max_eval_prompts >= 0, "data.max_*_prompts must be >= 0")
        _require(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")
        _require(self.eval_subset_seed >= -1, f"data.eval_subset_seed must be -1 (first rows) or >= 0, "
                                              f"got {self.eval_subset_seed}")


@dataclass
class SFTConfig:
    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 50
    log_every: int = 10

    def __post_init__(self):
        _require(self.steps >= 1, "sft.steps must be >= 1")
        _require(self.batch_size >= 1, "sft.batch_size must be >= 1")
        _require(self.lr > 0, "sft.lr must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "sft.min_lr_ratio must be in [0, 1]")
        _require(0 <= self.warmup_steps < self.steps or self.steps == 1, "sft.warmup_steps must be < sft.steps")
        _require(self.save_every >= 1 and self.eval_every >= 1 and self.log_every >= 1, "sft.*_every must be >= 1")


@dataclass
class RLConfig:
    estimator: str = "recast"  # grpo | repair_only | boundary_only | recast | recast_adaptive | anchor_only
    alpha: float = 1.0
    group_size: int = 16
    prompts_per_step: int = 8
    steps: int = 30
    lr: float = 5e-5  # 2e-4 let ReCast drift (k3 KL 0.22 after 30 steps) on the synthetic default; see README
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.001
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    constrained: bool = True
    # rows per forward/backward graph call; on CPU a compiled graph keeps ~25 MB per row of the tiny model's grad
    # graph (~39 MB per row per layer at Qwen3-0.6B), so this sets the memory (README "Memory and speed")
    micro_batch_size: int = 16
    # rows the rollout decodes at once (whole prompts; 0 = all P*G): a decode graph's memory grows with its rows
    rollout_rows: int = 256
    ppo_epochs: int = 1
    eps: float = 1e-6
    eval_every: int = 10
    # explicit evaluation steps (0 = before training); empty: every eval_every steps. The last step is
    # always evaluated (a grid cell is finished when its last step has an evaluation)
    eval_steps: Tuple[int, ...] = ()
    save_every: int = 10
    # where a group comes from: "sample" draws G responses per prompt at rl.temperature (top_k / top_p);
    # "beam" takes the G best beams of the SID-constrained beam search evaluation runs (temperature 1, no
    # length normalisation: every constrained beam has the same length), best first, as OpenOneRec-RL's
    # recipe forms its groups; then all-zero groups ~ 1 - Pass@G. Deterministic: no rollout RNG is used.
    rollout: str = "sample"
    # adaptive repair (recast_adaptive): repair probability = clip(1 - natural_ratio / target, floor, 1)
    adaptive_target: float = 0.5
    adaptive_floor: float = 0.0
    adaptive_momentum: float = 0.9

    def __post_init__(self):
        from recast_ms.signals import ESTIMATORS

        names = sorted(ESTIMATORS) + ["recast_adaptive"]
        _require(self.estimator in names, f"rl.estimator must be one of {names}, got {self.estimator!r}")
        _require(self.alpha > 0, f"rl.alpha must be > 0, got {self.alpha}")
        _require(self.group_size >= 2, f"rl.group_size must be >= 2, got {self.group_size}")
        _require(self.prompts_per_step >= 1, "rl.prompts_per_step must be >= 1")
        _require(self.steps >= 1, "rl.steps must be >= 1")
        _require(self.lr > 0, "rl.lr must be > 0")
        _require(0 <= self.clip_low < 1 and self.clip_high >= 0, "rl.clip_low must be in [0, 1) and rl.clip_high >= 0")
        _require(self.kl_coef >= 0, "rl.kl_coef must be >= 0")
        _require(self.temperature > 0, "rl.temperature must be > 0")
        _require(self.top_k >= 0 and 0 < self.top_p <= 1, "rl.top_k must be >= 0 and rl.top_p in (0, 1]")
        _require(self.micro_batch_size >= 1 and self.ppo_epochs >= 1, "rl.micro_batch_size and rl.ppo_epochs must be >= 1")
        _require(self.rollout_rows >= 0, "rl.rollout_rows must be >= 0 (0: all P*G rows at once)")
        _require(0 < self.adaptive_target <= 1 and 0 <= self.adaptive_floor <= 1, "rl.adaptive_target in (0, 1], rl.adaptive_floor in [0, 1]")
        _require(0 <= self.adaptive_momentum < 1, "rl.adaptive_momentum must be in [0, 1)")
        _require(self.rollout in ("sample", "beam"), f"rl.rollout must be 'sample' or 'beam', got {self.rollout!r}")
        _require(self.rollout == "sample" or (self.top_k == 0 and self.top_p == 1.0),
                 "rl.top_k / rl.top_p shape sampled rollouts only; with rl.rollout=beam leave them at 0 / 1.0")
        self.eval_steps = tuple(sorted({int(s) for s in self.eval_steps}))
        _require(all(0 <= s <= self.steps for s in self.eval_steps),
                 f"rl.eval_steps {list(self.eval_steps)} must lie in [0, rl.steps={self.steps}]")

    def eval_due(self, step: int) -> bool:
        """Whether the RL loop evaluates after ``step`` optimizer steps (0: the starting policy)."""
        if step == self.steps:
            return True
        if self.eval_steps:
            return step in self.eval_steps
        return step % self.eval_every == 0


@dataclass
class EvalConfig:
    beam_width: int = 32
    ks: Tuple[int, ...] = (1, 5, 10, 32)
    batch_size: int = 16
    constrained: bool = True

    def __post_init__(self):
        self.ks = tuple(int(k) for k in self.ks)
        _require(self.beam_width >= 1, "eval.beam_width must be >= 1")
        _require(all(1 <= k <= self.beam_width for k in self.ks), f"eval.ks {self.ks} must lie in [1, beam_width={self.beam_width}]")


@dataclass
class RuntimeConfig:
    """Device and parallel layout of a run (``runtime:`` section); resolved by ``recast_ms.runtime.plan_runtime``.

    ``device_target``: ``auto`` (Ascend when MindSpore can use it, else CPU; logged), ``CPU`` or ``Ascend``.
    The layout keys default to the model YAML's ``parallel_config`` / ``recompute_config`` / ``parallel``
    sections (0 or ``auto`` = take the YAML's); a value here overrides it. ``data_parallel = 0`` takes the
    YAML's DP when DP x TP x PP equals the world size, else world / (TP x PP). On CPU only data parallel
    exists (msrun ranks, gradients all-reduced in the optimizer cell): TP or PP > 1 on CPU is an error.
    ``world_size``: the device count the run is meant for (0 = whatever msrun gives); a mismatch is an error.
    """
    device_target: str = "auto"  # auto | CPU | Ascend
    data_parallel: int = 0
    model_parallel: int = 0
    pipeline_stage: int = 0
    micro_batch_num: int = 0  # pipeline micro-batches (pipeline_stage > 1)
    optimizer_parallel: str = "auto"  # auto (the model YAML's parallel.enable_parallel_optimizer) | true | false
    recompute: str = "auto"  # auto (the model YAML's recompute_config.recompute) | true | false
    world_size: int = 0

    def __post_init__(self):
        dev = str(self.device_target).strip()
        canon = {"auto": "auto", "cpu": "CPU", "ascend": "Ascend"}
        _require(dev.lower() in canon, f"runtime.device_target must be auto, CPU or Ascend, got {self.device_target!r}")
        self.device_target = canon[dev.lower()]
        for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "world_size"):
            _require(getattr(self, key) >= 0, f"runtime.{key} must be >= 0 (0 = from the model YAML), got {getattr(self, key)}")
        for key in ("optimizer_parallel", "recompute"):
            val = str(getattr(self, key)).strip().lower()
            _require(val in ("auto", "true", "false"), f"runtime.{key} must be auto, true or false, got {getattr(self, key)!r}")
            setattr(self, key, val)


@dataclass
class RunConfig:
    model_config: str = "model_configs/qwen3_tiny.yaml"
    # a Hugging Face Qwen3 checkpoint directory (config.json, safetensors, tokenizer.json) to start
    # from instead of a randomly initialised model_config; SID tokens are added to its vocabulary
    hf_checkpoint: str = ""
    output_dir: str = "runs/default"
    seed: int = 0
    seq_length: int = 48  # prompt + response, fixed: the compiled graphs never see another length
    # embedding rows of the model; 0 = the tokenizer's vocabulary size. Larger pads the vocabulary, as real
    # Qwen3 does (151,936 rows for 151,669 tokens); used by scripts/bench_scale.py for the real 0.6B shape
    vocab_size: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        _require(self.seq_length >= 8, "seq_length must be >= 8")
        _require(self.vocab_size >= 0, "vocab_size must be >= 0 (0: the tokenizer's vocabulary size)")
        _require(self.seed >= 0, f"seed must be >= 0 (MindSpore and numpy seeds are unsigned), got {self.seed}")
        _require(not self.hf_checkpoint or os.path.isdir(self.hf_checkpoint),
                 f"hf_checkpoint {self.hf_checkpoint!r} is not a directory")
        # checked here, before any data, tokenizer or run-directory file is made
        _require(bool(self.hf_checkpoint) or os.path.isfile(self.model_config_path),
                 f"model_config {self.model_config!r}: no such file ({self.model_config_path})")

    @property
    def model_config_path(self) -> str:
        p = self.model_config
        return p if os.path.isabs(p) else os.path.join(REPO_ROOT, p)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _coerce(value, typ, key: str):
    origin = get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):  # inf / nan pass every `> 0` check and then train nothing or NaN at step 1
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (tuple, Tuple, list, List):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        inner = get_args(typ)[0] if get_args(typ) else str
        return tuple(_coerce(v, inner, key) for v in value)
    return value


def from_dict(cls, d: Optional[Dict[str, Any]], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys raise."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f" in section '{prefix.rstrip('.')}'" if prefix else ""
        raise ValueError(f"unknown config key(s){where}: {', '.join(prefix + u for u in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        typ = hints[k]
        if dataclasses.is_dataclass(typ):
            kwargs[k] = from_dict(typ, v, prefix + k + ".")
        else:
            kwargs[k] = _coerce(v, typ, prefix + k)
    return cls(**kwargs)


def apply_overrides(d: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``["rl.group_size=32", "seed=1"]`` -> nested dict updates (values parsed as YAML scalars)."""
    d = dict(d)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return d


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run YAML (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    An empty file or one whose top level is not a mapping is an error (an empty file would otherwise
    train on the defaults without a word)."""
    raw: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if raw is None:
            raise ValueError(f"{path}: the config file is empty (omit --config to run on the embedded defaults)")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of keys and sections "
                             f"(model_config, data, sft, rl, eval, ...), got a {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return from_dict(RunConfig, raw)
    except ValueError as e:
        where = " + ".join(([path] if path else []) + (["command-line overrides"] if overrides else []))
        raise ValueError(f"{where}: {e}" if where else str(e)) from None


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(stored: RunConfig, given: RunConfig) -> Dict[str, Tuple[Any, Any]]:
    """``key -> (stored, given)`` for every key whose value differs (``model_config`` compared as a path)."""
    a, b = _flat(stored.to_dict()), _flat(given.to_dict())
    a["model_config"], b["model_config"] = (os.path.realpath(c.model_config_path) for c in (stored, given))
    for c, d in ((stored, a), (given, b)):
        if c.hf_checkpoint:
            d["hf_checkpoint"] = os.path.realpath(c.hf_checkpoint)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_compatible(stored_path: str, given: RunConfig, what: str) -> None:
    """Compare the config a run (or checkpoint) was written under with the one given now.

    A difference in a ``SHAPE_KEYS`` key is an error naming each such key (the checkpoint cannot
    continue under it); other differences are allowed and logged. ``what`` names the stored side in
    messages (``"run runs/sft"``)."""
    try:
        stored = load_config(stored_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: cannot read its config {stored_path} ({e})") from None
    diff = config_differences(stored, given)
    bad = {k: v for k, v in diff.items() if k in SHAPE_KEYS}
    if bad:
        raise ValueError(f"{what} was written with a different " + ", ".join(
            f"{k} ({v[0]!r}, now {v[1]!r})" for k, v in bad.items())
            + "; these keys fix the tokenizer, vocabulary or tensor shapes. Use the run's own values, "
              "or start a new run (another --run-dir, or --fresh)")
    if diff:
        logger.info("%s: config differs from %s in %s", what, stored_path,
                    ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in diff.items()))


def save_config(cfg: RunConfig, path: str):
    """Written atomically (a kill mid-write leaves the previous file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    d = cfg.to_dict()
    d["eval"]["ks"] = list(d["eval"]["ks"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    os.replace(tmp, path)
