"""Tokenizers: every SID code is one token, a response is L codes + EOS; prompt encoding and padding."""
import json

import numpy as np
import pytest

from recast_ms.data.prompts import (TEMPLATE_WORDS, encode_batch, encode_prompt, encode_response, pad_to_bucket,
                                    prompt_corpus, render_prompt)
from recast_ms.data.sample import Sample
from recast_ms.data.synthetic import SyntheticConfig, make_synthetic
from recast_ms.models.tokenizer import (HFSIDTokenizer, SentencePieceSIDTokenizer, SIDTokenizer, check_sid_tokens,
                                        load_tokenizer, sid_token_map, sid_vocabulary)
from recast_ms.sid import OPENONEREC_FORMAT, SIDCodebook


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(SyntheticConfig(seed=3, num_users=150))


@pytest.fixture(scope="module")
def sp_tok(synth):
    cb = synth.codebook
    corpus = prompt_corpus(synth.train, cb) + prompt_corpus(synth.train, cb, with_titles=True)
    return SentencePieceSIDTokenizer.train(corpus, sid_vocabulary(cb.fmt, cb.codebook_size), extra_symbols=TEMPLATE_WORDS)


def _check_sid_contract(tok, codebook, samples):
    """Every code is one id; a rendered response is exactly L code tokens (+ markers) then EOS."""
    assert isinstance(tok, SIDTokenizer)
    check_sid_tokens(tok, codebook.fmt, codebook.codebook_size)
    tmap = sid_token_map(tok, codebook)
    code_ids = set(tmap.code_to_id.ravel().tolist())
    assert len(code_ids) == codebook.num_levels * codebook.codebook_size  # distinct ids
    assert tok.pad_id not in code_ids and tok.eos_id not in code_ids and tok.pad_id != tok.eos_id
    for s in samples:
        sid = s.target_sids[0]
        ids = encode_response(sid, codebook, tok)
        assert ids[-1] == tok.eos_id
        markers = [tok.token_to_id(m) for m in (codebook.fmt.begin, codebook.fmt.end) if m]
        body = ids[:-1]
        if markers:
            assert body[0] == markers[0] and body[-1] == markers[1]
            body = body[1:-1]
        assert body == tmap.sid_to_ids(sid)
        assert tmap.parse_ids(ids) == [sid]
        assert codebook.parse(tok.decode(ids)) == [sid]
        prompt_ids = encode_prompt(s, codebook, tok)
        assert tmap.parse_ids(prompt_ids) == list(dict.fromkeys(s.history_sids))
    assert tok.token_to_id("<definitely-not-a-token>") is None
    assert tok.id_to_token(-1) is None and tok.id_to_token(tok.vocab_size) is None


def test_sentencepiece_contract(sp_tok, synth):
    _check_sid_contract(sp_tok, synth.codebook, synth.valid[:50])
    s = synth.valid[0]
    for with_titles in (False, True):
        text = render_prompt(s, synth.codebook, with_titles)
        assert sp_tok.decode(sp_tok.encode(text)) == text
    assert sp_tok.bos_id is None and (sp_tok.pad_id, sp_tok.eos_id) == (0, 2)
    # the template words and each history SID are compact: prefix + (space + L codes) per item + suffix
    n = len(s.history_sids)
    assert len(sp_tok.encode(render_prompt(s, synth.codebook))) == 1 + n * (1 + 3) + 2


