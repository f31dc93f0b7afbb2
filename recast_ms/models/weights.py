"""Weights of MindFormers' training-graph Qwen3: Hugging Face checkpoints in (the project's own training-state
checkpoints are ``recast_ms/trainer/checkpoint.py``), and the one :func:`set_parameters` every load goes through.

Hugging Face checkpoints (``config.json`` + ``model.safetensors`` or sharded ``model-*.safetensors`` with
``model.safetensors.index.json``) are read offline by a small safetensors reader of our own (fp32/fp16/bf16
tensors, memory-mapped) and converted here, not by ``mindformers.checkpoint.load_hf_checkpoint``, because in
mindformers 1.9.0 that loader (measured):

* always interleaves gate/up rows into ``linear_fc1`` (its ``ConcatConvertOp``) and always groups q/k/v per kv
  head, whatever ``use_interleaved_weight_layout_mlp`` / ``use_contiguous_weight_layout_attention`` say, so a
  model with the contiguous [gate; up] layout (our CPU YAMLs) gets wrong weights without an error;
* only logs missing or unused tensors, and cannot load a checkpoint into a model with a larger vocabulary.

The conversion below follows MindFormers' own layouts (``ModelMixin.concat_qkv_interleaved`` /
``concat_qkv_contiguous`` / ``concat_linear_fc1_interleaved`` / ``concat_linear_fc1_contiguous``); tests check it
against an independent numpy Hugging Face Qwen3 forward and against ``load_hf_checkpoint`` for the layout the
latter handles.

Vocabulary extension: SID tokens added by the tokenizer get ids past the checkpoint's vocabulary (and the
dedicated pad/eos tokens may too); :func:`load_hf_qwen3` builds the model with the tokenizer's vocabulary and
initialises the new embedding rows (and ``lm_head`` rows when untied) as the mean of the existing rows plus
seeded Gaussian noise of ``noise_scale`` times their per-dimension standard deviation. Why the mean: a new
output row ``e_new = mean(e)`` gives every new token the logit ``h . mean(e)``, the average of the old tokens'
logits, so the new tokens start with a small share of the probability mass and the old tokens' distribution
barely moves (Hewitt, 2021, "Initializing new word embeddings for pretrained language models"); zero or
freshly random rows can instead give logits far from the old ones. As an input row the mean is an
"average token" the network already knows how to process. The small noise makes the rows of different SID
tokens differ from the first step. Old rows are never touched, so the logits of old tokens on sequences of
old tokens are exactly those of the unextended model.

Every error about a checkpoint is a :class:`CheckpointError` (a ``ValueError``) naming the file and the
tensor(s) concerned.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Parameter, Tensor

from recast_ms.models.layout import fuse_gate_up, fuse_qkv

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_NOISE_SCALE = 0.1

# tensors a Hugging Face Qwen3 checkpoint may hold that the model does not use
_IGNORABLE_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model; the message names the file and tensor(s)."""


# ============================================================================================ safetensors reader

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and checked, tensors memory-mapped on demand.

    Format: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``
    (plus an optional ``__metadata__``), then the data. Every offset and size is checked against the file
    length, so a truncated or garbage file raises :class:`CheckpointError` naming the file (and the tensor).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, truncated?)")
                header_len = int.from_bytes(head, "little")
                if header_len < 2 or 8 + header_len > size:
                    raise CheckpointError(f"{self.path}: not a safetensors file (header length {header_len} does "
                                          f"not fit in {size} bytes: truncated or corrupt)")
                raw = handle.read(header_len)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read ({err})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), \
                    entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dtype]).itemsize
            if not 0 <= begin <= end or end - begin != nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                                      f"[{begin}, {end}) inconsistent with its size {nbytes} bytes")
            if end > data_len:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {end} of the data but the file "
                                      f"holds only {data_len} data bytes (truncated)")
            self._entries[name] = (dtype, shape, int(begin), int(end))

    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> str:
        return self._entries[name][0]

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """The tensor as a (new, writable) ``dtype`` array; bf16 is widened exactly."""
        st_dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        raw = np.memmap(self.path, dtype=_ST_DTYPES[st_dtype], mode="r", offset=self._data_start + begin,
                        shape=(int(np.prod(shape, dtype=np.int64)),))
        if st_dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw
        return np.array(out, dtype=dtype).reshape(shape)


