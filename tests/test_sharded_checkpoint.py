"""Sharded checkpoints (recast_ms/trainer/sharded_checkpoint.py) on CPU, against strategy files a DryRun compile
wrote for the micro model's RL step (tests/fixtures/strategy/, made by tests/test_dryrun.py's commands; that
test also checks a fresh compile still writes these layouts):

* ``dp2_tp2.ckpt``: DP 2 x TP 2 on 4 ranks (``runtime.model_parallel=2``, world 4), the actor update graph;
* ``tp2.ckpt``: DP 1 x TP 2 on 2 ranks (world 2).

Known tensors are sliced per rank by :func:`slice_for_rank` (the project's reading of a layout), merged by
MindSpore's ``transform_checkpoints`` (its own), and must come back equal; re-sliced onto the other layout, every
destination rank's slices must equal the slices of the same tensors under that layout."""
import json
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.trainer import sharded_checkpoint as sc  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "strategy")
DP2_TP2, TP2 = os.path.join(FIXTURES, "dp2_tp2.ckpt"), os.path.join(FIXTURES, "tp2.ckpt")
# the micro model (model_configs/qwen3_micro.yaml): hidden 64, 4 heads / 2 KV heads of 16, MLP 128, vocab padded
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.0.self_attention.linear_proj.weight"


def _full_shapes(strategy, slice_shapes):
    out = {}
    for name, (dev, tmap, _) in sc.layouts(strategy).items():
        if name not in slice_shapes:
            continue
        out[name] = [n * (dev[len(dev) - 1 - m] if m >= 0 else 1) for n, m in zip(slice_shapes[name], tmap)]
    return out


@pytest.fixture(scope="module")
def full():
    lay = sc.layouts(DP2_TP2)
    rng = np.random.default_rng(0)
    # the micro model's full shapes, known independently of the strategy file
    shapes = {QKV: (128, 64), PROJ: (64, 64), "decoder.layers.0.mlp.linear_fc1.weight": (256, 64),
              "decoder.layers.0.mlp.linear_fc2.weight": (64, 128), "decoder.layers.0.input_layernorm.weight": (64,)}
    assert set(shapes) <= set(lay), sorted(lay)[:10]
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_the_fixture_layouts_are_tensor_parallel():
    lay = sc.layouts(DP2_TP2)
    dev, tmap, _ = lay[QKV]
    assert sorted(dev) == [1, 2, 2] or np.prod(dev) == 4, dev
    assert tmap[0] >= 0 and tmap[1] == -1  # column parallel: q/k/v rows split over TP
    _, tmap_proj, _ = lay[PROJ]
    assert tmap_proj[0] == -1 and tmap_proj[1] >= 0  # row parallel: input columns split
    for moment in ("optimizer.adam_m.", "optimizer.adam_v."):  # the AdamW moments are sliced as their weight
        assert lay[moment + QKV][:2] == lay[QKV][:2]


def test_slice_for_rank_column_and_row_parallel(full):
    lay = sc.layouts(DP2_TP2)
    halves = {tuple(sc.slice_for_rank(full[QKV], *lay[QKV][:2], r).shape) for r in range(4)}
    assert halves == {(64, 64)}
    parts = [sc.slice_for_rank(full[QKV], *lay[QKV][:2], r) for r in range(4)]
    # the four ranks hold the two row halves, each twice (the DP replicas)
    top = sum(np.array_equal(p, full[QKV][:64]) for p in parts)
    bottom = sum(np.array_equal(p, full[QKV][64:]) for p in parts)
    assert (top, bottom) == (2, 2)
    proj = [sc.slice_for_rank(full[PROJ], *lay[PROJ][:2], r) for r in range(4)]
    assert {p.shape for p in proj} == {(64, 32)}
    assert any(np.array_equal(p, full[PROJ][:, :32]) for p in proj)
    assert any(np.array_equal(p, full[PROJ][:, 32:]) for p in proj)


def test_merge_gives_back_the_full_tensors(full, tmp_path):
    step = str(tmp_path / "step_1")
    sc.write_rank_slices(full, DP2_TP2, range(4), step)
    merged = sc.merge(step, str(tmp_path / "merged.ckpt"))
    for name, value in full.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)


def test_a_sharded_step_reads_like_a_full_checkpoint(full, tmp_path):
    # recast-eval / --init on a semi-auto run's step: merged on the host, model weights only, the project's names
    import json

    from recast_ms.trainer import checkpoint as ckpt

    step = str(tmp_path / "checkpoints" / "step_3")
    moment = "optimizer.adam_m." + QKV
    sc.write_rank_slices({**full, moment: full[QKV] * 0.5}, DP2_TP2, range(4), step)
    with open(os.path.join(step, sc.META), "w", encoding="utf-8") as f:
        json.dump({"step": 3, "world_size": 4, "sharded": True, "phase": "rl"}, f)
    tensors, meta = ckpt.load_state(step)
    assert meta["step"] == 3 and set(tensors) == {"model/" + k for k in full}  # the AdamW moment is left out
    for name, value in full.items():
        np.testing.assert_array_equal(tensors["model/" + name], value, err_msg=name)


