"""Signals: hand-worked golden cases, loop-versus-vectorised checks and input validation."""
import numpy as np
import pytest

from recast_ms.rewards import sid_similarity, structural_score, task_reward
from recast_ms.signals import (
    ESTIMATORS,
    Selection,
    common_prefix_len,
    compute_signal,
    divergent_mask,
    entropy_rows,
    gather_rows,
    get_estimator,
    grpo_advantage,
    group_rows,
    prefix_histogram,
    recast_signal,
    select,
    signal_diagnostics,
)

# ----------------------------------------------------------------------------- rewards / scores


def test_sid_similarity_prefix_depth():
    assert sid_similarity((1, 2, 3), (1, 2, 3)) == 1.0
    assert sid_similarity((1, 2, 3), (1, 2, 4)) == pytest.approx(2 / 3)
    assert sid_similarity((1, 2, 3), (1, 9, 3)) == pytest.approx(1 / 3)  # prefix, not overlap
    assert sid_similarity((1, 2, 3), (7, 2, 3)) == 0.0
    assert sid_similarity((5, 6), (5, 7)) == 0.5
    assert sid_similarity((1, 2, 3, 4), (1, 2, 3)) == 0.75  # unequal lengths never score 1


def test_task_reward_and_structural_score_set_form():
    tgt = [(1, 2, 3)]
    assert task_reward([(1, 2, 3)], tgt) == 1.0
    assert task_reward([(9, 9, 9), (1, 2, 3)], tgt) == 1.0
    assert task_reward([(1, 2, 4)], tgt) == 0.0
    assert task_reward([], tgt) == 0.0
    assert task_reward((1, 2, 3), (1, 2, 3)) == 1.0  # a single SID is accepted as a set of one
    assert structural_score([(1, 2, 4), (1, 5, 5)], tgt) == pytest.approx(2 / 3)
    assert structural_score([(1, 2, 4)], [(1, 2, 4), (8, 8, 8)]) == 1.0  # multi-target
    assert structural_score([], tgt) == 0.0
    assert structural_score([(1, 2, 3)], []) == 0.0


# ----------------------------------------------------------------------------- GRPO


def test_grpo_golden_single_hit_unbiased_std():
    # mean .25, unbiased std sqrt((.75^2 + 3 * .25^2) / 3) = .5
    adv = grpo_advantage([[1, 0, 0, 0]], eps=0.0)
    np.testing.assert_allclose(adv, [[1.5, -0.5, -0.5, -0.5]])
    # population form on request: std = sqrt(3)/4
    adv0 = grpo_advantage([[1, 0, 0, 0]], eps=0.0, ddof=0)
    np.testing.assert_allclose(adv0[0, 0], 0.75 / (np.sqrt(3) / 4))


