"""Nothing lost, nothing silent: run-directory ownership, config checks on resume, the NaN guard, one
response parser for reward and evaluation, and the small argument / config errors (issue 11).

Each test reproduces a defect of the earlier code (it failed there) on the micro model with 1-3 steps.
"""
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from recast_ms.config import load_config
from recast_ms.trainer import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "model_configs", "qwen3_micro.yaml")
SFT = [f"model_config={MICRO}", "seq_length=32", "data.num_users=60", "sft.batch_size=8", "sft.warmup_steps=0",
       "sft.log_every=1", "sft.eval_every=100"]
RL = ["rl.prompts_per_step=4", "rl.group_size=4", "rl.kl_coef=0.0", "rl.micro_batch_size=8"]


def _sft_cfg(*over):
    return load_config(None, SFT + list(over))


def _steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(n.split("_")[1]) for n in os.listdir(root) if n.startswith("step_"))


# ------------------------------------------------------------------------------------------- 1. ownership


def test_pruning_never_deletes_a_newer_checkpoint(tmp_path):
    run = str(tmp_path)
    t = {"model/w": np.ones(2, np.float32)}
    ckpt.save_state(run, 100, t, {"phase": "sft"})
    for s in (1, 2, 3):
        ckpt.save_state(run, s, t, {"phase": "sft"})
    assert _steps(run) == [2, 3, 100]  # keep=2 among this run's own steps; step_100 untouched


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """An old 3-step SFT run, then a new 2-step ``--fresh`` run in the same directory."""
    pytest.importorskip("mindspore")
    from recast_ms.trainer.sft import run_sft

    run = str(tmp_path_factory.mktemp("sft") / "run")
    run_sft(_sft_cfg("sft.steps=3", "sft.save_every=3"), run, progress=False)
    assert _steps(run) == [3]
    run_sft(_sft_cfg("sft.steps=2", "sft.save_every=1"), run, resume=False, progress=False)
    return run


def test_fresh_run_owns_the_directory(sft_runs):
    # before: the new run's step_1 was pruned at once and the old step_3 stayed "latest"
    assert _steps(sft_runs) == [1, 2]
    assert ckpt.latest_checkpoint(sft_runs).endswith("step_2")
    assert yaml.safe_load(open(os.path.join(sft_runs, "config.yaml")))["sft"]["steps"] == 2
    assert [json.loads(l)["step"] for l in open(os.path.join(sft_runs, "sft_metrics.jsonl"))] == [1, 2]


# ------------------------------------------------------------------------------------------- 2. config on resume


@pytest.mark.parametrize("override,key", [("seq_length=40", "seq_length"),
                                          ("model_config=model_configs/qwen3_mini.yaml", "model_config")])
def test_resume_with_other_shape_is_refused_and_config_kept(sft_runs, override, key):
    from recast_ms.trainer.sft import run_sft

    path = os.path.join(sft_runs, "config.yaml")
    before = open(path).read()
    with pytest.raises(ValueError, match=key):
        run_sft(_sft_cfg("sft.steps=2", override), sft_runs, progress=False)
    assert open(path).read() == before  # before: rewritten with the new value, then "resumed" on the old weights


def test_rl_init_with_other_shape_is_refused(sft_runs, tmp_path):
    from recast_ms.trainer.rl import RLTrainer

    init = ckpt.latest_checkpoint(sft_runs)
    with pytest.raises(ValueError, match="seq_length"):
        RLTrainer(_sft_cfg("seq_length=40", *RL), str(tmp_path / "rl"), init, os.path.join(sft_runs, "tokenizer"),
                  progress=False)
    assert not os.path.exists(tmp_path / "rl" / "config.yaml")


def test_non_shape_differences_resume_and_are_logged(sft_runs, caplog):
    from recast_ms.trainer.sft import run_sft

    with caplog.at_level(logging.INFO, logger="recast_ms"):
        assert run_sft(_sft_cfg("sft.steps=2", "sft.save_every=1", "sft.lr=0.5"), sft_runs, progress=False) == {}
    assert "sft.lr 0.002 -> 0.5" in caplog.text and "nothing to train" in caplog.text
    assert _steps(sft_runs) == [1, 2]


# ------------------------------------------------------------------------------------------- 5. NaN guard


def test_exploded_rl_update_is_never_saved(sft_runs, tmp_path):
    from recast_ms.trainer.rl import RLTrainer

    init = ckpt.latest_checkpoint(sft_runs)
    cfg = load_config(os.path.join(sft_runs, "config.yaml"), RL + ["rl.lr=1e30", "rl.save_every=1", "rl.steps=2"])
    tr = RLTrainer(cfg, str(tmp_path / "rl"), init, os.path.join(sft_runs, "tokenizer"), progress=False)
    before = ckpt.load_state(init)[0]
    with pytest.raises(FloatingPointError, match=r"RL step 1: .*reaches .*not saved.*--init checkpoint .*step_2 is untouched"):
        tr.train(resume=False, evaluate=False)
    assert ckpt.latest_checkpoint(str(tmp_path / "rl")) is None  # before: step_1 with weights of 1e30
    after = ckpt.load_state(init)[0]
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_exploded_sft_update_is_never_saved_same_numbering(tmp_path):
    from recast_ms.trainer.sft import run_sft

    run = str(tmp_path / "sft")
    with pytest.raises(FloatingPointError, match=r"SFT step 1: .*not saved.*No checkpoint of this run"):
        run_sft(_sft_cfg("sft.steps=2", "sft.save_every=1", "sft.lr=1e30"), run, progress=False)
    assert ckpt.latest_checkpoint(run) is None


