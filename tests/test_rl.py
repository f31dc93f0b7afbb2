"""RL trainer on a micro Qwen3: learning direction, physical filtering widths, exact resume, NaN stop."""
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.config import load_config  # noqa: E402
from recast_ms.trainer.rl import RLTrainer  # noqa: E402

MICRO = os.path.join(os.path.dirname(__file__), "data", "qwen3_micro.yaml")
P, G = 4, 4


def _cfg(**over):
    base = {
        "model_config": MICRO, "seq_length": 32, "data.num_users": 60, "rl.prompts_per_step": P,
        "rl.group_size": G, "rl.kl_coef": 0.0, "rl.lr": 1e-3, "rl.save_every": 2, "rl.steps": 4,
        "rl.micro_batch_size": 8, "data.max_eval_prompts": 8, "eval.beam_width": 4, "eval.ks": "[1,4]",
        "eval.batch_size": 8,
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _trainer(tmp_path, name, **over):
    return RLTrainer(_cfg(**over), str(tmp_path / name), None, str(tmp_path / "tok"), progress=False)


def _seq_logps(trainer, batch):
    """Summed response log-prob of each actor row, under the current actor."""
    lp = trainer.actor_logps_fn(ms.Tensor(batch["input_ids"]), ms.Tensor(batch["resp_start"])).asnumpy()  # [B, R]
    return (lp * batch["loss_mask"]).sum(1)


def test_recast_step_raises_positive_and_lowers_hardest_negative(tmp_path):
    tr = _trainer(tmp_path, "dir", **{"rl.estimator": "recast"})
    batch = tr.make_batch()
    assert batch["input_ids"].shape == (2 * P, 32)  # the physical filter: 2 rows per prompt
    live = batch["active_mask"]
    assert live.any()
    before = _seq_logps(tr, batch)
    tr.update(batch)
    after = _seq_logps(tr, batch)
    delta = (after - before).reshape(P, 2)  # rows (pos, neg) per prompt
    assert (batch["advantages"].reshape(P, 2)[live] == [1.0, -1.0]).all()
    assert (delta[live, 0] > 0).all(), delta  # the chosen positive became more likely
    assert (delta[live, 1] < 0).all(), delta  # the hardest negative less likely
    # repaired groups put the ground-truth anchor on the positive row
    anchors = tr.rl_anchors[batch["prompt_index"]]
    for p in np.nonzero(batch["repaired"])[0]:
        start = batch["resp_start"][2 * p]
        resp = batch["input_ids"][2 * p][start : start + tr.R][batch["loss_mask"][2 * p] > 0]
        np.testing.assert_array_equal(resp, anchors[p][anchors[p] != tr.tok.pad_id][: len(resp)])


@pytest.mark.parametrize("estimator,rows", [("grpo", P * G), ("repair_only", P * G), ("boundary_only", 2 * P)])
def test_update_width_from_real_batches(tmp_path, estimator, rows):
    tr = _trainer(tmp_path, estimator, **{"rl.estimator": estimator})
    for _ in range(2):  # the shape never changes from step to step
        m = tr.step()
        assert m["actor/rows"] == rows
        assert m["actor/tokens"] == rows * 32
    assert np.isfinite(m["actor/loss"])


def test_resume_equals_uninterrupted(tmp_path):
    a = _trainer(tmp_path, "a", **{"rl.estimator": "recast"})
    a.train(resume=False, evaluate=False)
    b = _trainer(tmp_path, "b", **{"rl.estimator": "recast"})
    b.train(resume=False, evaluate=False, stop_after=2)  # "killed" after the step-2 checkpoint
    del b
    c = _trainer(tmp_path, "b", **{"rl.estimator": "recast"})
    c.train(resume=True, evaluate=False)
    assert c.step_idx == 4
    for pa, pc in zip(a.model.trainable_params(), c.model.trainable_params()):
        np.testing.assert_allclose(pa.asnumpy(), pc.asnumpy(), rtol=0, atol=1e-6, err_msg=pa.name)
    ha = [l for l in open(tmp_path / "a" / "metrics.jsonl")]
    hc = [l for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert len(ha) == len(hc) == 4  # resumed log has no duplicated steps


def test_non_finite_loss_stops_with_clear_message(tmp_path):
    tr = _trainer(tmp_path, "nan", **{"rl.estimator": "recast"})
    batch = tr.make_batch()
    batch["advantages"] = batch["advantages"] * np.float32(np.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        tr.update(batch)
