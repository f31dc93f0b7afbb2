"""The config loader: unknown keys, types, overrides, cross-field checks, help text, legacy keys."""
import dataclasses
import subprocess
import sys

import pytest
import yaml

from recast_ms.config import (DataConfig, EvalConfig, RLConfig, RunConfig, SFTConfig, RuntimeConfig, apply_overrides,
                              config_help, load_config, save_config)
from recast_ms.signals import ESTIMATORS


def _yaml(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_and_yaml_with_overrides(tmp_path):
    cfg = load_config()
    assert cfg.rl.estimator == "recast" and cfg.rl.group_size == 16 and cfg.eval.ks == (1, 5, 10, 32)
    path = _yaml(tmp_path, {"seed": 3, "rl": {"group_size": 8, "estimator": "grpo"}, "eval": {"ks": [1, 4]}})
    cfg = load_config(path, ["rl.group_size=32", "sft.lr=1e-3", "eval.ks=[1,2]", "rl.eval_steps=0,5", "data.with_titles=yes"])
    assert cfg.seed == 3 and cfg.rl.estimator == "grpo"
    assert cfg.rl.group_size == 32  # the command line wins over the file
    assert cfg.sft.lr == 1e-3 and isinstance(cfg.sft.lr, float)
    assert cfg.eval.ks == (1, 2) and cfg.rl.eval_steps == (0, 5) and cfg.data.with_titles is True
    assert apply_overrides({"rl": {"lr": 1}}, ["rl.alpha=2"]) == {"rl": {"lr": 1, "alpha": 2}}


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in section 'rl': rl\.group_sise"):
        load_config(_yaml(tmp_path, {"rl": {"group_sise": 8}}))
    with pytest.raises(ValueError, match=r"command-line overrides: unknown config key\(s\): bogus"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        load_config(None, ["rl.group_size"])


def test_every_config_error_is_a_config_error(tmp_path):
    """The commands print a ConfigError as one line (exit 2): every user-fixable config problem must be one."""
    from recast_ms.config import ConfigError

    (tmp_path / "bad.yaml").write_text("rl: [1\n")
    for path, overrides, match in ((None, ["sft.group_size=3"], r"sft\.group_size \(did you mean rl\.group_size\?\)"),
                                   (None, ["rl.seq_length=8"], r"rl\.seq_length \(did you mean seq_length\?\)"),
                                   (None, ["rll.lr=1"], r"rll \(did you mean rl\?\)"),
                                   (None, ["rl.lr=inf"], "rl.lr: expected a finite number"),
                                   (None, ["rl.lr=["], "not a YAML scalar or list"),
                                   (None, ["rl.group_size=1"], "rl.group_size must be >= 2"),
                                   (str(tmp_path / "missing.yaml"), [], "config file not found"),
                                   (str(tmp_path), [], "config file .*: Is a directory"),
                                   (str(tmp_path / "bad.yaml"), [], "not valid YAML")):
        with pytest.raises(ConfigError, match=match) as exc:
            load_config(path, overrides)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override, message", [
    ("rl.group_size=abc", "rl.group_size: expected an integer"),
    ("rl.group_size=2.5", "rl.group_size: expected an integer"),
    ("rl.lr=nan", "rl.lr: expected a finite number"),
    ("rl.constrained=maybe", "rl.constrained: expected a boolean"),
    ("eval.ks={a: 1}", "eval.ks: expected a list"),
    ("rl.estimator=ppo", "rl.estimator must be one of"),
    ("rl.group_size=1", "rl.group_size must be >= 2"),
    ("eval.ks=[1,64]", r"eval.ks \(1, 64\) must lie in \[1, beam_width=32\]"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1"),
])
def test_types_and_values_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_cross_field_checks():
    with pytest.raises(ValueError, match=r"data.max_rl_prompts=4 is fewer than rl.prompts_per_step=8"):
        load_config(None, ["data.max_rl_prompts=4", "rl.prompts_per_step=8"])
    assert load_config(None, ["data.max_rl_prompts=8", "rl.prompts_per_step=8"]).data.max_rl_prompts == 8
    with pytest.raises(ValueError, match="eval.ks .* must lie in .*beam_width=4"):
        load_config(None, ["eval.beam_width=4"])  # the default ks reach 32
    with pytest.raises(ValueError, match="rl.eval_steps .* must lie in"):
        load_config(None, ["rl.steps=10", "rl.eval_steps=[0,20]"])
    with pytest.raises(ValueError, match="with rl.rollout=beam leave them"):
        load_config(None, ["rl.rollout=beam", "rl.top_k=5"])


def test_round_trip_and_removed_keys(tmp_path):
    cfg = load_config(None, ["rl.group_size=32", "eval.ks=[1,10]"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    assert load_config(path) == cfg
    stored = yaml.safe_load(open(path))
    stored["output_dir"] = "runs/old"  # what runs written before the field was dropped hold
    assert load_config(_yaml(tmp_path, stored, "old.yaml")) == cfg
    assert "output_dir" not in {f.name for f in dataclasses.fields(RunConfig)}


def test_every_field_has_help_and_help_lists_them():
    text = config_help()
    for cls, prefix in ((RunConfig, ""), (DataConfig, "data."), (SFTConfig, "sft."), (RLConfig, "rl."),
                        (EvalConfig, "eval."), (RuntimeConfig, "runtime.")):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in ("data", "sft", "rl", "eval", "runtime"):
                continue
            assert f.metadata.get("help"), f"{prefix}{f.name} has no help text"
            assert f"  {prefix}{f.name} (" in text
    for name, est in ESTIMATORS.items():  # the estimator list comes from the registry
        assert f"      {name}: {est.help}" in text


def test_commands_show_config_help():
    out = subprocess.run([sys.executable, "-m", "recast_ms.commands.rl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--init" in out.stdout and "rl.group_size (int, default 16): G: responses per prompt" in out.stdout
