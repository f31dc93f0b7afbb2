"""MiniOneRec Amazon-2018 data (Industrial_and_Scientific, Office_Products) with precomputed SIDs.

Files, under ``<root>/<ds>/``: ``<ds>.index.json`` (item id -> SID codes, the catalogue),
``<ds>.item.json`` (titles), ``<ds>_5_2016-10-2018-11.info.txt`` (catalogue copy, cross-checked),
``<ds>_5_2016-10-2018-11.valid.csv`` and ``.test.csv`` (one next-item sample a row, history = the
user's previous <= 10 items). The upstream train split is absent, so training data is derived here.

Training protocol (no train.csv)
--------------------------------
Upstream made one sample per interaction (history = previous <= 10 items, target = the item) and cut
ALL samples 8:1:1 by target time into train / valid / test. Hence, per user, the valid rows then the
test rows (file order is time order) form one chain: each row's history is the previous row's
``history + [target]`` (last 10). Every item of a user's sequence that is a valid or test target is
inside the valid/test time window; the only items from the train window are the history of the
user's chronologically FIRST row (its first valid row, or its first test row if it has no valid row).

* ``train``: for every user, every (prefix -> next) transition inside the history of that first row:
  ``(h[:i] -> h[i])`` for ``i = 1..len(h)-1``, the history cut to its last 10 items as upstream's.
  These targets all precede the valid window in time, so nothing after the training period is seen.
  Transitions are de-duplicated on (user, history, target), and any transition equal to a held-out
  (user, history, target) triple (test, and valid unless ``valid_in_train``) is removed as a second
  guard (it counts in ``train_overlap_excluded``; it is 0 on the shipped data). If a user's first
  row is malformed, that user gives no transitions (its later histories would contain held-out
  targets); counted in ``users_first_row_malformed``.
  Transitions are NOT taken from later rows' histories: those prefixes end in valid or test targets,
  and a test row's history even contains earlier test rows of the same user (a transition like
  ``h[1:i] -> h[i]`` would repeat a test target at its own position under a shorter context, which
  an exact-triple filter would miss).
* ``valid``: valid.csv as given, held out (RL prompts and/or model selection; see
  ``split_by_user`` to carve a validation subset out of it by user).
* ``test``: test.csv as given.
* ``valid_in_train=True`` (final runs only): the valid rows are appended to ``train`` (they precede
  every test target in time); ``valid`` is then no longer held out.

Counts on the shipped files (valid_in_train=False, no malformed rows):
Industrial_and_Scientific 10,393 train transitions from 3,285 users / 4,532 valid / 4,533 test;
Office_Products 9,484 / 4,866 / 4,866. (Upstream's train split held ~36k / ~39k samples; this is
the part of it recoverable from valid/test histories.)

A row that repeats an earlier good row of the same file field for field is dropped (it would be
trained on or evaluated twice) and listed in ``LoadReport.duplicate_rows`` as (file, line, line of
the first copy), counted in ``counts["duplicates_dropped"]`` and logged with its first examples.

Malformed rows (csv error, a quoted field left open that runs into the next line, bytes that are not
UTF-8, wrong column count, bad python literal, wrong type, unknown item id, empty history, SID that
disagrees with index.json) are logged as warnings with file and line and counted in ``LoadReport``;
they never raise, and never take a good line with them: a record that spans lines is accepted only
if it parses and none of its continuation lines is a good row on its own (else its first line is the
malformed row and reading resumes on the next line). Files are decoded strictly: a row with a
non-UTF-8 byte is malformed (never kept under a mangled user id). A row whose user cannot be read
cannot taint its user, so the user whose history continues it (the row after it in the chain) is
excluded from training instead (``users_after_unattributed_row``). What cannot be a usable dataset is
an error naming the file: an unreadable or empty ``index.json``, a split file without data rows or
with every row malformed, and no training transition at all.
"""
from __future__ import annotations

import ast
import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from recast_ms.config import ConfigError
from recast_ms.data.sample import LoadReport, Sample, Splits
from recast_ms.sid import MINIONEREC_FORMAT, SID, SIDCodebook, SIDFormat, parse_sid_string

logger = logging.getLogger(__name__)

DATASETS = ("Industrial_and_Scientific", "Office_Products")
PERIOD = "5_2016-10-2018-11"
HISTORY_WINDOW = 10  # upstream keeps the previous <= 10 items as history
REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id", "history_item_sid", "item_sid")
MAX_WARNINGS_PER_FILE = 20  # the report keeps every malformed row; the log only the first ones

