"""RL trainer on a micro Qwen3: learning direction, physical filtering widths, exact resume, NaN stop."""
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.config import load_config  # noqa: E402
from recast_ms.rewards import response_sid  # noqa: E402
from recast_ms.trainer.rl import RLTrainer  # noqa: E402

MICRO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs", "qwen3_micro.yaml")
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
    lp = trainer.actor_logps_fn(ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)).asnumpy()  # [B, R]
    return (lp * batch.loss_mask).sum(1)


def test_recast_step_raises_positive_and_lowers_hardest_negative(tmp_path):
    tr = _trainer(tmp_path, "dir", **{"rl.estimator": "recast"})
    batch = tr.make_batch()
    assert batch.input_ids.shape == (2 * P, 32)  # the physical filter: 2 rows per prompt
    live = batch.active_mask
    assert live.any()
    before = _seq_logps(tr, batch)
    tr.update(batch)
    after = _seq_logps(tr, batch)
    delta = (after - before).reshape(P, 2)  # rows (pos, neg) per prompt
    assert (batch.advantages.reshape(P, 2)[live] == [1.0, -1.0]).all()
    assert (delta[live, 0] > 0).all(), delta  # the chosen positive became more likely
    assert (delta[live, 1] < 0).all(), delta  # the hardest negative less likely
    # repaired groups put the ground-truth anchor on the positive row
    anchors = tr.rl_anchors[batch.prompt_index]
    for p in np.nonzero(batch.repaired)[0]:
        start = batch.resp_start[2 * p]
        resp = batch.input_ids[2 * p][start : start + tr.R][batch.loss_mask[2 * p] > 0]
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
    batch.advantages = batch.advantages * np.float32(np.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        tr.update(batch)


def test_beam_groups_are_the_beam_search_and_move_the_policy(tmp_path):
    """rl.rollout=beam: each group is the G best constrained beams (distinct valid SIDs, identical to
    beam_search's output for the same weights, best first); one ReCast step on them raises the positive
    and lowers the hardest negative."""
    from recast_ms.rollout.engine import beam_search

    tr = _trainer(tmp_path, "beam", **{"rl.estimator": "recast", "rl.rollout": "beam"})
    batch = tr.make_batch()
    idx = batch.prompt_index
    seqs, scores = beam_search(tr.decoder, tr.rl_prompts.ids[idx], tr.rl_prompts.lens[idx], beam_width=G,
                               max_new_tokens=tr.R, eos_id=tr.tok.eos_id, pad_id=tr.tok.pad_id,
                               constraint=tr.constraint)
    np.testing.assert_array_equal(batch.rollout_ids.reshape(P, G, tr.R), seqs)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    assert batch.valid.all()
    for p in range(P):
        sids = [response_sid(row, tr.token_map) for row in seqs[p]]
        assert all(s is not None and tr.splits.codebook.is_valid(s) for s in sids)
        assert len(set(sids)) == G  # G distinct items
    # a deterministic rollout: the same weights give the same group again
    np.testing.assert_array_equal(tr.make_batch().rollout_ids, batch.rollout_ids)

    live = batch.active_mask
    assert live.any() and batch.input_ids.shape == (2 * P, 32)  # the [2P, T] gather is unchanged
    before = _seq_logps(tr, batch)
    tr.update(batch)
    delta = (_seq_logps(tr, batch) - before).reshape(P, 2)
    assert (delta[live, 1] < 0).all(), delta  # every hardest negative (a top beam) became less likely
    assert (delta[live, 0] - delta[live, 1] > 0).all(), delta  # every pair's margin grew
    # beams share prefixes: lowering a negative can drag down a positive that starts like it, so the
    # positives rise on average rather than each one
    assert delta[live, 0].mean() > 0, delta
    # a natural (non-repaired) positive or negative is one of the group's beams
    rows = batch.rollout_ids.reshape(P, G, tr.R)
    for p in np.nonzero(live & ~batch.repaired)[0]:
        pos, neg = batch.active_index[p]
        start = batch.resp_start[2 * p]
        np.testing.assert_array_equal(batch.input_ids[2 * p][start:start + tr.R][batch.loss_mask[2 * p] > 0],
                                      rows[p, pos][: int(batch.loss_mask[2 * p].sum())])
        assert rows[p, neg].tolist() != rows[p, pos].tolist()


def test_anchor_only_raises_the_positive_and_leaves_the_negative_without_loss(tmp_path):
    tr = _trainer(tmp_path, "anchor", **{"rl.estimator": "anchor_only"})
    batch = tr.make_batch()
    assert batch.input_ids.shape == (2 * P, 32)
    live = batch.active_mask
    assert live.any() and batch.repaired.any()
    adv = batch.advantages.reshape(P, 2)
    assert (adv[live] == [1.0, 0.0]).all() and (adv[~live] == 0).all()
    mask = batch.loss_mask.reshape(P, 2, -1)
    assert (mask[:, 1] == 0).all()  # the negative row carries no loss at all (no -alpha, no KL)
    assert (mask[live, 0].sum(-1) > 0).all()
    before = _seq_logps(tr, batch)
    m = tr.update(batch)
    assert m["actor/rows"] == 2 * P and m["actor/response_tokens"] == mask[:, 0].sum()
    delta = (_seq_logps(tr, batch) - before).reshape(P, 2)
    assert (delta[live, 0] > 0).all(), delta
