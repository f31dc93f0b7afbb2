"""recast-dryrun: the micro model's graphs compile for Ascend under MindSpore's DryRun (no Ascend here).

The compile tests need the CANN stand-in (``../shared/tools/ascend-dryrun/build.sh``, gcc); they skip, saying
why, only when it cannot be built. About 3 minutes on the 2-core machine (the tensor-parallel RL step: ~30 s
per rank, once the simulated runtime's busy-waiting threads are demoted: dryrun._SpinDemoter).
"""
import json
import os
import subprocess
import sys
import time

import pytest

from recast_ms import dryrun as dr

MICRO = os.path.join(dr.repo_root(), "model_configs", "qwen3_micro.yaml")
# the micro model on the synthetic data, small enough to compile each phase in ~30 s
# (the entropy diagnostic is off: it reruns the rollout's cells at the actor's row count, one more compile each)
MICRO_OVERRIDES = [f"model_config={MICRO}", "rl.prompts_per_step=4", "rl.group_size=4", "rl.micro_batch_size=8",
                   "rl.log_entropy=false"]


def test_parse_ranks():
    assert dr.parse_ranks("0,N-1", 8) == [0, 7]
    assert dr.parse_ranks(" 3, 0,3", 4) == [0, 3]
    assert dr.parse_ranks("all", 3) == [0, 1, 2]
    for bad in ("8", "N-9", "x", ""):
        with pytest.raises(ValueError, match="not a rank in"):
            dr.parse_ranks(bad, 8)


def test_parse_peaks_reads_mindsporess_release_lines():
    log = ("Device MOC memory size: 65536M\nUsed peak memory usage (without fragments): 17M\n"
           "Actual peak memory usage (with fragments): 19M\n[WARNING] DEVICE ... statistics:\n"
           "Used peak memory usage (without fragments): 23716M\nActual peak memory usage (with fragments): 26244M\n")
    assert dr.parse_peaks(log) == {"peak_mb": 23716, "peak_with_fragments_mb": 26244}
    assert dr.parse_peaks("no statistics") == {"peak_mb": None, "peak_with_fragments_mb": None}


def test_busy_waiting_threads_are_demoted_and_the_main_thread_is_not():
    # a child whose second thread spins like the simulated runtime's callback threads, its main thread asleep
    code = ("import threading, time, sys\n"
            "def spin():\n    while True: pass\n"
            "threading.Thread(target=spin, daemon=True).start()\nprint(threading.get_native_id(), flush=True)\n"
            "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        main = int(child.stdout.readline())
        spin = dr._SpinDemoter(child.pid)
        spin.poll()
        deadline = time.time() + 20
        while not spin.demoted and time.time() < deadline:
            time.sleep(0.5)
            spin.poll()
        spinners = [t for t in map(int, os.listdir(f"/proc/{child.pid}/task")) if t != main]
        assert spin.demoted == set(spinners) and len(spinners) == 1, (spin.demoted, spinners)
        assert os.sched_getscheduler(spinners[0]) == os.SCHED_IDLE
        assert os.sched_getscheduler(main) == os.SCHED_OTHER  # the compiling thread keeps its priority
    finally:
        child.kill()
        child.wait()


def test_missing_stub_is_reported_not_raised(tmp_path):
    with pytest.raises(dr.StubUnavailable, match=str(tmp_path)):
        dr.find_stub(str(tmp_path))
    report = dr.dryrun(None, [], 1, [0], stub=str(tmp_path))
    assert report["ranks"] == {} and "no env.sh" in report["error"]


@pytest.fixture(scope="module")
def stub():
    try:
        return dr.find_stub()
    except dr.StubUnavailable as err:
        pytest.skip(f"CANN stand-in for DryRun unavailable: {err}")


def test_cli_compiles_the_data_parallel_sft_and_rl_steps(stub, tmp_path):
    # the command as a user runs it, on the data-parallel path the 0.6B / 1.7B launches take: the SFT step and the
    # ReCast RL step (graph-mode selection, the fused optimizer step that all-reduces the gradients over HCCL) on
    # the last rank of two (the first rank of a launch is compiled by the tests below: the graphs are alike)
    proc = subprocess.run([sys.executable, "-m", "recast_ms.commands.dryrun", "--stub", stub, "--world-size", "2",
                           "--ranks", "1", *MICRO_OVERRIDES], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, check=False)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, (report["error"], proc.stderr[-2000:])
    assert "needs no Ascend" in proc.stderr and "not a measurement" in proc.stderr
    assert report["error"] is None and report["world_size"] == 2
    rank = report["ranks"]["1"]
    assert rank["compiled"] is True and rank["peak_mb"] > 0
    expected = {"sft/train_step", "sft/val_forward", "rl/rollout_prefill", "rl/rollout_decode", "rl/select_recast",
                "rl/reference_forward", "rl/actor_update_recast"}
    assert expected <= set(rank["graphs"]), rank["graphs"]
    assert all(g["compiled"] and g["peak_mb"] >= 1 for g in rank["graphs"].values()), rank["graphs"]
    # MindSpore's per-process figure bounds every graph of that process (MB rounding aside)
    assert rank["graphs"]["sft/train_step"]["peak_mb"] <= rank["phases"]["sft"]["peak_mb"] + 1
    # the data-parallel gradient reduction was compiled into this rank's graphs
    assert rank["phases"]["rl"]["collectives"].get("AllReduce", 0) > 0, rank["phases"]["rl"]["collectives"]
    # DryRun writes execute_order/, rank_0/, offload/ into its cwd: never into the caller's
    assert os.listdir(tmp_path) == []


def test_a_layout_that_cannot_build_is_reported_per_rank(stub, tmp_path):
    # 4 heads do not split over model_parallel=3: the plan refuses it before anything compiles
    report = dr.dryrun(None, MICRO_OVERRIDES + ["runtime.model_parallel=3"], world_size=3, ranks=[2], phases=["rl"],
                       stub=stub, scratch=str(tmp_path), timeout=900)
    assert report["ranks"]["2"]["compiled"] is False
    assert "num_attention_heads=4 is not divisible by model_parallel=3" in report["error"]


# DP 2 x TP 2 on 4 ranks: the semi-auto-parallel engines (recast_ms/trainer/engines.py, sharded set)
MICRO_TP = MICRO_OVERRIDES + ["runtime.model_parallel=2"]
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "strategy", "dp2_tp2.ckpt")