PathLike = Union[str, os.PathLike]


def default_data_root() -> Path:
    """``$RECAST_DATA_ROOT`` if set, else ``<repo>/../shared/data/minionerec_amazon``."""
    env = os.environ.get("RECAST_DATA_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "minionerec_amazon"


def dataset_files(root: PathLike, dataset: str, period: str = PERIOD) -> Dict[str, Path]:
    d = Path(root) / dataset
    return {
        "index": d / f"{dataset}.index.json",
        "item": d / f"{dataset}.item.json",
        "info": d / f"{dataset}_{period}.info.txt",
        "valid": d / f"{dataset}_{period}.valid.csv",
        "test": d / f"{dataset}_{period}.test.csv",
    }


# ---------------------------------------------------------------------------------------------- catalogue


def load_codebook(root: PathLike, dataset: str, report: Optional[LoadReport] = None,
                  fmt: SIDFormat = MINIONEREC_FORMAT, codebook_size: int = 256,
                  period: str = PERIOD) -> SIDCodebook:
    """Catalogue from index.json (required); titles from item.json, else info.txt (both optional).

    Bad index entries are reported and skipped; info.txt lines that disagree with index.json are
    reported as ``info_mismatch`` (the catalogue stays index.json's).
    """
    report = report if report is not None else LoadReport()
    files = dataset_files(root, dataset, period)
    index_name = files["index"].name
    raw = _read_json(files["index"])
    if not isinstance(raw, dict):
        raise ValueError(f"{files['index']}: expected a JSON object of item id -> SID codes, got {type(raw).__name__}")
    item_to_sid: Dict[int, SID] = {}
    for key, codes in raw.items():
        try:
            item = int(key)
            if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
                raise ValueError(f"codes must be a list of strings, got {codes!r}")
            sid = parse_sid_string("".join(codes), fmt)
            if any(c >= codebook_size for c in sid):
                raise ValueError(f"code outside [0, {codebook_size}) in {codes!r}")
        except ValueError as e:
            _malformed(report, index_name, 0, "bad_index_entry", f"item {key!r}: {e}")
            continue
        item_to_sid[item] = sid

    if not item_to_sid:
        raise ValueError(f"{files['index']}: no usable catalogue entry ({len(raw)} entries, all malformed)")
    titles: Dict[int, str] = {}
    if files["item"].exists():
        items = _read_json(files["item"])
        if isinstance(items, dict):
            for key, meta in items.items():
                if isinstance(meta, dict) and isinstance(meta.get("title"), str) and key.isdigit():
                    titles[int(key)] = meta["title"]
        else:
            report.notes.append(f"{files['item'].name} is not a JSON object: titles from info.txt only")
    else:
        report.notes.append(f"{files['item'].name} absent: titles from info.txt only")

    mismatches = 0
    if files["info"].exists():
        with open(files["info"], encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                try:
                    sid = parse_sid_string(parts[0], fmt)
                    item = int(parts[-1])
                    ok = len(parts) >= 3 and item_to_sid.get(item) == sid
                except (ValueError, IndexError):
                    ok = False
                if not ok:
                    mismatches += 1
                    if mismatches <= MAX_WARNINGS_PER_FILE:
                        logger.warning("%s:%d: disagrees with %s: %r", files["info"].name, lineno, index_name, line[:120])
                    continue
                titles.setdefault(item, parts[1])
    report.counts["info_mismatch"] = mismatches
    report.counts["items"] = len(item_to_sid)
    return SIDCodebook(item_to_sid, fmt=fmt, codebook_size=codebook_size,
                       item_titles={i: t for i, t in titles.items() if i in item_to_sid})


def _read_json(path: Path):
    """A catalogue file's JSON; an unreadable, truncated or empty file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: catalogue file not found") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------- rows


class _Malformed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Row:
    """One CSV data row: where it was, whose it was (None if unreadable), and its sample (None if malformed)."""

    file: str
    line: int
    user_id: Optional[str]
    sample: Optional[Sample]
    # a malformed row whose user id alone is unreadable: its (history, target), to find whose chain it was in
    orphan: Optional[Sample] = None


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as ``surrogateescape`` reads them


class _LineFeed:
    """Physical lines handed to ``csv.reader`` one at a time; ``pos`` is the index of the next one, so a
    reader can be restarted at any line (after a quoted field that ran over a line end)."""

    def __init__(self, lines: List[str]):
        self.lines, self.pos = lines, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _literal(text: str, column: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise _Malformed("bad_literal", f"{column}={text[:80]!r} ({type(e).__name__})") from None


def _int_list(value, column: str) -> List[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise _Malformed("bad_type", f"{column} must be an int or a list of ints, got {value!r:.80}")


def _sid_list(value, column: str, fmt: SIDFormat) -> List[SID]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise _Malformed("bad_type", f"{column} must be a SID string or a list of them, got {value!r:.80}")
    try:
        return [parse_sid_string(v, fmt) for v in items]
    except ValueError as e:
        raise _Malformed("bad_sid", f"{column}: {e}") from None


def _parse_row(row: List[str], col: Dict[str, int], codebook: SIDCodebook, origin: str) -> Sample:
    if len(row) < len(col) or len(row) <= max(col.values()):
        raise _Malformed("wrong_column_count", f"{len(row)} fields")
    user = row[col["user_id"]].strip()
    if not user:
        raise _Malformed("empty_user")
    hist = _int_list(_literal(row[col["history_item_id"]], "history_item_id"), "history_item_id")
    if not hist:
        raise _Malformed("empty_history")
    item_cell = row[col["item_id"]]
    targets = _int_list(_literal(item_cell, "item_id"), "item_id")
    if not targets:
        raise _Malformed("empty_target")
    hist_sids = _sid_list(_literal(row[col["history_item_sid"]], "history_item_sid"), "history_item_sid", codebook.fmt)
    sid_cell = row[col["item_sid"]].strip()
    target_sids = _sid_list(_literal(sid_cell, "item_sid") if sid_cell.startswith("[") else sid_cell,
                            "item_sid", codebook.fmt)
    for item in hist + targets:
        if item not in codebook.item_to_sid:
            raise _Malformed("unknown_item", f"item id {item}")
    if len(hist_sids) != len(hist) or len(target_sids) != len(targets):
        raise _Malformed("sid_mismatch", "number of SIDs differs from number of item ids")
    for item, sid in zip(hist + targets, hist_sids + target_sids):
        if codebook.item_to_sid[item] != sid:
            raise _Malformed("sid_mismatch", f"item {item}: row says {codebook.fmt.render(sid)}, "
                                             f"index says {codebook.render_item(item)}")
    return Sample(user, tuple(hist), tuple(hist_sids), tuple(targets), tuple(target_sids), origin)


def _malformed(report: LoadReport, file: str, line: int, reason: str, detail: str = "") -> None:
    report.add_malformed(file, line, reason, detail)
    n = sum(1 for f, _, _ in report.malformed_rows if f == file)
    if n <= MAX_WARNINGS_PER_FILE:
        logger.warning("%s:%d: skipped malformed row (%s%s)", file, line, reason, f": {detail}" if detail else "")
    elif n == MAX_WARNINGS_PER_FILE + 1:
        logger.warning("%s: more malformed rows; all are listed in LoadReport.malformed_rows", file)


def _good_alone(line: str, col: Dict[str, int], codebook: SIDCodebook) -> bool:
    """Whether one physical line is a complete, good data row by itself."""
    try:
        fields = next(csv.reader([line]))
        _parse_row(fields, col, codebook, "")
        return not _UNDECODABLE.search(line)
    except (csv.Error, StopIteration, _Malformed):
        return False


def read_split_csv(path: PathLike, codebook: SIDCodebook, report: Optional[LoadReport] = None) -> List[Row]:
    """Every data row of one valid/test CSV, in file order; malformed rows have ``sample=None``.

    Raises only for a missing file or a header without the required columns. See the module
    docstring for undecodable bytes and quoted fields that run over a line end.
    """
    report = report if report is not None else LoadReport()
    path = Path(path)
    name = path.name
    rows: List[Row] = []
    seen: Dict[tuple, int] = {}  # fields of a good row -> its line: exact duplicates are dropped
    read = kept = 0
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        lines = f.readlines()
    feed = _LineFeed(lines)
    reader = csv.reader(feed)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise ValueError(f"{path}: no readable header ({e!r})") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: header lacks columns {missing}; got {header}")
    col = {c: header.index(c) for c in REQUIRED_COLUMNS}

    def restart(at: int):  # read on from physical line index ``at`` with a fresh reader
        nonlocal reader
        feed.pos = at
        reader = csv.reader(feed)

    while feed.pos < len(lines):
        start = feed.pos  # index of the record's first physical line; its line number is start + 1
        line = start + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            read += 1
            _malformed(report, name, line, "csv_error", str(e))
            rows.append(Row(name, line, None, None))
            restart(start + 1)
            continue
        read += 1
        if not any(x.strip() for x in fields):
            _malformed(report, name, line, "blank_row")
            rows.append(Row(name, line, None, None))
            continue
        user = fields[col["user_id"]].strip() if len(fields) > col["user_id"] else ""
        user = user if user and not _UNDECODABLE.search(user) and "\n" not in user else None
        try:
            sample = _parse_row(fields, col, codebook, f"{name}:{line}")
        except _Malformed as e:
            sample, err = None, e
        span = feed.pos - start
        if span > 1 and (sample is None or any(_good_alone(lines[k], col, codebook) for k in range(start + 1, feed.pos))):
            # a quote opened on this line ran over the line end and swallowed what follows: this line is
            # the malformed row; the next ones are read again on their own
            _malformed(report, name, line, "unclosed_quote", f"a quoted field runs on into line {line + 1}")
            rows.append(Row(name, line, user, None))
            restart(start + 1)
            continue
        undecodable = [header[i] if i < len(header) else f"field {i}" for i, x in enumerate(fields)
                       if _UNDECODABLE.search(x)]
        if undecodable:
            orphan = None
            if user is None:  # which chain the row was in can still be found from its items
                try:
                    orphan = _parse_row([("?" if i == col["user_id"] else x) for i, x in enumerate(fields)], col,
                                        codebook, f"{name}:{line}")
                except _Malformed:
                    pass
            _malformed(report, name, line, "undecodable", f"bytes that are not UTF-8 in {undecodable}")
            rows.append(Row(name, line, user, None, orphan))
            continue
        if sample is None:
            _malformed(report, name, line, err.reason, err.detail)
            rows.append(Row(name, line, user, None))
            continue
        first_line = seen.setdefault(tuple(fields), line)
        if first_line != line:  # kept, it would be trained on or evaluated twice
            report.duplicate_rows.append((name, line, first_line))
            continue
        kept += 1
        rows.append(Row(name, line, user, sample))
    report.rows_read[name] = read
    report.rows_kept[name] = kept
    dups = [(line, first) for f, line, first in report.duplicate_rows if f == name]
    if dups:
        logger.warning("%s: dropped %d exact duplicate rows, e.g. %s", name, len(dups),
                       ", ".join(f"line {l} repeats line {f}" for l, f in dups[:5]))
    return rows


# ---------------------------------------------------------------------------------------------- protocol


def derive_training(valid_rows: Sequence[Row], test_rows: Sequence[Row], report: Optional[LoadReport] = None,
                    valid_in_train: bool = False) -> List[Sample]:
    """Training transitions by the protocol in the module docstring; counts go to ``report.counts``."""
    report = report if report is not None else LoadReport()
    first: Dict[str, Row] = {}
    by_user: Dict[str, List[Row]] = {}
    for r in list(valid_rows) + list(test_rows):  # valid precedes test in time; file order is time order
        if r.user_id is None:
            continue
        first.setdefault(r.user_id, r)
        by_user.setdefault(r.user_id, []).append(r)

    chain_breaks = 0
    for user, rs in by_user.items():
        for prev, cur in zip(rs, rs[1:]):
            if prev.sample is None or cur.sample is None:
                continue
            expected = (prev.sample.history_items + prev.sample.target_items)[-HISTORY_WINDOW:]
            if cur.sample.history_items != expected:
                chain_breaks += 1
                if chain_breaks <= MAX_WARNINGS_PER_FILE:
                    logger.warning("%s: history of user %s does not continue %s", cur.sample.origin, user,
                                   prev.sample.origin)

    # a row with an unreadable user may have been some user's first row; that user's next row (whose
    # history continues it) would then pass for the first and leak the row's held-out target
    orphan_next = {(r.orphan.history_items + r.orphan.target_items)[-HISTORY_WINDOW:]
                   for r in list(valid_rows) + list(test_rows) if r.orphan is not None}
    candidates: List[Sample] = []
    tainted = after_orphan = 0
    for user, r in first.items():
        if r.sample is None:
            tainted += 1
            continue
        if r.sample.history_items in orphan_next:
            after_orphan += 1
            continue
        s = r.sample
        for i in range(1, len(s.history_items)):
            # upstream's history window, which also keeps a very long first history linear in memory
            lo = max(0, i - HISTORY_WINDOW)
            candidates.append(Sample(user, s.history_items[lo:i], s.history_sids[lo:i], (s.history_items[i],),
                                     (s.history_sids[i],), f"{s.origin}#prefix{i}"))
    if valid_in_train:
        candidates.extend(r.sample for r in valid_rows if r.sample is not None)

    held = {r.sample.key for r in test_rows if r.sample is not None}
    if not valid_in_train:
        held |= {r.sample.key for r in valid_rows if r.sample is not None}
    train: List[Sample] = []
    seen = set()
    overlap = dups = 0
    for s in candidates:
        if s.key in held:
            overlap += 1
        elif s.key in seen:
            dups += 1
        else:
            seen.add(s.key)
            train.append(s)
    if overlap:
        logger.warning("removed %d training transitions equal to held-out (user, history, target) triples", overlap)
    if tainted:
        logger.warning("%d users give no training transitions: their first row is malformed", tainted)
    if after_orphan:
        logger.warning("%d users give no training transitions: their first readable row continues a row whose "
                       "user id is unreadable", after_orphan)
    report.counts.update(
        users=len(first),
        users_first_row_malformed=tainted,
        users_after_unattributed_row=after_orphan,
        chain_breaks=chain_breaks,
        train_candidates=len(candidates),
        train_duplicates=dups,
        train_overlap_excluded=overlap,
    )
    return train


class DatasetNotFound(ConfigError, FileNotFoundError):
    """``data.dataset`` / ``data.root`` name no dataset directory: a config error (the commands print it as one line,
    exit 2), still a ``FileNotFoundError`` for code that catches that."""


def load_amazon(dataset: str, root: Optional[PathLike] = None, valid_in_train: bool = False,
                fmt: SIDFormat = MINIONEREC_FORMAT, codebook_size: int = 256, period: str = PERIOD) -> Splits:
    """Catalogue + train/valid/test samples of one dataset; see the module docstring for the protocol.

    ``splits.report.counts`` holds ``train``, ``valid``, ``test``, ``malformed`` and the protocol
    counts; ``splits.report.malformed_rows`` lists every skipped row as (file, line, reason).
    """
    root = Path(root) if root is not None else default_data_root()
    if not (root / dataset).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DatasetNotFound(f"data.dataset {dataset!r}: no directory {root / dataset}; datasets under {root}: "
                                f"{found or 'none (is data.root / $RECAST_DATA_ROOT right?)'} (shipped: {list(DATASETS)})")
    files = dataset_files(root, dataset, period)
    report = LoadReport()
    codebook = load_codebook(root, dataset, report, fmt=fmt, codebook_size=codebook_size, period=period)
    valid_rows = read_split_csv(files["valid"], codebook, report)
    test_rows = read_split_csv(files["test"], codebook, report)
    for split, rows in (("valid", valid_rows), ("test", test_rows)):
        if not rows:
            raise ValueError(f"{files[split]}: no data rows (header only): the {split} split would be empty")
        bad = [r for r in rows if r.sample is None]
        if len(bad) == len(rows):
            first = next(x for x in report.malformed_rows if x[0] == files[split].name)
            raise ValueError(f"{files[split]}: all {len(rows)} data rows are malformed (line {first[1]}: {first[2]}; "
                             f"every one is in the log): the {split} split would be empty")
    train = derive_training(valid_rows, test_rows, report, valid_in_train=valid_in_train)
    if not train:
        raise ValueError(f"{root / dataset}: no training transition can be derived from {files['valid'].name} and "
                         f"{files['test'].name} (every user's first row is malformed or has a one-item history)")
    valid = [r.sample for r in valid_rows if r.sample is not None]
    test = [r.sample for r in test_rows if r.sample is not None]
    report.counts.update(train=len(train), valid=len(valid), test=len(test), malformed=report.num_malformed,
                         duplicates_dropped=len(report.duplicate_rows))
    if valid_in_train:
        report.notes.append("valid_in_train=True: valid rows are in train and no longer held out")
    logger.info("%s: %s", dataset, report.summary())
    return Splits(codebook=codebook, train=train, valid=valid, test=test, report=report, name=dataset)
