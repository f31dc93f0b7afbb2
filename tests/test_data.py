"""Data: synthetic generator, prompt rendering, the MiniOneRec Amazon loader (real files and malformed rows)."""
import csv
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from recast_ms.data.amazon import DATASETS, default_data_root, load_amazon, read_split_csv
from recast_ms.data.prompts import PROMPT_PREFIX, PROMPT_SUFFIX, render_prompt, render_response
from recast_ms.data.sample import LoadReport, Sample, split_by_user
from recast_ms.data.synthetic import SyntheticConfig, make_synthetic
from recast_ms.metrics import most_popular_ranking, pass_at_k
from recast_ms.sid import SIDCodebook

# ---------------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synth():
    return make_synthetic()


def test_synthetic_deterministic():
    cfg = SyntheticConfig(seed=11, num_users=80)
    a, b = make_synthetic(cfg), make_synthetic(cfg)
    assert a.codebook.item_to_sid == b.codebook.item_to_sid
    assert (a.train, a.valid, a.test) == (b.train, b.valid, b.test)
    c = make_synthetic(SyntheticConfig(seed=12, num_users=80))
    assert c.codebook.item_to_sid != a.codebook.item_to_sid or c.train != a.train


def test_synthetic_catalogue_shape(synth):
    cb = synth.codebook
    assert cb.num_levels == 3 and cb.codebook_size == 16
    assert 200 <= len(cb.item_to_sid) <= 500
    assert len(cb.sids) == len(cb.item_to_sid)  # no collisions
    assert len({s[0] for s in cb.sids}) == 8 and len({s[:2] for s in cb.sids}) == 32
    assert sorted(cb.item_to_sid) == list(range(len(cb.item_to_sid)))
    assert all(cb.item_titles[i] for i in cb.item_to_sid)
    c = synth.report.counts
    assert (c["valid"], c["test"]) == (600, 600) and c["train"] == len(synth.train) > 3000


def test_synthetic_splits_do_not_leak(synth):
    for held in (synth.valid, synth.test):
        keys = {s.key for s in held}
        assert not keys & {s.key for s in synth.train}
    # leave-last-out: a user's test history ends with its valid target
    valid_by_user = {s.user_id: s for s in synth.valid}
    for t in synth.test:
        v = valid_by_user[t.user_id]
        assert t.history_items[-1] == v.target_items[0]


def test_synthetic_is_learnable_and_near_misses_informative(synth):
    """A last-item bigram model hits often, popularity rarely, random almost never; misses share prefixes."""
    bigram = defaultdict(Counter)
    for s in synth.train:
        bigram[s.history_sids[-1]][s.target_sids[0]] += 1
    hit = sum(bool(bigram[s.history_sids[-1]]) and bigram[s.history_sids[-1]].most_common(1)[0][0] == s.target_sids[0]
              for s in synth.valid) / len(synth.valid)
    pop = most_popular_ranking(synth.train)
    pop_hit = sum(pass_at_k(pop, s.target_sids, 1) for s in synth.valid) / len(synth.valid)
    assert hit > 0.3 and pop_hit < 0.05 and 1 / len(synth.codebook.sids) < 0.005
    shares_top = sum(s.history_sids[-1][0] == s.target_sids[0][0] for s in synth.test) / len(synth.test)
    assert shares_top > 0.6


def test_synthetic_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig(branches=(8,))
    with pytest.raises(ValueError):
        SyntheticConfig(p_successor=0.9, p_sibling=0.5)
    two = make_synthetic(SyntheticConfig(num_levels=2, branches=(6,), leaf_range=(3, 5), num_users=20))
    assert two.codebook.num_levels == 2


