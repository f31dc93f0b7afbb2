"""The semi-auto-parallel policy cells (recast_ms/models/sharded.py) off semi-auto parallel: on CPU their shard
strategies do nothing, so they must equal the plain cells the CPU path uses, value for value and in gradient."""
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.config import load_config  # noqa: E402
from recast_ms.models.policy import LogitsAt, ResponseLogProbs  # noqa: E402
from recast_ms.models.sharded import ShardedLogitsAt, ShardedResponseLogProbs  # noqa: E402
from recast_ms.trainer.rl import RLTrainer  # noqa: E402

MICRO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs", "qwen3_micro.yaml")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_cells")
    over = {"model_config": MICRO, "seq_length": 32, "data.num_users": 60, "rl.prompts_per_step": 2,
            "rl.group_size": 4, "rl.kl_coef": 0.001, "rl.lr": 1e-3, "rl.estimator": "grpo"}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    return RLTrainer(cfg, str(tmp / "run"), None, str(tmp / "tok"), progress=False)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_sharded_response_logps_equal_plain(trainer, temperature):
    batch = trainer.make_batch()
    ids, start = ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)
    plain = ResponseLogProbs(trainer.model, trainer.R, temperature)(ids, start).asnumpy()
    sharded = ShardedResponseLogProbs(trainer.model, trainer.R, temperature, dp=2, tp=2)(ids, start).asnumpy()
    assert sharded.shape == plain.shape == (8, trainer.R)
    assert np.abs(plain).max() > 0.5
    np.testing.assert_allclose(sharded, plain, rtol=0, atol=2e-5)


def test_sharded_response_logps_same_gradient(trainer):
    batch = trainer.make_batch()
    ids, start = ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)
    params = ms.ParameterTuple(trainer.model.trainable_params())
    weights = ms.Tensor(np.random.default_rng(0).normal(size=(8, trainer.R)).astype(np.float32))

    class Weighted(ms.nn.Cell):
        def __init__(self, cell):
            super().__init__(auto_prefix=False)
            self.cell = cell

        def construct(self, i, s):
            return (self.cell(i, s) * weights).sum()

    def grads(cell):
        return [g.asnumpy() for g in ms.grad(Weighted(cell), None, params)(ids, start)]

    g_plain = grads(ResponseLogProbs(trainer.model, trainer.R))
    g_sharded = grads(ShardedResponseLogProbs(trainer.model, trainer.R, dp=2, tp=2))
    assert max(np.abs(g).max() for g in g_plain) > 1e-3
    for a, b in zip(g_plain, g_sharded):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_sharded_logits_at_equal_plain(trainer):
    batch = trainer.make_batch()
    ids = ms.Tensor(batch.input_ids)
    pos = ms.Tensor((batch.resp_start - 1).astype(np.int32))
    plain = LogitsAt(trainer.model)(ids, pos).asnumpy()
    sharded = ShardedLogitsAt(trainer.model, dp=2, tp=2)(ids, pos).asnumpy()
    assert sharded.shape == plain.shape == (8, trainer.model.config.vocab_size)
    np.testing.assert_allclose(sharded, plain, rtol=0, atol=2e-5)


def test_sharded_reference_takes_the_actors_weights(trainer):
    """The semi-auto reference engine is a second model of the actor's config; copy_from gives it the actor's
    weights (before any compile), after which its log-probs equal the actor's."""
    from types import SimpleNamespace

    from recast_ms.runtime import Layout
    from recast_ms.trainer.engines import ShardedReference, StepBatch

    ref = ShardedReference(trainer.model, trainer.rcfg, trainer.R, SimpleNamespace(layout=Layout(1, 1, 1, 1, False, False)))
    assert all(p.name.startswith("ref.") for p in ref.model.get_parameters())
    n = len(list(trainer.model.get_parameters()))
    assert ref.copy_from(trainer.model) == n
    batch = trainer.make_batch()
    ids, start = ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)
    sb = StepBatch(batch.input_ids, batch.resp_start, batch.advantages, batch.loss_mask, len(ids), [(ids, start)])
    got = ref.logps(sb)[0].asnumpy()
    # the sharded cell vs the plain one: equal weights, fp32 rounding of two op orders (as above)
    np.testing.assert_allclose(got, trainer.policy.logps_fn(ids, start).asnumpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("micro", [2, 4, 3])  # 3 does not divide the 8 rows: one micro-batch
def test_pipeline_forward_equals_the_unwrapped_cells(trainer, micro):
    """Under pipeline parallelism the forward graphs run as MindSpore's pipeline-inference pattern (a lazy-inline
    body per micro-batch of rows, outputs concatenated); off a pipeline that must change no value. The body is the
    plain one here: the CPU backend cannot run a lazy-inline cell called twice, and lazy_inline changes no value."""
    from recast_ms.models.sharded import PipelineForward

    batch = trainer.make_batch()
    ids, start = ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)
    pos = ms.Tensor((batch.resp_start - 1).astype(np.int32))
    logits_at = ShardedLogitsAt(trainer.model, dp=2, tp=2)
    wrapped = PipelineForward(logits_at, micro, lazy_inline=False)
    assert wrapped.is_logits_at  # FullForwardDecoder still takes it as its next-token cell
    np.testing.assert_allclose(wrapped(ids, pos).asnumpy(), logits_at(ids, pos).asnumpy(), rtol=0, atol=2e-5)
    logps = ShardedResponseLogProbs(trainer.model, trainer.R, 1.0, dp=2, tp=2)
    np.testing.assert_allclose(PipelineForward(logps, micro, lazy_inline=False)(ids, start).asnumpy(), logps(ids, start).asnumpy(),
                               rtol=0, atol=2e-5)


