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


def test_sft_dropout_lives_in_the_training_graph_only(tmp_path):
    """sft.dropout: the SFT training step's graph drops hidden units (two forward passes of the same batch
    differ), while the validation loss, evaluation and RL graphs over the same weights see none (their
    log-probs equal those of the same weights built without dropout); and SFT still learns."""
    from recast_ms.models.policy import ResponseLogProbs, set_dropout
    from recast_ms.trainer.setup import build_model, get_tokenizer, init_runtime, load_splits
    from recast_ms.trainer.sft import encode_split

    cfg = load_config(None, [f"model_config={MICRO}", "seq_length=32", "data.num_users=60"])
    splits = load_splits(cfg.data)
    tok = get_tokenizer(splits, str(tmp_path / "tok"), cfg)
    init_runtime(cfg)
    model = build_model(cfg, tok, seed=0, dropout=0.3)
    plain = build_model(cfg, tok, seed=0)
    ids, start, mask = encode_split(splits.valid[:8], splits, tok, cfg)
    ids, start = ms.Tensor(ids), ms.Tensor(start)
    train_fn, eval_fn = ResponseLogProbs(model, 4), ResponseLogProbs(model, 4)
    assert set_dropout(model, True) > 0
    a, b = train_fn(ids, start).asnumpy(), train_fn(ids, start).asnumpy()
    assert not np.array_equal(a, b)  # a fresh dropout mask per call
    set_dropout(model, False)
    e = eval_fn(ids, start).asnumpy()
    np.testing.assert_allclose(e, ResponseLogProbs(plain, 4)(ids, start).asnumpy(), rtol=0, atol=1e-6)
    set_dropout(model, True)
    np.testing.assert_array_equal(eval_fn(ids, start).asnumpy(), e)  # a compiled graph keeps its setting
    assert not np.array_equal(train_fn(ids, start).asnumpy(), e)

    run = str(tmp_path / "drop")
    overrides = [f"model_config={MICRO}", "seq_length=32", "data.num_users=60", "sft.steps=8", "sft.batch_size=8",
                 "sft.warmup_steps=2", "sft.save_every=8", "sft.eval_every=4", "sft.log_every=1", "sft.lr=0.01",
                 "sft.dropout=0.1"]
    run_sft(load_config(None, overrides), run, progress=False)
    rows = [json.loads(l) for l in open(os.path.join(run, "sft_metrics.jsonl"))]
    assert np.isfinite([r["sft/loss"] for r in rows]).all()
    assert rows[-1]["sft/val_loss"] < rows[3]["sft/val_loss"] < np.log(100)


def test_eval_command_scores_an_sft_run(tmp_path):
    """recast-eval (recast_ms.commands.evaluate) on a finished SFT run: a table and a JSON with every K."""
    import subprocess
    import sys

    run = str(tmp_path / "sft")
    run_sft(_cfg(), run, progress=False)
    out = str(tmp_path / "eval.json")
    r = subprocess.run([sys.executable, "-m", "recast_ms.commands.evaluate", "--run-dir", run, "--split", "valid",
                        "--max-prompts", "6", "--out", out, "eval.beam_width=4", "eval.ks=[1,4]", "eval.batch_size=4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out))
    assert res["num_prompts"] == 6 and res["step"] == 8 and res["split"] == "valid"
    assert 0.0 <= res["model"]["model/pass@1"] <= res["model"]["model/pass@4"] <= 1.0
    assert "| model |" in r.stdout
