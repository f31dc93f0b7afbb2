"""The runtime plan (recast_ms/runtime.py), the layout check of every shipped YAML and the launcher's dry run.

Pure planning: no model is built and no MindSpore context is touched (except ``resolve_device``'s query).
"""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from recast_ms.config import REPO_ROOT, load_config
from recast_ms.runtime import (CPU_PATCHES, Layout, PlanError, check_layout, model_shape, plan_runtime,
                               read_model_yaml, resolve_device, yaml_layout)

RUNS = os.path.join(REPO_ROOT, "model_configs", "runs")
LAUNCHER = os.path.join(REPO_ROOT, "scripts", "launch_msrun.sh")


def cfg(*overrides, path=None):
    return load_config(path, list(overrides))


def ascend_run(name):
    return os.path.join(RUNS, f"ascend_qwen3_{name}.yaml")


# ----------------------------------------------------------------------------- CPU


def test_cpu_plan_keeps_todays_behaviour():
    from recast_ms.models.cpu_compat import PATCH_TARGETS

    assert CPU_PATCHES == tuple(name for name, *_ in PATCH_TARGETS)
    for world in (1, 2):
        plan = plan_runtime(cfg(), "CPU", world)
        assert plan.layout == Layout(world, 1, 1, 1, False, False)
        assert plan.parallel == {} and plan.parallel_config == {} and plan.recompute_config == {}
        assert not plan.use_parallel and set(plan.dtypes.values()) == {"float32"} and not plan.use_flash_attention
        assert plan.cpu_patches == CPU_PATCHES and plan.rollout_engine == "kv_decoder"
        assert ("AllReduce" in plan.gradient_reduction) == (world > 1)


def test_cpu_plan_of_an_ascend_yaml_drops_its_layout_and_bf16():
    plan = plan_runtime(cfg("model_config=model_configs/qwen3_8b.yaml"), "CPU", 1)
    assert plan.layout.devices == 1 and plan.parallel_config == {} and plan.dtypes["compute_dtype"] == "float32"
    text = " ".join(plan.notes)
    assert "2 x 4 x 1" in text and "bfloat16" in text and "flash attention" in text


@pytest.mark.parametrize("override, needle", [("runtime.model_parallel=2", "Invalid backend: CPU"),
                                              ("runtime.pipeline_stage=2", "only data parallel"),
                                              ("runtime.data_parallel=4", "world size 2"),
                                              ("runtime.recompute=true", "Ascend")])
def test_cpu_refuses_what_cpu_cannot_run(override, needle):
    with pytest.raises(PlanError, match=needle):
        plan_runtime(cfg(override), "CPU", 2)


# ----------------------------------------------------------------------------- Ascend


def test_ascend_8b_plan_honours_the_yaml():
    plan = plan_runtime(cfg(path=ascend_run("8b")), "Ascend", 8)
    assert plan.layout == Layout(2, 4, 1, 1, True, True)
    assert plan.use_parallel and plan.parallel["parallel_mode"] == "semi_auto_parallel" and plan.parallel["full_batch"]
    assert plan.parallel["enable_parallel_optimizer"] is True and "pipeline_stages" not in plan.parallel
    assert plan.parallel_config["model_parallel"] == 4 and plan.parallel_config["use_seq_parallel"] is True
    assert plan.recompute_config["recompute"] is True
    assert plan.dtypes["compute_dtype"] == "bfloat16" and plan.dtypes["params_dtype"] == "float32"
    assert plan.use_flash_attention and plan.cpu_patches == ()
    assert plan.rollout_engine == "sharded_full_forward" and "TP=4" in plan.rollout_reason
    assert "MFTrainOneStepCell" in plan.train_wrapper and "NOT WRITTEN" not in plan.train_wrapper
    assert plan.context["device_target"] == "Ascend"
    json.loads(plan.to_json())