def test_stage_column_and_the_last_stage_statistics(monkeypatch):
    """Under a pipeline only the last stage holds the step's loss and statistics: each rank's stage column sums
    them with the other stages contributing zeros (the grad norm as the column's largest)."""
    import mindspore.ops.communication as comm

    from recast_ms.trainer import engines

    assert engines.stage_column(0, 8, 2) == ([0, 4], False) and engines.stage_column(7, 8, 2) == ([3, 7], True)
    assert engines.stage_column(5, 12, 3) == ([1, 5, 9], False) and engines.stage_column(9, 12, 3) == ([1, 5, 9], True)
    sent = []

    def fake_all_reduce(tensor, op="sum", group=None, async_op=False):
        sent.append((tensor.asnumpy().copy(), op, group))
        # host-side arithmetic: a kernel here would start MindSpore's runtime before another module's set_device
        return type(tensor)(tensor.asnumpy() * (3 if op == "sum" else 1)), None  # a column of three such members

    monkeypatch.setattr(comm, "all_reduce", fake_all_reduce)
    monkeypatch.delenv("MS_SIMULATION_LEVEL", raising=False)
    stats = np.array([0.5, 0.25, 0.125, 0.0625])
    got, norm = engines._from_last_stage(stats, 2.0, "g", last=True)
    np.testing.assert_allclose(got, 3 * stats)
    np.testing.assert_allclose(sent[0][0], stats)
    assert norm == 2.0 and sent[1][1] == "max" and sent[0][2] == sent[1][2] == "g"
    got, _ = engines._from_last_stage(stats, 2.0, "g", last=False)
    assert (sent[2][0] == 0).all() and (got == 0).all()  # what a non-last stage holds is not the loss


def test_pure_morphs_changes_no_value(trainer):
    """Clearing the side-effect flags of the linear layers' Morphs (needed by the last pipeline stages' forward
    graphs) keeps the embedding's and changes no output. Last in this module: the flags stay cleared."""
    from mindspore.ops.operations import Morph

    from recast_ms.models.sharded import pure_morphs

    batch = trainer.make_batch()
    ids, start = ms.Tensor(batch.input_ids), ms.Tensor(batch.resp_start)
    before = ResponseLogProbs(trainer.model, trainer.R)(ids, start).asnumpy()
    morphs = [(type(c).__name__, p) for _, c in trainer.model.cells_and_names()
              for p in getattr(c, "_primitives", {}).values() if isinstance(p, Morph)]
    n = pure_morphs(trainer.model)
    assert n == sum(1 for name, _ in morphs if "Embedding" not in name) and n > 0, morphs
    for name, prim in morphs:
        kept = "Embedding" in name
        assert bool(prim.attrs.get("side_effect_mem")) is kept, name
    after = ResponseLogProbs(trainer.model, trainer.R)(ids, start).asnumpy()
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)


def test_sharded_sft_engine_equals_the_local_one_and_resumes(tmp_path):
    """The semi-auto SFT engine (MindFormers' one-step cell + AdamW over the mcore-contract SFT loss) off semi-auto
    parallel: the same loss, gradient norm and weights as the CPU path's fused optimizer, step for step, with the
    cosine schedule's lr set on AdamW's Parameter each step; its per-rank checkpoint resumes to the same next step."""
    from types import SimpleNamespace

    from recast_ms.runtime import Layout
    from recast_ms.trainer.engines import LocalSFT, ShardedSFT
    from recast_ms.trainer.setup import build_model, get_tokenizer, load_splits, response_len
    from recast_ms.trainer.sft import encode_split

    cfg = load_config(None, [f"model_config={MICRO}", "seq_length=32", "data.num_users=60", "sft.batch_size=8"])
    splits = load_splits(cfg.data)
    tok = get_tokenizer(splits, str(tmp_path / "tok"), cfg)
    R = response_len(splits)
    ids, start, mask = encode_split(splits.train[:8], splits, tok, cfg)
    plan = SimpleNamespace(layout=Layout(1, 1, 1, 1, False, False), use_parallel=True)

    def sharded():
        return ShardedSFT(build_model(cfg, tok, seed=0), cfg.sft, R, 8, plan)

    sh, lo = sharded(), LocalSFT(build_model(cfg, tok, seed=0), cfg.sft, R)
    n = float(mask.sum())
    np.testing.assert_allclose(sh.logps(ids, start), lo.logps(ids, start), rtol=0, atol=2e-5)
    losses = []
    for lr in (1e-2, 5e-3, 2e-3):
        (a, na), (b, nb) = sh.train_step(ids, start, mask, n, lr), lo.train_step(ids, start, mask, n, lr)
        assert a == pytest.approx(b, rel=1e-5) and na == pytest.approx(nb, rel=1e-4)
        losses.append(a)
    assert losses[-1] < losses[0] - 0.5  # it learned: the same 8 rows, three steps
    for p, q in zip(sh.model.trainable_params(), lo.model.trainable_params()):
        np.testing.assert_allclose(p.asnumpy(), q.asnumpy(), rtol=0, atol=5e-5)  # fp32 op order through AdamW
    sh.save(str(tmp_path / "run"), 3, {"phase": "sft"}, rank=0, keep=2)
    again = sharded()
    assert again.load(str(tmp_path / "run" / "checkpoints" / "step_3"))["step"] == 3
    (a, _), (b, _) = again.train_step(ids, start, mask, n, 1e-3), sh.train_step(ids, start, mask, n, 1e-3)
    assert a == pytest.approx(b, rel=1e-6)