def test_split_by_user(synth):
    rest, held = split_by_user(synth.valid, 0.25, seed=1)
    assert len(rest) + len(held) == len(synth.valid) and 0.15 < len(held) / len(synth.valid) < 0.35
    assert not {s.user_id for s in rest} & {s.user_id for s in held}
    assert split_by_user(list(reversed(synth.valid)), 0.25, seed=1)[1] == list(reversed(held))


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_template(synth):
    cb = synth.codebook
    s = Sample.from_items("u", [0, 1], [2], cb)
    sids = [cb.render_item(i) for i in (0, 1)]
    assert render_prompt(s, cb) == f"{PROMPT_PREFIX} {sids[0]} {sids[1]} {PROMPT_SUFFIX}"
    with_titles = render_prompt(s, cb, with_titles=True)
    assert with_titles == f"{PROMPT_PREFIX} {sids[0]} {cb.item_titles[0]} | {sids[1]} {cb.item_titles[1]} {PROMPT_SUFFIX}"
    assert render_prompt(s, cb, max_items=1) == f"{PROMPT_PREFIX} {sids[1]} {PROMPT_SUFFIX}"
    assert render_response(s.target_sids[0], cb) == cb.render_item(2)
    assert cb.parse(render_response(s.target_sids[0], cb)) == [s.target_sids[0]]
    assert cb.parse(render_prompt(s, cb, with_titles=True)) == list(s.history_sids)


# ---------------------------------------------------------------------------------------------- amazon (real)

EXPECTED = {  # train transitions, valid rows, test rows, users
    "Industrial_and_Scientific": (10393, 4532, 4533, 3285),
    "Office_Products": (9484, 4866, 4866, 3231),
}


def _data_root() -> Path:
    return default_data_root()


@pytest.fixture(scope="module", params=DATASETS)
def amazon(request):
    root = _data_root()
    if not (root / request.param / f"{request.param}.index.json").exists():
        pytest.skip(f"MiniOneRec Amazon data not found under {root} (set RECAST_DATA_ROOT to its directory)")
    return load_amazon(request.param, root)


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECAST_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("RECAST_DATA_ROOT")
    assert default_data_root().parts[-3:] == ("shared", "data", "minionerec_amazon")


def test_amazon_counts(amazon):
    n_train, n_valid, n_test, n_users = EXPECTED[amazon.name]
    c = amazon.report.counts
    assert (len(amazon.train), len(amazon.valid), len(amazon.test)) == (n_train, n_valid, n_test)
    assert (c["train"], c["valid"], c["test"], c["users"], c["malformed"]) == (n_train, n_valid, n_test, n_users, 0)
    assert c["chain_breaks"] == 0 and c["info_mismatch"] == 0 and c["train_overlap_excluded"] == 0
    cb = amazon.codebook
    assert cb.codebook_size == 256 and cb.num_levels == 3
    assert all(isinstance(i, int) for i in cb.item_to_sid) and len(cb.item_titles) == len(cb.item_to_sid)
    s = amazon.test[0]
    assert s.history_sids == tuple(cb.sid_of(i) for i in s.history_items)


def test_amazon_no_leak(amazon):
    train_keys = {s.key for s in amazon.train}
    assert not train_keys & {s.key for s in amazon.test}
    assert not train_keys & {s.key for s in amazon.valid}
    # stronger, by position: every training transition lies inside the history of the user's first
    # held-out row, so its target precedes every valid/test target of that user in time (histories
    # chain without breaks). An exact-triple check alone would miss a held-out target predicted at its
    # own position from a shorter context; repeat purchases make a content-only check meaningless.
    assert amazon.report.counts["chain_breaks"] == 0
    first = {}
    for s in amazon.valid + amazon.test:
        first.setdefault(s.user_id, s)
    for s in amazon.train:
        h = first[s.user_id].history_items
        assert h[: len(s.history_items) + 1] == s.history_items + s.target_items


def test_amazon_valid_in_train(amazon):
    both = load_amazon(amazon.name, _data_root(), valid_in_train=True)
    assert len(both.train) == len(amazon.train) + len(amazon.valid)
    assert not {s.key for s in both.train} & {s.key for s in both.test}


# ---------------------------------------------------------------------------------------------- malformed rows

HEADER = ["user_id", "history_item_title", "item_title", "history_item_id", "item_id", "history_item_sid", "item_sid"]
SIDS = {0: (1, 2, 3), 1: (1, 2, 4), 2: (5, 6, 7), 3: (5, 0, 0), 4: (9, 9, 9)}


def _sid(i):
    a, b, c = SIDS[i]
    return f"<a_{a}><b_{b}><c_{c}>"


