"""Inputs a user can get wrong (issue 21): refused up front with one line, or documented where they are given."""
import subprocess
import sys

import pytest

from recast_ms.config import ConfigError, load_config


def test_unconstrained_beam_rollout_is_refused():
    # before: accepted, and the run trained on nothing with exit 0
    with pytest.raises(ConfigError, match=r"rl\.rollout=beam needs rl\.constrained=true \("):
        load_config(None, ["rl.rollout=beam", "rl.constrained=false"])
    assert not load_config(None, ["rl.rollout=sample", "rl.constrained=false"]).rl.constrained


def test_eval_max_prompts_zero_means_the_whole_split_in_help():
    out = subprocess.run([sys.executable, "-m", "recast_ms.commands.evaluate", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    line = " ".join(out[out.index("--max-prompts N "):].split())  # argparse wraps the help text
    assert line.startswith("--max-prompts N evaluate N prompts of the split; 0 (the default) = the whole split.")


def test_main_job_refuses_a_beam_group_larger_than_the_catalogue_before_sft(tmp_path):
    # before: SFT ran and wrote its run, then the RL stage failed at its first rollout
    out = tmp_path / "main"
    r = subprocess.run([sys.executable, "-m", "recast_ms.commands.main", "--out", str(out), "data.num_users=60",
                        "sft.steps=1", "rl.rollout=beam", "rl.group_size=301"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "main.py: error: rl.group_size=301 exceeds the 300 distinct item SIDs of the synthetic-0 catalogue: "
        "rl.rollout=beam needs that many distinct beams per prompt; lower rl.group_size or use rl.rollout=sample"]
    assert not (out / "sft").exists()
