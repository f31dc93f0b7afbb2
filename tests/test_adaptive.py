"""Adaptive repair: static ReCast while nothing is naturally trainable, receding as groups become trainable."""
import pytest

pytest.importorskip("mindspore")
from recast_ms.trainer.rl import AdaptiveRepair  # noqa: E402


def test_adaptive_repair_recedes_with_naturally_trainable_ratio():
    a = AdaptiveRepair(target=0.5, floor=0.1, momentum=0.5)
    assert a.prob == 1.0  # no evidence yet: repair like static ReCast
    a.update(0.0)
    assert a.prob == 1.0
    a.update(0.5)  # EMA 0.25 -> 1 - 0.25 / 0.5
    assert a.prob == pytest.approx(0.5)
    for _ in range(20):
        a.update(0.8)
    assert a.prob == pytest.approx(0.1)  # floored once groups are trainable on their own
