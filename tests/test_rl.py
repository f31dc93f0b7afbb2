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
        "rl.log_entropy": False,  # an extra forward graph per step; the entropy test turns it on
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
        # rl.log_entropy=false (these tests' default): no entropy forward, no entropy keys
        assert "timing_s/entropy" not in m and not any(k.startswith("policy/entropy") for k in m)
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


def test_beam_group_larger_than_catalogue_is_refused_before_anything_is_written(tmp_path):
    """Issue 21: this failed only at the first rollout, after the tokenizer and the run files were written."""
    from recast_ms.config import ConfigError
    from recast_ms.trainer.setup import load_splits

    num_sids = len(load_splits(_cfg().data).codebook.sid_to_items)  # 300 on this synthetic catalogue
    over = {"rl.rollout": "beam", "rl.group_size": num_sids + 1, "rl.prompts_per_step": 1, "rl.micro_batch_size": 2}
    with pytest.raises(ConfigError, match=rf"^rl\.group_size={num_sids + 1} exceeds the {num_sids} distinct item SIDs"):
        _trainer(tmp_path, "run", **over)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "tok").exists()
    _trainer(tmp_path, "ok", **{**over, "rl.group_size": num_sids})  # a catalogue of exactly G is enough


def test_run_without_valid_responses_stops_instead_of_training_on_nothing(tmp_path, caplog):
    """Issue 21: unconstrained rollouts of an untrained policy name no item; GRPO then has no signal at all."""
    from recast_ms.trainer.rl import BARREN_STEPS

    tr = _trainer(tmp_path, "barren", **{"rl.estimator": "grpo", "rl.constrained": False, "rl.prompts_per_step": 2,
                                         "rl.group_size": 2, "rl.steps": BARREN_STEPS + 2, "rl.save_every": 100})
    with pytest.raises(RuntimeError, match=rf"{BARREN_STEPS} steps in a row without a valid rollout response"):
        tr.train(evaluate=False)  # before: exit 0 after every step had grad norm 0
    assert tr.step_idx == BARREN_STEPS
    assert "step 1: no rollout response names a catalogue item (rl.constrained=False)" in caplog.text


# ----------------------------------------------------------------------------- the negative row's knobs (issue 24)


def _params(tr):
    return {p.name: p.asnumpy().copy() for p in tr.model.trainable_params()}


def test_negative_weight_zero_is_the_anchor_only_step(tmp_path):
    """Weight 0 takes the negative's loss away and nothing else: the same batch and the same weights after the
    step as anchor_only; weight 1 is ReCast's batch, its negative pushed down."""
    zero = _trainer(tmp_path, "w0", **{"rl.estimator": "recast", "rl.negative_weight": 0.0})
    anchor = _trainer(tmp_path, "ao", **{"rl.estimator": "anchor_only"})
    bz, ba = zero.make_batch(), anchor.make_batch()
    np.testing.assert_array_equal(bz.input_ids, ba.input_ids)
    np.testing.assert_array_equal(bz.loss_mask, ba.loss_mask)  # the negative rows carry no loss
    assert bz.active_mask.any() and (bz.loss_mask[1::2] == 0).all()
    neg_before = _seq_logps(zero, bz)
    zero.update(bz)
    anchor.update(ba)
    pz, pa = _params(zero), _params(anchor)
    for k in pz:
        np.testing.assert_allclose(pz[k], pa[k], rtol=0, atol=1e-7, err_msg=k)
    # and no term of its own moved the negative: its change is the positive's side effect, equal in both runs
    np.testing.assert_allclose(_seq_logps(zero, bz) - neg_before, _seq_logps(anchor, ba) - neg_before, atol=1e-6)


def _token_logps(trainer, batch):
    return trainer.actor_logps_fn(ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)).asnumpy()  # [B, R]