def _row(user, hist, target, title="t", hist_sids=None, target_sid=None):
    hist_sids = hist_sids if hist_sids is not None else str([_sid(i) for i in hist])
    return [user, str([title] * len(hist)), title, str(hist), str(target), hist_sids,
            target_sid if target_sid is not None else _sid(target)]


def _write_dataset(root: Path, valid_rows, test_rows, name="Tiny"):
    d = root / name
    d.mkdir(parents=True)
    index = {str(i): [f"<{l}_{c}>" for l, c in zip("abc", sid)] for i, sid in SIDS.items()}
    index["bad"] = ["<a_1>"]  # a broken catalogue entry: reported, skipped
    (d / f"{name}.index.json").write_text(json.dumps(index))
    (d / f"{name}.item.json").write_text(json.dumps({str(i): {"title": f"item {i}"} for i in SIDS}))
    for split, rows in (("valid", valid_rows), ("test", test_rows)):
        with open(d / f"{name}_5_2016-10-2018-11.{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            for r in rows:
                if isinstance(r, str):
                    f.write(r)
                else:
                    w.writerow(r)
    return d


def test_malformed_rows_are_reported_with_line_numbers(tmp_path, caplog):
    valid_rows = [
        _row("U1", [0, 1, 2], 3, title="multi\nline title"),  # line 2-3 (quoted newline)
        "U2,\"['t']\",t,[0,,1],2,\"['<a_1><b_2><c_3>']\",<a_5><b_6><c_7>\n",  # line 4: bad literal
        _row("U3", [0, 77], 2, hist_sids=str([_sid(0), "<a_1><b_2><c_3>"])),  # line 5: unknown item 77
        _row("U4", [], 2, hist_sids="[]"),  # line 6: empty history
        _row("U5", [0, 1], 2, target_sid="<a_9><b_9><c_9>"),  # line 7: SID mismatch with index
        ["U6", "x", "y"],  # line 8: too few fields
        _row("U7", [0, 1, 4], 2),  # line 9: a good row
        _row("U8", [0, 1], "'two'", target_sid=_sid(2)),  # line 10: item_id of the wrong type
        _row("U9", [3, 4, 0], 1),  # line 11: U9's FIRST row is fine
    ]
    test_rows = [
        _row("U1", [0, 1, 2, 3], 4),  # continues U1
        _row("U5", [0, 1, 2], 4),  # U5's first row was malformed: no training transitions from U5
        _row("U9", [3, 4, 0, 1], 2, hist_sids="['<a_1><b_2><c_3>'"),  # line 4: bad literal (unclosed)
    ]
    _write_dataset(tmp_path, valid_rows, test_rows)
    with caplog.at_level(logging.WARNING, logger="recast_ms.data.amazon"):
        splits = load_amazon("Tiny", tmp_path)
    rep = splits.report
    where = {(f.split(".")[-2], line): reason.split(":")[0] for f, line, reason in rep.malformed_rows}
    assert where == {
        ("index", 0): "bad_index_entry",
        ("valid", 4): "bad_literal",
        ("valid", 5): "unknown_item",
        ("valid", 6): "empty_history",
        ("valid", 7): "sid_mismatch",
        ("valid", 8): "wrong_column_count",
        ("valid", 10): "bad_type",
        ("test", 4): "bad_literal",
    }
    assert rep.num_malformed == 8 and rep.counts["malformed"] == 8
    assert rep.rows_read == {"Tiny_5_2016-10-2018-11.valid.csv": 9, "Tiny_5_2016-10-2018-11.test.csv": 3}
    assert rep.rows_kept == {"Tiny_5_2016-10-2018-11.valid.csv": 3, "Tiny_5_2016-10-2018-11.test.csv": 2}
    assert "valid.csv:7: skipped malformed row (sid_mismatch" in caplog.text
    assert [s.user_id for s in splits.valid] == ["U1", "U7", "U9"] and len(splits.test) == 2
    # train: prefixes of the first row's history for U1 (2), U7 (2), U9 (2); U5 tainted
    assert rep.counts["users_first_row_malformed"] == 6  # U2, U3, U4, U5, U6, U8
    assert sorted({s.user_id for s in splits.train}) == ["U1", "U7", "U9"]
    assert [(s.history_items, s.target_items) for s in splits.train if s.user_id == "U1"] == [((0,), (1,)), ((0, 1), (2,))]
    assert len(splits.train) == 6
    assert splits.valid[0].origin.endswith("valid.csv:2")


def test_overlap_guard_and_chain_breaks(tmp_path):
    # U1's test row repeats (history, target) of a transition inside its first valid row's history
    valid_rows = [_row("U1", [0, 1, 0, 1], 2)]
    test_rows = [_row("U1", [0], 1), _row("U2", [0], 1)]  # also a chain break for U1
    _write_dataset(tmp_path, valid_rows, test_rows)
    splits = load_amazon("Tiny", tmp_path)
    c = splits.report.counts
    assert c["train_overlap_excluded"] == 1 and c["chain_breaks"] == 1
    assert ((0,), (1,)) not in {(s.history_items, s.target_items) for s in splits.train if s.user_id == "U1"}
    assert not {s.key for s in splits.train} & {s.key for s in splits.test}


def test_bad_header_and_missing_file(tmp_path):
    cb = SIDCodebook({i: s for i, s in SIDS.items()}, codebook_size=16)
    p = tmp_path / "x.csv"
    p.write_text("user,item\nA,1\n")
    with pytest.raises(ValueError, match="header lacks"):
        read_split_csv(p, cb)
    p.write_text("")
    with pytest.raises(ValueError, match="no readable header"):
        read_split_csv(p, cb)
    with pytest.raises(FileNotFoundError):
        read_split_csv(tmp_path / "missing.csv", cb)
    # a header-only file is fine: zero rows
    p.write_text(",".join(HEADER) + "\n")
    rep = LoadReport()
    assert read_split_csv(p, cb, rep) == [] and rep.rows_read == {"x.csv": 0}


# ---------------------------------------------------------------------------------------------- integrity (issue 11)


def _csv_line(row) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue()


def test_undecodable_user_is_malformed_and_leaks_nothing(tmp_path):
    good = _row("U7", [0, 1, 4], 2)
    valid_rows = [good, _row("U1", [0, 1], 2), _row("U1", [0, 1, 2], 3)]
    _write_dataset(tmp_path, valid_rows, [_row("U1", [0, 1, 2, 3], 4)])
    path = tmp_path / "Tiny" / "Tiny_5_2016-10-2018-11.valid.csv"
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"\nU1,", b"\nU\xff1,", 1))  # U1's FIRST row (line 3): a non-UTF-8 byte
    splits = load_amazon("Tiny", tmp_path)
    rep = splits.report
    assert ("Tiny_5_2016-10-2018-11.valid.csv", 3) in [(f, l) for f, l, r in rep.malformed_rows if r.startswith("undecodable")]
    assert all("\ufffd" not in s.user_id and "\udcff" not in s.user_id for s in splits.valid + splits.train)
    # the damaged row's held-out target (item 2 after [0, 1]) must not come back as a training transition
    # (before: the row was kept under user 'U\ufffd1' and U1's next row passed for its first)
    assert ((0, 1), (2,)) not in {(s.history_items, s.target_items) for s in splits.train if s.user_id != "U7"}
    assert {s.user_id for s in splits.train} == {"U7"}
    assert rep.counts["users_after_unattributed_row"] == 1


