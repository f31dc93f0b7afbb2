"""The graph-mode RecastSelect Cell agrees exactly with the numpy reference, down to the actor rows."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.signals import Selection, gather_rows, get_estimator, recast_signal, select  # noqa: E402
from recast_ms.signals_ms import RecastSelect  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def graph_mode_cpu():
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device("CPU")
    except RuntimeError as err:  # an earlier test in this process already ran a kernel: the runtime is up, on CPU
        if "runtime has been initialized" not in str(err):
            raise
    assert ms.get_context("device_target") == "CPU"


def _batch(rng, P, G, hit_rate, coarse=True):
    r = (rng.random((P, G)) < hit_rate).astype(np.float32)
    if coarse:  # frequent ties
        s = np.where(r == 1, 1.0, rng.integers(0, 3, (P, G)) / 3).astype(np.float32)
    else:  # multi-target-like: hits need not score 1
        s = rng.random((P, G)).astype(np.float32)
    # force the special rows: all-zero, all-hit, all-tied scores
    r[0], s[0] = 0, 0
    r[1], s[1] = 1, 1
    r[2] = 0
    return r, s


@pytest.mark.parametrize("repair,negative", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("G", [2, 8, 16])
def test_cell_matches_numpy_on_random_inputs(repair, negative, G):
    P = 32
    alpha = 0.7
    sel = RecastSelect(group_size=G, alpha=alpha, repair=repair, negative=negative)
    rng = np.random.default_rng(G + 100 * repair)
    trials = 0
    for hit_rate in (0.0, 0.05, 0.2, 0.6, 1.0):
        for coarse in (True, False):
            r, s = _batch(rng, P, G, hit_rate, coarse)
            veto = rng.random(P) < 0.9
            out = sel(ms.Tensor(r), ms.Tensor(s), ms.Tensor(veto))
            idx, pair_adv, mask, repaired, anchor, r2, s2 = [o.asnumpy() for o in out]
            ref = recast_signal(r, s, alpha=alpha, repair=repair, boundary=True, negative=negative, repair_mask=veto)
            np.testing.assert_array_equal(repaired, ref.repaired)
            np.testing.assert_array_equal(anchor, ref.anchor_index)
            np.testing.assert_array_equal(mask, ref.active_mask)
            # indices only carry meaning where the group has that kind of sample
            np.testing.assert_array_equal(idx, ref.active_index)
            np.testing.assert_allclose(pair_adv, ref.pair_advantages.astype(np.float32), rtol=0, atol=0)
            np.testing.assert_array_equal(r2, ref.rewards.astype(np.float32))
            np.testing.assert_array_equal(s2, ref.scores.astype(np.float32))
            trials += 1
    assert trials == 10


def test_gather_matches_numpy():
    """The trainer's path (Cell selection -> Selection -> gather_rows) gives the numpy reference's actor rows."""
    P, G, T = 16, 8, 12
    rng = np.random.default_rng(3)
    r, s = _batch(rng, P, G, 0.1)
    ref = Selection.from_signal(recast_signal(r, s))
    rows = rng.integers(0, 1000, (P * G, T)).astype(np.int32)
    anchors = rng.integers(1000, 2000, (P, T)).astype(np.int32)
    for name in ("recast", "anchor_only", "boundary_only"):
        est = get_estimator(name)
        graph = select(est, r, s, cell=est.cell(G))
        numpy_ref = select(est, r, s)
        for field in ("row_index", "from_anchor", "prompt_index", "live", "repaired", "active_mask"):
            np.testing.assert_array_equal(getattr(graph, field), getattr(numpy_ref, field), err_msg=f"{name} {field}")
        np.testing.assert_array_equal(graph.advantages, numpy_ref.advantages.astype(np.float32))
    graph = select(get_estimator("recast"), r, s, cell=get_estimator("recast").cell(G))
    out = gather_rows(rows, anchors, graph)
    assert out.shape == (2 * P, T)
    np.testing.assert_array_equal(out, gather_rows(rows, anchors, ref))
    assert graph.repaired.any()  # the anchor path was exercised
    np.testing.assert_array_equal(out[0::2][graph.repaired], anchors[graph.repaired])


def test_cell_rejects_bad_construction():
    with pytest.raises(ValueError, match="G must be >= 2"):
        RecastSelect(group_size=1)
    with pytest.raises(ValueError, match="alpha"):
        RecastSelect(group_size=4, alpha=0.0)


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_cell_matches_numpy_with_a_negative_weight(weight):
    """rl.negative_weight (issue 24): the Cell's advantages and loss rows equal the reference's, exactly."""
    rng = np.random.default_rng(5)
    r, s = _batch(rng, 32, 8, 0.2)
    est = get_estimator("recast")
    ref = select(est, r, s, alpha=0.7, negative_weight=weight)
    got = select(est, r, s, alpha=0.7, negative_weight=weight, cell=est.cell(8, 0.7, weight))
    np.testing.assert_array_equal(got.advantages, ref.advantages)
    np.testing.assert_array_equal(got.live, ref.live)
    np.testing.assert_array_equal(got.row_index, ref.row_index)