def test_divergent_mask_spares_the_shared_prefix_and_pushes_the_divergent_token(tmp_path):
    """The same batch trained with the negative's loss on every token (full) and from its first divergent token
    (divergent): divergent keeps the shared codes of the negative -- which are the positive's tokens in the
    positive's context -- rising, where full's -alpha cancels the positive's +alpha on them."""
    over = {"rl.estimator": "recast", "rl.prompts_per_step": 8, "rl.group_size": 8, "rl.micro_batch_size": 16}
    out = {}
    for mode in ("full", "divergent"):
        tr = _trainer(tmp_path, mode, **over, **{"rl.negative_mask": mode})
        batch = tr.make_batch()
        before = _token_logps(tr, batch)
        tr.update(batch)
        out[mode] = (batch, (_token_logps(tr, batch) - before)[1::2])  # the negatives' per-token change
    batch, d_div = out["divergent"]
    full_batch, d_full = out["full"]
    np.testing.assert_array_equal(batch.input_ids, full_batch.input_ids)
    rows = np.stack([batch.input_ids[b, s: s + tr.R] for b, s in enumerate(batch.resp_start)])  # [2P, R]
    shared = np.cumprod(rows[1::2] == rows[0::2], axis=1).sum(1)  # [P] codes the pair shares
    live = batch.active_mask
    assert (live & (shared > 0)).any(), shared  # the case under test occurs
    for p in np.nonzero(live)[0]:
        assert (batch.loss_mask[2 * p + 1, : shared[p]] == 0).all() and batch.loss_mask[2 * p + 1, shared[p]] == 1
        np.testing.assert_array_equal(full_batch.loss_mask[2 * p + 1], full_batch.loss_mask[2 * p])  # full: all
        assert d_div[p, shared[p]] < 0, (p, shared[p], d_div[p])  # where the negative leaves the positive
        if shared[p]:
            assert d_div[p, : shared[p]].sum() > 0, (p, d_div[p])  # not pushed down
            assert d_div[p, : shared[p]].sum() > d_full[p, : shared[p]].sum(), (p, d_div[p], d_full[p])
    h = {k: v for k, v in batch.diagnostics.items() if k.startswith("signals/pair_prefix_len_count/")}
    assert [h[f"signals/pair_prefix_len_count/{k}"] for k in range(tr.R)] == \
        np.bincount(np.minimum(shared[live], tr.R - 1), minlength=tr.R).tolist()


def test_step_logs_entropy_prefix_histogram_and_clipping(tmp_path):
    tr = _trainer(tmp_path, "m", **{"rl.estimator": "recast", "rl.grad_clip": 1e-6, "rl.log_entropy": True})
    m = tr.step()
    assert m["actor/grad_clipped"] == 1.0 and m["actor/grad_norm"] > 1e-6
    V = tr.model.trainable_params()[0].shape[0]
    assert 0 <= m["policy/entropy_sid"] <= np.log(V) and 0 < m["policy/entropy_full"] <= np.log(V)
    # the constrained policy has fewer choices than the full head at every position
    assert m["policy/entropy_sid"] < m["policy/entropy_full"]
    counts = [m[f"signals/pair_prefix_len_count/{k}"] for k in range(tr.R)]
    assert sum(counts) == m["signals/active_group_ratio"] * P
    loose = _trainer(tmp_path, "m2", **{"rl.estimator": "grpo", "rl.grad_clip": 1e6, "rl.log_entropy": True})
    m2 = loose.step()
    assert m2["actor/grad_clipped"] == 0.0 and "policy/entropy_full" in m2
    assert not any(k.startswith("signals/pair_prefix_len_count/") for k in m2)  # no pair in GRPO
    assert m2["actor/rows"] == P * G  # the step itself is unchanged (the width test runs it with the switch off)


def test_reserved_valid_rows_are_never_rl_prompts_and_are_what_eval_scores(tmp_path):
    tr = _trainer(tmp_path, "res", **{"data.reserved_valid_rows": 20, "data.reserved_valid_seed": 3,
                                      "eval.split": "reserved", "data.max_eval_prompts": 0})
    reserved = {id(s) for s in tr.reserved_samples}  # the split's own objects: identity, not equality
    assert len(reserved) == 20 and len(tr.rl_samples) == len(tr.splits.valid) - 20
    assert not reserved & {id(s) for s in tr.rl_samples}
    assert [id(s) for s in tr.eval_samples] == [id(s) for s in tr.reserved_samples]
    # the prompts of several epochs of steps index the pool only, and the batch holds their encodings
    drawn = np.concatenate([tr.sampler.at(s) for s in range(3 * len(tr.rl_samples) // P)])
    assert drawn.min() >= 0 and drawn.max() < len(tr.rl_samples)
    batch = tr.make_batch()
    np.testing.assert_array_equal(tr.rl_anchors[batch.prompt_index],
                                  tr.rl_anchors[tr.sampler.at(0)])  # what the step trained on came from the pool
