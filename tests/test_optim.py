"""Optimizer: torch-exact bias-corrected AdamW with decoupled decay, accumulation, clipping, schedule."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import nn, ops  # noqa: E402

from recast_ms.trainer.optim import Optimizer, cosine_lr  # noqa: E402


class Lin(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.ones((3, 4), np.float32)), name="w")
        self.b = ms.Parameter(ms.Tensor(np.zeros(4, np.float32)), name="b")

    def construct(self, x, y):
        out = ops.matmul(x, self.w) + self.b
        loss = ((out - y) ** 2).mean()
        return loss, loss * 2


def _numpy_adamw(x, y, steps, lr, wd, micro=1, clip=0.0):
    W, B = np.ones((3, 4)), np.zeros(4)
    m = [np.zeros_like(W), np.zeros_like(B)]
    v = [np.zeros_like(W), np.zeros_like(B)]
    for t in range(1, steps + 1):
        gW, gB = np.zeros_like(W), np.zeros_like(B)
        for xs, ys in zip(np.array_split(x, micro), np.array_split(y, micro)):
            out = xs @ W + B
            d = 2 * (out - ys) / out.size
            gW += xs.T @ d
            gB += d.sum(0)
        if clip > 0:
            n = np.sqrt((gW**2).sum() + (gB**2).sum())
            s = min(1.0, clip / (n + 1e-6))
            gW, gB = gW * s, gB * s
        W = W * (1 - lr * wd)  # decoupled decay; the 1-D bias is not decayed
        for i, (p, g) in enumerate(((W, gW), (B, gB))):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            p -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    return W, B


@pytest.mark.parametrize("micro,clip", [(1, 0.0), (2, 0.05)])
def test_adamw_matches_torch_formula(micro, clip):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    y = rng.normal(size=(6, 4)).astype(np.float32)
    net = Lin()
    opt = Optimizer(net, net.trainable_params(), lr=0.1, weight_decay=0.1, grad_clip=clip)
    for _ in range(5):
        for xs, ys in zip(np.array_split(x, micro), np.array_split(y, micro)):
            loss, aux = opt.accumulate(ms.Tensor(xs), ms.Tensor(ys))
            assert np.isclose(aux.asnumpy(), 2 * loss.asnumpy())
        opt.step(0.1)
    W, B = _numpy_adamw(x, y, 5, 0.1, 0.1, micro, clip)
    np.testing.assert_allclose(net.w.asnumpy(), W, atol=2e-5)
    np.testing.assert_allclose(net.b.asnumpy(), B, atol=2e-5)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_fused_step_equals_accumulate_then_step(clip):
    """One micro-batch per step: the fused graph (no gradient buffers) gives the same weights and norms."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.normal(size=(6, 3)).astype(np.float32))
    y = ms.Tensor(rng.normal(size=(6, 4)).astype(np.float32))
    nets, norms = [], []
    for fused in (False, True):
        net = Lin()
        opt = Optimizer(net, net.trainable_params(), lr=0.1, weight_decay=0.1, grad_clip=clip, name=f"f{fused}",
                        fused=fused)
        assert (opt.buffers is None) == fused
        norms.append([opt.train_step([(x, y)], 0.1)[1] for _ in range(4)])
        nets.append(net)
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-6)
    np.testing.assert_allclose(nets[0].w.asnumpy(), nets[1].w.asnumpy(), atol=1e-7)
    W, _ = _numpy_adamw(x.asnumpy(), y.asnumpy(), 4, 0.1, 0.1, 1, clip)
    np.testing.assert_allclose(nets[1].w.asnumpy(), W, atol=2e-5)
    with pytest.raises(RuntimeError, match="fused"):
        opt.accumulate(x, y)
    with pytest.raises(ValueError, match="exactly one micro-batch"):
        opt.train_step([(x, y), (x, y)], 0.1)


def test_state_dict_round_trip_resumes_exactly():
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.normal(size=(6, 3)).astype(np.float32))
    y = ms.Tensor(rng.normal(size=(6, 4)).astype(np.float32))
    a = Lin()
    oa = Optimizer(a, a.trainable_params(), lr=0.05, name="a")
    for _ in range(3):
        oa.accumulate(x, y)
        oa.step(0.05)
    b = Lin()
    ob = Optimizer(b, b.trainable_params(), lr=0.05, name="a")
    for pa, pb in zip(a.trainable_params(), b.trainable_params()):
        pb.set_data(pa.data.copy())
    ob.load_state_dict(oa.state_dict())
    for o in (oa, ob):
        o.accumulate(x, y)
        o.step(0.05)
    np.testing.assert_array_equal(a.w.asnumpy(), b.w.asnumpy())


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    mid = cosine_lr(55, 100, 1.0, 10, 0.1)
    assert 0.5 < mid < 0.6


class _ManyParams(nn.Cell):
    """``n`` tiny tensors: the per-parameter loops of the optimizer cells set the graph's call depth."""

    def __init__(self, n):
        super().__init__()
        self.ps = ms.ParameterTuple(
            [ms.Parameter(ms.Tensor(np.full((2, 2), 0.5, np.float32)), name=f"mp{i}") for i in range(n)])

    def construct(self, x):
        y = x
        for p in self.ps:
            y = y + (p * p).sum()
        loss = y.sum()
        return loss, loss * 2


def test_optimizer_compiles_past_the_default_call_depth():
    # 120 tensors need more than a call depth of 400 (measured: the step fails to compile at 400 without
    # ensure_call_depth); the optimizer raises the limit by its parameter count, as Qwen3-1.7B's 311 tensors
    # need above the default 1000
    from recast_ms.trainer import optim

    ms.set_recursion_limit(400)
    optim._call_depth[0] = 400
    try:
        net = _ManyParams(120)
        opt = Optimizer(net, net.trainable_params(), lr=0.1, name="many")
        assert optim._call_depth[0] >= 120 * optim.CALL_DEPTH_PER_PARAM
        x = ms.Tensor(np.ones(2, np.float32))
        _, norm = opt.train_step([(x,)], lr=0.1)
        # d loss / d p = 2 * 2p per element (two output entries): 2.0 for each of 120 x 4 entries
        assert norm == pytest.approx(np.sqrt(120 * 4 * 2.0**2), rel=1e-5)
        assert float(net.ps[0].asnumpy()[0, 0]) < 0.5  # the step moved the parameters down the gradient
    finally:
        ms.set_recursion_limit(max(1000, optim._call_depth[0]))