def test_non_finite_message_names_only_the_non_finite_value(tmp_path):
    from recast_ms.trainer import guard

    with pytest.raises(FloatingPointError) as e:
        guard.check_step("SFT", 3, {"loss": 2.5, "grad_norm": float("nan")}, str(tmp_path))
    msg = str(e.value)
    assert "non-finite grad_norm=nan (finite: loss=2.5)" in msg and "SFT step 3" in msg  # before: "non-finite loss 2.5"


@pytest.mark.parametrize("override", ["rl.temperature=inf", "rl.alpha=inf", "rl.lr=nan", "sft.lr=.inf"])
def test_non_finite_config_values_are_rejected(override):
    with pytest.raises(ValueError, match=f"{override.split('=')[0]}: expected a finite number"):
        load_config(None, [override])


def test_a_run_whose_updates_are_all_zero_says_so(tmp_path, caplog):
    pytest.importorskip("mindspore")
    from recast_ms.trainer.rl import RLTrainer

    cfg = _sft_cfg(*RL, "rl.estimator=grpo", "rl.steps=1", "rl.save_every=1")
    tr = RLTrainer(cfg, str(tmp_path / "rl"), None, str(tmp_path / "tok"), progress=False)
    tr._rewards = lambda responses, samples: (np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 4), bool))
    before = [p.asnumpy().copy() for p in tr.model.trainable_params()]
    with caplog.at_level(logging.WARNING, logger="recast_ms"):
        tr.train(resume=False, evaluate=False)
    assert all(np.array_equal(b, p.asnumpy()) for b, p in zip(before, tr.model.trainable_params()))
    assert "all 1 updates of this run were zero" in caplog.text


# ------------------------------------------------------------------------------------------- 7. one parser


def test_reward_and_evaluation_parse_a_response_alike():
    from recast_ms.rewards import response_sid
    from recast_ms.sid import MINIONEREC_FORMAT, SIDCodebook, SIDTokenMap
    from recast_ms.trainer.rl import RLTrainer

    cb = SIDCodebook({0: (1, 2, 3), 1: (3, 2, 1)}, codebook_size=4)
    vocab = {t: i + 10 for i, t in enumerate(cb.code_tokens())}
    tmap = SIDTokenMap(MINIONEREC_FORMAT, 4, vocab)
    eos, x = 2, 5
    target = tmap.sid_to_ids((1, 2, 3))
    rows = np.array([target + [eos], [x] + target, target[:2] + [x, eos]])  # exact, shifted by one, broken
    host = SimpleNamespace(G=3, splits=SimpleNamespace(codebook=cb), token_map=tmap, R=4)
    sample = SimpleNamespace(target_sids=((1, 2, 3),))
    rewards, scores, valid = RLTrainer._rewards(host, rows, [sample])
    hits = [response_sid(r, tmap) == (1, 2, 3) for r in rows]
    assert rewards[0].tolist() == [float(h) for h in hits] == [1.0, 0.0, 0.0]  # before: the shifted row earned 1
    assert valid[0].tolist() == [True, False, False]


# ------------------------------------------------------------------------------------------- 8. smaller items


def test_config_file_errors(tmp_path):
    empty, listy = tmp_path / "empty.yaml", tmp_path / "list.yaml"
    empty.write_text("")
    listy.write_text("- seq_length: 32\n")
    with pytest.raises(ValueError, match="empty.yaml: the config file is empty"):
        load_config(str(empty))
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(str(listy))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        load_config(None, ["seed=-1"])
    with pytest.raises(ValueError, match="model_config 'nowhere.yaml': no such file"):
        load_config(None, ["model_config=nowhere.yaml"])
    with pytest.raises(ValueError) as e:
        load_config(None, ["rl.grop_size=4"])
    assert str(e.value).startswith("command-line overrides: unknown config key(s) in section 'rl': rl.grop_size")


def test_checkpoints_path_that_is_a_file_fails_before_training(tmp_path):
    from recast_ms.trainer.sft import run_sft

    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(NotADirectoryError, match="checkpoints exists and is not a directory"):
        run_sft(_sft_cfg("sft.steps=1"), str(tmp_path), progress=False)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "tokenizer").exists()


def _script(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def test_script_argument_errors_are_named_up_front(tmp_path):
    r = _script("evaluate.py", "--run-dir", str(tmp_path), "--max-prompts", "-5")
    assert r.returncode == 2 and "--max-prompts must be >= 0" in r.stderr
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    r = _script("evaluate.py", "--run-dir", str(tmp_path), "--out", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = _script("train_rl.py", "--init", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "rl"))
    assert r.returncode != 0 and "is not a finished SFT run directory" in r.stderr