def test_transform_onto_another_layout(full, tmp_path):
    step = str(tmp_path / "step_1")
    sc.write_rank_slices(full, DP2_TP2, range(4), step)
    dst = sc.transform(step, str(tmp_path / "tp2"), TP2)
    lay = sc.layouts(TP2)
    for rank in range(2):
        files = [f for f in os.listdir(os.path.join(dst, f"rank_{rank}")) if f.endswith(".ckpt")]
        assert len(files) == 1, files
        got = {k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(dst, f"rank_{rank}", files[0])).items()}
        for name, value in full.items():
            np.testing.assert_array_equal(got[name], sc.slice_for_rank(value, *lay[name][:2], rank), err_msg=name)


class _TwoWeights(ms.nn.Cell):
    def __init__(self, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = ms.Parameter(ms.Tensor(rng.normal(size=(4, 3)).astype(np.float32)), name="w")
        self.b = ms.Parameter(ms.Tensor(rng.normal(size=(3,)).astype(np.float32)), name="b")


def test_save_rank_state_round_trips_and_prunes_old_steps(tmp_path):
    run = str(tmp_path / "run")
    strategy = sc.strategy_file(run, 1)
    os.makedirs(os.path.dirname(strategy))
    with open(DP2_TP2, "rb") as src, open(strategy, "wb") as dst:
        dst.write(src.read())
    saved = _TwoWeights(seed=0)
    for step in (1, 2, 3):  # rank 0 marks each step and keeps the newest two; rank 1 only writes its slices
        for rank in (0, 1):
            sc.save_rank_state(run, step, saved, {"estimator": "recast"}, rank=rank, world_size=2)
    ckpts = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["step_2", "step_3"]
    step_dir = os.path.join(ckpts, "step_3")
    assert sorted(os.listdir(step_dir)) == ["meta.json", "rank_0", "rank_1"]  # no temporary directory left
    assert sorted(os.listdir(sc.rank_dir(step_dir, 1))) == ["meta.json", "state_1.ckpt", "strategy.ckpt"]
    assert "strategy.ckpt" not in os.listdir(sc.rank_dir(step_dir, 0))  # rank 0 had no strategy file
    fresh = _TwoWeights(seed=1)
    assert not np.array_equal(fresh.w.asnumpy(), saved.w.asnumpy())
    meta = sc.load_rank_state(step_dir, fresh, rank=1)
    assert meta == {"step": 3, "rank": 1, "world_size": 2, "estimator": "recast"}
    np.testing.assert_array_equal(fresh.w.asnumpy(), saved.w.asnumpy())
    np.testing.assert_array_equal(fresh.b.asnumpy(), saved.b.asnumpy())
    with pytest.raises(FileNotFoundError, match="no slices for rank 5"):
        sc.load_rank_state(step_dir, fresh, rank=5)


def test_a_failed_rank_save_leaves_the_previous_slices(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    cell = _TwoWeights(seed=0)
    final = sc.save_rank_state(run, 1, cell, {}, rank=0, world_size=1)
    before = open(os.path.join(final, "state_0.ckpt"), "rb").read()

    def broken(*_a, **_k):
        raise KeyboardInterrupt  # what a kill mid-write raises

    monkeypatch.setattr(ms, "save_checkpoint", broken)
    with pytest.raises(KeyboardInterrupt):
        sc.save_rank_state(run, 1, _TwoWeights(seed=1), {}, rank=0, world_size=1)
    step_dir = os.path.dirname(final)
    assert sorted(os.listdir(step_dir)) == ["meta.json", "rank_0"]
    assert open(os.path.join(final, "state_0.ckpt"), "rb").read() == before


def _compiled_layout(dev, tmap, full_shape):
    """A ``parameter_layout_dict`` entry as MindSpore's compile gives it: (dev_matrix, tensor_map, slice_shape,
    field, uniform_split, opt_shard_group, full_shape)."""
    piece = [n // (dev[len(dev) - 1 - m] if m >= 0 else 1) for n, m in zip(full_shape, tmap)]
    return (list(dev), list(tmap), piece, 0, True, "", list(full_shape))


def test_load_slices_gives_each_rank_its_slice_one_tensor_at_a_time(full):
    # a sharded run from hf_checkpoint (engines.load_sliced_start): after compile every parameter holds its slice
    # shape; load_slices reads each full tensor once and sets MindSpore's slice of it, which must equal the
    # project's own slicing of the same layout (which test_merge checks against transform_checkpoints)
    lay = sc.layouts(DP2_TP2)
    layouts = {name: _compiled_layout(lay[name][0], lay[name][1], full[name].shape) for name in full}
    for rank in range(4):
        reads = []
        sources = {name: ((lambda name=name: reads.append(name) or full[name]), f"hf:{name}") for name in full}
        params = {"ref." + name: ms.Parameter(ms.Tensor(np.zeros(layouts[name][2], np.float32)), name="ref." + name)
                  for name in full}
        assert sc.load_slices(params, {"ref." + k: v for k, v in layouts.items()}, sources, rank, strip="ref.") == \
            len(full)
        assert sorted(reads) == sorted(full)  # each tensor read once
        for name in full:
            want = sc.slice_for_rank(full[name], lay[name][0], lay[name][1], rank)
            np.testing.assert_array_equal(params["ref." + name].asnumpy(), want)
        assert params["ref." + QKV].shape == (64, 64)  # half the q/k/v rows: TP 2


def test_load_slices_checks_names_and_shapes_before_setting(full):
    from recast_ms.models.weights import CheckpointError

    lay = sc.layouts(DP2_TP2)
    layouts = {name: _compiled_layout(lay[name][0], lay[name][1], full[name].shape) for name in full}
    sources = {name: ((lambda name=name: full[name]), f"hf:{name}") for name in full if name != PROJ}
    params = {name: ms.Parameter(ms.Tensor(np.zeros(layouts[name][2], np.float32)), name=name) for name in full}
    with pytest.raises(CheckpointError, match="no tensor for model parameter.*linear_proj"):
        sc.load_slices(params, layouts, sources, 0)
    assert not params[QKV].asnumpy().any()  # nothing was set
    sources[PROJ] = (lambda: full[PROJ][:, :32], "hf:proj")  # a tensor of the wrong width
    with pytest.raises(CheckpointError, match="hf:proj: tensor for .*linear_proj.* has shape \\[64, 32\\], "
                                              "the model needs \\[64, 64\\]"):
        sc.load_slices(params, layouts, sources, 1)
    sources[PROJ] = (lambda: full[PROJ], "hf:proj")
    params[PROJ] = ms.Parameter(ms.Tensor(np.zeros((64, 64), np.float32)), name=PROJ)  # not sliced as compiled
    with pytest.raises(CheckpointError, match="rank 1's slice of .*linear_proj.* has shape \\[64, 32\\], "
                                              "the compiled graph holds \\[64, 64\\]"):
        sc.load_slices(params, layouts, sources, 1)


def test_load_rank_model_slices_reads_a_step_of_the_same_layout_and_refuses_another(full, tmp_path):
    # an RL run --init from the SFT run's sharded step on the same layout (engines.load_sliced_init): each rank sets
    # its own saved slices, model weights only; a compiled layout that splits differently is refused naming
    # transform, and a layout written with another device matrix but the same splits ([2, 2] for [2, 1, 2]) is not
    from recast_ms.models.weights import CheckpointError

    lay = sc.layouts(DP2_TP2)
    step = str(tmp_path / "sft" / "checkpoints" / "step_40")
    sc.write_rank_slices({**full, "optimizer.adam_m." + QKV: full[QKV]}, DP2_TP2, range(4), step)
    for rank in range(4):
        layouts = {"ref." + name: _compiled_layout([2, 2], lay[name][1], full[name].shape) for name in full}
        params = {"ref." + name: ms.Parameter(ms.Tensor(np.zeros(layouts["ref." + name][2], np.float32)),
                                              name="ref." + name) for name in full}
        assert sc.load_rank_model_slices(params, layouts, step, rank, strip="ref.") == len(full)
        for name in full:
            want = sc.slice_for_rank(full[name], lay[name][0], lay[name][1], rank)
            np.testing.assert_array_equal(params["ref." + name].asnumpy(), want)
    assert sc.axis_splits([2, 1, 2], [0, -1], 3) == sc.axis_splits([2, 2], [0, -1], 3) == [(2, 1), (1, 0)]
    layouts = {name: _compiled_layout(lay[name][0], lay[name][1], full[name].shape) for name in full}
    layouts[PROJ] = _compiled_layout(lay[PROJ][0], [0, -1], full[PROJ].shape)  # rows split, not columns
    params = {name: ms.Parameter(ms.Tensor(np.zeros(layouts[name][2], np.float32)), name=name) for name in full}
    with pytest.raises(CheckpointError, match="linear_proj.* was saved under .* transform the step onto this layout"):
        sc.load_rank_model_slices(params, layouts, step, 1)
    with pytest.raises(CheckpointError, match="no slices for rank 5"):
        sc.load_rank_model_slices(params, layouts, step, 5)
    assert sc.is_sharded_step(step) is False  # rank 0's meta.json (written by save_rank_state) marks a step
    with open(os.path.join(step, sc.META), "w") as f:
        json.dump({"step": 40, "sharded": True}, f)
    assert sc.is_sharded_step(step) and not sc.is_sharded_step(str(tmp_path))