# the micro model's full weight shapes (model_configs/qwen3_micro.yaml on the synthetic data: hidden 64, 4 heads /
# 2 KV heads of 16, MLP 128, vocabulary 340, tied head), the names the strategy fixture lays out
MICRO_SHAPES = {"embedding.word_embeddings.weight": (340, 64), "decoder.final_layernorm.weight": (64,),
                **{f"decoder.layers.{i}.{k}": v for i in range(2) for k, v in {
                    "self_attention.linear_qkv.weight": (128, 64), "self_attention.linear_proj.weight": (64, 64),
                    "self_attention.q_layernorm.weight": (16,), "self_attention.k_layernorm.weight": (16,),
                    "mlp.linear_fc1.weight": (256, 64), "mlp.linear_fc2.weight": (64, 128),
                    "input_layernorm.weight": (64,), "pre_mlp_layernorm.weight": (64,)}.items()}}


def test_tensor_parallel_recast_step_compiles_on_the_first_rank(stub, tmp_path):
    # the first rank here, the last rank in the grpo test below: both ends of the launch, one compile each.
    # The run starts (--init) from a sharded step of this very layout, as an 8B / 14B RL run starts from its SFT
    # run's checkpoint: the actor and the reference each load rank 0's saved slices (engines.load_sliced_init)
    import numpy as np

    from recast_ms.trainer import sharded_checkpoint as sc

    lay = sc.layouts(FIXTURE)
    assert set(MICRO_SHAPES) == {n for n in lay if n.split(".")[0] in sc.MODEL_ROOTS}
    rng = np.random.default_rng(0)
    full = {n: rng.normal(size=shape).astype(np.float32) for n, shape in MICRO_SHAPES.items()}
    step = tmp_path / "sft" / "checkpoints" / "step_40"
    sc.write_rank_slices(full, FIXTURE, [0], str(step))
    (step / sc.META).write_text(json.dumps({"step": 40, "world_size": 4, "sharded": True}))
    report = dr.dryrun(None, MICRO_TP, world_size=4, ranks=[0], phases=["rl"], stub=stub,
                       scratch=str(tmp_path / "scratch"), timeout=900, keep=True, init=str(step))
    assert report["error"] is None, report["error"]
    sums = report["ranks"]["0"]["phases"]["rl"]["sliced_start"]["sums"]
    assert report["ranks"]["0"]["phases"]["rl"]["sliced_start"]["loaded"] == {"actor": 18, "reference": 18}
    for name, value in full.items():  # every parameter holds rank 0's slice as the project cuts it
        want = float(sc.slice_for_rank(value, lay[name][0], lay[name][1], 0).astype(np.float64).sum())
        assert sums["actor"][name] == pytest.approx(want, abs=1e-3), name
        assert sums["reference"]["ref." + name] == pytest.approx(want, abs=1e-3), name
    for rank in ("0",):
        r = report["ranks"][rank]
        assert r["compiled"] is True, r
        # rollout: P = 4 prompts encoded once, then P*G = 16 rows per new token
        assert {"rl/rollout_forward_4rows", "rl/rollout_forward_16rows", "rl/reference_forward",
                "rl/actor_update_recast"} <= set(r["graphs"]), r["graphs"]
        coll = r["phases"]["rl"]["collectives"]
        # TP inserts AllGather / ReduceScatter, the vocabulary-parallel log-softmax and DP gradients AllReduce
        assert coll.get("AllReduce", 0) > 0 and coll.get("AllGather", 0) > 0, coll
        ck = r["phases"]["rl"]["checkpoint"]
        qkv = ck["slice_shapes"]["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert qkv["full"] == [128, 64] and qkv["slice"] == [64, 64]  # (4 + 2 x 2) heads x 16 rows, split by TP
        assert ck["slice_shapes"]["optimizer.adam_m.decoder.layers.0.self_attention.linear_qkv.weight"]["slice"] == \
            [64, 64]
        # the strategy file this compile wrote holds the layouts the committed fixture (test_sharded_checkpoint) has
        fresh, fixed = sc.layouts(ck["strategy"]), sc.layouts(FIXTURE)
        assert fresh == fixed


def test_grpo_tensor_parallel_step_accumulates_micro_batches_on_the_last_rank(stub, tmp_path):
    # [P*G, T] = 16 rows in micro-batches of 8: MindFormers' GradAccumulationCellWithMultiOutputs under its
    # accumulating one-step cell, with optimizer parallel (its micro-step AllGather needs the accu_grads buffers)
    report = dr.dryrun(None, MICRO_TP + ["rl.estimator=grpo", "runtime.optimizer_parallel=true"], world_size=4,
                       ranks=[3], phases=["rl"], stub=stub, scratch=str(tmp_path), timeout=900)
    assert report["error"] is None, report["error"]
    r = report["ranks"]["3"]
    assert r["compiled"] is True and "rl/actor_update_grpo" in r["graphs"], r


MICRO_PP = MICRO_TP + ["runtime.pipeline_stage=2", "runtime.micro_batch_num=2"]  # DP 1 x TP 2 x PP 2 on 4 ranks


@pytest.mark.parametrize("rank, estimator, sends, from_hf", [(0, "recast", "Send", True), (3, "grpo", "Receive", False)])
def test_pipeline_step_compiles_on_each_stage(stub, tmp_path, rank, estimator, sends, from_hf):
    # rank 0 holds stage 0, rank 3 the last stage: every graph of the step compiles on both (the forwards through
    # MindSpore's pipeline-inference pattern, the update through MindFormers' PipelineCellWithMultiOutputs), and the
    # stages talk (stage 0 sends activations, the last stage receives them).
    # Rank 0 starts from a Hugging Face checkpoint: no host holds the whole model (engines.load_sliced_start)
    overrides = MICRO_PP + [f"rl.estimator={estimator}"]
    if from_hf:
        from qwen3_numpy_ref import write_hf_model_dir

        overrides += [f"hf_checkpoint={write_hf_model_dir(tmp_path / 'hf')}"]
    # rank 0 also compiles the SFT step (engines.ShardedSFT, the same one-step cell over the pipeline cell) from the
    # checkpoint's slices: the 8B / 14B SFT runs on the RL run's own layout
    phases = ["sft", "rl"] if from_hf else ["rl"]
    report = dr.dryrun(None, overrides + ["sft.batch_size=8"], world_size=4, ranks=[rank], phases=phases, stub=stub,
                       scratch=str(tmp_path / "scratch"), timeout=900)
    assert report["error"] is None, report["error"]
    r = report["ranks"][str(rank)]
    assert r["compiled"] is True, r
    if from_hf:
        sft = r["phases"]["sft"]
        assert {"sft/train_step", "sft/val_forward"} <= set(r["graphs"]) and sft["collectives"].get(sends, 0) > 0, sft
        # stage 0's 9 parameters, each this rank's slice of the converted checkpoint tensor before the step ran
        assert sft["sliced_start"]["loaded"] == {"model": 9}, sft["sliced_start"]
        assert sft["sliced_start"]["checked"] == sft["sliced_start"]["equal"] == 9, sft["sliced_start"]
        lin = sft["checkpoint"]["slice_shapes"]["decoder.layers.0.mlp.linear_fc1.weight"]
        assert lin["slice"] == [lin["full"][0] // 2, lin["full"][1]] and lin["full"][0] > 2  # fused gate/up, by TP 2
    assert {"rl/rollout_forward_4rows", "rl/rollout_forward_16rows", "rl/reference_forward",
            f"rl/actor_update_{estimator}"} <= set(r["graphs"]), r["graphs"]
    coll = r["phases"]["rl"]["collectives"]
    assert coll.get(sends, 0) > 0 and coll.get("AllReduce", 0) > 0, coll
    if from_hf:
        # stage 0's parameters only (the embedding and layer 0's eight weights of the two-layer model), in the actor
        # and in the reference, each equal to this rank's slice of the converted checkpoint tensor as the project
        # cuts it (sharded_checkpoint.slice_for_rank), checked before the step ran
        # the strategy file the sharded checkpoints carry was written by the compile the sliced start made
        assert r["phases"]["rl"]["checkpoint"]["strategy_written"] is True
        sliced = r["phases"]["rl"]["sliced_start"]
        assert sliced["loaded"] == {"actor": 9, "reference": 9}, sliced
        assert sliced["checked"] == sliced["equal"] == 18 and sliced["max_abs_diff"] == 0.0, sliced
