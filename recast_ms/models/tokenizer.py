"""Tokenizers in which every SID code is exactly one token.

``SIDTokenizer`` is the protocol the rest of recast_ms uses (prompts, rollout, trainer):
``encode(text) -> list[int]`` (no BOS/EOS added), ``decode(ids) -> str``, ``pad_id``, ``eos_id``,
``bos_id`` (or None), ``vocab_size``, ``token_to_id(tok)``, ``id_to_token(id)``, ``get_vocab()``.

Two implementations:

* ``SentencePieceSIDTokenizer``: trained here on the prompt corpus (CPU models built from scratch);
  every SID token is a user-defined symbol; ids 0 / 1 / 2 are pad / unk / eos (3 is bos if asked).
* ``HFSIDTokenizer``: a Hugging Face ``tokenizer.json`` of a checkpoint (offline, ``tokenizers``
  library) with the SID tokens added as special tokens; pad / eos / bos from ``tokenizer_config.json``
  or ``config.json`` when present, a dedicated pad token otherwise. Added tokens get ids past the
  base vocabulary, so the model's embedding must cover ``vocab_size``.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, Union, runtime_checkable

from recast_ms.sid import SIDCodebook, SIDFormat, SIDTokenMap

PathLike = Union[str, os.PathLike]
META_FILE = "recast_tokenizer.json"


@runtime_checkable
class SIDTokenizer(Protocol):
    pad_id: int
    eos_id: int
    bos_id: Optional[int]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_to_id(self, tok: str) -> Optional[int]: ...

    def id_to_token(self, idx: int) -> Optional[str]: ...

    def get_vocab(self) -> Dict[str, int]: ...


def sid_vocabulary(fmt: SIDFormat, codebook_size: int) -> List[str]:
    """Tokens a tokenizer must hold as single tokens: every code of every level, plus begin/end markers."""
    return fmt.all_tokens(codebook_size) + [t for t in (fmt.begin, fmt.end) if t]


def sid_token_map(tokenizer: SIDTokenizer, codebook: SIDCodebook) -> SIDTokenMap:
    """``SIDTokenMap`` of ``codebook``'s code tokens in ``tokenizer`` (ValueError if one is missing)."""
    return SIDTokenMap(codebook.fmt, codebook.codebook_size, tokenizer.get_vocab())


def check_sid_tokens(tokenizer: SIDTokenizer, fmt: SIDFormat, codebook_size: int) -> None:
    """ValueError naming the SID tokens that are not encoded as exactly their own single id."""
    bad = []
    for tok in sid_vocabulary(fmt, codebook_size):
        idx = tokenizer.token_to_id(tok)
        if idx is None or tokenizer.encode(tok) != [idx]:
            bad.append(tok)
    if bad:
        raise ValueError(f"{len(bad)} SID tokens are not single tokens, e.g. {bad[:5]}")


