"""The memory planner (recast_ms/memory_plan.py, scripts/plan_memory.py): shapes, Ascend terms, CPU calibration."""
import json
import os
import shutil
import sys

import pytest

from recast_ms import memory_plan as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.mark.parametrize("yaml_name, vocab, expected", [
    ("qwen3_0_6b", None, 596_049_920), ("qwen3_1_7b", None, 1_720_574_976), ("qwen3_8b", None, 8_190_735_360),
    ("qwen3_14b", None, 14_768_307_200),  # the published Qwen3 sizes: 0.6B / 1.7B / 8.2B / 14.8B
    ("qwen3_tiny", 1024, 3_410_000), ("qwen3_10m", 1024, 9_840_000),  # README: bench_model's measured counts
])
def test_parameter_counts(yaml_name, vocab, expected):
    n = mp.load_shape(f"model_configs/{yaml_name}.yaml", vocab).num_params
    assert n == pytest.approx(expected, rel=0.003 if vocab else 0)


def test_tiny_count_equals_the_built_model():
    """The planner's parameter count equals MindFormers' model (tiny, built once, ~3 s)."""
    from recast_ms.models.qwen3 import build_context, build_qwen3, count_parameters

    build_context("CPU")
    model = build_qwen3("qwen3_tiny.yaml", vocab_size=340, seq_length=16, pad_token_id=0, eos_token_id=1)
    assert count_parameters(model) == mp.load_shape("model_configs/qwen3_tiny.yaml", 340).num_params


def _plan(**kw):
    s = mp.load_shape("model_configs/qwen3_8b.yaml")
    args = dict(dp=2, tp=4, pp=1, micro_batch_num=1, optimizer_parallel=True, recompute=True, seq_parallel=True,
                flash=True, train_rows=32, rollout_rows=512, seq=1024)
    args.update(kw)
    return s, mp.plan_ascend(s, **args)


def test_ascend_terms_follow_the_layout():
    s, t = _plan()
    n_dev = s.num_params / 4
    # one micro-batch under semi-auto parallel: the gradients as the AdamW step's temporaries, split by the shard
    assert t["params"] == pytest.approx(n_dev * 4 / 2) and t["grads"] == pytest.approx(n_dev * 4 * 2.36 / 2)
    _, dp4 = _plan(dp=4)  # split further at DP 4 (8B DP 4 x TP 4 compiles within 4% of it)
    assert dp4["grads"] == pytest.approx(n_dev * 4 * 2.36 / 4)
    _, acc = _plan(accumulate=True)  # the accumulating step keeps whole fp32 gradients
    assert acc["grads"] == pytest.approx(n_dev * 4)
    # the data-parallel path (TP = PP = 1, KV decoder): the fused one-graph step holds two fp32 gradients
    dp_args = dict(tp=1, dp=8, optimizer_parallel=False, rollout_engine="kv_decoder")
    s, fused = _plan(fused=True, **dp_args)
    _, buffered = _plan(**dp_args)
    assert fused["grads"] == pytest.approx(s.num_params * 4 * mp.DP_FUSED_STEP_GRADS)
    assert buffered["grads"] == pytest.approx(s.num_params * 4)
    assert t["optimizer"] == pytest.approx(n_dev * 8 / 2) and t["optimizer_no_opt_parallel"] == pytest.approx(n_dev * 8)
    assert t["reference"] == pytest.approx(n_dev * 4 / 2)  # the actor's params dtype (fp32), sharded as its weights
    _, no_op = _plan(optimizer_parallel=False)
    assert no_op["optimizer"] == 2 * t["optimizer"] and no_op["params"] == 2 * t["params"]
    _, no_rc = _plan(recompute=False)
    assert no_rc["activations"] > 5 * (t["activations"] - t["logits"]) + t["logits"]
    _, no_kl = _plan(kl=False)
    assert no_kl["reference"] == 0 and no_kl["total"] < t["total"]
    # twice the rows per device: twice the activations and logits; KV cache follows the rollout rows
    _, big = _plan(train_rows=64, rollout_rows=1024)
    assert big["activations"] == pytest.approx(2 * t["activations"])
    # the semi-auto rollout has no cache: a chunk of rl.rollout_rows (256) rows at a time, whatever P*G is
    assert t["kv_cache"] == 0 and big["rollout"] == pytest.approx(t["rollout"])
    _, dp_path = _plan(tp=1, dp=8, optimizer_parallel=False, seq_parallel=False, rollout_engine="kv_decoder")
    _, dp_big = _plan(tp=1, dp=8, optimizer_parallel=False, seq_parallel=False, rollout_engine="kv_decoder",
                      rollout_rows=1024)
    assert dp_path["kv_cache"] > 0 and dp_big["kv_cache"] == pytest.approx(2 * dp_path["kv_cache"])
    assert t["total"] == pytest.approx(t["resident"] + max(t["rollout"], t["ref_forward"], t["activations"]))
    # pipeline: half the layers per stage, micro_batch_num splits the rows, PP micro-batches in flight
    _, pipe = _plan(tp=2, pp=2, micro_batch_num=4, dp=2, recompute=False)
    _, flat = _plan(tp=2, pp=1, dp=2, recompute=False)
    assert pipe["activations_no_recompute"] == pytest.approx(flat["activations_no_recompute"] / 2 * 2 / 4)