def test_ascend_14b_tensor_parallel_and_overrides():
    # the run config takes TP 8 instead of the model YAML's TP 4 x PP 2 (pipeline RL graphs do not compile)
    plan = plan_runtime(cfg(path=ascend_run("14b")), "Ascend", 8)
    assert plan.layout == Layout(1, 8, 1, 4, True, True) and "pipeline_stages" not in plan.parallel
    assert plan.rollout_engine == "sharded_full_forward"
    # overrides beat the YAML; DP follows the world size when the YAML's does not fit it
    plan = plan_runtime(cfg("runtime.world_size=0", "runtime.recompute=false", "runtime.optimizer_parallel=false",
                            path=ascend_run("14b")), "Ascend", 32)
    assert plan.layout == Layout(4, 8, 1, 4, False, False)
    assert plan.recompute_config["recompute"] is False and plan.parallel["enable_parallel_optimizer"] is False
    assert any("world 32" in n for n in plan.notes)


def test_pipeline_layouts_plan_stages_and_the_result_broadcast():
    # the paper's 14B layout (DP 1 x TP 4 x PP 2 on 8 devices): MindSpore pipelines with the forward graphs' results
    # broadcast from the last stage (every stage's host reads the rollout logits / log-probs), MindFormers' vocab
    # embedding reset as its build_parallel_config does
    plan = plan_runtime(cfg("runtime.model_parallel=4", "runtime.pipeline_stage=2", path=ascend_run("14b")), "Ascend", 8)
    assert plan.layout == Layout(1, 4, 2, 4, True, True)
    assert plan.parallel["pipeline_stages"] == 2 and plan.parallel["pipeline_result_broadcast"] is True
    assert plan.parallel_config["pipeline_stage"] == 2 and plan.parallel_config["vocab_emb_dp"] is False
    assert plan.rollout_engine == "sharded_full_forward"
    flat = plan_runtime(cfg(path=ascend_run("14b")), "Ascend", 8)  # the shipped TP 8 layout has no pipeline keys
    assert "pipeline_stages" not in flat.parallel and "pipeline_result_broadcast" not in flat.parallel
    with pytest.raises(PlanError, match="micro_batch_num=1 < pipeline_stage=2"):
        plan_runtime(cfg("runtime.model_parallel=4", "runtime.pipeline_stage=2", "runtime.micro_batch_num=1",
                         path=ascend_run("14b")), "Ascend", 8)


def test_semi_auto_sft_plans_the_rl_layout_and_checks_its_batch():
    """SFT of 8B / 14B runs on the RL run's own semi-auto layout (the sharded SFT engine); its global batch must
    split over DP (and a pipeline's micro-batches)."""
    for name in ("8b", "14b"):
        rl, sft = (plan_runtime(cfg(path=ascend_run(name)), "Ascend", 8, stage=st) for st in ("rl", "sft"))
        assert sft.use_parallel and sft.layout == rl.layout and sft.parallel_config == rl.parallel_config
    with pytest.raises(PlanError, match=r"sft.batch_size=12 \(global\) is not divisible by data_parallel=8"):
        plan_runtime(cfg("sft.batch_size=12", path=ascend_run("0_6b")), "Ascend", 8, stage="sft")
    pp = ("runtime.model_parallel=4", "runtime.pipeline_stage=2", "runtime.micro_batch_num=4")
    assert plan_runtime(cfg(*pp, path=ascend_run("14b")), "Ascend", 8, stage="sft").layout.pipeline_stage == 2
    with pytest.raises(PlanError, match="sft.batch_size=6 .* micro_batch_num=4 = 4"):
        plan_runtime(cfg(*pp, "sft.batch_size=6", path=ascend_run("14b")), "Ascend", 8, stage="sft")
    assert plan_runtime(cfg(path=ascend_run("0_6b")), "Ascend", 8, stage="sft").layout.data_parallel == 8


def test_ascend_small_model_uses_the_kv_decoder_only_without_sharded_weights():
    plan = plan_runtime(cfg(path=ascend_run("0_6b")), "Ascend", 8)
    assert plan.layout == Layout(8, 1, 1, 1, False, False) and plan.rollout_engine == "kv_decoder"
    plan = plan_runtime(cfg("runtime.optimizer_parallel=true", path=ascend_run("0_6b")), "Ascend", 8)
    assert plan.rollout_engine == "sharded_full_forward"
    plan = plan_runtime(cfg("runtime.world_size=1", path=ascend_run("0_6b")), "Ascend", 1)
    assert not plan.use_parallel and plan.parallel == {} and plan.layout.devices == 1