def test_line_cut_inside_a_quoted_field_swallows_nothing(tmp_path):
    cut = _csv_line(_row("U2", [0, 1], 2, title="a title"))
    cut = cut[: cut.index("a title") + 3] + "\n"  # the line ends inside the quoted history-title field
    valid_rows = [_row("U1", [0, 1, 2], 3), cut, _row("U3", [0, 1, 4], 2), _row("U4", [1, 2], 3)]
    _write_dataset(tmp_path, valid_rows, [_row("U1", [0, 1, 2, 3], 4)])
    splits = load_amazon("Tiny", tmp_path)
    rep = splits.report
    assert [s.user_id for s in splits.valid] == ["U1", "U3", "U4"]  # before: U3's line vanished into U2's field
    assert [(l, r.split(":")[0]) for f, l, r in rep.malformed_rows if f.endswith("valid.csv")] == [(3, "unclosed_quote")]
    assert rep.rows_read["Tiny_5_2016-10-2018-11.valid.csv"] == 4


def test_empty_or_all_malformed_split_is_an_error_naming_the_file(tmp_path):
    _write_dataset(tmp_path / "a", [], [_row("U1", [0, 1, 2, 3], 4)])
    with pytest.raises(ValueError, match=r"valid\.csv: no data rows"):  # before: 0 rows, val_loss 0.0, exit 0
        load_amazon("Tiny", tmp_path / "a")
    _write_dataset(tmp_path / "b", [_row("U1", [0, 1], 2)], [_row("U1", [0, 1], 2, target_sid=_sid(4)), ["U2", "x", "y"]])
    with pytest.raises(ValueError, match=r"test\.csv: all 2 data rows are malformed"):
        load_amazon("Tiny", tmp_path / "b")