class HFTensors:
    """The tensors of a Hugging Face checkpoint directory: ``model.safetensors.index.json`` (sharded), else
    ``model.safetensors``, else every ``*.safetensors`` file. Each tensor name must appear in exactly one file."""

    def __init__(self, hf_dir: PathLike):
        self.dir = Path(hf_dir)
        self.files: Dict[str, SafetensorsFile] = {}
        self.where: Dict[str, SafetensorsFile] = {}
        index_path = self.dir / SAFETENSORS_INDEX
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
                raise CheckpointError(f"{index_path}: unreadable index ({type(err).__name__}: {err})") from None
            for name, file_name in weight_map.items():
                shard = self._open(self.dir / file_name, f"(listed for tensor {name!r} in {index_path})")
                if name not in shard:
                    raise CheckpointError(f"{shard.path}: tensor {name!r} is missing (the index {index_path} "
                                          "places it in this file)")
                self.where[name] = shard
            return
        paths = [self.dir / SAFETENSORS_FILE] if (self.dir / SAFETENSORS_FILE).exists() \
            else sorted(self.dir.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.dir}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or *.safetensors file")
        for path in paths:
            shard = self._open(path, "")
            for name in shard.keys():
                if name in self.where:
                    raise CheckpointError(f"tensor {name!r} is in both {self.where[name].path} and {path}")
                self.where[name] = shard

    def _open(self, path: Path, context: str) -> SafetensorsFile:
        if path not in self.files:
            if not path.exists():
                raise CheckpointError(f"{path}: file not found {context}".rstrip())
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def names(self) -> List[str]:
        return list(self.where)

    def file_of(self, name: str) -> Path:
        return self.where[name].path

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)


# ============================================================================================ Hugging Face config

def read_hf_config(hf_dir: PathLike) -> dict:
    """``config.json`` of a Hugging Face Qwen3 checkpoint, checked to be a dense Qwen3 this loader handles."""
    path = Path(hf_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable config ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type != "qwen3":
        raise CheckpointError(f"{path}: model_type={model_type!r}; only dense 'qwen3' checkpoints are supported")
    unsupported = {
        "rope_scaling": config.get("rope_scaling") not in (None, {}),
        "use_sliding_window": bool(config.get("use_sliding_window")),
        "attention_bias": bool(config.get("attention_bias")),
        "hidden_act": config.get("hidden_act", "silu") != "silu",
    }
    bad = [f"{key}={config.get(key)!r}" for key, flag in unsupported.items() if flag]
    if bad:
        raise CheckpointError(f"{path}: unsupported setting(s) {', '.join(bad)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{path}: {key} missing or not an integer")
    return config


def _dims(config: Mapping) -> Tuple[int, int, int, int, int, int, int]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return (config["vocab_size"], hidden, config["intermediate_size"], config["num_hidden_layers"], heads,
            kv_heads, head_dim)


def hf_model_yaml(config: Mapping, *, contiguous_mlp: bool = True, **model_overrides) -> dict:
    """A model YAML dict (``{'model': {'model_config': ...}}``, the schema of ``model_configs/*.yaml``) for
    :func:`recast_ms.models.qwen3.build_qwen3` from a Hugging Face Qwen3 ``config.json`` dict.

    Hugging Face keys are copied; MindFormers keys are set for a Qwen3 (q/k norm, RoPE, no biases, no dropout,
    fp32; ``build_qwen3`` applies the CPU overrides on CPU anyway). ``contiguous_mlp`` picks the [gate; up]
    ``linear_fc1`` layout (cheaper on CPU) over the interleaved one. ``model_overrides`` replace any key
    (e.g. ``compute_dtype='bfloat16'`` on Ascend).
    """
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = _dims(config)
    tied = bool(config.get("tie_word_embeddings", False))
    model_config = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "hidden_act": "swiglu",  # HF "silu" on the gate of a gated MLP; MindFormers names the pair swiglu
        "max_position_embeddings": config.get("max_position_embeddings", 40960),
        "initializer_range": config.get("initializer_range", 0.02),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(config.get("rope_theta", 1e6)),
        "tie_word_embeddings": tied, "untie_embeddings_and_output_weights": not tied,
        "attention_bias": False, "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "position_embedding_type": "rope",
        "qk_layernorm": True, "add_bias_linear": False, "use_flash_attention": False,
        "use_contiguous_weight_layout_attention": False, "use_interleaved_weight_layout_mlp": not contiguous_mlp,
        "offset": 0, "params_dtype": "float32", "compute_dtype": "float32", "layernorm_compute_dtype": "float32",
        "softmax_compute_dtype": "float32", "rotary_dtype": "float32",
    }
    model_config.update(model_overrides)
    return {"model": {"model_config": model_config}}


