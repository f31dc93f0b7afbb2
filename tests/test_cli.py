"""The command line (issue 21): configuration, plan and device errors as one line with exit 2, plan_memory's
argument checks, and a smoke run of every console command and script the README names; the quiet console
(issue 25): framework chatter off the terminal, into the run's log file, unless --verbose."""
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from recast_ms.cli import command
from recast_ms.config import REPO_ROOT as ROOT, ConfigError

with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as _f:
    _scripts = _f.read().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
CONSOLE_COMMANDS = dict(re.findall(r'^(recast-[\w-]+)\s*=\s*"([\w.]+:\w+)"', _scripts, re.M))
# the run configuration commands (base_parser): their --help lists every config key
CONFIG_COMMANDS = ("recast-sft", "recast-rl", "recast-eval", "recast-grid", "recast-main")
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py"))
# scripts kept so `python scripts/X.py` runs a console command: their --help is the command's
SHIMS = {"sft.py": "recast-sft", "train_rl.py": "recast-rl", "evaluate.py": "recast-eval",
         "run_grid.py": "recast-grid", "run_main.py": "recast-main"}
# lines only MindSpore (glog: "[WARNING] ANALYZER(pid,...)") or MindFormers ("... - WARNING - ...") print
FRAMEWORK_LINE = re.compile(r"hyper_parallel|^\[(DEBUG|INFO|WARNING|ERROR)\] [A-Z_]+\(\d+|"
                            r" - (DEBUG|INFO|WARNING) - ", re.M)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "scripts", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _exit_and_stderr(capsys, main, *args):
    with pytest.raises(SystemExit) as exc:
        main(*args)
    return exc.value.code, capsys.readouterr().err


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _env():
    env = dict(os.environ)
    env.pop("RECAST_VERBOSE", None)
    return env


