"""SID formats, codebook, prefix trie and parsers: round trips, fuzz (never raises), brute-force trie."""
import itertools
import random

import numpy as np
import pytest

from recast_ms.sid import (MINIONEREC_FORMAT, OPENONEREC_FORMAT, PrefixTrie, SIDCodebook, SIDFormat, SIDTokenMap,
                           parse_sid_string)

FORMATS = {
    "minionerec": MINIONEREC_FORMAT,
    "openonerec": OPENONEREC_FORMAT,
    "2-level": SIDFormat(num_levels=2),
    "4-level": SIDFormat(num_levels=4),
    "4-level-openonerec": SIDFormat(num_levels=4, token_prefix="s_", begin="<|sid_begin|>", end="<|sid_end|>"),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_render_parse_round_trip(name):
    fmt = FORMATS[name]
    rng = random.Random(0)
    for _ in range(200):
        sid = tuple(rng.randrange(300) for _ in range(fmt.num_levels))
        text = fmt.render(sid)
        assert fmt.parse(text) == [sid]
        assert parse_sid_string(text, fmt) == sid
        assert [fmt.parse_token(t) for t in fmt.tokens(sid)] == list(enumerate(sid))
        # embedded in other text, twice, with a duplicate: order of appearance, duplicates removed
        other = tuple((c + 1) % 300 for c in sid)
        assert fmt.parse(f"x {text} y {fmt.render(other)} {text}") == [sid, other]


def test_known_written_forms():
    assert MINIONEREC_FORMAT.render((12, 7, 201)) == "<a_12><b_7><c_201>"
    assert OPENONEREC_FORMAT.render((12, 7, 201)) == "<|sid_begin|><s_a_12><s_b_7><s_c_201><|sid_end|>"
    assert SIDFormat(num_levels=4).render((1, 2, 3, 4)) == "<a_1><b_2><c_3><d_4>"
    assert MINIONEREC_FORMAT.parse("<a_1> <b_2>\n<c_3>") == [(1, 2, 3)]  # whitespace tolerated
    assert MINIONEREC_FORMAT.parse("<a_1><c_2><b_3>") == []  # levels out of order
    assert SIDFormat(num_levels=2).parse("<a_1><b_2><c_3>") == [(1, 2)]


def test_strict_parse_rejects():
    for bad in ["", "<a_1><b_2>", "<a_1><b_2><c_3><a_4><b_5><c_6>", "a_1 b_2 c_3", "<a_x><b_2><c_3>", None, 12]:
        with pytest.raises(ValueError):
            parse_sid_string(bad)


def test_format_validation():
    with pytest.raises(ValueError):
        SIDFormat(num_levels=0)
    with pytest.raises(ValueError):
        SIDFormat(num_levels=2, level_names=("a",))
    with pytest.raises(ValueError):
        MINIONEREC_FORMAT.tokens((1, 2))


def _small_codebook(fmt=MINIONEREC_FORMAT, size=8):
    items = {0: (1, 2, 3), 1: (1, 2, 4), 2: (1, 5, 0), 3: (7, 0, 0), 4: (1, 2, 3)}  # items 0 and 4 collide
    items = {k: v[: fmt.num_levels] + (0,) * (fmt.num_levels - len(v)) for k, v in items.items()}
    return SIDCodebook(items, fmt=fmt, codebook_size=size, item_titles={0: "zero"})


def test_codebook():
    cb = _small_codebook()
    assert cb.items_of((1, 2, 3)) == [0, 4]
    assert cb.is_valid((7, 0, 0)) and not cb.is_valid((7, 0, 1))
    assert cb.parse("<a_7><b_0><c_1> <a_1><b_5><c_0> junk <a_1><b_2><c_3>") == [(1, 5, 0), (1, 2, 3)]
    assert cb.parse_tokens(["<a_1>", "<b_2>", "<c_4>"]) == [(1, 2, 4)]
    assert cb.parse_tokens([1, None, "<a_1>"]) == []
    assert cb.render_item(3) == "<a_7><b_0><c_0>"
    assert len(cb.code_tokens()) == 3 * 8
    with pytest.raises(KeyError):
        cb.sid_of(99)
    with pytest.raises(ValueError):
        SIDCodebook({0: (1, 2)}, codebook_size=8)
    with pytest.raises(ValueError):
        SIDCodebook({0: (1, 2, 8)}, codebook_size=8)


def test_token_map_round_trip():
    for fmt in FORMATS.values():
        cb = _small_codebook(fmt)
        vocab = {tok: 100 + i for i, tok in enumerate(cb.code_tokens())}
        tm = SIDTokenMap(fmt, cb.codebook_size, vocab)
        for sid in cb.sids:
            ids = tm.sid_to_ids(sid)
            assert len(ids) == fmt.num_levels
            assert tm.parse_ids([5] + ids + [6] + ids) == [sid]
        with pytest.raises(ValueError):
            SIDTokenMap(fmt, cb.codebook_size, {})


ALPHABET = "<>_abcdsz|0123456789 \n-+"
FRAGMENTS = ["<a_", "<b_", "<c_", "<d_", "<s_a_", ">", "<|sid_begin|>", "<|sid_end|>", "1", "255", "9999999", "_"]


def _random_text(rng):
    parts = []
    for _ in range(rng.randrange(0, 12)):
        if rng.random() < 0.5:
            parts.append(rng.choice(FRAGMENTS))
        else:
            parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 6))))
    return "".join(parts)


