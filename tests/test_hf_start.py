"""Starting a run from a Hugging Face Qwen3 checkpoint: SID tokens added to its tokenizer, vocabulary
grown, SFT trains and resumes through the same code path as the embedded default."""
import json

import numpy as np
import pytest

pytest.importorskip("mindspore")

from qwen3_numpy_ref import write_hf_model_dir  # noqa: E402
from recast_ms.config import load_config  # noqa: E402


def _hf_dir(tmp_path):
    return write_hf_model_dir(tmp_path / "hf")


def test_sft_from_hf_checkpoint(tmp_path):
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.sft import run_sft

    hf = _hf_dir(tmp_path)
    cfg = load_config(None, [f"hf_checkpoint={hf}", "seq_length=32", "data.num_users=60", "sft.steps=6",
                             "sft.batch_size=8", "sft.warmup_steps=0", "sft.save_every=3", "sft.eval_every=3",
                             "sft.log_every=3", "sft.lr=0.01"])
    run = tmp_path / "run"
    m = run_sft(cfg, str(run), progress=False)
    tok_meta = json.loads((run / "tokenizer" / "recast_tokenizer.json").read_text())
    assert tok_meta["kind"] == "hf"
    # 5 base tokens + 3 levels x 16 codes + a dedicated pad (EOS is the checkpoint's <|im_end|>)
    assert tok_meta["vocab_size"] == 5 + 48 + 1 and tok_meta["eos_token"] == "<|im_end|>"
    tensors, meta = ckpt.load_state(ckpt.latest_checkpoint(str(run)))
    emb = next(v for k, v in tensors.items() if k.endswith("word_embeddings.weight"))
    assert emb.shape == (54, 48)  # grown from 8 rows to the tokenizer's vocabulary
    rows = [json.loads(l) for l in open(run / "sft_metrics.jsonl")]
    assert rows[-1]["sft/loss"] < rows[0]["sft/loss"]  # learning moved the policy towards the targets
    assert np.isfinite(m["sft/val_loss"])


PLAN_FIELDS = ("params_dtype", "compute_dtype", "layernorm_compute_dtype", "softmax_compute_dtype", "rotary_dtype",
               "use_flash_attention")


def _plan_view(conf) -> dict:
    """What the runtime plan decides, read back from a built model's Qwen3Config."""
    pc = getattr(conf, "parallel_config", None)
    layout = None if pc is None else (pc.data_parallel, pc.model_parallel, pc.pipeline_stage, pc.recompute.recompute)
    return {**{k: str(getattr(conf, k)) for k in PLAN_FIELDS}, "layout": layout}


def _tok():
    from types import SimpleNamespace

    return SimpleNamespace(vocab_size=54, pad_id=53, eos_id=4)  # build_model reads these three only


def test_hf_checkpoint_keeps_the_ascend_plan(tmp_path, monkeypatch):
    """Before: the HF branch built fp32, no flash attention, no recompute, no parallel config whatever the plan
    said. Now both branches get the plan's (1.7B: bf16, flash attention, recompute). Config only: no Ascend here,
    so ``build_qwen3`` is replaced by MindFormers' config build for Ascend and no weights are loaded."""
    from recast_ms.models import qwen3, weights
    from recast_ms.runtime import plan_runtime
    from recast_ms.trainer import setup

    hf = _hf_dir(tmp_path)
    real_config = qwen3.build_qwen3_config
    monkeypatch.setattr(qwen3, "build_qwen3",
                        lambda model_yaml, seed=None, **kw: real_config(model_yaml, device_target="Ascend", **kw))
    monkeypatch.setattr(weights, "load_hf_weights", lambda *a, **k: None)
    run = "model_configs/runs/ascend_qwen3_1_7b.yaml"
    views = {}
    for name, hf_ckpt in (("yaml", ""), ("hf", str(hf))):
        cfg = load_config(run, [f"hf_checkpoint={hf_ckpt}", "seq_length=32"])
        monkeypatch.setattr(setup, "_PLAN", plan_runtime(cfg, "Ascend", 8))
        views[name] = _plan_view(setup.build_model(cfg, _tok(), seed=0))
    assert views["hf"] == views["yaml"], views
    assert views["hf"]["compute_dtype"] == "bfloat16" and views["hf"]["use_flash_attention"] == "True"
    assert views["hf"]["layout"] == (1, 1, 1, True)  # one device's graph (DP is the optimizer's AllReduce); recompute


def test_hf_checkpoint_keeps_the_cpu_plan(tmp_path):
    """The CPU branch, built for real: fp32, no flash attention, no layout, with and without the checkpoint."""
    from recast_ms.trainer import setup

    hf = _hf_dir(tmp_path)
    views = {}
    for name, hf_ckpt in (("yaml", ""), ("hf", str(hf))):
        cfg = load_config(None, [f"hf_checkpoint={hf_ckpt}", "seq_length=32", "runtime.device_target=CPU"])
        setup.init_runtime(cfg)
        views[name] = _plan_view(setup.build_model(cfg, _tok(), seed=0).config)
    assert views["hf"] == views["yaml"], views
    assert views["hf"]["compute_dtype"] == "float32" and views["hf"]["use_flash_attention"] == "False"
