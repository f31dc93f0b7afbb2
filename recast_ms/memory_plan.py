"""Memory planner: per-device memory of a GRPO / ReCast RL step, on paper, for a model YAML and a layout.

Two models, kept apart because the two backends keep memory differently:

* **Ascend** (:func:`plan_ascend`, not measured: no Ascend hardware here): the standard terms, per device.
  Parameters in the YAML's ``params_dtype``, gradients (fp32), AdamW moments (2 x fp32), all sharded by
  TP x PP (the largest pipeline stage); with optimizer parallel the parameters and the moments are further
  sharded by DP (MindSpore's optimizer parallel stores each weight sliced and all-gathers it for the forward;
  gradients stay whole: ``gradient_accumulation_shard: False``); the semi-auto one-micro-batch step's gradients
  are its optimizer step's temporaries instead (:data:`OPT_STEP_TEMPORARIES`). The frozen reference model in
  ``compute_dtype``. Activations per micro-batch (``micro / DP`` rows, ``/ micro_batch_num`` per pipeline
  micro-batch with ``PP`` of them in flight on the first stage) with or without full recompute, sequence
  parallel dividing every term by TP, flash attention (no ``S x S`` scores), plus the fp32 logits /
  log-softmax / gradient over the (vocab-parallel) vocabulary that the project's token log-prob needs. The
  rollout phase: on the data-parallel path the KV cache of ``P*G / DP`` rows; under semi-auto parallel (the
  actor's own graph rerun per token, no cache) one layer's forward activations of a ``rl.rollout_rows`` chunk
  plus its fp32 next-token logits. Peak = resident (params + grads + moments + reference) + the largest phase
  (rollout, reference forward, update). ``fits`` compares it with MindFormers' ``max_device_memory``
  fraction of the device (58 of 64 GB).
* **CPU** (:func:`predict_cpu_rss_mb`, calibrated): MindSpore 2.9's CPU backend keeps, for the process's
  life, memory per compiled graph that scales with the graph's rows (``docs``: /shared notes "Memory on the
  CPU backend"). Model: ``RSS = base + bytes_per_param * N + k_act * (grad graph + fwd graph activations,
  the standard fp32 no-recompute terms) + k_roll * rollout KV cache``. The constants are fitted to measured
  records (:data:`CALIBRATION_FILE`) and :func:`calibrate` reports the relative error against them.

A record is a dict: ``name``, ``model`` (model YAML), ``vocab_size``, ``seq_length``, ``stage`` (``build``:
actor + reference + optimizer allocated, no graph run; ``logprob``: + one forward graph of ``train_rows``;
``train``: + forward and grad graphs of ``train_rows``; ``rl_step``: + rollout of ``rollout_rows`` rows, the
reference forward and the grad graph at ``train_rows``), ``train_rows``, ``rollout_rows``, ``peak_rss_mb``,
``source`` (the command that measured it). Add one with :func:`add_record` (or
``scripts/plan_memory.py --add-record '{...}'``); :func:`records_from_bench_scale` turns
``scripts/bench_scale.py``'s JSON line into records.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import yaml

from recast_ms.config import REPO_ROOT

CALIBRATION_FILE = os.path.join(REPO_ROOT, "recast_ms", "memory_calibration.json")
GB = 1024 ** 3
MB = 1024 ** 2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAGES = ("build", "logprob", "train", "rl_step")
# priors for the CPU fit (used when the records cannot determine a constant)
CPU_PRIOR = {"base_mb": 600.0, "bytes_per_param": 24.0, "k_act": 6.0, "k_roll": 1.0}
# fp32 actor + reference + gradient buffer + AdamW m and v (20) + the transient gradients (4)
CPU_FWD_FRACTION = 8.5 / 25.0  # measured per-row memory of a log-prob forward graph / of the grad graph (notes)
USABLE_FRACTION = 58.0 / 64.0  # MindFormers' Qwen3 YAML: max_device_memory 58GB on a 64 GB device


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    params_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    seq_length: int = 1024

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2 + 2 * d  # q, o, k, v, q/k norms
        return attn + 3 * h * self.intermediate + 2 * h  # gate, up, down, two norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + head + self.layers * self.layer_params + self.hidden


@functools.lru_cache(maxsize=64)
def _model_config(path: str, mtime_ns: int, size: int) -> dict:
    # keyed on the file's stamp: the calibration re-reads the same few YAMLs thousands of times per plan
    # (8,000 parses, 60 s, for the 20 rows of `dryrun_scale.py --summary`); a rewritten file is read again
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)["model"]["model_config"]


def load_shape(model_yaml: str, vocab_size: Optional[int] = None, seq_length: Optional[int] = None) -> Shape:
    path = model_yaml if os.path.isabs(model_yaml) else os.path.join(REPO_ROOT, model_yaml)
    st = os.stat(path)
    mc = _model_config(path, st.st_mtime_ns, st.st_size)  # shared: read, never modified
    vocab = vocab_size or mc.get("vocab_size")
    if not vocab:
        raise ValueError(f"{model_yaml}: vocab_size is null (it comes from the tokenizer): give vocab_size")
    tied = bool(mc.get("tie_word_embeddings", True)) and not mc.get("untie_embeddings_and_output_weights", False)
    return Shape(int(vocab), int(mc["hidden_size"]), int(mc["intermediate_size"]), int(mc["num_hidden_layers"]),
                 int(mc["num_attention_heads"]), int(mc.get("num_key_value_heads") or mc["num_attention_heads"]),
                 int(mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"]), tied,
                 str(mc.get("params_dtype", "float32")), str(mc.get("compute_dtype", "float32")),
                 int(seq_length or mc.get("seq_length") or 1024))


def layer_activation_bytes(s: Shape, *, compute_bytes: int, flash: bool, tp: int = 1, seq_parallel: bool = False,
                           seq: Optional[int] = None) -> float:
    """Bytes one token keeps for the backward of one decoder layer (no recompute).

    Saved tensors: the two RMSNorm inputs (fp32), the q/k/v and MLP matmul inputs, q/k/v, the q/k-norm and
    RoPE inputs, the attention output, gate / up / SwiGLU output; without flash attention also the fp32
    ``S x S`` scores and probabilities. The ``h``-sized terms are replicated across TP unless sequence
    parallel is on; the rest is split by TP."""
    h, a, kv, d, i = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    seq = seq or s.seq_length
    replicated = 4 * 2 * h + compute_bytes * 2 * h
    split = compute_bytes * ((a * d + 2 * kv * d) + (a * d + kv * d) + a * d + 3 * i)
    if not flash:
        split += 4 * 2 * a * seq
    return (replicated / (tp if seq_parallel else 1)) + split / tp


def logits_bytes(s: Shape, *, train: bool, tp: int = 1) -> float:
    """fp32 logits + log-softmax (+ their gradient when training) per token, vocab-parallel over TP."""
    return 4.0 * s.vocab * (3 if train else 2) / tp


def kv_bytes_per_token(s: Shape, *, compute_bytes: int, tp: int = 1) -> float:
    return s.layers * 2 * s.kv_heads * s.head_dim * compute_bytes / min(tp, s.kv_heads)


# ----------------------------------------------------------------------------- Ascend


def _stage_params(s: Shape, tp: int, pp: int) -> float:
    """Parameters on the device holding the largest pipeline stage, TP-sharded."""
    per_stage = s.layers // pp * s.layer_params
    first = per_stage + s.embedding_params
    last = per_stage + s.hidden + (s.embedding_params if (not s.tied or pp > 1) else 0)
    biggest = max(first, last) if pp > 1 else s.num_params
    return biggest / tp


# The semi-auto one-micro-batch step (MindFormers' train-one-step cell: backward, global-norm clip, AdamW):
# DryRun's memory tracker puts its peak inside the AdamW step, where the gradients live only as that step's
# element-wise temporaries (the clip's scaled copy, AdamW's Mul / Sub outputs), split with the weights by the
# optimizer shard: 2.35 x the fp32 weights per device at Qwen3-14B DP 1 x TP 8, 2.38 x at 8B DP 2 x TP 4 with
# optimizer parallel (docs/bench/dryrun_scale/memory_*.json); 8B at DP 4 x TP 4 agrees within 4% with 2.36 / 4 (an
# earlier floor of one whole fp32 gradient was fitted to a compile that still held the lazy-inline weight copy).
# The accumulating step (GRPO's micro-batches) keeps whole fp32 gradients beside its accu_grads (fitted against the
# same compiles).
OPT_STEP_TEMPORARIES = 2.36
# The data-parallel path's fused step (recast_ms.trainer.optim.FusedStep: forward, backward, clip and AdamW in one
# graph, no gradient buffers) holds about two fp32 gradients per parameter in DryRun's plan, not one: fitted on the
# four full-depth compiles (Qwen3-0.6B / 1.7B, SFT and ReCast, 8 ranks: 1.92 / 2.10 / 1.98 / 2.12, each within 2%
# of 2.0 x 4 B); which temporaries they are is not identified (no memory-tracker breakdown of that graph).
DP_FUSED_STEP_GRADS = 2.0


def plan_ascend(s: Shape, *, dp: int, tp: int, pp: int, micro_batch_num: int, optimizer_parallel: bool,
                recompute: bool, seq_parallel: bool, flash: bool, train_rows: int, rollout_rows: int,
                seq: int, kl: bool = True, rollout_engine: str = "sharded_full_forward",
                rollout_chunk: int = 256, accumulate: bool = False, fused: bool = False) -> Dict[str, float]:
    """Per-device bytes of each term (see the module docstring); ``total`` = resident + the largest phase."""
    pb, cb = DTYPE_BYTES[s.params_dtype], DTYPE_BYTES[s.compute_dtype]
    n_dev = _stage_params(s, tp, pp)
    shard = dp if optimizer_parallel else 1
    semi_auto = rollout_engine == "sharded_full_forward"
    if semi_auto:
        grads = n_dev * 4.0 * (1.0 if accumulate else OPT_STEP_TEMPORARIES / shard)
    else:  # the data-parallel path: the fused one-graph step, or gradient buffers filled per micro-batch
        grads = n_dev * 4.0 * (DP_FUSED_STEP_GRADS if fused else 1.0)
    t = {"params": n_dev * pb / shard, "grads": grads, "optimizer": n_dev * 8.0 / shard,
         "optimizer_no_opt_parallel": n_dev * 8.0, "optimizer_opt_parallel": n_dev * 8.0 / dp,
         # the reference is a second model of the actor's config and layout: its params_dtype, sharded as the
         # actor's weights are (DryRun: the reference forward graph grows by 4 B/param/device at 14B DP 1 and by
         # 2 B at 8B DP 2 with optimizer parallel, not by the compute dtype's 2 B)
         "reference": n_dev * pb / shard if kl else 0.0}
    rows_dev = train_rows / dp
    layer_tok = layer_activation_bytes(s, compute_bytes=cb, flash=flash, tp=tp, seq_parallel=seq_parallel, seq=seq)
    if pp > 1:
        tokens = rows_dev / micro_batch_num * seq  # one pipeline micro-batch
        inflight = pp
    else:
        tokens, inflight = rows_dev * seq, 1
    layers_stage = s.layers // pp
    full = layers_stage * inflight * tokens * layer_tok
    stored = layers_stage * inflight * tokens * (cb * s.hidden / (tp if seq_parallel else 1)) + tokens * layer_tok
    t["activations_no_recompute"] = full
    t["activations_recompute"] = stored
    t["logits"] = tokens * logits_bytes(s, train=True, tp=tp)
    t["activations"] = (stored if recompute else full) + t["logits"]
    t["ref_forward"] = tokens * (layer_tok + logits_bytes(s, train=False, tp=tp)) if kl else 0.0
    if rollout_engine == "sharded_full_forward":
        # no cache: each new token reruns the actor's graph on [rl.rollout_rows, S] (the chunk); one layer's
        # forward activations live at a time, plus the fp32 next-token logits of the chunk (vocab-parallel)
        chunk = min(rollout_rows, rollout_chunk) / dp
        t["kv_cache"] = 0.0
        t["rollout_weights"] = 0.0
        t["rollout"] = chunk * seq * layer_tok + chunk * 4.0 * s.vocab / tp
    else:  # the KV decoder over the actor's own weights (data-parallel path)
        t["kv_cache"] = rollout_rows / dp * seq * kv_bytes_per_token(s, compute_bytes=cb, tp=tp)
        t["rollout_weights"] = 0.0
        t["rollout"] = t["kv_cache"]
    # several micro-batches per step under semi-auto parallel: MindFormers' accu_grads beside the gradients, which
    # DryRun shows at ~4 B/param/device (8B at DP 2 x TP 4, GRPO's 16 micro-batches: 828 MB per layer against
    # ReCast's fused 588)
    t["grad_accumulation"] = n_dev * 4.0 if accumulate else 0.0
    t["resident"] = t["params"] + t["grads"] + t["optimizer"] + t["reference"] + t["grad_accumulation"]
    t["total"] = t["resident"] + max(t["rollout"], t["ref_forward"], t["activations"])
    return t


# ----------------------------------------------------------------------------- CPU (calibrated)


def cpu_features(rec: dict) -> Dict[str, float]:
    """Parameter count and the activation / rollout byte counts of a record's graphs (fp32, no recompute)."""
    s = load_shape(rec["model"], rec.get("vocab_size"), rec.get("seq_length"))
    seq = int(rec["seq_length"])
    stage = rec["stage"]
    if stage not in STAGES:
        raise ValueError(f"record {rec.get('name')!r}: stage must be one of {STAGES}, got {stage!r}")
    per_row_grad = seq * (s.layers * layer_activation_bytes(s, compute_bytes=4, flash=False, seq=seq)
                          + logits_bytes(s, train=True))
    rows = float(rec.get("train_rows", 0))
    act = {"build": 0.0, "logprob": CPU_FWD_FRACTION, "train": 1.0 + CPU_FWD_FRACTION,
           "rl_step": 1.0 + CPU_FWD_FRACTION}[stage] * rows * per_row_grad
    roll = float(rec.get("rollout_rows", 0)) * seq * kv_bytes_per_token(s, compute_bytes=4) if stage == "rl_step" else 0.0
    # an RL step also holds the frozen reference: 4 B/param in fp32, known, not fitted
    ref = 4.0 * float(s.num_params) if stage == "rl_step" else 0.0
    # gradient-accumulation buffers (4 B/param) unless one micro-batch covered the step (the fused step)
    if stage in ("train", "rl_step") and not rec.get("fused", False):
        ref += 4.0 * float(s.num_params)
    return {"params": float(s.num_params), "act": act, "roll": roll, "ref": ref}


