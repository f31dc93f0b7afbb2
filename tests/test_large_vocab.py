"""The large-vocabulary path (Qwen3's 151,936 rows + SID tokens) on a micro model: response-only log-probs
equal the full LM head's, and one RL step runs, stays finite and moves the policy."""
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from recast_ms.config import load_config  # noqa: E402
from recast_ms.models.policy import ResponseLogProbs, TokenLogProbs  # noqa: E402
from recast_ms.trainer.rl import RLTrainer  # noqa: E402

MICRO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs", "qwen3_micro.yaml")
QWEN3_VOCAB = 151_936


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("large_vocab")
    over = {"model_config": MICRO, "seq_length": 32, "data.num_users": 60, "rl.prompts_per_step": 2,
            "rl.group_size": 4, "rl.kl_coef": 0.001, "rl.lr": 1e-3, "rl.estimator": "recast",
            "vocab_size": QWEN3_VOCAB + 64}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    return RLTrainer(cfg, str(tmp / "run"), None, str(tmp / "tok"), progress=False)


def test_model_has_the_large_vocabulary(trainer):
    assert trainer.model.config.vocab_size == QWEN3_VOCAB + 64 > trainer.tok.vocab_size


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_response_logps_equal_full_head(trainer, temperature):
    batch = trainer.make_batch()
    ids, start, R = batch.input_ids, batch.resp_start, trainer.R
    full = TokenLogProbs(trainer.model, temperature)(ms.Tensor(ids)).asnumpy()  # [B, S-1], the full head
    resp = ResponseLogProbs(trainer.model, R, temperature)(ms.Tensor(ids), ms.Tensor(start)).asnumpy()  # [B, R]
    expected = np.stack([full[b, s - 1 : s - 1 + R] for b, s in enumerate(start)])
    assert resp.shape == (len(ids), R)
    assert np.abs(expected).max() > 5.0  # log-probs over 152k tokens: far from zero
    np.testing.assert_allclose(resp, expected, rtol=0, atol=1e-6)


def test_one_rl_step_moves_the_policy(trainer):
    before = {p.name: p.asnumpy().copy() for p in trainer.model.trainable_params()}
    m = trainer.step()
    assert m["actor/rows"] == 4 and np.isfinite(m["actor/loss"]) and m["actor/grad_norm"] > 0
    assert m["rollout/valid_ratio"] == 1.0  # constrained decoding never leaves the SID catalogue
    moved = [n for n, p in ((p.name, p.asnumpy()) for p in trainer.model.trainable_params())
             if not np.array_equal(p, before[n])]
    assert "embedding.word_embeddings.weight" in moved and len(moved) == len(before)