def test_report_grpo_vs_recast_and_fits():
    rep = mp.plan_report("model_configs/qwen3_8b.yaml", 8, 64, group_size=32, prompts=16)
    assert rep["layout"]["dp"] == 2 and rep["layout"]["tp"] == 4 and rep["actor_tokens_ratio"] == 16
    g, r = rep["grpo"], rep["recast"]
    assert (g["micro_rows"], r["micro_rows"]) == (128, 32) and r["total_gb"] < g["total_gb"]
    for est in (g, r):
        assert est["fits"] == (est["total_gb"] <= rep["usable_gb"])
    # with equal micro-batches the update phase is equal: the peak differs by GRPO's accumulation buffers and its
    # whole fp32 gradients against ReCast's one-step temporaries (its [P*G, T] = 512 rows take 16 micro-batches of
    # 32; ReCast's 32 rows one fused step)
    same = mp.plan_report("model_configs/qwen3_8b.yaml", 8, 64, group_size=32, prompts=16, micro_batch_size=32)
    g_t, r_t = same["grpo"]["terms_gb"], same["recast"]["terms_gb"]
    assert r_t["grad_accumulation"] == 0 and g_t["grad_accumulation"] == pytest.approx(g_t["grads"], rel=1e-3)
    assert r_t["grads"] == pytest.approx(g_t["grads"] * mp.OPT_STEP_TEMPORARIES / 2, rel=1e-3)  # DP 2 shards them
    assert same["grpo"]["total_gb"] == pytest.approx(
        same["recast"]["total_gb"] + g_t["grad_accumulation"] + g_t["grads"] - r_t["grads"], abs=2e-3)
    one = mp.plan_report("model_configs/qwen3_8b.yaml", 8, 64, group_size=32, prompts=16, micro_batch_size=512)
    assert one["grpo"]["terms_gb"]["grad_accumulation"] == 0  # one micro-batch covers the step: no buffers
    # 16 devices: DP doubles, optimizer states halve again
    r16 = mp.plan_report("model_configs/qwen3_8b.yaml", 16, 64, group_size=32, prompts=16)
    assert r16["layout"]["dp"] == 4
    assert r16["recast"]["terms_gb"]["optimizer"] == pytest.approx(r["terms_gb"]["optimizer"] / 2, rel=1e-3)
    small = mp.plan_report("model_configs/qwen3_14b.yaml", 8, 16, group_size=32, prompts=16)
    assert not small["grpo"]["fits"] and not small["recast"]["fits"]
    with pytest.raises(ValueError, match="not divisible by TP x PP"):
        mp.plan_report("model_configs/qwen3_14b.yaml", 12, 64, group_size=32, prompts=16)
    # the SFT step on the same layout: no reference model, no rollout, the one-step cell's temporaries; its 32 rows
    # at seq 64 are ReCast's actor batch, so it is ReCast's step less the reference (weights and forward)
    sft = mp.plan_report("model_configs/qwen3_8b.yaml", 8, 64, group_size=32, prompts=16, sft_batch=32, seq_length=64)
    rc = mp.plan_report("model_configs/qwen3_8b.yaml", 8, 64, group_size=32, prompts=16, seq_length=64)["recast"]
    s_t, r_t = sft["sft"]["terms_gb"], rc["terms_gb"]
    assert s_t["reference"] == s_t["ref_forward"] == s_t["rollout"] == 0 and s_t["grads"] == r_t["grads"]
    assert sft["sft"]["total_gb"] == pytest.approx(rc["total_gb"] - r_t["reference"], abs=2e-3)
    assert "sft" not in rep  # only when asked


def test_calibration_on_the_shipped_records():
    cal = mp.calibrate()
    # tiny-model runs within 5%; the real 0.6B shape (bench_scale.py) is in the fit, within 15% (README)
    assert len(cal["records"]) >= 10 and cal["calibration_error"] < 0.15 and cal["leave_one_out_error"] < 0.3
    assert any(r["name"].startswith("qwen3_0_6b") for r in cal["records"])
    assert all(abs(r["rel_error"]) < 0.05 for r in cal["records"] if r["name"].startswith("tiny"))
    for r in cal["records"]:
        assert abs(r["predicted_mb"] / r["measured_mb"] - 1) <= cal["calibration_error"] + 1e-4


