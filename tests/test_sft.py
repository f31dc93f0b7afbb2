"""SFT on the micro model: the loss falls on the response tokens, and a killed run resumes exactly."""
import json
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.config import load_config  # noqa: E402
from recast_ms.trainer import checkpoint as ckpt  # noqa: E402
from recast_ms.trainer.sft import run_sft  # noqa: E402

MICRO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs", "qwen3_micro.yaml")


def _cfg():
    return load_config(None, [f"model_config={MICRO}", "seq_length=32", "data.num_users=60", "sft.steps=8",
                              "sft.batch_size=8", "sft.warmup_steps=2", "sft.save_every=4", "sft.eval_every=4",
                              "sft.log_every=1", "sft.lr=0.01"])


def test_sft_learns_and_resume_equals_uninterrupted(tmp_path):
    a = str(tmp_path / "a")
    run_sft(_cfg(), a, progress=False)
    rows = [json.loads(l) for l in open(os.path.join(a, "sft_metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["sft/val_loss"] < rows[3]["sft/val_loss"] < np.log(100)  # below uniform over the vocab

    b = str(tmp_path / "b")
    run_sft(_cfg(), b, progress=False, stop_after=5)  # "killed" at step 5: the step-4 checkpoint survives
    assert os.path.basename(ckpt.latest_checkpoint(b)) == "step_4"
    run_sft(_cfg(), b, progress=False)  # the same command again resumes from step 4
    ta, _ = ckpt.load_state(ckpt.latest_checkpoint(a))
    tb, meta = ckpt.load_state(ckpt.latest_checkpoint(b))
    assert meta["step"] == 8
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=0, atol=1e-6, err_msg=k)
    rows_b = [json.loads(l) for l in open(os.path.join(b, "sft_metrics.jsonl"))]
    assert [r["step"] for r in rows_b] == list(range(1, 9))  # no step logged twice after the resume
