"""The stateless (seed, step) epoch sampler shared by SFT and RL."""
import numpy as np
import pytest

from recast_ms.data.batching import EpochSampler


def test_chained_order_is_sfts_sequential_draws():
    """chained=True replays one default_rng(seed): epoch e is its (e+1)-th permutation (SFT's order, so SFT
    runs reproduce bit for bit), yet step t needs no state from step t-1."""
    n, k, seed = 23, 5, 7
    rng = np.random.default_rng(seed)
    expected = []
    for _ in range(4):  # 4 epochs of 4 full batches; the ragged tail (3 rows) is skipped
        perm = rng.permutation(n)
        expected += [perm[i * k:(i + 1) * k] for i in range(n // k)]
    s = EpochSampler(n, k, seed, chained=True)
    for t in (9, 0, 15, 3, 4):  # any order: a pure function of the step
        np.testing.assert_array_equal(s.at(t), expected[t])
    assert [s.epoch_of(t) for t in (0, 3, 4, 15)] == [0, 0, 1, 3]


def test_keyed_order_and_seeds_differ():
    s = EpochSampler(20, 4, seed=3)
    np.testing.assert_array_equal(s.at(6), np.random.default_rng([3, 1]).permutation(20)[4:8])
    assert not np.array_equal(EpochSampler(20, 4, seed=3).at(0), EpochSampler(20, 4, seed=4).at(0))
    epoch = np.concatenate([s.at(t) for t in range(5)])
    assert sorted(epoch.tolist()) == list(range(20))  # an epoch visits every row once
    with pytest.raises(ValueError, match="3 rows cannot fill steps of 4"):
        EpochSampler(3, 4, 0)