def test_fit_recovers_known_constants():
    """Records generated from known constants (tiny + a 0.6B-shaped record) are fitted back exactly."""
    truth = {"base_mb": 800.0, "bytes_per_param": 30.0, "k_act": 5.0, "k_roll": 2.0}
    recs = []
    for i, (model, vocab, rows, roll, stage) in enumerate([
            ("model_configs/qwen3_tiny.yaml", 340, 32, 128, "rl_step"), ("model_configs/qwen3_tiny.yaml", 340, 128, 512, "rl_step"),
            ("model_configs/qwen3_tiny.yaml", 340, 64, 1024, "rl_step"), ("model_configs/qwen3_0_6b.yaml", None, 0, 0, "build"),
            ("model_configs/qwen3_0_6b.yaml", None, 1, 8, "rl_step")]):
        rec = {"name": f"r{i}", "model": model, "vocab_size": vocab, "seq_length": 48, "stage": stage,
               "train_rows": rows, "rollout_rows": roll, "peak_rss_mb": 0.0, "source": "synthetic"}
        rec["peak_rss_mb"] = mp.predict_cpu_rss_mb(rec, truth)
        recs.append(rec)
    got = mp.fit_constants(recs)
    for k, v in truth.items():
        assert got[k] == pytest.approx(v, rel=1e-4), k
    # without a large-model record bytes/param is not identifiable and keeps its prior
    assert mp.fit_constants(recs[:3])["bytes_per_param"] == mp.CPU_PRIOR["bytes_per_param"]


def test_add_record_and_bench_scale_records(tmp_path):
    path = tmp_path / "cal.json"
    shutil.copy(mp.CALIBRATION_FILE, path)
    before = mp.calibrate(mp.load_records(str(path)))
    bench = {"params": 596_049_920, "vocab_size": 151936, "peak_rss_mb": 18700.0,
             "stages": {"build": {"peak_rss_mb": 2900.0}, "rl_recast": 18700.0}}
    recs = mp.records_from_bench_scale(bench, stage_shapes={
        "build": {"stage": "build", "seq_length": 64}, "rl_recast": {"stage": "rl_step", "seq_length": 64,
                                                                     "train_rows": 2, "rollout_rows": 8}})
    assert [r["peak_rss_mb"] for r in recs] == [2900.0, 18700.0] and recs[0]["model"].endswith("qwen3_0_6b.yaml")
    after = None
    for rec in recs:
        after = mp.add_record(rec, str(path))
    assert len(after["records"]) == len(before["records"]) + 2
    assert after["constants"]["bytes_per_param"] != mp.CPU_PRIOR["bytes_per_param"]  # now identifiable
    assert len(mp.load_records(str(path))) == len(before["records"]) + 2
    with pytest.raises(ValueError, match="lacks"):
        mp.add_record({"name": "x"}, str(path))
    with pytest.raises(ValueError, match="bench params"):
        mp.records_from_bench_scale(dict(bench, params=1000), stage_shapes={})
    with pytest.raises(ValueError, match="stage must be one of"):
        mp.cpu_features(dict(recs[0], stage="warmup"))


def test_plan_memory_cli_issue_command(capsys):
    import plan_memory

    rc = plan_memory.main(["--model", "model_configs/qwen3_8b.yaml", "--devices", "8", "--device-memory-gb", "64",
                           "--estimator", "recast", "--group-size", "32", "--prompts", "16"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    last = json.loads(out[-1])
    assert last["model"] == "model_configs/qwen3_8b.yaml" and last["devices"] == 8
    assert isinstance(last["calibration_error"], float)
    for est in ("grpo", "recast"):
        assert set(last[est]) >= {"total_gb", "fits"}
    text = "\n".join(out)
    for needle in ("params", "gradients", "without optimizer parallel", "with optimizer parallel", "reference model",
                   "no recompute", "rollout KV cache", "fits", "CPU calibration"):
        assert needle in text, needle


def test_report_flags_a_batch_dp_cannot_split():
    rep = mp.plan_report("model_configs/qwen3_0_6b.yaml", 64, 64, group_size=32, prompts=16)
    assert rep["layout"]["dp"] == 64
    # the data-parallel path: each rank owns P / DP whole groups, 16 prompts cannot split over 64 ranks
    assert rep["grpo"]["batch_divides"] is False and rep["recast"]["batch_divides"] is False
    rep = mp.plan_report("model_configs/qwen3_0_6b.yaml", 8, 64, group_size=32, prompts=16)
    assert rep["grpo"]["batch_divides"] and rep["recast"]["batch_divides"]
    # each rank runs micro-batches of min(micro_batch_size, its 64 / 4 rows), not a DP slice of one global one
    assert (rep["grpo"]["micro_rows"], rep["recast"]["micro_rows"]) == (8 * 64, 8 * 4)
