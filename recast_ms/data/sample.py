"""Types shared by every data source: one next-item ``Sample``, the three ``Splits`` and a ``LoadReport``."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from recast_ms.sid import SID, SIDCodebook


@dataclass(frozen=True)
class Sample:
    """One next-item prediction: a user's history (oldest first) and the target item(s).

    ``target_items``/``target_sids`` are tuples so that multi-target data fits the same type
    (``ID(y*)`` in the spec is ``set(target_sids)``); single-target data has one of each.
    ``origin`` says where the sample came from (``"<file>:<line>"``), for error messages.
    """

    user_id: str
    history_items: Tuple[int, ...]
    history_sids: Tuple[SID, ...]
    target_items: Tuple[int, ...]
    target_sids: Tuple[SID, ...]
    origin: str = ""

    def __post_init__(self):
        if len(self.history_items) != len(self.history_sids):
            raise ValueError(f"{self.origin}: {len(self.history_items)} history items but {len(self.history_sids)} SIDs")
        if not self.target_items or len(self.target_items) != len(self.target_sids):
            raise ValueError(f"{self.origin}: targets {self.target_items} do not match target SIDs {self.target_sids}")

    @property
    def key(self) -> Tuple[str, Tuple[int, ...], Tuple[int, ...]]:
        """``(user, history, targets)``: the identity used for de-duplication and leak checks."""
        return (self.user_id, self.history_items, self.target_items)

    @classmethod
    def from_items(cls, user_id: str, history: Sequence[int], targets: Sequence[int], codebook: SIDCodebook,
                   origin: str = "") -> "Sample":
        """Builds a sample whose SIDs are looked up in ``codebook`` (KeyError for an unknown item)."""
        history = tuple(int(i) for i in history)
        targets = tuple(int(i) for i in targets)
        return cls(user_id, history, tuple(codebook.sid_of(i) for i in history), targets,
                   tuple(codebook.sid_of(i) for i in targets), origin)


@dataclass
class LoadReport:
    """What a loader read, kept and skipped, and why. Nothing is dropped without a line here."""

    rows_read: Dict[str, int] = field(default_factory=dict)  # file name -> data rows seen
    rows_kept: Dict[str, int] = field(default_factory=dict)  # file name -> rows turned into samples
    malformed: Dict[str, int] = field(default_factory=dict)  # reason -> count, over all files
    malformed_rows: List[Tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)
    duplicate_rows: List[Tuple[str, int, int]] = field(default_factory=list)  # (file, line, line of 1st copy), dropped
    counts: Dict[str, int] = field(default_factory=dict)  # protocol counts (transitions, users, ...)
    notes: List[str] = field(default_factory=list)

    @property
    def num_malformed(self) -> int:
        return sum(self.malformed.values())

    def add_malformed(self, file: str, line: int, reason: str, detail: str = "") -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1
        self.malformed_rows.append((file, line, f"{reason}: {detail}" if detail else reason))

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in self.counts.items() if k != "malformed"]
        parts.append(f"malformed={self.num_malformed}" + (f" {self.malformed}" if self.malformed else ""))
        return ", ".join(parts)


@dataclass
class Splits:
    """``train`` (SFT transitions), ``valid`` (held out: RL prompts / model selection), ``test``."""

    codebook: SIDCodebook
    train: List[Sample]
    valid: List[Sample]
    test: List[Sample]
    report: LoadReport = field(default_factory=LoadReport)
    name: str = ""


def split_by_user(samples: Sequence[Sample], fraction: float, seed: int = 0) -> Tuple[List[Sample], List[Sample]]:
    """Deterministic split of ``samples`` into (rest, held) with about ``fraction`` of the USERS held.

    A user's samples all land on one side (histories of one user overlap, so a row-level split would
    leak). The assignment hashes ``(seed, user_id)``, so it does not depend on sample order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rest: List[Sample] = []
    held: List[Sample] = []
    for s in samples:
        h = hashlib.sha256(f"{seed}:{s.user_id}".encode()).digest()
        (held if int.from_bytes(h[:8], "big") / 2.0**64 < fraction else rest).append(s)
    return rest, held