def test_ascend_data_parallel_layouts_take_the_cpu_path():
    """0.6B / 1.7B as shipped (TP = PP = 1, no optimizer parallel): stand-alone mode with the optimizer cell's
    AllReduce, as CPU msrun, not semi-auto; the model graph is one device's; dtypes / flash / recompute kept."""
    for name, recompute in (("0_6b", False), ("1_7b", True)):
        plan = plan_runtime(cfg(path=ascend_run(name)), "Ascend", 8)
        assert plan.layout == Layout(8, 1, 1, 1, False, recompute)
        assert not plan.use_parallel and plan.parallel == {}
        assert "AllReduce (HCCL)" in plan.gradient_reduction and "NOT WRITTEN" not in plan.train_wrapper
        pc = plan.parallel_config
        assert (pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"]) == (1, 1, 1)
        assert plan.dtypes["compute_dtype"] == "bfloat16" and plan.use_flash_attention
        assert plan.recompute_config["recompute"] is recompute and plan.rollout_engine == "kv_decoder"
        # SFT plans the same layout for its own global batch
        assert plan_runtime(cfg(path=ascend_run(name)), "Ascend", 8, stage="sft").layout == plan.layout


@pytest.mark.parametrize("device, overrides, world, stage, needle", [
    ("Ascend", ["rl.prompts_per_step=3"], 8, "rl", r"rl.prompts_per_step=3 \(global\) is not divisible by data_parallel=8"),
    ("Ascend", ["rl.prompts_per_step=6", "runtime.world_size=4"], 4, "rl", r"prompts_per_step=6 \(global\) .* data_parallel=4"),
    ("Ascend", ["sft.batch_size=12"], 8, "sft", r"sft.batch_size=12 \(global\) is not divisible by data_parallel=8"),
    ("CPU", ["rl.prompts_per_step=3"], 2, "rl", r"rl.prompts_per_step=3 \(global\) is not divisible by data_parallel=2"),
    ("CPU", ["sft.batch_size=9"], 2, "sft", r"sft.batch_size=9 \(global\) is not divisible by data_parallel=2"),
])
def test_each_rank_owns_whole_groups(device, overrides, world, stage, needle):
    path = ascend_run("0_6b") if device == "Ascend" else None
    with pytest.raises(PlanError, match=needle):
        plan_runtime(cfg(*overrides, path=path), device, world, stage=stage)
    # the same batch on the other stage is not this stage's business
    plan_runtime(cfg(*overrides, path=path), device, world, stage="rl" if stage == "sft" else "sft")


@pytest.mark.parametrize("overrides, world, needle", [
    (["rl.estimator=grpo", "rl.prompts_per_step=2", "rl.group_size=3", "rl.micro_batch_size=3"], 8,
     r"micro-batch of 3 rows \(batch \[P\*G, T\] = \[2 x 3, T\].* data_parallel=2 = 2"),
    (["rl.prompts_per_step=16", "rl.micro_batch_size=12"], 8, r"32 rows, not a multiple of .* = 12"),
])
def test_semi_auto_batch_must_divide_by_dp(overrides, world, needle):
    """Semi-auto parallel (8B: DP 2 x TP 4) slices the global micro-batch by DP."""
    with pytest.raises(PlanError, match=needle):
        plan_runtime(cfg(*overrides, path=ascend_run("8b")), "Ascend", world)


def test_ascend_layout_errors_name_the_numbers():
    with pytest.raises(PlanError, match="num_attention_heads=32 is not divisible by model_parallel=3"):
        plan_runtime(cfg("runtime.model_parallel=3", "runtime.world_size=0", path=ascend_run("8b")), "Ascend", 6)
    with pytest.raises(PlanError, match="num_key_value_heads=8 is not divisible by model_parallel=16"):
        plan_runtime(cfg("runtime.model_parallel=16", "runtime.world_size=0", path=ascend_run("8b")), "Ascend", 16)
    with pytest.raises(PlanError, match="num_hidden_layers=36 is not divisible by pipeline_stage=8"):
        plan_runtime(cfg("runtime.pipeline_stage=8", "runtime.micro_batch_num=8", "runtime.world_size=0",
                         path=ascend_run("8b")), "Ascend", 32)
    with pytest.raises(PlanError, match="world size 12 is not divisible by model_parallel x pipeline_stage = 8 x 1"):
        plan_runtime(cfg("runtime.world_size=0", path=ascend_run("14b")), "Ascend", 12)
    with pytest.raises(PlanError, match="runtime.world_size=8 but the launch gives 16"):
        plan_runtime(cfg(path=ascend_run("8b")), "Ascend", 16)
    with pytest.raises(PlanError, match=r"2 x 4 x 1 = 8 != 16 devices"):
        plan_runtime(cfg("runtime.data_parallel=2", "runtime.world_size=0", path=ascend_run("8b")), "Ascend", 16)


def test_runtime_section_is_validated():
    assert cfg("runtime.device_target=ascend").runtime.device_target == "Ascend"
    assert cfg("runtime.recompute=True").runtime.recompute == "true"
    with pytest.raises(ValueError, match="runtime.device_target must be auto, CPU or Ascend"):
        cfg("runtime.device_target=GPU")
    with pytest.raises(ValueError, match="unknown config key"):
        cfg("runtime.tensor_parallel=2")
    with pytest.raises(ValueError, match="runtime.optimizer_parallel must be auto, true or false"):
        cfg("runtime.optimizer_parallel=maybe")


def test_resolve_device():
    assert resolve_device("Ascend") == ("Ascend", "runtime.device_target")
    device, why = resolve_device("auto")
    import mindspore as ms

    expected = "Ascend" if ms.device_context.ascend.is_available() else "CPU"
    assert device == expected and why.startswith("auto")


# ----------------------------------------------------------------------------- shipped YAMLs (CI layout check)


def _launch_world(run_yaml):
    """The device count of the launch example in a run YAML's header: --worker_num N."""
    with open(run_yaml) as f:
        m = re.search(r"launch_msrun\.sh --worker_num (\d+) --local_worker_num (\d+)", f.read())
    assert m, f"{run_yaml}: no launch example"
    return int(m.group(1))


def test_every_shipped_layout_is_valid_for_its_launch_example():
    model_yamls = sorted(glob.glob(os.path.join(REPO_ROOT, "model_configs", "*.yaml")))
    launched = {}
    for run_yaml in sorted(glob.glob(os.path.join(RUNS, "*.yaml"))):
        c = load_config(run_yaml)
        if c.runtime.device_target != "Ascend":
            continue
        world = _launch_world(run_yaml)
        raw = read_model_yaml(c.model_config_path)
        layout = yaml_layout(raw)
        check_layout(model_shape(raw), layout, world, where=run_yaml)  # the YAML's own DP x TP x PP == world
        plan = plan_runtime(c, "Ascend", world)
        assert plan.layout.devices == world == c.runtime.world_size
        assert plan.layout.data_parallel == layout.data_parallel  # not re-derived: the YAML's layout as written
        for est in ("grpo", "recast"):  # both batch shapes fit the layout
            plan_runtime(load_config(run_yaml, [f"rl.estimator={est}"]), "Ascend", world)
        launched[os.path.abspath(c.model_config_path)] = world
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    for path in model_yamls:
        raw = read_model_yaml(path)
        if not raw.get("parallel_config"):
            continue
        assert path in launched, f"{path} has an Ascend layout but no run YAML with a launch example"
        name = os.path.basename(path)[:-5]
        assert f"--config model_configs/runs/ascend_{name}.yaml" in readme, f"README lacks the {name} launch command"


def test_layout_check_catches_a_bad_yaml(tmp_path):
    raw = read_model_yaml(os.path.join(REPO_ROOT, "model_configs", "qwen3_14b.yaml"))
    raw["parallel_config"]["model_parallel"] = 3
    with pytest.raises(PlanError, match="num_attention_heads=40 is not divisible by model_parallel=3"):
        check_layout(model_shape(raw), yaml_layout(raw), 6)
    with pytest.raises(PlanError, match="micro_batch_num=1 < pipeline_stage=2"):
        check_layout(model_shape(raw), Layout(1, 4, 2, 1, False, False), 8)


# ----------------------------------------------------------------------------- launcher


def _launcher(*args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", LAUNCHER, *args], capture_output=True, text=True, env=env, timeout=300)


def test_launcher_dry_run_prints_the_plan_and_checks_it():
    r = _launcher("--worker_num", "16", "--local_worker_num", "8", "--node_rank", "1", "--master_addr", "10.0.0.1",
                  "--master_port", "8118", "--dry-run", "--", "--config", ascend_run("8b"), "--init", "runs/sft",
                  "--run-dir", "runs/rl", "runtime.world_size=16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--worker_num=16 --local_worker_num=8 --node_rank=1 --master_addr=10.0.0.1 --master_port=8118" in r.stdout
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["layout"]["data_parallel"] == 4 and plan["layout"]["model_parallel"] == 4
    assert plan["device_target"] == "Ascend" and plan["rollout_engine"] == "sharded_full_forward"
    # a layout that does not fit the world size fails the dry run with the numbers
    r = _launcher("--worker_num", "8", "--dry-run", "--", "--config", ascend_run("8b"), "rl.prompts_per_step=2",
                  "rl.estimator=grpo", "rl.group_size=3", "rl.micro_batch_size=3")
    assert r.returncode == 2 and "[2 x 3, T]" in r.stderr
    r = _launcher("--worker_num", "8", "--dry-run", "--", "--config", ascend_run("0_6b"), "rl.prompts_per_step=4")
    assert r.returncode == 2 and "rl.prompts_per_step=4 (global) is not divisible by data_parallel=8" in r.stderr
    # multi-node argument errors are named
    r = _launcher("--worker_num", "16", "--local_worker_num", "8", "--node_rank", "2", "--master_addr", "10.0.0.1",
                  "--master_port", "8118", "--dry-run")
    assert r.returncode == 2 and "node_rank=2" in r.stderr
    r = _launcher("--worker_num", "16", "--local_worker_num", "8", "--dry-run")
    assert r.returncode == 2 and "--master_addr" in r.stderr


def test_ascend_plan_reaches_the_model_config():
    """The plan's layout, recompute, bf16 and flash attention reach MindFormers' Qwen3Config (config only, no build);
    the CPU plan of the same run is fp32 without a parallel config."""
    from recast_ms.models.qwen3 import build_qwen3_config

    c = cfg(path=ascend_run("8b"))
    kw = dict(vocab_size=151936, seq_length=64, pad_token_id=151643, eos_token_id=151645)
    plan = plan_runtime(c, "Ascend", 8)
    conf = build_qwen3_config("qwen3_8b.yaml", device_target="Ascend", parallel_config=plan.parallel_config,
                              recompute_config=plan.recompute_config, **kw)
    pc = conf.parallel_config
    assert (pc.data_parallel, pc.model_parallel, pc.pipeline_stage) == (2, 4, 1) and pc.recompute.recompute is True
    assert conf.compute_dtype == "bfloat16" and conf.use_flash_attention is True
    conf = build_qwen3_config("qwen3_8b.yaml", device_target="Ascend", recompute_config={"recompute": False},
                              parallel_config=plan.parallel_config, **kw)
    assert conf.parallel_config.recompute.recompute is False
    conf = build_qwen3_config("qwen3_8b.yaml", device_target="CPU", **kw)
    assert conf.compute_dtype == "float32" and conf.use_flash_attention is False


def test_init_runtime_applies_the_cpu_plan_and_refuses_what_cannot_run(monkeypatch):
    from recast_ms import runtime
    from recast_ms.models import cpu_compat
    from recast_ms.trainer import setup

    plan = setup.init_runtime(cfg("runtime.device_target=CPU"))
    assert plan.device_target == "CPU" and setup.current_plan() is plan and cpu_compat.cpu_patches_applied()
    monkeypatch.setattr(runtime, "require_device", lambda device: None)  # as if an Ascend device were here
    # a batch the layout cannot split: one line, before anything is applied
    with pytest.raises(PlanError, match="not divisible by data_parallel=2"):
        setup.init_runtime(cfg("sft.batch_size=7", path=ascend_run("8b")), 8, stage="sft")
    # data-parallel layouts (0.6B, 1.7B) are not refused; without msrun's communication init they cannot run
    for name in ("0_6b", "1_7b"):
        with pytest.raises(RuntimeError, match="8 ranks but communication is not initialised"):
            setup.init_runtime(cfg(path=ascend_run(name)), 8)
    assert setup.current_plan() is plan  # nothing was applied