def test_sentencepiece_save_load(sp_tok, synth, tmp_path):
    sp_tok.save(tmp_path / "tok")
    for loaded in (SentencePieceSIDTokenizer.load(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, SentencePieceSIDTokenizer)
        assert loaded.get_vocab() == sp_tok.get_vocab()
        text = render_prompt(synth.test[0], synth.codebook, with_titles=True)
        assert loaded.encode(text) == sp_tok.encode(text)


def test_sentencepiece_openonerec_256(synth):
    """Amazon scale (3 x 256 codes) in the OpenOneRec format, with a BOS."""
    items = {i: (i % 256, (7 * i) % 256, (13 * i) % 256) for i in range(300)}
    cb = SIDCodebook(items, fmt=OPENONEREC_FORMAT, codebook_size=256)
    samples = [Sample.from_items("u", (1, 2), (i,), cb) for i in range(0, 300, 7)]
    tok = SentencePieceSIDTokenizer.train(prompt_corpus(samples, cb), sid_vocabulary(cb.fmt, 256), with_bos=True)
    _check_sid_contract(tok, cb, samples)
    assert tok.bos_id is not None and encode_prompt(samples[0], cb, tok)[0] == tok.bos_id
    assert len(encode_response(cb.sid_of(5), cb, tok)) == 3 + 2 + 1


def _wordlevel():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "history:": 1, "next:": 2, "<|endoftext|>": 3, "<|im_end|>": 4, "hello": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _write_wordlevel_checkpoint(directory, with_config=True):
    tok = _wordlevel()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if with_config:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>", "bos_token": None}))
    else:
        (directory / "config.json").write_text(json.dumps({"eos_token_id": [4, 3], "bos_token_id": None}))


def test_hf_wordlevel_from_tokenizer_config(synth, tmp_path):
    ckpt = tmp_path / "ckpt"
    _write_wordlevel_checkpoint(ckpt)
    cb = synth.codebook
    tok = HFSIDTokenizer.from_pretrained(ckpt, sid_vocabulary(cb.fmt, cb.codebook_size))
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (4, 3, None)
    assert tok.vocab_size == 6 + 3 * cb.codebook_size
    _check_sid_contract(tok, cb, synth.valid[:30])
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert isinstance(again, HFSIDTokenizer) and again.get_vocab() == tok.get_vocab()
    assert (again.eos_id, again.pad_id) == (tok.eos_id, tok.pad_id)


def test_hf_config_json_fallback_and_default_pad(synth, tmp_path):
    ckpt = tmp_path / "ckpt"
    _write_wordlevel_checkpoint(ckpt, with_config=False)
    cb = synth.codebook
    tok = HFSIDTokenizer.from_pretrained(ckpt, sid_vocabulary(cb.fmt, cb.codebook_size))
    assert tok.eos_id == 4  # first of config.json's eos_token_id list
    assert tok.id_to_token(tok.pad_id) == HFSIDTokenizer.DEFAULT_PAD
    _check_sid_contract(tok, cb, synth.valid[:10])
    with pytest.raises(FileNotFoundError):
        HFSIDTokenizer.from_pretrained(tmp_path / "nowhere", [])


def test_hf_bytelevel_bpe(synth, tmp_path):
    """A Qwen-like byte-level BPE, trained in the test on a few sentences: SID codes must not be merged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = prompt_corpus(synth.train[:200], synth.codebook, with_titles=True)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ckpt = tmp_path / "bpe"
    ckpt.mkdir()
    tok.save(str(ckpt / "tokenizer.json"))
    cb = synth.codebook
    hf = HFSIDTokenizer.from_pretrained(ckpt, sid_vocabulary(cb.fmt, cb.codebook_size), eos_token="<|endoftext|>")
    _check_sid_contract(hf, cb, synth.valid[:30])
    text = render_prompt(synth.valid[0], cb, with_titles=True)
    assert hf.decode(hf.encode(text)) == text


def test_encode_batch_and_padding(sp_tok, synth):
    cb = synth.codebook
    samples = synth.valid[:7]
    batch = encode_batch(samples, cb, sp_tok, prompt_buckets=(16, 48, 64))
    assert batch["prompt_ids"].shape[0] == 7 and batch["prompt_ids"].shape[1] in (16, 48, 64)
    assert batch["prompt_ids"].dtype == np.int32 and batch["response_ids"].shape == (7, 4)
    assert (batch["response_ids"][:, -1] == sp_tok.eos_id).all() and batch["response_mask"].all()
    for row, s in enumerate(samples):
        ids = encode_prompt(s, cb, sp_tok)
        n = int(batch["prompt_mask"][row].sum())
        assert batch["prompt_ids"][row, :n].tolist() == ids
        assert (batch["prompt_ids"][row, n:] == sp_tok.pad_id).all()
    left, mask = pad_to_bucket([[5, 6], [7]], pad_id=0, buckets=(4,), side="left")
    assert left.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError):
        pad_to_bucket([[1] * 9], 0, buckets=(4, 8))


def test_prompt_truncation_drops_oldest_items(sp_tok, synth):
    cb = synth.codebook
    s = max(synth.train, key=lambda x: len(x.history_sids))
    full = encode_prompt(s, cb, sp_tok)
    short = encode_prompt(s, cb, sp_tok, max_len=len(full) - 1)
    assert len(short) < len(full)
    assert short[1:] == full[len(full) - len(short) + 1:]  # "history:" then the most recent items, intact
    assert short == sp_tok.encode(render_prompt(s, cb, max_items=len(s.history_sids) - 1))
    with pytest.raises(ValueError):
        encode_prompt(s, cb, sp_tok, max_len=3)


class _CountingTokenizer:
    """``tok`` with a record of the text of every ``encode`` call (the work prompt encoding does)."""

    def __init__(self, tok):
        self._tok, self.texts = tok, []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text):
        self.texts.append(text)
        return self._tok.encode(text)


@pytest.mark.parametrize("with_titles", [False, True])
def test_long_history_is_truncated_in_bounded_work(sp_tok, synth, with_titles):
    """Issue 21: a 10,000-item history hung SFT (one re-render and re-tokenization per dropped item)."""
    from recast_ms.data.batching import encode_prompts

    cb = synth.codebook
    items = sorted(cb.item_to_sid)
    assert len(items) > 64  # the kept tail has distinct items, so parsing it back is exact
    history = [items[i % len(items)] for i in range(10_000)]
    long = Sample.from_items("U", history, [items[0]], cb, origin="long.csv:2")
    tok = _CountingTokenizer(sp_tok)
    max_len = 64
    enc = encode_prompts([long], cb, tok, max_len, with_titles)  # the SFT / RL / eval path
    n = int(enc.lens[0])
    ids = enc.ids[0, :n].tolist()
    assert 0 < n <= max_len
    # the kept items are the most recent ones that fit: one more does not fit
    tmap = sid_token_map(sp_tok, cb)
    parsed = tmap.parse_ids(ids)
    k = len(parsed)
    assert parsed == [cb.item_to_sid[i] for i in history[-k:]]
    assert ids == sp_tok.encode(render_prompt(long, cb, with_titles, max_items=k))
    assert len(sp_tok.encode(render_prompt(long, cb, with_titles, max_items=k + 1))) > max_len
    # bounded work: a handful of tokenizer calls, none on more than max_len items (before: ~10,000 calls,
    # each on the whole remaining history)
    assert len(tok.texts) <= 2 + int(np.log2(max_len))
    first_code = cb.fmt.token(0, 0).split("0")[0]  # "<a_": every rendered item holds exactly one
    assert max(t.count(first_code) for t in tok.texts) <= max_len


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_hf_files_that_are_not_json_are_named(synth, tmp_path, name):
    """Issue 21: before, a broken file gave a bare 'expected ident at line 1 column 2' or JSONDecodeError."""
    from recast_ms.config import RunConfig
    from recast_ms.trainer.setup import get_tokenizer

    ckpt = tmp_path / "ckpt"
    _write_wordlevel_checkpoint(ckpt)
    (ckpt / name).write_text('{"truncated": ')
    cfg = RunConfig()
    cfg.hf_checkpoint = str(ckpt)
    with pytest.raises(ValueError, match=rf"^{ckpt / name}: not a"):
        get_tokenizer(synth, str(tmp_path / "run_tok"), cfg)  # the path SFT takes from a HF checkpoint
    if name == "tokenizer.json":
        HFSIDTokenizer(_wordlevel(), ["<a_1>"]).save(tmp_path / "saved")
        (tmp_path / "saved" / name).write_text("not json")
        with pytest.raises(ValueError, match=rf"^{tmp_path / 'saved' / name}: not a"):
            load_tokenizer(tmp_path / "saved")  # a run directory's tokenizer, reloaded by RL / evaluation
