"""Starting a run from a Hugging Face Qwen3 checkpoint: SID tokens added to its tokenizer, vocabulary
grown, SFT trains and resumes through the same code path as the embedded default."""
import json

import numpy as np
import pytest

pytest.importorskip("mindspore")

from qwen3_numpy_ref import random_hf_weights, tiny_hf_config, write_hf_checkpoint  # noqa: E402
from recast_ms.config import load_config  # noqa: E402


def _hf_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "history:": 1, "next:": 2, "<|endoftext|>": 3, "<|im_end|>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    d = tmp_path / "hf"
    config = tiny_hf_config(vocab_size=8, tie=True, eos_token_id=4)  # 8 rows: padded past the 5 tokens
    write_hf_checkpoint(d, config, random_hf_weights(config, seed=0))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return d


def test_sft_from_hf_checkpoint(tmp_path):
    from recast_ms.trainer import checkpoint as ckpt
    from recast_ms.trainer.sft import run_sft

    hf = _hf_dir(tmp_path)
    cfg = load_config(None, [f"hf_checkpoint={hf}", "seq_length=32", "data.num_users=60", "sft.steps=6",
                             "sft.batch_size=8", "sft.warmup_steps=0", "sft.save_every=3", "sft.eval_every=3",
                             "sft.log_every=3", "sft.lr=0.01"])
    run = tmp_path / "run"
    m = run_sft(cfg, str(run), progress=False)
    tok_meta = json.loads((run / "tokenizer" / "recast_tokenizer.json").read_text())
    assert tok_meta["kind"] == "hf"
    # 5 base tokens + 3 levels x 16 codes + a dedicated pad (EOS is the checkpoint's <|im_end|>)
    assert tok_meta["vocab_size"] == 5 + 48 + 1 and tok_meta["eos_token"] == "<|im_end|>"
    tensors, meta = ckpt.load_state(ckpt.latest_checkpoint(str(run)))
    emb = next(v for k, v in tensors.items() if k.endswith("word_embeddings.weight"))
    assert emb.shape == (54, 48)  # grown from 8 rows to the tokenizer's vocabulary
    rows = [json.loads(l) for l in open(run / "sft_metrics.jsonl")]
    assert rows[-1]["sft/loss"] < rows[0]["sft/loss"]  # learning moved the policy towards the targets
    assert np.isfinite(m["sft/val_loss"])
