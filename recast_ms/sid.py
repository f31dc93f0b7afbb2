"""Semantic IDs: item id <-> SID tuple <-> tokens, parsing, and a prefix trie for constrained decoding.

A SID is a tuple of ``L`` integer codes, one per level of the residual quantiser. Two written forms
are supported (any number of levels):

* MiniOneRec:  ``<a_12><b_7><c_201>``
* OpenOneRec:  ``<|sid_begin|><s_a_12><s_b_7><s_c_201><|sid_end|>``

Parsing never raises: garbage gives an empty list. "Valid" means the SID names an item of the
catalogue; the reward and the structural score only ever see valid SIDs (spec: S(y) = 0 when the
output names no valid item).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

SID = Tuple[int, ...]


@dataclass(frozen=True)
class SIDFormat:
    """How SID codes are written as tokens.

    ``token(level, code)`` is ``f"<{token_prefix}{level_names[level]}_{code}>"``; a rendered SID is
    ``begin + tokens + end``.
    """

    num_levels: int = 3
    token_prefix: str = ""
    begin: str = ""
    end: str = ""
    level_names: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if not self.level_names:
            if self.num_levels > 26:
                raise ValueError("more than 26 levels need explicit level_names")
            object.__setattr__(self, "level_names", tuple(string.ascii_lowercase[: self.num_levels]))
        if len(self.level_names) != self.num_levels:
            raise ValueError(f"level_names {self.level_names} do not match num_levels={self.num_levels}")
        esc = [re.escape(n) for n in self.level_names]
        pre = re.escape(self.token_prefix)
        # one pattern matching a full SID: every level, in order, adjacent (whitespace tolerated)
        body = r"\s*".join(rf"<{pre}{n}_(\d{{1,6}})>" for n in esc)
        object.__setattr__(self, "_sid_re", re.compile(body))
        object.__setattr__(self, "_token_re", re.compile(rf"^<{pre}({'|'.join(esc)})_(\d{{1,6}})>$"))

    def token(self, level: int, code: int) -> str:
        return f"<{self.token_prefix}{self.level_names[level]}_{int(code)}>"

    def tokens(self, sid: Sequence[int]) -> List[str]:
        if len(sid) != self.num_levels:
            raise ValueError(f"SID {tuple(sid)} has {len(sid)} codes, format expects {self.num_levels}")
        return [self.token(level, code) for level, code in enumerate(sid)]

    def render(self, sid: Sequence[int]) -> str:
        return self.begin + "".join(self.tokens(sid)) + self.end

    def parse_token(self, tok: str) -> Optional[Tuple[int, int]]:
        """``"<b_7>" -> (1, 7)``; None for anything that is not a code token."""
        m = self._token_re.match(tok) if isinstance(tok, str) else None
        if not m:
            return None
        return self.level_names.index(m.group(1)), int(m.group(2))

    def parse(self, text) -> List[SID]:
        """All well-formed SIDs in ``text``, in order of appearance, duplicates removed. Never raises."""
        if not isinstance(text, str):
            return []
        out: List[SID] = []
        seen = set()
        for m in self._sid_re.finditer(text):
            sid = tuple(int(g) for g in m.groups())
            if sid not in seen:
                seen.add(sid)
                out.append(sid)
        return out

    def all_tokens(self, codebook_size: int) -> List[str]:
        return [self.token(level, c) for level in range(self.num_levels) for c in range(codebook_size)]


MINIONEREC_FORMAT = SIDFormat(num_levels=3)
OPENONEREC_FORMAT = SIDFormat(num_levels=3, token_prefix="s_", begin="<|sid_begin|>", end="<|sid_end|>")


def parse_sid_string(text: str, fmt: SIDFormat = MINIONEREC_FORMAT) -> SID:
    """Strict parse of exactly one SID (data files); raises ValueError naming the offending text."""
    body = text.strip() if isinstance(text, str) else ""
    if fmt.begin and body.startswith(fmt.begin) and body.endswith(fmt.end):
        body = body[len(fmt.begin) : len(body) - len(fmt.end)]
    m = fmt._sid_re.fullmatch(body)
    if not m:
        raise ValueError(f"not a single {fmt.num_levels}-level SID: {text!r}")
    return tuple(int(g) for g in m.groups())


class PrefixTrie:
    """Prefix trie over valid SIDs: ``allowed(prefix)`` gives the codes that may follow ``prefix``."""

    def __init__(self, sids: Iterable[Sequence[int]]):
        self._children: Dict[SID, set] = {}
        self.num_levels: Optional[int] = None
        n = 0
        for sid in sids:
            sid = tuple(int(c) for c in sid)
            if self.num_levels is None:
                self.num_levels = len(sid)
            elif len(sid) != self.num_levels:
                raise ValueError(f"SID {sid} has {len(sid)} levels, trie has {self.num_levels}")
            for depth in range(len(sid)):
                self._children.setdefault(sid[:depth], set()).add(sid[depth])
            n += 1
        if n == 0:
            raise ValueError("PrefixTrie needs at least one SID")
        self._sorted = {k: np.array(sorted(v), dtype=np.int64) for k, v in self._children.items()}

    def allowed(self, prefix: Sequence[int] = ()) -> np.ndarray:
        """Sorted codes allowed after ``prefix`` (empty array for an invalid or complete prefix)."""
        return self._sorted.get(tuple(int(c) for c in prefix), np.zeros(0, dtype=np.int64))

    def contains(self, sid: Sequence[int]) -> bool:
        sid = tuple(sid)
        return len(sid) == self.num_levels and sid[-1] in self._children.get(sid[:-1], ())


@dataclass
class SIDCodebook:
    """Catalogue of items and their SIDs.

    Several items may share one SID (RQ-VAE collisions); ``sid_to_items`` keeps all of them.
    """

    item_to_sid: Dict[Hashable, SID]
    fmt: SIDFormat = MINIONEREC_FORMAT
    codebook_size: int = 256
    item_titles: Mapping[Hashable, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.item_to_sid:
            raise ValueError("empty codebook")
        self.sid_to_items: Dict[SID, List[Hashable]] = {}
        for item, sid in self.item_to_sid.items():
            sid = tuple(int(c) for c in sid)
            if len(sid) != self.fmt.num_levels:
                raise ValueError(f"item {item!r}: SID {sid} has {len(sid)} levels, expected {self.fmt.num_levels}")
            if any(c < 0 or c >= self.codebook_size for c in sid):
                raise ValueError(f"item {item!r}: SID {sid} has a code outside [0, {self.codebook_size})")
            self.item_to_sid[item] = sid
            self.sid_to_items.setdefault(sid, []).append(item)
        self.trie = PrefixTrie(self.sid_to_items.keys())

    @property
    def num_levels(self) -> int:
        return self.fmt.num_levels

    @property
    def sids(self) -> List[SID]:
        return list(self.sid_to_items.keys())

    def sid_of(self, item) -> SID:
        try:
            return self.item_to_sid[item]
        except KeyError:
            raise KeyError(f"unknown item id {item!r}") from None

    def items_of(self, sid: Sequence[int]) -> List[Hashable]:
        return self.sid_to_items.get(tuple(sid), [])

    def is_valid(self, sid: Sequence[int]) -> bool:
        return tuple(sid) in self.sid_to_items

    def render(self, sid: Sequence[int]) -> str:
        return self.fmt.render(sid)

    def render_item(self, item) -> str:
        return self.fmt.render(self.sid_of(item))

    def code_tokens(self) -> List[str]:
        """Every code token of every level: the vocabulary extension for this codebook."""
        return self.fmt.all_tokens(self.codebook_size)

    def parse(self, text) -> List[SID]:
        """Valid SIDs named by a generated text (order of appearance); [] for garbage. Never raises."""
        return [s for s in self.fmt.parse(text) if s in self.sid_to_items]

    def parse_tokens(self, tokens: Iterable) -> List[SID]:
        """Valid SIDs named by a sequence of token strings. Never raises."""
        try:
            text = "".join(t for t in tokens if isinstance(t, str))
        except TypeError:
            return []
        return self.parse(text)


class SIDTokenMap:
    """Maps SID codes to token ids of a tokenizer and back, for decoding directly on token ids.

    ``code_to_id[level, code]`` is the token id of that code token; ``id_to_level_code`` inverts it.
    """

    def __init__(self, fmt: SIDFormat, codebook_size: int, token_to_id: Mapping[str, int]):
        self.fmt = fmt
        self.codebook_size = codebook_size
        self.code_to_id = np.full((fmt.num_levels, codebook_size), -1, dtype=np.int64)
        for level in range(fmt.num_levels):
            for code in range(codebook_size):
                tok = fmt.token(level, code)
                if tok not in token_to_id:
                    raise ValueError(f"tokenizer has no token for {tok}: add the SID tokens to the vocabulary")
                self.code_to_id[level, code] = token_to_id[tok]
        self.id_to_level_code: Dict[int, Tuple[int, int]] = {
            int(self.code_to_id[l, c]): (l, c) for l in range(fmt.num_levels) for c in range(codebook_size)
        }
        # dense inverses of code_to_id over ids 0..max code id (-1 elsewhere): vectorised parsing of [N, R] ids
        size = int(self.code_to_id.max()) + 1
        self.level_of_id = np.full(size, -1, dtype=np.int64)
        self.code_of_id = np.full(size, -1, dtype=np.int64)
        self.level_of_id[self.code_to_id] = np.arange(fmt.num_levels)[:, None]
        self.code_of_id[self.code_to_id] = np.arange(codebook_size)[None, :]

    def sid_to_ids(self, sid: Sequence[int]) -> List[int]:
        return [int(self.code_to_id[level, code]) for level, code in enumerate(sid)]

    def parse_ids(self, ids: Iterable) -> List[SID]:
        """All well-formed SIDs (codes of levels 0..L-1 in consecutive positions) in a token id sequence.

        Never raises; validity against a catalogue is the caller's (``SIDCodebook.is_valid``).
        """
        out: List[SID] = []
        seen = set()
        L = self.fmt.num_levels
        try:
            seq = [self.id_to_level_code.get(int(i)) for i in ids]
        except (TypeError, ValueError, OverflowError):
            return []
        for start in range(len(seq) - L + 1):
            window = seq[start : start + L]
            if all(w is not None and w[0] == lvl for lvl, w in enumerate(window)):
                sid = tuple(w[1] for w in window)
                if sid not in seen:
                    seen.add(sid)
                    out.append(sid)
        return out
