"""Run configuration: validated dataclasses, YAML loading, command-line overrides.

Two levels, as in MindRLHF: a run YAML (data / sft / rl / eval / runtime sections) names a MindFormers model
YAML in ``model_configs/`` by path. Keys are identical in YAML, dataclass and command line
(``rl.group_size=32``). An unknown key anywhere is an error that names it; bad values are rejected
in ``__post_init__`` with the reason.
"""
from __future__ import annotations

import dataclasses
import difflib
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


def _f(default, help_text: str):
    """A config field with its help text (shown by every command's ``--help``), as TRL's ``field(metadata=...)``."""
    return field(default=default, metadata={"help": help_text})


class ConfigError(ValueError):
    """A run configuration (or plan) the user can fix; the message names the key and the value. Every command
    prints it as one line and exits 2 (``recast_ms.cli.command``); any other exception keeps its traceback."""


def _require(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    source: str = _f("synthetic", "data source: synthetic (embedded, no files) | amazon (MiniOneRec Amazon CSVs)")
    dataset: str = _f("Industrial_and_Scientific", "amazon: dataset folder name (Industrial_and_Scientific, Office_Products)")
    root: str = _f("", "amazon data root; empty: $RECAST_DATA_ROOT or ../shared/data/minionerec_amazon")
    seed: int = _f(0, "synthetic catalogue / user seed")
    with_titles: bool = _f(False, "render item titles into prompts next to their SIDs")
    text_vocab_size: int = _f(256, "learned sentencepiece pieces besides the SID tokens")
    valid_in_train: bool = _f(False, "amazon: add valid rows to SFT training (final runs only)")
    codebook_size: int = _f(16, "synthetic: codes per SID level")
    num_users: int = _f(600, "synthetic: users (each yields train/valid/test transitions)")
    # sparse-hit defaults: a calibrated policy hits ~3.5% of samples (most groups of 16 all-zero)
    # and the best last-item predictor reaches Pass@1 ~0.13, leaving room for RL
    p_successor: float = _f(0.1, "synthetic: probability the next item is its group's successor")
    p_sibling: float = _f(0.3, "synthetic: probability of a sibling sharing 2 codes")
    p_branch: float = _f(0.25, "synthetic: probability of an item under the same level-0 branch")
    p_jump: float = _f(0.15, "synthetic: probability of a jump to another preferred branch")
    max_rl_prompts: int = _f(0, "RL prompts taken from the valid split; 0 = all of them")
    max_eval_prompts: int = _f(300, "test prompts evaluated during RL; 0 = the whole test split")
    eval_subset_seed: int = _f(-1, "-1: evaluate on the first max_eval_prompts test rows; >= 0: on a seeded random "
                                   "subset of that size (the same rows for every run that sets it)")
    # model selection on rows neither RL nor the test ever sees (issue 24): carved out of valid before RL draws
    reserved_valid_rows: int = _f(0, "valid rows held out of the RL prompt pool (a seeded slice) for selection "
                                     "with eval.split=reserved; 0 = none (the RL pool is the whole valid split)")
    reserved_valid_seed: int = _f(0, "seed of the reserved valid slice (the same rows for every run that sets it)")

    def __post_init__(self):
        _require(self.source in ("synthetic", "amazon"), f"data.source must be 'synthetic' or 'amazon', got {self.source!r}")
        _require(self.codebook_size >= 2, "data.codebook_size must be >= 2")
        _require(self.max_rl_prompts >= 0 and self.max_eval_prompts >= 0, "data.max_*_prompts must be >= 0")
        _require(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")
        _require(self.reserved_valid_rows >= 0 and self.reserved_valid_seed >= 0,
                 f"data.reserved_valid_rows / data.reserved_valid_seed must be >= 0, got {self.reserved_valid_rows} / "
                 f"{self.reserved_valid_seed}")
        _require(self.eval_subset_seed >= -1, f"data.eval_subset_seed must be -1 (first rows) or >= 0, "
                                              f"got {self.eval_subset_seed}")


@dataclass
class SFTConfig:
    steps: int = _f(200, "optimizer steps")
    batch_size: int = _f(32, "sequences per optimizer step, GLOBAL: under msrun each data-parallel rank takes "
                            "batch_size / ranks of them (one static [batch, seq_length] graph per rank)")
    lr: float = _f(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "cosine decay floor, as a fraction of lr")
    warmup_steps: int = _f(20, "linear warm-up steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "global gradient-norm clip")
    eval_every: int = _f(100, "steps between validation-loss evaluations")
    save_every: int = _f(50, "steps between checkpoints (a kill loses at most this many)")
    log_every: int = _f(10, "steps between metric lines")
    keep_checkpoints: int = _f(2, "newest checkpoints kept (0 = all: a start chosen among them later, e.g. by valid "
                                  "Pass@1, needs every save_every checkpoint)")
    dropout: float = _f(0.0, "hidden-state dropout in the SFT training step only (MindFormers' hidden_dropout; on CPU "
                             "ops.Dropout); validation loss, evaluation and RL run without it. With dropout a resumed "
                             "run is not bit-identical to an uninterrupted one (the dropout RNG is not saved)")

    def __post_init__(self):
        _require(self.steps >= 1, "sft.steps must be >= 1")
        _require(self.batch_size >= 1, "sft.batch_size must be >= 1")
        _require(self.lr > 0, "sft.lr must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "sft.min_lr_ratio must be in [0, 1]")
        _require(0 <= self.warmup_steps < self.steps or self.steps == 1, "sft.warmup_steps must be < sft.steps")
        _require(self.save_every >= 1 and self.eval_every >= 1 and self.log_every >= 1, "sft.*_every must be >= 1")
        _require(self.keep_checkpoints >= 0,
                 f"sft.keep_checkpoints must be >= 0 (0 = all), got {self.keep_checkpoints}")
        _require(0.0 <= self.dropout < 1.0, f"sft.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class RLConfig:
    estimator: str = _f("recast", "advantage estimator (the registry in recast_ms/signals.py, listed below)")
    alpha: float = _f(1.0, "boundary estimators: advantage magnitude of the (positive, negative) pair")
    negative_weight: float = _f(1.0, "boundary estimators with a negative: the negative's advantage is "
                                     "-alpha * negative_weight (1 = ReCast; 0 = no negative loss, as anchor_only)")
    negative_mask: str = _f("full", "the negative row's loss mask: full (every response token) | divergent (only "
                                    "from the first token where it differs from its group's positive, so the shared "
                                    "prefix is not pushed down)")
    group_size: int = _f(16, "G: responses per prompt")
    prompts_per_step: int = _f(8, "P: prompts per optimizer step, GLOBAL on every backend: under msrun each "
                                  "data-parallel rank owns P / ranks whole groups (P must divide)")
    steps: int = _f(30, "optimizer steps")
    lr: float = _f(5e-5, "learning rate (2e-4 let ReCast drift, k3 KL 0.22 after 30 steps, on the synthetic default)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "global gradient-norm clip")
    clip_low: float = _f(0.2, "PPO ratio clip below 1")
    clip_high: float = _f(0.28, "PPO ratio clip above 1 (clip-higher)")
    kl_coef: float = _f(0.001, "k3 KL penalty to the frozen reference; 0 drops the reference model")
    temperature: float = _f(1.0, "sampling temperature (rl.rollout=sample), also applied to the trained log-probs")
    top_k: int = _f(0, "sampled rollouts: keep the k most likely tokens; 0 = off")
    top_p: float = _f(1.0, "sampled rollouts: nucleus mass; 1.0 = off")
    constrained: bool = _f(True, "rollouts follow the SID prefix trie (every response a catalogue item)")
    # on CPU a compiled graph keeps ~25 MB per row of the tiny model's grad graph (~39 MB per row per layer at
    # Qwen3-0.6B), so this sets the memory (README "Memory and speed")
    micro_batch_size: int = _f(16, "rows per forward/backward graph call (sets the memory on CPU)")
    rollout_rows: int = _f(256, "rows the rollout decodes at once (whole prompts); 0 = all P*G")
    ppo_epochs: int = _f(1, "optimizer passes per rollout; 1 = on-policy (no old-log-prob forward)")
    eps: float = _f(1e-6, "GRPO: added to the group standard deviation")
    eval_every: int = _f(10, "steps between test evaluations (when rl.eval_steps is empty)")
    eval_steps: Tuple[int, ...] = _f((), "explicit evaluation steps (0 = before training); the last step is always "
                                          "evaluated (a grid cell is finished when its last step has an evaluation)")
    save_every: int = _f(10, "steps between checkpoints")
    # the entropy is a second teacher-forced decode of the actor rows: ~1.2 s of a 6 s tiny-model GRPO step
    # (G = 16, P = 16) on the 2-core CPU, which a speed comparison should not carry
    log_entropy: bool = _f(True, "log policy/entropy_full and policy/entropy_sid every step (an extra forward over "
                                 "the actor rows); false for speed benchmarks")
    # beam: all-zero groups ~ 1 - Pass@G, as in OpenOneRec-RL's recipe; deterministic, no rollout RNG
    rollout: str = _f("sample", "group source: sample (G draws at rl.temperature) | beam (the G best SID-constrained "
                                "beams, temperature 1, no length normalisation: every constrained beam has the same "
                                "length; best first)")
    adaptive_target: float = _f(0.5, "recast_adaptive: repair probability = clip(1 - natural_ratio / target, floor, 1)")
    adaptive_floor: float = _f(0.0, "recast_adaptive: lowest repair probability")
    adaptive_momentum: float = _f(0.9, "recast_adaptive: EMA momentum of the naturally-trainable ratio")

    def __post_init__(self):
        from recast_ms.signals import ESTIMATORS

        _require(self.estimator in ESTIMATORS, f"rl.estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        _require(self.alpha > 0, f"rl.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.negative_weight < math.inf, f"rl.negative_weight must be a finite number >= 0, "
                                                       f"got {self.negative_weight}")
        _require(self.negative_mask in ("full", "divergent"),
                 f"rl.negative_mask must be 'full' or 'divergent', got {self.negative_mask!r}")
        est = ESTIMATORS[self.estimator]
        _require((self.negative_weight == 1.0 and self.negative_mask == "full") or (est.boundary and est.negative),
                 f"rl.negative_weight={self.negative_weight} / rl.negative_mask={self.negative_mask!r} shape a boundary "
                 f"estimator's negative row; rl.estimator={self.estimator!r} has none (leave them at 1.0 / full)")
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
        _require(self.rollout == "sample" or self.constrained,
                 "rl.rollout=beam needs rl.constrained=true (without the SID trie the unnormalised beam scores favour "
                 "short responses that name no catalogue item: such a run trained on nothing)")
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
    beam_width: int = _f(32, "beams of the evaluation beam search (K)")
    ks: Tuple[int, ...] = _f((1, 5, 10, 32), "cut-offs for Pass/Recall/NDCG@K (each <= beam_width)")
    batch_size: int = _f(16, "prompts per beam-search call (a fixed shape: the last batch is filled)")
    constrained: bool = _f(True, "beams follow the SID prefix trie")
    split: str = _f("test", "what RL-time evaluation scores: test | reserved (data.reserved_valid_rows valid rows "
                            "the RL sampler never draws: select variants there, confirm on test)")

    def __post_init__(self):
        self.ks = tuple(int(k) for k in self.ks)
        _require(self.beam_width >= 1, "eval.beam_width must be >= 1")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.split in ("test", "reserved"), f"eval.split must be 'test' or 'reserved', got {self.split!r}")
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
    device_target: str = _f("auto", "auto (Ascend when MindSpore can use it, else CPU) | CPU | Ascend")
    data_parallel: int = _f(0, "DP; 0 = from the model YAML / world size")
    model_parallel: int = _f(0, "TP (Ascend only); 0 = from the model YAML")
    pipeline_stage: int = _f(0, "PP stages (Ascend only); 0 = from the model YAML")
    micro_batch_num: int = _f(0, "pipeline micro-batches (pipeline_stage > 1)")
    optimizer_parallel: str = _f("auto", "auto (the model YAML's parallel.enable_parallel_optimizer) | true | false")
    recompute: str = _f("auto", "auto (the model YAML's recompute_config.recompute) | true | false")
    world_size: int = _f(0, "devices the run is meant for; 0 = whatever msrun gives (a mismatch is an error)")

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
    model_config: str = _f("model_configs/qwen3_tiny.yaml", "model YAML (MindFormers layout), relative to the repo")
    hf_checkpoint: str = _f("", "a Hugging Face Qwen3 directory (config.json, safetensors, tokenizer.json) to start from "
                                "instead of a random model_config; SID tokens are added to its vocabulary")
    seed: int = _f(0, "seed of the model init, the data order and every RNG stream")
    seq_length: int = _f(48, "prompt + response tokens, fixed: the compiled graphs never see another length")
    vocab_size: int = _f(0, "embedding rows; 0 = the tokenizer's vocabulary (larger pads it, as real Qwen3 does)")
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        _require(self.seq_length >= 8, "seq_length must be >= 8")
        _require(self.vocab_size >= 0, "vocab_size must be >= 0 (0: the tokenizer's vocabulary size)")
        _require(self.seed >= 0, f"seed must be >= 0 (MindSpore and numpy seeds are unsigned), got {self.seed}")
        # cross-field checks: caught here, before any data, model or run file is made
        r = self.rl
        _require(self.data.max_rl_prompts == 0 or self.data.max_rl_prompts >= r.prompts_per_step,
                 f"data.max_rl_prompts={self.data.max_rl_prompts} is fewer than rl.prompts_per_step={r.prompts_per_step}: "
                 "a step could not draw its prompts")
        _require(not (self.data.reserved_valid_rows and self.data.valid_in_train),
                 "data.reserved_valid_rows needs data.valid_in_train=false: with it the reserved rows are SFT training "
                 "rows and no longer unseen")
        _require(self.eval.split != "reserved" or self.data.reserved_valid_rows > 0,
                 "eval.split=reserved needs data.reserved_valid_rows > 0 (no valid row is reserved)")
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
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):  # inf / nan pass every `> 0` check and then train nothing or NaN at step 1
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (tuple, Tuple, list, List):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = get_args(typ)[0] if get_args(typ) else str
        return tuple(_coerce(v, inner, key) for v in value)
    return value


# keys older runs' stored config.yaml files hold that nothing reads any more: accepted and dropped (with a
# log line) so a committed run directory stays readable; an unknown key anywhere else is still an error
REMOVED_KEYS = {"output_dir": "the run directory is --run-dir / --out"}
_REMOVED_SEEN: set = set()


def config_help() -> str:
    """Every config key with its type, default and help text (the commands' ``--help`` epilog)."""
    from recast_ms.signals import ESTIMATORS

    lines = []
    for key, f, typ in _leaf_keys():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = getattr(typ, "__name__", None) or str(typ).replace("typing.", "")
        lines.append(f"  {key} ({name}, default {default!r}): {f.metadata.get('help', '')}")
        if key == "rl.estimator":
            lines.extend(f"      {n}: {e.help}" for n, e in ESTIMATORS.items())
    return "\n".join(lines)


def _leaf_keys(cls=None, prefix: str = ""):
    """``(dotted key, field, type)`` of every config leaf, in declaration order."""
    cls = cls or RunConfig
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, f, hints[f.name]


def _suggest(prefix: str, name: str, names) -> str:
    """``sft.group_size (did you mean rl.group_size?)``: the same name in another section, else a close
    spelling in this one."""
    elsewhere = [k for k, _, _ in _leaf_keys() if k.rsplit(".", 1)[-1] == name and k != prefix + name]
    close = [prefix + n for n in difflib.get_close_matches(name, sorted(names), n=1)]
    hint = elsewhere or close
    return prefix + name + (f" (did you mean {' or '.join(hint)}?)" if hint else "")


def from_dict(cls, d: Optional[Dict[str, Any]], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses; unknown keys raise."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    if not prefix:
        for key in REMOVED_KEYS.keys() & d.keys() - _REMOVED_SEEN:  # said once per process
            _REMOVED_SEEN.add(key)
            logger.info("config key %r is no longer used (%s); ignored", key, REMOVED_KEYS[key])
        d = {k: v for k, v in d.items() if k not in REMOVED_KEYS}
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f" in section '{prefix.rstrip('.')}'" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(_suggest(prefix, u, names) for u in unknown)}; "
                          f"known: {sorted(names)}")
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
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {ov!r}: the value is not a YAML scalar or list") from None
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
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if raw is None:
            raise ConfigError(f"{path}: the config file is empty (omit --config to run on the embedded defaults)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys and sections "
                             f"(model_config, data, sft, rl, eval, ...), got a {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return from_dict(RunConfig, raw)
    except ValueError as e:
        where = " + ".join(([path] if path else []) + (["command-line overrides"] if overrides else []))
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


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
        raise ConfigError(f"{what}: cannot read its config {stored_path} ({e})") from None
    diff = config_differences(stored, given)
    bad = {k: v for k, v in diff.items() if k in SHAPE_KEYS}
    if bad:
        raise ConfigError(f"{what} was written with a different " + ", ".join(
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