def predict_cpu_rss_mb(rec: dict, constants: Dict[str, float]) -> float:
    f = cpu_features(rec)
    return (constants["base_mb"] + (constants["bytes_per_param"] * f["params"] + constants["k_act"] * f["act"]
                                    + constants["k_roll"] * f["roll"] + f["ref"]) / MB)


def load_records(path: str = CALIBRATION_FILE) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return list(json.load(f)["records"])


def fit_constants(records: Sequence[dict]) -> Dict[str, float]:
    """Non-negative least squares of measured peak RSS on the CPU features, in relative terms (each record
    weighted by 1 / its RSS). ``bytes_per_param`` is fitted only when a record has >= 1e8 parameters (on the
    tiny model it is invisible: 3M params x 24 B = 70 MB); otherwise it stays at its prior, 24 B."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from scipy.optimize import nnls  # pylint: disable=import-outside-toplevel

    feats = [cpu_features(r) for r in records]
    y = np.array([float(r["peak_rss_mb"]) for r in records])
    fit_bpp = any(f["params"] >= 1e8 for f in feats)
    names = ["base_mb"] + (["bytes_per_param"] if fit_bpp else []) + ["k_act", "k_roll"]
    cols = {"base_mb": [1.0] * len(feats), "bytes_per_param": [f["params"] / MB for f in feats],
            "k_act": [f["act"] / MB for f in feats], "k_roll": [f["roll"] / MB for f in feats]}
    target = y - np.array([f["ref"] / MB for f in feats])
    if not fit_bpp:
        target = target - np.array([CPU_PRIOR["bytes_per_param"] * f["params"] / MB for f in feats])
    a = np.array([cols[n] for n in names]).T
    w = 1.0 / y
    # a constant whose column is all zero (no record exercises it) keeps its prior
    used = [j for j, n in enumerate(names) if np.any(a[:, j] != 0)]
    fixed = [j for j in range(len(names)) if j not in used]
    for j in fixed:
        target = target - a[:, j] * CPU_PRIOR[names[j]]
    coef, _ = nnls(a[:, used] * w[:, None], target * w)
    out = dict(CPU_PRIOR)
    for j, c in zip(used, coef):
        out[names[j]] = float(c)
    return out


def calibrate(records: Optional[Sequence[dict]] = None) -> dict:
    """Fit the CPU constants to the records; returns the constants, each record's prediction and relative
    error, and ``calibration_error`` = the largest |predicted / measured - 1| (in-sample)."""
    records = load_records() if records is None else list(records)  # list: sliced for leave-one-out
    if not records:
        raise ValueError("no calibration records")
    constants = fit_constants(records)
    rows = []
    for r in records:
        pred = predict_cpu_rss_mb(r, constants)
        rows.append({"name": r["name"], "measured_mb": float(r["peak_rss_mb"]), "predicted_mb": round(pred, 1),
                     "rel_error": round(pred / float(r["peak_rss_mb"]) - 1.0, 4)})
    err = max(abs(x["rel_error"]) for x in rows)
    loo = []  # leave-one-out: each record predicted by constants fitted without it (out of sample)
    if len(records) > 3:
        for i, r in enumerate(records):
            c = fit_constants(records[:i] + records[i + 1:])
            loo.append(abs(predict_cpu_rss_mb(r, c) / float(r["peak_rss_mb"]) - 1.0))
    return {"constants": constants, "records": rows, "calibration_error": round(err, 4),
            "mean_abs_error": round(sum(abs(x["rel_error"]) for x in rows) / len(rows), 4),
            "leave_one_out_error": round(max(loo), 4) if loo else None}


def add_record(record: dict, path: str = CALIBRATION_FILE) -> dict:
    """Validate one measured record (see the module docstring), append it to the calibration file and return
    the new calibration (:func:`calibrate`)."""
    need = ("name", "model", "seq_length", "stage", "peak_rss_mb", "source")
    missing = [k for k in need if k not in record]
    if missing:
        raise ValueError(f"calibration record lacks {missing}")
    cpu_features(record)  # checks the model, vocab and stage
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["records"] = [r for r in data["records"] if r["name"] != record["name"]] + [record]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return calibrate(data["records"])


def records_from_bench_scale(bench: dict, *, model: str = "model_configs/qwen3_0_6b.yaml",
                             stage_shapes: Dict[str, dict], source: str = "python scripts/bench_scale.py") -> List[dict]:
    """Records from ``scripts/bench_scale.py``'s last JSON line (``params``, ``vocab_size``, ``peak_rss_mb``,
    ``stages``). ``stage_shapes`` maps a bench stage name to its shape, e.g.
    ``{"rl_recast": {"stage": "rl_step", "seq_length": 64, "train_rows": 2, "rollout_rows": 8}}``; each
    such stage's peak RSS (``stages[name]`` as a number, or a dict with ``peak_rss_mb``) becomes a record.
    The bench's ``params`` must equal the planner's parameter count of ``model`` at ``vocab_size``."""
    s = load_shape(model, bench["vocab_size"])
    if abs(s.num_params - int(bench["params"])) > 0.01 * s.num_params:
        raise ValueError(f"bench params {bench['params']} != planner's {s.num_params} for {model}")
    out = []
    for name, shape in stage_shapes.items():
        val = bench["stages"][name]
        peak = val["peak_rss_mb"] if isinstance(val, dict) else val
        out.append({"name": f"{os.path.basename(model)[:-5]} {name}", "model": model, "vocab_size": int(bench["vocab_size"]),
                    "peak_rss_mb": float(peak), "source": source, **shape})
    return out


# ----------------------------------------------------------------------------- the report


def default_layout(model_yaml: str, devices: int, tp: int = 0, pp: int = 0) -> dict:
    """The model YAML's TP / PP / recompute / optimizer parallel, with DP = devices / (TP x PP); ``tp`` / ``pp``
    (> 0) replace the YAML's, as a run config's ``runtime.model_parallel`` / ``pipeline_stage`` do."""
    from recast_ms.runtime import check_layout, model_shape, read_model_yaml, yaml_layout, Layout  # noqa: E501 pylint: disable=import-outside-toplevel

    path = model_yaml if os.path.isabs(model_yaml) else os.path.join(REPO_ROOT, model_yaml)
    raw = read_model_yaml(path)
    base = yaml_layout(raw)
    tp, pp = tp or base.model_parallel, pp or base.pipeline_stage
    if devices % (tp * pp):
        raise ValueError(f"{devices} devices not divisible by TP x PP = {tp} x {pp}")
    layout = Layout(devices // (tp * pp), tp, pp, base.micro_batch_num, base.optimizer_parallel, base.recompute)
    check_layout(model_shape(raw), layout, devices, where=model_yaml)
    pc = raw.get("parallel_config") or {}
    mc = raw["model"]["model_config"]
    return {"dp": layout.data_parallel, "tp": tp, "pp": pp, "micro_batch_num": layout.micro_batch_num,
            "optimizer_parallel": layout.optimizer_parallel, "recompute": layout.recompute,
            "seq_parallel": bool(pc.get("use_seq_parallel", False)) and tp > 1,
            "flash": bool(mc.get("use_flash_attention", False))}


def plan_report(model_yaml: str, devices: int, device_memory_gb: float, *, group_size: int, prompts: int,
                micro_batch_size: int = 128, seq_length: Optional[int] = None, kl: bool = True,
                optimizer_parallel: Optional[bool] = None, recompute: Optional[bool] = None, tp: int = 0,
                pp: int = 0, sft_batch: int = 0) -> dict:
    """Per-device plan for grpo (``[P*G, T]``) and recast (``[2P, T]``) on Ascend, plus the CPU calibration;
    with ``sft_batch`` (> 0, global rows) also the SFT step (``sft``: no reference, no rollout, one micro-batch)."""
    s = load_shape(model_yaml, seq_length=seq_length)
    lay = default_layout(model_yaml, devices, tp, pp)
    if optimizer_parallel is not None:
        lay["optimizer_parallel"] = optimizer_parallel
    if recompute is not None:
        lay["recompute"] = recompute
    engine = "kv_decoder" if lay["tp"] == 1 and lay["pp"] == 1 and not lay["optimizer_parallel"] else "sharded_full_forward"
    out = {"model": model_yaml, "devices": devices, "device_memory_gb": device_memory_gb,
           "usable_gb": round(device_memory_gb * USABLE_FRACTION, 2), "params": s.num_params,
           "seq_length": s.seq_length, "group_size": group_size, "prompts": prompts,
           "micro_batch_size": micro_batch_size, "layout": lay, "rollout_engine": engine}
    # TP = PP = 1 runs the stand-alone data-parallel path: each rank splits its own P / DP groups into micro-batches
    # of up to micro_batch_size rows (semi-auto slices one global micro-batch by DP instead); ``micro`` counts the
    # rows one micro-batch step spans over all DP ranks
    dp_path = engine == "kv_decoder"
    for est, rows in (("grpo", prompts * group_size), ("recast", 2 * prompts)):
        micro = min(micro_batch_size, max(1, rows // lay["dp"])) * lay["dp"] if dp_path else min(micro_batch_size, rows)
        t = plan_ascend(s, dp=lay["dp"], tp=lay["tp"], pp=lay["pp"], micro_batch_num=lay["micro_batch_num"],
                        optimizer_parallel=lay["optimizer_parallel"], recompute=lay["recompute"],
                        seq_parallel=lay["seq_parallel"], flash=lay["flash"], train_rows=micro,
                        rollout_rows=prompts * group_size, seq=s.seq_length, kl=kl, rollout_engine=engine,
                        # semi-auto only: on the data-parallel path DryRun shows no such term (0.6B GRPO's
                        # two-micro-batch step peaks below ReCast's fused one)
                        accumulate=not dp_path and rows > micro,
                        fused=dp_path and rows // lay["dp"] <= micro_batch_size)
        gb = {k: round(v / GB, 3) for k, v in t.items()}
        split = lay["dp"] * (lay["micro_batch_num"] if lay["pp"] > 1 else 1)
        out[est] = {"actor_rows": rows, "micro_rows": micro, "actor_tokens": rows * s.seq_length,
                    "terms_gb": gb, "total_gb": gb["total"], "fits": bool(gb["total"] <= out["usable_gb"]),
                    # the runtime plan refuses P that DP does not divide (data parallel: whole groups per rank),
                    # or a micro-batch that DP (x pipeline micro-batches) does not divide (semi-auto)
                    "batch_divides": prompts % lay["dp"] == 0 if dp_path else micro % split == 0}
    if sft_batch:
        t = plan_ascend(s, dp=lay["dp"], tp=lay["tp"], pp=lay["pp"], micro_batch_num=lay["micro_batch_num"],
                        optimizer_parallel=lay["optimizer_parallel"], recompute=lay["recompute"],
                        seq_parallel=lay["seq_parallel"], flash=lay["flash"], train_rows=sft_batch, rollout_rows=0,
                        seq=s.seq_length, kl=False, rollout_engine=engine, fused=dp_path)
        gb = {k: round(v / GB, 3) for k, v in t.items()}
        out["sft"] = {"actor_rows": sft_batch, "micro_rows": sft_batch, "actor_tokens": sft_batch * s.seq_length,
                      "terms_gb": gb, "total_gb": gb["total"], "fits": bool(gb["total"] <= out["usable_gb"]),
                      "batch_divides": sft_batch % (lay["dp"] * (lay["micro_batch_num"] if lay["pp"] > 1 else 1)) == 0}
    out["actor_tokens_ratio"] = round(out["grpo"]["actor_tokens"] / out["recast"]["actor_tokens"], 2)
    out["peak_memory_change"] = round(out["recast"]["total_gb"] / out["grpo"]["total_gb"] - 1.0, 4)
    cal = calibrate()
    out["calibration_error"] = cal["calibration_error"]
    out["calibration"] = cal
    return out


def format_report(rep: dict) -> str:
    lay = rep["layout"]
    lines = [f"{rep['model']}: {rep['params'] / 1e9:.3f}B params, {rep['devices']} devices x {rep['device_memory_gb']} GB "
             f"(usable {rep['usable_gb']} GB), DP x TP x PP = {lay['dp']} x {lay['tp']} x {lay['pp']}, "
             f"optimizer parallel {lay['optimizer_parallel']}, recompute {lay['recompute']}, seq parallel "
             f"{lay['seq_parallel']}, flash {lay['flash']}; S = {rep['seq_length']}, P = {rep['prompts']}, "
             f"G = {rep['group_size']}, micro-batch {rep['micro_batch_size']} rows; rollout engine {rep['rollout_engine']}",
             "Ascend, per device, GB (standard terms; not measured on Ascend):",
             "| term | grpo | recast |", "|---|---|---|"]
    keys = [("actor rows / micro rows", None), ("params", "params"), ("gradients", "grads"),
            ("optimizer states (as planned)", "optimizer"), ("  without optimizer parallel", "optimizer_no_opt_parallel"),
            ("  with optimizer parallel", "optimizer_opt_parallel"), ("reference model", "reference"),
            ("activations / micro-batch, no recompute", "activations_no_recompute"),
            ("activations / micro-batch, recompute", "activations_recompute"), ("logits (fp32, log-softmax, grad)", "logits"),
            ("gradient accumulation buffers", "grad_accumulation"),
            ("update phase (as planned)", "activations"), ("reference forward phase", "ref_forward"),
            ("rollout KV cache (data-parallel path)", "kv_cache"), ("rollout phase (as planned)", "rollout"),
            ("resident", "resident"), ("**total (peak)**", "total")]
    for label, key in keys:
        if key is None:
            g, r = rep["grpo"], rep["recast"]
            lines.append(f"| {label} | {g['actor_rows']} / {g['micro_rows']} | {r['actor_rows']} / {r['micro_rows']} |")
        else:
            lines.append(f"| {label} | {rep['grpo']['terms_gb'][key]:.2f} | {rep['recast']['terms_gb'][key]:.2f} |")
    lines.append(f"| fits | {rep['grpo']['fits']} | {rep['recast']['fits']} |")
    lines.append(f"| micro-batch divisible by DP (x pipeline micro-batches) | {rep['grpo']['batch_divides']} | "
                 f"{rep['recast']['batch_divides']} |")
    lines.append(f"actor tokens GRPO / ReCast = {rep['actor_tokens_ratio']}x; peak memory ReCast vs GRPO "
                 f"{100 * rep['peak_memory_change']:+.1f}%")
    cal = rep["calibration"]
    c = cal["constants"]
    lines.append(f"CPU calibration ({len(cal['records'])} measured records; RSS = {c['base_mb']:.0f} MB + "
                 f"{c['bytes_per_param']:.1f} B/param + {c['k_act']:.2f} x activations + {c['k_roll']:.2f} x KV): "
                 f"max relative error {100 * cal['calibration_error']:.1f}%, mean {100 * cal['mean_abs_error']:.1f}%, "
                 f"leave-one-out max {100 * (cal['leave_one_out_error'] or 0):.1f}% (Ascend terms are not calibrated: "
                 "no Ascend run exists)")
    for r in cal["records"]:
        lines.append(f"  {r['name']}: measured {r['measured_mb']:.0f} MB, predicted {r['predicted_mb']:.0f} MB "
                     f"({100 * r['rel_error']:+.1f}%)")
    return "\n".join(lines)


def summary_json(rep: dict) -> str:
    keep = {"model": rep["model"], "devices": rep["devices"], "device_memory_gb": rep["device_memory_gb"],
            "calibration_error": rep["calibration_error"], "layout": rep["layout"],
            "actor_tokens_ratio": rep["actor_tokens_ratio"], "peak_memory_change": rep["peak_memory_change"]}
    for est in ("grpo", "recast"):
        keep[est] = {"total_gb": rep[est]["total_gb"], "fits": rep[est]["fits"], "micro_rows": rep[est]["micro_rows"],
                     "batch_divides": rep[est]["batch_divides"]}
    return json.dumps(keep, sort_keys=True)