# ----------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("command_name, argv, expected", [
    ("recast-sft", ["--run-dir", "{tmp}/r", "sft.group_size=3"],
     "unknown config key(s) in section 'sft': sft.group_size (did you mean rl.group_size?)"),
    ("recast-sft", ["--run-dir", "{tmp}/r", "group_size=3"], "group_size (did you mean rl.group_size?)"),
    ("recast-sft", ["--run-dir", "{tmp}/r", "rl.grup_size=3"], "rl.grup_size (did you mean rl.group_size?)"),
    ("recast-sft", ["--run-dir", "{tmp}/r", "rl.group_size=abc"], "rl.group_size: expected an integer, got 'abc'"),
    ("recast-main", ["--out", "{tmp}/m", "rl.lr=.nan"], "rl.lr: expected a finite number, got nan"),
    ("recast-main", ["--out", "{tmp}/m", "sft.steps=.inf"], "sft.steps: expected an integer, got inf"),
    ("recast-main", ["--out", "{tmp}/m", "rl.lr=["], "override 'rl.lr=[': the value is not a YAML scalar or list"),
    ("recast-main", ["--out", "{tmp}/m", "--config", "{tmp}/missing.yaml"], "config file not found: {tmp}/missing.yaml"),
    ("recast-sft", ["--run-dir", "{tmp}/r", "--config", "{tmp}/bad.yaml"], "{tmp}/bad.yaml: not valid YAML:"),
    ("recast-eval", ["--run-dir", "{tmp}/r", "--config", "{tmp}/empty.yaml"], "{tmp}/empty.yaml: the config file is empty"),
    ("recast-sft", ["--run-dir", "{tmp}/r", "data.source=amazon", "data.root={tmp}", "data.dataset=Nope"],
     "data.dataset 'Nope': no directory {tmp}/Nope; datasets under {tmp}: ['r']"),
])
def test_config_errors_are_one_line_exit_2(command_name, argv, expected, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.yaml").write_text("rl:\n  group_size: [1\n  lr: 2\n")
    (tmp_path / "empty.yaml").write_text("")
    module, func = CONSOLE_COMMANDS[command_name].split(":")
    main = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [command_name] + [a.format(tmp=tmp_path) for a in argv])
    code, err = _exit_and_stderr(capsys, main)
    line = _one_line(err)
    assert code == 2 and line.startswith(f"{command_name}: error: ") and expected.format(tmp=tmp_path) in line


def test_every_console_command_uses_the_wrapper():
    assert set(CONFIG_COMMANDS) <= set(CONSOLE_COMMANDS)
    for name, target in CONSOLE_COMMANDS.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        assert getattr(main, "__wrapped__", None) is not None, f"{name}: main() is not wrapped by recast_ms.cli.command"


def test_wrapper_prints_config_errors_and_keeps_other_tracebacks(capsys):
    @command
    def bad():
        raise ConfigError("rl.lr: first line\n  second line")

    @command
    def bug():
        raise RuntimeError("a bug keeps its traceback")

    code, err = _exit_and_stderr(capsys, bad)
    assert code == 2 and _one_line(err).endswith("error: rl.lr: first line; second line")
    with pytest.raises(RuntimeError, match="a bug keeps its traceback"):
        bug()


@pytest.mark.parametrize("argv, expected", [
    (["--world-size", "3", "--device", "Ascend", "--config", "model_configs/runs/ascend_qwen3_8b.yaml",
      "runtime.world_size=3"],
     "world size 3 is not divisible by model_parallel x pipeline_stage = 4 x 1"),
    (["--world-size", "2", "--device", "CPU", "runtime.model_parallel=2"], "runtime.model_parallel=2 on CPU"),
    (["--world-size", "1", "rl.estimator=ppo"], "rl.estimator must be one of"),
])
def test_runtime_plan_errors_are_one_line_exit_2(argv, expected, capsys):
    code, err = _exit_and_stderr(capsys, _load_script("show_plan.py").main, argv)
    assert code == 2 and expected in _one_line(err)


# ----------------------------------------------------------------------------- Ascend asked for, none here


def test_ascend_without_a_device_is_one_line(tmp_path, monkeypatch, capsys):
    from recast_ms.runtime import _ascend_available, require_device

    if _ascend_available():
        pytest.skip("this machine has an Ascend device")
    monkeypatch.delenv("MS_SIMULATION_LEVEL", raising=False)
    from recast_ms.commands.sft import main

    monkeypatch.setattr(sys, "argv", ["recast-sft", "--run-dir", str(tmp_path / "r"), "runtime.device_target=Ascend",
                                      "model_config=model_configs/qwen3_micro.yaml", "data.num_users=50"])
    code, err = _exit_and_stderr(capsys, main)
    assert code == 2 and "runtime.device_target=Ascend, but MindSpore finds no Ascend device" in _one_line(err)
    require_device("CPU")
    monkeypatch.setenv("MS_SIMULATION_LEVEL", "1")  # the dry run simulates Ascend on this machine: let it through
    require_device("Ascend")


# ----------------------------------------------------------------------------- plan_memory's arguments


@pytest.mark.parametrize("argv, expected", [
    (["--device-memory-gb", "-1"], "--device-memory-gb must be a finite number > 0, got -1.0"),
    (["--device-memory-gb", "nan"], "--device-memory-gb must be a finite number > 0, got nan"),
    (["--group-size", "0"], "--group-size must be >= 2 (G responses per prompt), got 0"),
    (["--prompts", "-1"], "--prompts must be >= 1, got -1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    (["--seq-length", "0"], "--seq-length must be >= 1, got 0"),
    (["--devices", "0"], "--devices must be >= 1, got 0"),
    (["--devices", "3"], "3 devices not divisible by TP x PP = 4 x 1"),
    (["--model", "model_configs/nope.yaml"], "--model model_configs/nope.yaml: no such file"),
    (["--model", "model_configs/runs/ascend_qwen3_8b.yaml"],
     "is a run YAML: give its model YAML, --model model_configs/qwen3_8b.yaml"),
    (["--add-record", "{"], "--add-record: Expecting property name"),
])
def test_plan_memory_rejects_bad_arguments(argv, expected, capsys):
    code, err = _exit_and_stderr(capsys, _load_script("plan_memory.py").main, argv)
    assert code == 2 and expected in _one_line(err)


# ----------------------------------------------------------------------------- smoke: every command and script

_HELP_PROBE = r"""
import contextlib, io, importlib, json, runpy, sys
out = {}
for name, target in json.loads(sys.argv[1]).items():
    buf = io.StringIO()
    sys.argv = [name, "--help"]
    code = "no exit"
    with contextlib.redirect_stdout(buf):
        try:
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                module, func = target.split(":")
                getattr(importlib.import_module(module), func)()
        except SystemExit as exc:
            code = exc.code or 0
    out[name] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_help_of_every_console_command_and_script():
    targets = dict(CONSOLE_COMMANDS)
    targets.update({s: os.path.join(ROOT, "scripts", s) for s in SCRIPTS})
    r = subprocess.run([sys.executable, "-c", _HELP_PROBE, json.dumps(targets)], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    helps = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (code, text) in helps.items():
        assert code == 0 and text.startswith("usage:"), (name, code, text[:300])
        if name in CONFIG_COMMANDS or SHIMS.get(name) in CONFIG_COMMANDS:
            assert "rl.group_size (int, default 16)" in text and "sft.steps (int" in text, name
            assert "--verbose" in text and "--config" in text, name
    assert "--run-dir" in helps["recast-sft"][1] and "--init" in helps["recast-rl"][1]
    assert "--preset" in helps["recast-grid"][1] and "--estimators" in helps["recast-main"][1]
    assert "--device-memory-gb" in helps["plan_memory.py"][1] and "--world-size" in helps["show_plan.py"][1]


def test_documented_scripts_exist_and_each_is_smoke_tested():
    docs = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                                if f.endswith(".md")]
    named = set()
    for path in docs:
        with open(path, encoding="utf-8") as f:
            named |= set(re.findall(r"scripts/(\w+\.py)", f.read()))
    assert named and named <= set(SCRIPTS), named - set(SCRIPTS)
    assert set(SCRIPTS) == set(SCRIPT_RUNS) | set(SHIMS), "a script without a smoke run (SCRIPT_RUNS) or shim entry"


# each script on its smallest setting (the micro model, tiny batches): output checked, not just the exit status
SCRIPT_RUNS = {
    "bench_model.py": ["--configs", "qwen3_micro", "--batch", "2", "--seq", "16", "--vocab", "64", "--iters", "1",
                       "--decode-prompts", "1", "--decode-group", "2", "--decode-new", "2", "--decode-prompt-len", "8"],
    "bench_decode.py": ["--model-yaml", "qwen3_micro.yaml", "--vocab", "64", "--prompts", "1", "--group", "2",
                        "--new-tokens", "2", "--prompt-len", "8", "--repeats", "1"],
    "bench_system.py": ["--group-size", "2", "--prompts", "1", "--steps", "2", "--model", "model_configs/qwen3_micro.yaml",
                        "--work-dir", "{tmp}"],
    "bench_scale.py": ["--model", "model_configs/qwen3_micro.yaml", "--vocab", "512", "--stages", "sft_step",
                       "--sft-batch", "2", "--work-dir", "{tmp}"],
    "plan_memory.py": ["--model", "model_configs/qwen3_0_6b.yaml", "--devices", "1", "--group-size", "4", "--prompts", "2"],
    "show_plan.py": ["--world-size", "1", "--device", "CPU"],
    "make_method_figure.py": ["--out", "{tmp}/method.png"],
    # the summary of the committed DryRun reports (compiling them is hours: scripts/dryrun_scale.py's docstring)
    "dryrun_scale.py": ["--summary", "--out", "{tmp}", "--reports", "docs/bench/dryrun_scale"],
    # the committed DryRun results (a compile is minutes; CI compiles the pipeline case in tests/test_dryrun.py)
    "dryrun_sliced_start.py": ["--summary"],
    "dryrun_memory_breakdown.py": ["tests/fixtures/memory_block_tiny.csv", "--out", "{tmp}/breakdown.json"],
}


def _check_script_output(name, out, tmp_path):
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if name == "bench_decode.py":
        assert "kv-cache:" in out and "full-forward:" in out and "tokens/s" in last, out[-2000:]
        return
    if name == "make_method_figure.py":
        assert (tmp_path / "method.png").stat().st_size > 10_000
        return
    res = json.loads(last)
    if name == "bench_model.py":
        assert res["train_tokens_per_s"] > 0 and res["configs"][0]["config"] == "qwen3_micro"
    elif name == "bench_system.py":
        assert res["group_size"] == 2 and res["peak_memory_mb"]["recast"] > 0
    elif name == "bench_scale.py":
        assert res["completed"] and res["stages"]["sft_step"]["s"] > 0
    elif name == "plan_memory.py":
        assert res["devices"] == 1 and res["recast"]["total_gb"] > 0
    elif name == "show_plan.py":
        assert res["device_target"] == "CPU" and res["world_size"] == 1
    elif name == "dryrun_sliced_start.py":
        # every committed sliced start loaded each slice equal to the project's own slicing; optimizer parallel split some
        assert res and all(r["error"] is None and r["checked"] == r["equal"] > 0 for r in res.values()), res
        assert res["tp_op_r0"]["opt_sharded"] > 0 and res["pp_r0"]["loaded"]["actor"] < res["tp_r0"]["loaded"]["actor"]
    elif name == "dryrun_memory_breakdown.py":
        # the fixture's peak: the forward MatMul output beside the three weights; the AdamW temporary came later
        assert res["peak_mb"] == 22.0 and res["alive_mb"] == {"weights/adam_moments": 8.0, "kernel/forward": 6.0,
                                                              "weights/actor": 4.0, "weights/reference": 4.0}, res
        assert json.loads((tmp_path / "breakdown.json").read_text()) == res
    elif name == "dryrun_scale.py":
        row = res["rows"]["qwen3_8b_w8_recast_r0"]
        assert row["extrapolated_peak_mb"] == row["peak_mb_L2"] + 34 * (row["peak_mb_L4"] - row["peak_mb_L2"]) // 2
        assert (tmp_path / "summary.json").exists() and row["planned_mb"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPT_RUNS))
def test_script_runs_on_its_smallest_setting(name, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in SCRIPT_RUNS[name]]
    r = subprocess.run([sys.executable, os.path.join("scripts", name), *argv], capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    _check_script_output(name, r.stdout, tmp_path)
    assert not FRAMEWORK_LINE.search(r.stdout + r.stderr), (r.stdout + r.stderr)[-3000:]


# ----------------------------------------------------------------------------- quiet console


@pytest.mark.slow
def test_sft_console_shows_no_framework_chatter(tmp_path):
    exe = shutil.which("recast-sft")
    cmd = [exe] if exe else [sys.executable, "-m", "recast_ms.commands.sft"]
    run_dir = tmp_path / "sft"
    r = subprocess.run(cmd + ["--run-dir", str(run_dir), "model_config=model_configs/qwen3_micro.yaml", "sft.steps=1",
                              "sft.warmup_steps=0", "data.num_users=50"],
                       capture_output=True, text=True, cwd=str(tmp_path), env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    assert not FRAMEWORK_LINE.search(console), console[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("{'sft/loss': ")  # the project's own final line stays
    assert "hyper_parallel" in (run_dir / "logs" / "framework.log").read_text()  # routed, not lost


_IMPORT_MINDFORMERS = (
    "import sys\n"
    "from recast_ms.cli import command, setup_logging\n"
    "@command\n"
    "def main():\n"
    "    setup_logging(sys.argv[1] == 'verbose', sys.argv[2])\n"
    "    import mindformers  # logs 'Import PyNative... failed: hyper_parallel' while importing\n"
    "main()\n")


@pytest.mark.slow
def test_verbose_shows_framework_logs(tmp_path):
    def run(mode):
        return subprocess.run([sys.executable, "-c", _IMPORT_MINDFORMERS, mode, str(tmp_path / mode)],
                              capture_output=True, text=True, env=_env(), timeout=300)

    quiet, loud = run("quiet"), run("verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "hyper_parallel" not in quiet.stdout + quiet.stderr
    assert "hyper_parallel" in (tmp_path / "quiet" / "logs" / "framework.log").read_text()
    assert "hyper_parallel" in loud.stdout + loud.stderr and not (tmp_path / "verbose" / "logs").exists()
