"""PolicyLoss: against a numpy transcription, and micro-batch additivity."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from recast_ms.trainer.loss import PolicyLoss  # noqa: E402


def _np_loss(lp, old, ref, adv, mask, n, lo=0.2, hi=0.28, beta=0.01):
    ratio = np.exp(lp - old)
    pg = np.maximum(-adv[:, None] * ratio, -adv[:, None] * np.clip(ratio, 1 - lo, 1 + hi))
    d = ref - lp
    kl = np.exp(d) - d - 1
    tok = pg + beta * kl
    seq = (tok * mask).sum(1) / np.maximum(mask.sum(1), 1)
    return seq.sum() / n


def test_policy_loss_matches_numpy_and_splits_over_micro_batches():
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    B, T = 8, 5
    lp = rng.normal(-2, 0.5, (B, T)).astype(np.float32)
    old = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = np.array([1, -1, 0, 1, -1, 1, 0, -1], np.float32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    mask[2] = 0  # a skipped row contributes nothing
    loss_fn = PolicyLoss(0.2, 0.28, 0.01)
    T_ = ms.Tensor
    full = loss_fn(T_(lp), T_(old), T_(ref), T_(adv), T_(mask), T_(8.0, ms.float32))[0].asnumpy()
    np.testing.assert_allclose(full, _np_loss(lp, old, ref, adv, mask, 8), rtol=1e-5)
    halves = sum(
        loss_fn(T_(lp[s]), T_(old[s]), T_(ref[s]), T_(adv[s]), T_(mask[s]), T_(8.0, ms.float32))[0].asnumpy()
        for s in (slice(0, 4), slice(4, 8))
    )
    np.testing.assert_allclose(halves, full, rtol=1e-5)


def test_on_policy_gradient_sign():
    """On-policy (ratio 1), kl_coef 0: d loss / d logp = -A / |y| / n, the REINFORCE direction."""
    ms.set_context(mode=ms.GRAPH_MODE)
    loss_fn = PolicyLoss(0.2, 0.28, 0.0)
    lp = ms.Tensor(np.full((2, 3), -1.0, np.float32))
    mask = ms.Tensor(np.ones((2, 3), np.float32))
    adv = ms.Tensor(np.array([1.0, -1.0], np.float32))

    class OnPolicy(ms.nn.Cell):
        def construct(self, x):
            return loss_fn(x, ms.ops.stop_gradient(x), ms.ops.stop_gradient(x), adv, mask, ms.Tensor(2.0, ms.float32))[0]

    grad = ms.grad(OnPolicy())(lp)
    np.testing.assert_allclose(grad.asnumpy(), [[-1 / 6] * 3, [1 / 6] * 3], rtol=1e-5)