def test_catalogue_and_dataset_errors_name_the_file(tmp_path):
    d = _write_dataset(tmp_path, [_row("U1", [0, 1], 2)], [_row("U1", [0, 1, 2], 3)])
    with pytest.raises(FileNotFoundError, match=r"data.dataset 'Tinny'.*\['Tiny'\]"):
        load_amazon("Tinny", tmp_path)
    index = d / "Tiny.index.json"
    for text in ("", index.read_text()[:20]):  # empty, truncated
        index.write_text(text)
        with pytest.raises(ValueError, match=r"Tiny\.index\.json: not a valid JSON file"):
            load_amazon("Tiny", tmp_path)


# ---------------------------------------------------------------------------------------------- inputs (issue 21)


def test_exact_duplicate_rows_are_dropped_and_reported(tmp_path, caplog):
    u1 = _row("U1", [0, 1, 2], 3)
    valid_rows = [u1, _row("U2", [0, 1], 2), u1, u1]  # lines 2-5: U1's row three times
    test_rows = [_row("U1", [0, 1, 2, 3], 4), _row("U2", [0, 1, 2], 3), _row("U2", [0, 1, 2], 3)]
    _write_dataset(tmp_path, valid_rows, test_rows)
    with caplog.at_level(logging.WARNING, logger="recast_ms.data.amazon"):
        splits = load_amazon("Tiny", tmp_path)
    rep = splits.report
    assert [s.user_id for s in splits.valid] == ["U1", "U2"]  # before: U1, U2, U1, U1
    assert [s.user_id for s in splits.test] == ["U1", "U2"]  # before: each U2 test row evaluated twice
    valid, test = "Tiny_5_2016-10-2018-11.valid.csv", "Tiny_5_2016-10-2018-11.test.csv"
    assert rep.duplicate_rows == [(valid, 4, 2), (valid, 5, 2), (test, 4, 3)]
    assert rep.counts["duplicates_dropped"] == 3 and rep.num_malformed == 1  # the broken index entry only
    assert rep.rows_read == {valid: 4, test: 3} and rep.rows_kept == {valid: 2, test: 2}
    assert f"{valid}: dropped 2 exact duplicate rows, e.g. line 4 repeats line 2, line 5 repeats line 2" in caplog.text
    assert "duplicates_dropped=3" in rep.summary()
    assert rep.counts["chain_breaks"] == 0  # U1's chain is read without its copies


def test_long_first_history_gives_windowed_transitions(tmp_path):
    """Issue 21: an n-item first history made n transitions of up to n items (quadratic memory)."""
    history = [i % 4 for i in range(5_000)]  # 10,000 SIDs would exceed the csv module's field limit
    _write_dataset(tmp_path, [_row("U1", history, 4)], [_row("U2", [0, 1, 2], 3)])
    splits = load_amazon("Tiny", tmp_path)
    u1 = [s for s in splits.train if s.user_id == "U1"]
    assert u1 and max(len(s.history_items) for s in u1) == 10  # upstream's window
    assert all(s.history_items == tuple(history[max(0, i - 10): i]) and s.target_items == (history[i],)
               for s, i in zip(u1, range(1, 11)))
    assert len(u1) == 9 + 4  # distinct (history, next) pairs of a period-4 sequence: 9 short ones, 4 full windows