def _write_meta(directory: Path, meta: dict) -> None:
    with open(directory / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


# ---------------------------------------------------------------------------------------------- sentencepiece


class SentencePieceSIDTokenizer:
    """SentencePiece model trained on the prompt corpus; SID tokens are user-defined symbols."""

    PAD, UNK, EOS, BOS = "<pad>", "<unk>", "</s>", "<s>"
    MODEL_FILE = "spm.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.pad_id = self._sp.pad_id()
        self.eos_id = self._sp.eos_id()
        bos = self._sp.bos_id()
        self.bos_id: Optional[int] = bos if bos >= 0 else None
        self.unk_id = self._sp.unk_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError("the sentencepiece model needs pad and eos ids")

    @classmethod
    def train(cls, texts: Iterable[str], sid_tokens: Sequence[str], extra_symbols: Sequence[str] = (),
              text_vocab_size: int = 256, model_type: str = "bpe", with_bos: bool = False,
              max_sentences: int = 200_000, seed_sentencepiece_size: int = 100_000) -> "SentencePieceSIDTokenizer":
        """Trains on ``texts``; ``sid_tokens`` and ``extra_symbols`` become single, never-split tokens.

        ``text_vocab_size`` bounds the learned pieces besides the symbols, the control ids and the 256
        byte-fallback pieces (a soft limit: a small corpus gives fewer). One thread, no console log.
        """
        import sentencepiece as spm

        symbols = list(dict.fromkeys(list(sid_tokens) + list(extra_symbols)))
        reserved = {cls.PAD, cls.UNK, cls.EOS, cls.BOS}
        if reserved & set(symbols):
            raise ValueError(f"symbols may not reuse the control tokens {sorted(reserved)}")
        if any(not s or any(ch.isspace() for ch in s) for s in symbols):
            raise ValueError("symbols must be non-empty and contain no whitespace")
        texts = list(texts)
        if not texts:
            raise ValueError("empty training corpus")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, model_type=model_type,
            vocab_size=len(symbols) + 4 + 256 + text_vocab_size, hard_vocab_limit=False,
            user_defined_symbols=symbols, pad_id=0, unk_id=1, eos_id=2, bos_id=3 if with_bos else -1,
            pad_piece=cls.PAD, unk_piece=cls.UNK, eos_piece=cls.EOS, bos_piece=cls.BOS,
            byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", character_coverage=1.0, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size,
            max_sentence_length=16384, num_threads=1, minloglevel=2,
        )
        return cls(buf.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._sp.decode(ids)

    def token_to_id(self, tok: str) -> Optional[int]:
        idx = self._sp.piece_to_id(tok)
        return idx if self._sp.id_to_piece(idx) == tok else None

    def id_to_token(self, idx: int) -> Optional[str]:
        return self._sp.id_to_piece(int(idx)) if 0 <= int(idx) < self.vocab_size else None

    def get_vocab(self) -> Dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def save(self, directory: PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.MODEL_FILE).write_bytes(self._proto)
        _write_meta(directory, {"kind": "sentencepiece", "model_file": self.MODEL_FILE, "vocab_size": self.vocab_size,
                                "pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id})
        return directory

    @classmethod
    def load(cls, directory: PathLike) -> "SentencePieceSIDTokenizer":
        return cls((Path(directory) / cls.MODEL_FILE).read_bytes())


# ---------------------------------------------------------------------------------------------- hugging face


def _token_content(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    """An optional JSON file ({} when absent); a file that is there but not JSON is an error naming it."""
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({type(err).__name__}: {err})") from None
    return data if isinstance(data, dict) else {}


def _hf_tokenizer_file(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # pylint: disable=broad-except  # the tokenizers library raises a bare Exception
        raise ValueError(f"{path}: not a readable Hugging Face tokenizer file ({err})") from None


class HFSIDTokenizer:
    """A checkpoint's ``tokenizer.json`` plus the SID tokens as added special tokens (no downloads)."""

    DEFAULT_PAD = "<|sid_pad|>"
    DEFAULT_EOS = "<|sid_eos|>"

    def __init__(self, tokenizer, sid_tokens: Sequence[str], pad_token: Optional[str] = None,
                 eos_token: Optional[str] = None, bos_token: Optional[str] = None):
        from tokenizers import AddedToken

        self._tok = tokenizer
        self.sid_tokens = list(dict.fromkeys(sid_tokens))
        pad_token = pad_token or self.DEFAULT_PAD
        eos_token = eos_token or self.DEFAULT_EOS
        needed = self.sid_tokens + [pad_token, eos_token] + ([bos_token] if bos_token else [])
        # added tokens are matched before the model runs, so a SID code is never split or merged; a
        # token already in the base vocabulary keeps its id
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in needed])
        self.pad_token, self.eos_token, self.bos_token = pad_token, eos_token, bos_token
        self.pad_id = self._tok.token_to_id(pad_token)
        self.eos_id = self._tok.token_to_id(eos_token)
        self.bos_id: Optional[int] = self._tok.token_to_id(bos_token) if bos_token else None

    @classmethod
    def from_pretrained(cls, directory: PathLike, sid_tokens: Sequence[str], pad_token: Optional[str] = None,
                        eos_token: Optional[str] = None, bos_token: Optional[str] = None) -> "HFSIDTokenizer":
        """Loads ``<directory>/tokenizer.json``; special tokens: argument, else tokenizer_config.json,
        else config.json ids, else (pad/eos) a dedicated added token."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (HFSIDTokenizer works offline from a checkpoint directory)")
        tok = _hf_tokenizer_file(path)
        tcfg = _read_json(directory / "tokenizer_config.json")
        mcfg = _read_json(directory / "config.json")

        def pick(explicit: Optional[str], name: str) -> Optional[str]:
            if explicit:
                return explicit
            from_cfg = _token_content(tcfg.get(f"{name}_token"))
            if from_cfg:
                return from_cfg
            idx = mcfg.get(f"{name}_token_id")
            if isinstance(idx, list):
                idx = idx[0] if idx else None
            if isinstance(idx, int) and not isinstance(idx, bool):
                return tok.id_to_token(idx)
            return None

        return cls(tok, sid_tokens, pick(pad_token, "pad"), pick(eos_token, "eos"), pick(bos_token, "bos"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, tok: str) -> Optional[int]:
        return self._tok.token_to_id(tok)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self._tok.id_to_token(int(idx)) if 0 <= int(idx) < self.vocab_size else None

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def save(self, directory: PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        _write_meta(directory, {"kind": "hf", "sid_tokens": self.sid_tokens, "pad_token": self.pad_token,
                                "eos_token": self.eos_token, "bos_token": self.bos_token,
                                "vocab_size": self.vocab_size})
        return directory

    @classmethod
    def load(cls, directory: PathLike) -> "HFSIDTokenizer":
        """Reloads what ``save`` wrote (SID tokens and special tokens from the meta file)."""
        directory = Path(directory)
        meta = _read_json(directory / META_FILE)
        if meta.get("kind") != "hf":
            raise ValueError(f"{directory / META_FILE} does not describe an HFSIDTokenizer")
        tok = _hf_tokenizer_file(directory / "tokenizer.json")
        return cls(tok, meta["sid_tokens"], meta["pad_token"], meta["eos_token"], meta.get("bos_token"))


def load_tokenizer(directory: PathLike) -> SIDTokenizer:
    """Loads a tokenizer saved by either implementation (dispatch on ``recast_tokenizer.json``)."""
    meta = _read_json(Path(directory) / META_FILE)
    kind = meta.get("kind")
    if kind == "sentencepiece":
        return SentencePieceSIDTokenizer.load(directory)
    if kind == "hf":
        return HFSIDTokenizer.load(directory)
    raise ValueError(f"{Path(directory) / META_FILE}: unknown tokenizer kind {kind!r}")