def test_grpo_uniform_groups_give_zero():
    adv = grpo_advantage([[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(adv, np.zeros((2, 3)))


# ----------------------------------------------------------------------------- ReCast goldens


def test_recast_all_zero_group_is_repaired_at_lowest_score_lowest_index():
    r = [[0, 0, 0, 0]]
    s = [[1 / 3, 0.0, 2 / 3, 0.0]]  # min 0 at slots 1 and 3 -> slot 1
    sig = recast_signal(r, s)
    assert sig.repaired.tolist() == [True]
    assert sig.anchor_index.tolist() == [1]
    np.testing.assert_array_equal(sig.rewards, [[0, 1, 0, 0]])
    np.testing.assert_allclose(sig.scores, [[1 / 3, 1.0, 2 / 3, 0.0]])
    assert sig.active_index.tolist() == [[1, 2]]  # anchor vs the structurally closest miss
    np.testing.assert_array_equal(sig.advantages, [[0, 1, -1, 0]])
    assert sig.active_mask.tolist() == [True]


def test_recast_single_hit_hardest_negative_ties_lowest_index():
    sig = recast_signal([[0, 1, 0, 0]], [[1 / 3, 1.0, 1 / 3, 0.0]], alpha=0.5)
    assert not sig.repaired[0] and sig.anchor_index[0] == -1
    assert sig.active_index.tolist() == [[1, 0]]
    np.testing.assert_array_equal(sig.advantages, [[-0.5, 0.5, 0, 0]])
    np.testing.assert_array_equal(sig.pair_advantages, [[0.5, -0.5]])


def test_recast_several_hits_strongest_positive_lowest_index():
    sig = recast_signal([[0, 1, 0, 1]], [[2 / 3, 1.0, 1 / 3, 1.0]])
    assert sig.active_index.tolist() == [[1, 0]]
    np.testing.assert_array_equal(sig.advantages, [[-1, 1, 0, 0]])


def test_recast_positive_by_score_with_multi_target_scores():
    # hits with different scores (multi-target data): the higher-scoring hit is the positive
    sig = recast_signal([[1, 1, 0]], [[0.5, 0.9, 0.4]])
    assert sig.active_index.tolist() == [[1, 2]]


def test_recast_all_hit_group_is_skipped():
    sig = recast_signal([[1, 1, 1]], [[1, 1, 1]])
    assert sig.active_mask.tolist() == [False]
    assert not sig.repaired[0]
    assert sig.active_index[0, 1] == -1
    np.testing.assert_array_equal(sig.advantages, np.zeros((1, 3)))
    np.testing.assert_array_equal(sig.pair_advantages, np.zeros((1, 2)))


def test_repair_only_normalises_over_repaired_group():
    sig = compute_signal("repair_only", [[0, 0, 0, 0]], [[0.5, 0.2, 0.2, 0.9]], eps=0.0)
    assert sig.anchor_index.tolist() == [1]
    np.testing.assert_allclose(sig.advantages, [[-0.5, 1.5, -0.5, -0.5]])
    assert not sig.boundary


def test_boundary_only_skips_all_zero_groups():
    sig = compute_signal("boundary_only", [[0, 0, 0], [0, 1, 0]], [[0.1, 0.2, 0.3], [0.3, 1, 0.6]])
    assert sig.repaired.tolist() == [False, False]
    assert sig.active_mask.tolist() == [False, True]
    np.testing.assert_array_equal(sig.advantages, [[0, 0, 0], [0, 1, -1]])


def test_grpo_estimator_matches_grpo_advantage():
    rng = np.random.default_rng(0)
    r = (rng.random((20, 8)) < 0.2).astype(float)
    s = np.where(r == 1, 1.0, rng.integers(0, 3, r.shape) / 3)
    sig = compute_signal("grpo", r, s)
    np.testing.assert_allclose(sig.advantages, grpo_advantage(r))
    assert not sig.repaired.any()


def test_repair_mask_vetoes_repair():
    sig = recast_signal([[0, 0], [0, 0]], [[0, 0], [0, 0]], repair_mask=[True, False])
    assert sig.repaired.tolist() == [True, False]
    assert sig.active_mask.tolist() == [True, False]


def test_anchor_only_golden_positive_only_no_negative():
    # group 0 all-zero -> repaired at slot 1 (lowest score, lowest index): +0.5 on the anchor only;
    # group 1 has a natural hit: +0.5 on the strongest positive only; group 2 all-hit: skipped as in ReCast
    r = [[0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]]
    s = [[1 / 3, 0.0, 2 / 3, 0.0], [2 / 3, 1.0, 1 / 3, 1.0], [1, 1, 1, 1]]
    sig = compute_signal("anchor_only", r, s, alpha=0.5)
    ref = compute_signal("recast", r, s, alpha=0.5)
    assert sig.repaired.tolist() == [True, False, False] and sig.anchor_index.tolist() == [1, -1, -1]
    np.testing.assert_array_equal(sig.advantages, [[0, 0.5, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(sig.pair_advantages, [[0.5, 0], [0.5, 0], [0, 0]])
    # the same repair, the same active groups and the same pair as ReCast: only the negative's -alpha is gone
    np.testing.assert_array_equal(sig.active_index, ref.active_index)
    np.testing.assert_array_equal(sig.active_mask, [True, True, False])
    np.testing.assert_array_equal(sig.rewards, ref.rewards)
    np.testing.assert_array_equal(ref.advantages - sig.advantages, [[0, 0, -0.5, 0], [-0.5, 0, 0, 0], [0] * 4])
    assert sig.boundary


def test_negative_false_needs_a_boundary_estimator():
    with pytest.raises(ValueError, match="only applies to boundary"):
        recast_signal([[0, 1]], [[0, 1]], boundary=False, negative=False)


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        compute_signal("ppo", [[0, 1]], [[0, 1]])


# ----------------------------------------------------------------------------- loop reference


def _loop_recast(r, s, alpha, repair, boundary, negative=True):
    """Straight transcription of the spec, one group at a time."""
    r, s = np.array(r, float), np.array(s, float)
    P, G = r.shape
    adv = np.zeros((P, G))
    idx = -np.ones((P, 2), int)
    mask = np.zeros(P, bool)
    anchor = -np.ones(P, int)
    for p in range(P):
        if repair and r[p].sum() == 0:
            j = min(range(G), key=lambda i: (s[p, i], i))
            anchor[p] = j
            r[p, j], s[p, j] = 1.0, 1.0
        pos = [i for i in range(G) if r[p, i] == 1]
        neg = [i for i in range(G) if r[p, i] == 0]
        if pos:
            idx[p, 0] = max(pos, key=lambda i: (s[p, i], -i))
        if neg:
            idx[p, 1] = max(neg, key=lambda i: (s[p, i], -i))
        mask[p] = bool(pos and neg)
        if boundary:
            if mask[p]:
                adv[p, idx[p, 0]], adv[p, idx[p, 1]] = alpha, (-alpha if negative else 0.0)
        else:
            m = sum(r[p]) / G
            sd = (sum((x - m) ** 2 for x in r[p]) / (G - 1)) ** 0.5
            adv[p] = [(x - m) / (sd + 1e-6) for x in r[p]]
    return r, s, anchor, adv, idx, mask


def _random_group_batch(rng, P, G, hit_rate):
    r = (rng.random((P, G)) < hit_rate).astype(float)
    # scores on a coarse grid so ties are frequent; a hit always scores 1 (single-target data)
    s = np.where(r == 1, 1.0, rng.integers(0, 3, (P, G)) / 3)
    return r, s


@pytest.mark.parametrize("repair,boundary,negative", [(True, True, True), (True, False, True), (False, True, True),
                                                      (False, False, True), (True, True, False)])
@pytest.mark.parametrize("G", [2, 3, 8, 16])
def test_vectorised_matches_loop(repair, boundary, negative, G):
    rng = np.random.default_rng(G * 10 + 2 * repair + boundary + 4 * negative)
    for hit_rate in (0.0, 0.05, 0.3, 0.9, 1.0):
        r, s = _random_group_batch(rng, 40, G, hit_rate)
        alpha = float(rng.uniform(0.1, 2.0))
        sig = recast_signal(r, s, alpha=alpha, repair=repair, boundary=boundary, negative=negative)
        lr, ls, anchor, adv, idx, mask = _loop_recast(r, s, alpha, repair, boundary, negative)
        np.testing.assert_array_equal(sig.rewards, lr)
        np.testing.assert_array_equal(sig.scores, ls)
        np.testing.assert_array_equal(sig.anchor_index, anchor)
        np.testing.assert_allclose(sig.advantages, adv, atol=1e-9)
        np.testing.assert_array_equal(sig.active_index, idx)
        np.testing.assert_array_equal(sig.active_mask, mask)


def test_inputs_not_mutated():
    r = np.zeros((2, 4))
    s = np.full((2, 4), 0.5)
    recast_signal(r, s)
    assert r.sum() == 0 and (s == 0.5).all()


# ----------------------------------------------------------------------------- gather


def test_gather_rows_uses_anchor_for_repaired_groups():
    P, G, T = 3, 4, 5
    rows = np.arange(P * G * T).reshape(P * G, T)
    anchors = -np.arange(P * T).reshape(P, T) - 1
    r = [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]
    s = [[0.2, 0.1, 0.5, 0.1], [0.3, 1, 0.6, 0.0], [1, 1, 1, 1]]
    sig = recast_signal(r, s)
    sel = Selection.from_signal(sig)
    out = gather_rows(rows, anchors, sel)
    assert out.shape == (2 * P, T)
    assert sel.live.tolist() == [True, True, True, True, False, False]  # the skipped group carries no loss
    np.testing.assert_array_equal(out[0], anchors[0])  # repaired: anchor replaces slot 1
    np.testing.assert_array_equal(out[1], rows[0 * G + 2])  # hardest negative (score .5)
    np.testing.assert_array_equal(out[2], rows[1 * G + 1])
    np.testing.assert_array_equal(out[3], rows[1 * G + 2])
    assert not sig.active_mask[2]  # skipped group keeps two rows, masked by the caller


def test_whole_group_selection_swaps_the_anchor_into_its_slot():
    """repair-only: every row stays (B = P*G), the replaced slot holds the anchor's tokens, advantages are
    the repaired group's GRPO advantages; GRPO itself is the identity selection."""
    P, G, T = 2, 4, 3
    rows = np.arange(P * G * T).reshape(P * G, T)
    anchors = -np.arange(P * T).reshape(P, T) - 1
    r = [[0, 0, 0, 0], [0, 1, 0, 0]]
    s = [[0.5, 0.2, 0.2, 0.9], [0.3, 1, 0.6, 0.0]]
    sel = select(get_estimator("repair_only"), r, s, eps=0.0)
    out = gather_rows(rows, anchors, sel)
    assert out.shape == (P * G, T) and sel.live.all()
    np.testing.assert_array_equal(out[1], anchors[0])  # argmin score of group 0 is slot 1 (tie -> lowest)
    keep = np.ones(P * G, bool)
    keep[1] = False
    np.testing.assert_array_equal(out[keep], rows[keep])
    np.testing.assert_allclose(sel.advantages[:G], compute_signal("repair_only", r, s, eps=0.0).advantages[0], rtol=1e-6)
    grpo = select(get_estimator("grpo"), r, s)
    np.testing.assert_array_equal(gather_rows(rows, anchors, grpo), rows)
    assert not grpo.from_anchor.any()


def test_registry_declares_every_estimator_once():
    assert list(ESTIMATORS) == ["grpo", "repair_only", "boundary_only", "recast", "recast_adaptive", "anchor_only"]
    flags = {n: (e.repair, e.boundary, e.negative) for n, e in ESTIMATORS.items()}
    assert flags["recast"] == (True, True, True) and flags["grpo"] == (False, False, True)
    assert flags["anchor_only"] == (True, True, False) and ESTIMATORS["recast_adaptive"].adaptive
    for est in ESTIMATORS.values():
        assert est.actor_rows(8, 16) == (16 if est.boundary else 128)
        assert (est.cell(4) is None) == (not est.boundary)
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        get_estimator("ppo")


# ----------------------------------------------------------------------------- group_ids


def test_group_rows_explicit_group_ids():
    vals = np.array([10, 20, 11, 21, 12, 22])
    gids = np.array([0, 1, 0, 1, 0, 1])
    grouped, order = group_rows(vals, gids)
    np.testing.assert_array_equal(grouped, [[10, 11, 12], [20, 21, 22]])
    np.testing.assert_array_equal(vals[order], grouped)
    with pytest.raises(ValueError, match="unequal sizes"):
        group_rows(np.arange(3), np.array([0, 0, 1]))


# ----------------------------------------------------------------------------- diagnostics


def test_diagnostics_golden():
    r = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    d = signal_diagnostics(r)
    assert d["signals/all_zero_group_ratio"] == 0.25
    assert d["signals/single_hit_group_ratio"] == 0.25
    assert d["signals/all_hit_group_ratio"] == 0.25
    assert d["signals/zero_reward_sample_ratio"] == 9 / 16
    assert d["signals/repair_trigger_ratio"] == 0.25
    assert d["signals/naturally_trainable_ratio"] == 0.5
    assert d["signals/trainable_ratio_after_repair"] == 0.75
    d0 = signal_diagnostics(r, repaired=np.zeros(4, bool))  # GRPO: nothing repaired
    assert d0["signals/repair_trigger_ratio"] == 0.0
    assert d0["signals/trainable_ratio_after_repair"] == 0.5
    assert all("/" in k for k in d)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "rewards,scores,kw,msg",
    [
        ([[0, 0.5]], [[0, 0]], {}, "binary"),
        ([[0, 2]], [[0, 0]], {}, "binary"),
        ([[0, np.nan]], [[0, 0]], {}, "binary"),
        ([[0, 1]], [[0, 0, 0]], {}, "shape"),
        ([[1], [0]], [[1], [0]], {}, "G must be >= 2"),
        ([0, 1], [0, 1], {}, r"\[P, G\]"),
        ([[0, 1]], [[0, 1]], {"alpha": 0.0}, "alpha"),
        ([[0, 1]], [[0, 1]], {"alpha": -1.0}, "alpha"),
        ([[0, 1]], [[0, np.inf]], {}, "finite"),
    ],
)
def test_bad_input_raises(rewards, scores, kw, msg):
    with pytest.raises(ValueError, match=msg):
        recast_signal(rewards, scores, **kw)


def test_grpo_bad_input_raises():
    with pytest.raises(ValueError, match="G must be >= 2"):
        grpo_advantage([[1]])
    with pytest.raises(ValueError, match="binary"):
        grpo_advantage([[0.3, 1]])


# ----------------------------------------------------------------------------- the negative row's knobs (issue 24)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.3, 1.0])
def test_negative_weight_scales_only_the_negative(weight):
    r = [[0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]]
    s = [[1 / 3, 0.0, 2 / 3, 0.0], [2 / 3, 1.0, 1 / 3, 1.0], [1, 1, 1, 1]]
    sel = select(get_estimator("recast"), r, s, alpha=0.5, negative_weight=weight)
    ref = select(get_estimator("recast"), r, s, alpha=0.5)
    np.testing.assert_allclose(sel.advantages, [0.5, -0.5 * weight, 0.5, -0.5 * weight, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(sel.row_index, ref.row_index)  # the same pair, only its weight moves
    # weight 0: the negative row carries no loss at all, exactly as anchor_only's
    live = [True, weight > 0, True, weight > 0, False, False]
    np.testing.assert_array_equal(sel.live, live)
    if weight == 0:
        np.testing.assert_array_equal(sel.live, select(get_estimator("anchor_only"), r, s, alpha=0.5).live)


def test_negative_weight_must_be_finite_and_non_negative():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="negative_weight"):
            recast_signal([[0, 1]], [[0, 1]], negative_weight=bad)


def test_common_prefix_len_stops_at_the_first_difference_and_the_row_end():
    a = np.array([[5, 6, 7, 2], [5, 6, 7, 2], [9, 6, 7, 2], [5, 2, 0, 0]])
    b = np.array([[5, 6, 8, 2], [5, 6, 7, 2], [5, 6, 7, 2], [5, 2, 0, 0]])
    m = np.array([[1, 1, 1, 1]] * 3 + [[1, 1, 0, 0]])
    assert common_prefix_len(a, b).tolist() == [2, 4, 0, 4]
    assert common_prefix_len(a, b, m).tolist() == [2, 4, 0, 2]  # padding after EOS is not "shared"


def _pair_selection():
    # 3 groups of G = 4; group 2 is all-hit (skipped)
    r = [[0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]]
    s = [[1 / 3, 0.0, 2 / 3, 0.0], [2 / 3, 1.0, 1 / 3, 1.0], [1, 1, 1, 1]]
    return select(get_estimator("recast"), r, s)


def test_divergent_mask_keeps_the_negative_from_its_first_divergent_token():
    sel = _pair_selection()
    # actor rows (pos, neg) per group: codes a b c + EOS(2)
    rows = np.array([[5, 6, 7, 2], [5, 6, 8, 2],    # shares 2 codes: loss on the 3rd code and EOS
                     [4, 6, 7, 2], [5, 6, 7, 2],    # differs at once: full loss
                     [5, 6, 7, 2], [5, 6, 7, 2]])   # skipped group (mask already 0)
    mask = np.ones((6, 4), np.float32)
    mask[4:] = 0
    out = divergent_mask(rows, mask, sel)
    np.testing.assert_array_equal(out, [[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1])  # the input is not changed
    with pytest.raises(ValueError, match="boundary"):
        divergent_mask(rows[:5], mask[:5], sel)


def test_prefix_histogram_counts_active_pairs_by_shared_codes():
    sel = _pair_selection()
    rows = np.array([[5, 6, 7, 2], [5, 6, 8, 2], [4, 6, 7, 2], [5, 6, 7, 2], [5, 6, 7, 2], [5, 6, 7, 2]])
    h = prefix_histogram(rows, np.ones((6, 4)), sel, num_codes=3)
    # group 0 shares 2 codes, group 1 none; group 2 (skipped) is not counted though it shares all 3
    assert h == {"signals/pair_prefix_len_count/0": 1.0, "signals/pair_prefix_len_count/1": 0.0,
                 "signals/pair_prefix_len_count/2": 1.0, "signals/pair_prefix_len_count/3": 0.0}


def test_entropy_rows_golden_full_and_constrained():
    lg = np.log(np.array([[0.5, 0.25, 0.25, 1e-300], [1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(entropy_rows(lg), [1.5 * np.log(2), np.log(4)], rtol=1e-9)
    allowed = np.array([[True, True, False, False], [True, False, False, False]])
    # renormalised over the allowed tokens: (2/3, 1/3) and a point mass
    np.testing.assert_allclose(entropy_rows(lg, allowed), [-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)), 0.0],
                               atol=1e-12)