def hf_tensor_shapes(config: Mapping) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the tensors of a Hugging Face Qwen3 checkpoint (``lm_head.weight`` only if untied)."""
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = _dims(config)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "self_attn.q_norm.weight": (head_dim,),
            prefix + "self_attn.k_norm.weight": (head_dim,),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def check_hf_tensors(tensors: HFTensors, config: Mapping, *, strict: bool = True) -> None:
    """CheckpointError naming the missing, mis-shaped (with file) or, if ``strict``, unexpected tensors."""
    expected = hf_tensor_shapes(config)
    missing = [name for name in expected if name not in tensors.where]
    if missing:
        files = ", ".join(sorted(path.name for path in tensors.files)) or "(no file)"
        raise CheckpointError(f"{tensors.dir}: {len(missing)} tensor(s) missing from the checkpoint ({files}): "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, shape in expected.items():
        got = tensors.shape(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{tensors.file_of(name)}: tensor {name!r} has shape {list(got)}, "
                                  f"config.json implies {list(shape)}")
    tied_head = config.get("tie_word_embeddings", False) and "lm_head.weight" in tensors.where
    if tied_head:
        logger.info("%s: lm_head.weight ignored (tie_word_embeddings=true)", tensors.file_of("lm_head.weight"))
    unexpected = [name for name in tensors.names() if name not in expected and not name.endswith(
        _IGNORABLE_HF_SUFFIXES) and not (tied_head and name == "lm_head.weight")]
    if unexpected:
        message = (f"{tensors.dir}: {len(unexpected)} tensor(s) that a Qwen3 with this config.json does not have: "
                   f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if strict:
            raise CheckpointError(message)
        logger.warning("%s (ignored)", message)


# ============================================================================================ conversion

def extend_rows(matrix: np.ndarray, num_rows: int, new_rows: Optional[Iterable[int]] = None, *,
                rng: Optional[np.random.Generator] = None, noise_scale: float = DEFAULT_NOISE_SCALE) -> np.ndarray:
    """``matrix [V_old, H]`` grown to ``[num_rows, H]``; the rows ``new_rows`` (default: every row past V_old;
    rows below V_old may be listed too, e.g. tokens added into a padded vocabulary) are set to the mean of the
    other old rows plus ``N(0, (noise_scale * std)^2)`` noise, std taken per dimension over those rows."""
    old_vocab, hidden = matrix.shape
    if num_rows < old_vocab:
        raise ValueError(f"cannot shrink {old_vocab} rows to {num_rows}")
    new = np.arange(old_vocab, num_rows) if new_rows is None else np.unique(np.asarray(list(new_rows), np.int64))
    if new.size and (new.min() < 0 or new.max() >= num_rows):
        raise ValueError(f"new row ids must lie in [0, {num_rows}), got {new.min()}..{new.max()}")
    keep = np.ones(old_vocab, bool)
    keep[new[new < old_vocab]] = False
    if not keep.any():
        raise ValueError("no old rows left to initialise the new rows from")
    base = matrix[keep].astype(np.float64)
    mean, std = base.mean(0), base.std(0)
    rng = np.random.default_rng(0) if rng is None else rng
    out = np.empty((num_rows, hidden), matrix.dtype)
    out[:old_vocab] = matrix
    out[new] = (mean + noise_scale * std * rng.standard_normal((new.size, hidden))).astype(matrix.dtype)
    return out


def named_parameters(model) -> Dict[str, Parameter]:
    """``{param.name: Parameter}``, each shared (tied) parameter once. ``param.name`` is the name MindSpore's
    checkpoints, ``load_param_into_net`` and optimizer moments (``adam_m.<name>``) use; for MindFormers' Qwen3 it
    lacks the ``model.`` that ``parameters_and_names`` adds (``embedding.word_embeddings.weight``)."""
    return {param.name: param for param in model.get_parameters()}


def _model_prefix(model) -> str:
    suffix = "embedding.word_embeddings.weight"
    for name in named_parameters(model):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    raise ValueError("the model has no 'embedding.word_embeddings.weight': not a MindFormers GPT model")


def hf_sources(tensors: HFTensors, config: Mapping, transformer_config, *, prefix: str = "",
               vocab_size: Optional[int] = None, new_token_ids: Optional[Iterable[int]] = None,
               seed: int = 0, noise_scale: float = DEFAULT_NOISE_SCALE) -> Dict[str, Tuple[Callable[[], np.ndarray], str]]:
    """``{mindformers_name: (make, source description)}``: ``make()`` reads (memory-mapped) and converts that one
    tensor only, so a rank of a sharded run can cut its slice of each weight in turn without ever holding the
    whole model (:func:`recast_ms.trainer.sharded_checkpoint.load_slices`). :func:`load_hf_weights` makes them
    all at once."""
    _, _, _, layers, _, kv_heads, _ = _dims(config)
    qkv_contiguous = bool(getattr(transformer_config, "use_contiguous_weight_layout_attention", False))
    mlp_interleaved = bool(getattr(transformer_config, "use_interleaved_weight_layout_mlp", False))
    out = {}

    def put(mf_name, make, *hf_names):
        out[prefix + mf_name] = (make, ", ".join(f"{n!r} ({tensors.file_of(n)})" for n in hf_names))

    for layer in range(layers):
        hf, mf = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        qkv = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        put(mf + "self_attention.linear_qkv.weight",
            lambda names=qkv: fuse_qkv(*(tensors.get(n) for n in names), kv_heads, contiguous=qkv_contiguous), *qkv)
        fc1 = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        put(mf + "mlp.linear_fc1.weight",
            lambda names=fc1: fuse_gate_up(*(tensors.get(n) for n in names), interleaved=mlp_interleaved), *fc1)
        for hf_name, mf_name in (("self_attn.o_proj", "self_attention.linear_proj"),
                                 ("self_attn.q_norm", "self_attention.q_layernorm"),
                                 ("self_attn.k_norm", "self_attention.k_layernorm"),
                                 ("mlp.down_proj", "mlp.linear_fc2"), ("input_layernorm", "input_layernorm"),
                                 ("post_attention_layernorm", "pre_mlp_layernorm")):
            name = f"{hf}{hf_name}.weight"
            put(f"{mf}{mf_name}.weight", lambda name=name: tensors.get(name), name)
    put("decoder.final_layernorm.weight", lambda: tensors.get("model.norm.weight"), "model.norm.weight")

    heads = [("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if not config.get("tie_word_embeddings", False):
        heads.append(("output_layer.weight", "lm_head.weight"))

    def head(index: int) -> np.ndarray:
        # each head draws its new rows from its own generator, seeded by (seed, head index): a head's rows are the
        # same whichever order the heads are made in, without remaking the heads before it
        _, hf_name = heads[index]
        matrix = tensors.get(hf_name)
        rows = matrix.shape[0] if vocab_size is None else vocab_size
        if rows != matrix.shape[0] or new_token_ids is not None:
            matrix = extend_rows(matrix, rows, new_token_ids, rng=np.random.default_rng((seed, index)),
                                 noise_scale=noise_scale)
        return matrix

    for i, (mf_name, hf_name) in enumerate(heads):
        put(mf_name, lambda i=i: head(i), hf_name)
    return out


def _check_names(source, wanted, available, strict: bool, missing_msg: str, unexpected_msg: str) -> None:
    """Raise :class:`CheckpointError` naming (up to 8) wanted names absent from ``available`` and, when
    ``strict``, available names nobody wants."""
    def listed(names):
        return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")

    missing = [name for name in wanted if name not in available]
    if missing:
        raise CheckpointError(f"{source}: {missing_msg}{listed(missing)}")
    unexpected = [name for name in available if name not in wanted]
    if unexpected and strict:
        raise CheckpointError(f"{source}: {unexpected_msg}{listed(unexpected)}")


def set_parameters(model, arrays: Mapping[str, Tuple[np.ndarray, str]], source: str, *,
                    strict: bool = True) -> None:
    """Set every parameter of ``model`` (a Cell, or a ``{name: Parameter}`` mapping such as optimizer
    moments) from ``arrays`` (``{name: (array, origin)}``, origin naming the file the array came from, or
    ``""``) after checking names and shapes of all of them first: a failed load changes nothing. Every load
    of weights into a model goes through here (Hugging Face import, the project's checkpoints, resume)."""
    params = dict(model) if isinstance(model, Mapping) else named_parameters(model)
    _check_names(source, params, arrays, strict, "no tensor for model parameter(s) ",
                 "tensor(s) the model does not have: ")
    for name, param in params.items():
        array, origin = arrays[name]
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(f"{origin or source}: tensor for {name!r} has shape {list(array.shape)}, "
                                  f"the model needs {list(param.shape)}")
    for name, param in params.items():
        param.set_data(Tensor(np.ascontiguousarray(arrays[name][0]), param.dtype))


def model_tensors(model, prefix: str = "") -> Dict[str, np.ndarray]:
    """``{prefix + param.name: array}`` of a model's parameters (each shared parameter once)."""
    return {prefix + name: param.asnumpy() for name, param in named_parameters(model).items()}


def hf_model_sources(model, hf_dir: PathLike, *, new_token_ids: Optional[Iterable[int]] = None, seed: int = 0,
                     noise_scale: float = DEFAULT_NOISE_SCALE, strict: bool = True,
                     tensors: Optional[HFTensors] = None) -> Dict[str, Tuple[Callable[[], np.ndarray], str]]:
    """:func:`hf_sources` for an already built MindFormers training-graph Qwen3 (its parameter names, layouts and
    vocabulary), after checking the checkpoint against the model: names and shapes of the Hugging Face tensors,
    vocabulary size, tied or untied head. Nothing is read beyond the headers."""
    config = read_hf_config(hf_dir)
    tensors = HFTensors(hf_dir) if tensors is None else tensors
    check_hf_tensors(tensors, config, strict=strict)
    transformer_config = model.get_gpt_transformer_config()
    vocab_size = int(transformer_config.vocab_size)
    if vocab_size < config["vocab_size"]:
        raise CheckpointError(f"{Path(hf_dir) / CONFIG_FILE}: vocab_size={config['vocab_size']} is larger than the "
                              f"model's {vocab_size}")
    prefix = _model_prefix(model)
    model_tied = prefix + "output_layer.weight" not in named_parameters(model)
    if bool(config.get("tie_word_embeddings", False)) != model_tied:
        raise CheckpointError(f"{Path(hf_dir) / CONFIG_FILE}: tie_word_embeddings="
                              f"{bool(config.get('tie_word_embeddings', False))} but the model is "
                              f"{'tied' if model_tied else 'untied'}")
    return hf_sources(tensors, config, transformer_config, prefix=prefix, vocab_size=vocab_size,
                      new_token_ids=new_token_ids, seed=seed, noise_scale=noise_scale)


def load_hf_weights(model, hf_dir: PathLike, *, new_token_ids: Optional[Iterable[int]] = None, seed: int = 0,
                    noise_scale: float = DEFAULT_NOISE_SCALE, strict: bool = True,
                    tensors: Optional[HFTensors] = None) -> None:
    """Load a Hugging Face Qwen3 checkpoint into an already built MindFormers training-graph Qwen3.

    The model's vocabulary may be larger than the checkpoint's: the extra rows (and ``new_token_ids``, which
    may also name rows inside the checkpoint's vocabulary) are initialised by :func:`extend_rows` with
    ``np.random.default_rng((seed, h))`` for head h (0: the embedding, 1: an untied lm_head). Every tensor is
    checked (names, shapes) before any parameter is set.
    """
    sources = hf_model_sources(model, hf_dir, new_token_ids=new_token_ids, seed=seed, noise_scale=noise_scale,
                               strict=strict, tensors=tensors)
    set_parameters(model, {k: (make(), origin) for k, (make, origin) in sources.items()}, str(hf_dir))


def load_hf_qwen3(hf_dir: PathLike, *, seq_length: int, vocab_size: Optional[int] = None,
                  pad_token_id: Optional[int] = None, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                  new_token_ids: Optional[Iterable[int]] = None, init_seed: int = 0,
                  noise_scale: float = DEFAULT_NOISE_SCALE, contiguous_mlp: bool = True, strict: bool = True,
                  parallel_config: Optional[dict] = None, load_weights: bool = True, **model_overrides):
    """Build MindFormers' training-graph Qwen3 for a Hugging Face Qwen3 checkpoint and load its weights offline.

    Args:
        hf_dir: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
        seq_length: the model's fixed input length.
        vocab_size: the tokenizer's final vocabulary (base + SID + pad/eos tokens; ``tokenizer.vocab_size``);
            ``None`` or anything not above the checkpoint's ``vocab_size`` keeps the checkpoint's (the
            embedding then still covers every id below it).
        pad_token_id / eos_token_id: default to ``config.json``'s; the pad id must be a dedicated token
            (MindFormers masks every key equal to it), so pass the tokenizer's.
        new_token_ids: rows to initialise afresh (default: the rows past the checkpoint's vocabulary).
            Pass the tokenizer's added ids when some of them fall inside the checkpoint's padded vocabulary.
        init_seed / noise_scale: the new rows are ``mean + noise_scale * std * N(0, 1)`` of the old rows.
        contiguous_mlp: [gate; up] ``linear_fc1`` (cheaper on CPU) instead of the interleaved layout.
        strict: unexpected tensors in the checkpoint are an error (else logged).
        parallel_config / model_overrides: passed to :func:`recast_ms.models.qwen3.build_qwen3`.
        load_weights: False builds the model with the checkpoint's shapes only (a sharded run builds it under
            ``no_init_parameters`` and each rank loads its slices after the graphs compiled).

    Returns:
        ``TrainingQwen3ForCausalLM`` (fp32 on CPU). Checkpoint errors raise :class:`CheckpointError` before
        the model is built.
    """
    from recast_ms.models.qwen3 import build_qwen3  # pylint: disable=import-outside-toplevel
    config = read_hf_config(hf_dir)
    tensors = HFTensors(hf_dir)
    check_hf_tensors(tensors, config, strict=strict)
    final_vocab = config["vocab_size"] if vocab_size is None else max(int(vocab_size), config["vocab_size"])
    model_yaml = hf_model_yaml(config, contiguous_mlp=contiguous_mlp)
    model = build_qwen3(model_yaml, vocab_size=final_vocab, seq_length=seq_length, pad_token_id=pad_token_id,
                        eos_token_id=eos_token_id, parallel_config=parallel_config, **model_overrides)
    if not load_weights:
        return model
    load_hf_weights(model, hf_dir, new_token_ids=new_token_ids, seed=init_seed, noise_scale=noise_scale,
                    strict=strict, tensors=tensors)
    return model