def test_parser_fuzz_strings_never_raise():
    rng = random.Random(1234)
    cb = _small_codebook()
    for i in range(2000):
        text = _random_text(rng) if i % 4 else "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(20)))
        for fmt in FORMATS.values():
            out = fmt.parse(text)
            assert all(len(s) == fmt.num_levels for s in out)
            try:
                parse_sid_string(text, fmt)
            except ValueError:
                pass
        assert all(cb.is_valid(s) for s in cb.parse(text))
        cb.parse_tokens(list(text))
        fmt = MINIONEREC_FORMAT
        fmt.parse_token(text)
    for junk in [None, 3, 2.5, b"<a_1><b_2><c_3>", ["<a_1>"], object()]:
        assert MINIONEREC_FORMAT.parse(junk) == []
        assert cb.parse(junk) == []
        assert MINIONEREC_FORMAT.parse_token(junk) is None


def test_parser_fuzz_token_ids_never_raise():
    rng = np.random.default_rng(7)
    for fmt in FORMATS.values():
        cb = _small_codebook(fmt)
        vocab = {tok: 50 + i for i, tok in enumerate(cb.code_tokens())}
        tm = SIDTokenMap(fmt, cb.codebook_size, vocab)
        for _ in range(2000 // len(FORMATS)):
            ids = rng.integers(-5, 50 + len(vocab) + 5, size=int(rng.integers(0, 20)))
            for sid in tm.parse_ids(ids):
                assert len(sid) == fmt.num_levels and all(0 <= c < cb.codebook_size for c in sid)
            tm.parse_ids(ids.tolist())
        for junk in [None, 5, "abc", [None, 1], [1.5, "x"], [2**70], [float("nan")], [[1, 2]]]:
            assert isinstance(tm.parse_ids(junk), list)


def test_parse_ids_finds_sid_at_every_offset():
    fmt = MINIONEREC_FORMAT
    vocab = {tok: i for i, tok in enumerate(fmt.all_tokens(4))}
    tm = SIDTokenMap(fmt, 4, vocab)
    ids = tm.sid_to_ids((3, 1, 2))
    for pad in range(4):
        assert tm.parse_ids([999] * pad + ids) == [(3, 1, 2)]
    assert tm.parse_ids(ids[:2]) == []
    assert tm.parse_ids(ids[1:] + ids[:1]) == []  # <b><c><a>: no SID


@pytest.mark.parametrize("levels,size,n", [(2, 5, 12), (3, 4, 25), (4, 3, 30)])
def test_trie_allowed_matches_brute_force(levels, size, n):
    rng = random.Random(levels)
    universe = list(itertools.product(range(size), repeat=levels))
    sids = rng.sample(universe, n)
    trie = PrefixTrie(sids)
    for depth in range(levels + 1):
        for prefix in itertools.product(range(size + 1), repeat=depth):  # includes out-of-range codes
            expected = sorted({s[depth] for s in sids if s[:depth] == prefix}) if depth < levels else []
            got = trie.allowed(prefix)
            assert got.tolist() == expected, prefix
            assert got.dtype == np.int64
    for s in universe:
        assert trie.contains(s) == (s in set(sids))
    assert not trie.contains(sids[0][:-1])
    with pytest.raises(ValueError):
        PrefixTrie([])
    with pytest.raises(ValueError):
        PrefixTrie([(1, 2), (1, 2, 3)])


@pytest.mark.parametrize("name", ["minionerec", "4-level"])
def test_vectorised_response_parser_matches_the_row_definition(name):
    """``rewards.response_sids`` (dense id tables on SIDTokenMap) == "the first L tokens are the codes of
    levels 0..L-1", checked row by row on fuzzed ids: valid SIDs, wrong levels, shifts, out-of-vocab ids."""
    from recast_ms.rewards import response_sids

    fmt = FORMATS[name]
    L, size = fmt.num_levels, 6
    cb = SIDCodebook({i: tuple(random.Random(i).randrange(size) for _ in range(L)) for i in range(20)},
                     codebook_size=size, fmt=fmt)
    vocab = {t: i + 7 for i, t in enumerate(cb.code_tokens())}  # ids 0..6 are other tokens
    tmap = SIDTokenMap(fmt, size, vocab)
    top = 7 + L * size
    rng = np.random.default_rng(0)
    rows = rng.integers(-3, top + 5, size=(400, L + 2))
    for n in range(0, 400, 3):  # every third row starts with a well-formed SID
        rows[n, :L] = tmap.sid_to_ids(tuple(rng.integers(0, size, L)))
    codes, parsed = response_sids(rows, tmap)
    for row, c, p in zip(rows, codes, parsed):
        want = [tmap.id_to_level_code.get(int(t)) for t in row[:L]]
        ok = all(w is not None and w[0] == lvl for lvl, w in enumerate(want))
        assert bool(p) == ok
        assert c.tolist() == ([w[1] for w in want] if ok else [-1] * L)
    assert 130 <= parsed.sum() < 400  # the fuzz exercised both outcomes
    assert response_sids(rows[:, : L - 1], tmap)[1].sum() == 0  # too short: nothing parses
