"""Table 5: average reliability, generality and locality of one-step and sequential editing.

Weighting, as the paper does it: every cell (one backbone, task and, for sequential
editing, regime) counts once, whatever its number of edit cases. Our value is the
mean of our cell means, its CI comes from bootstrapping within each cell
independently (reports.stats.estimate). Beside ours stand the paper's printed Table 5
and the same average recomputed from the paper's own Tables 1 (one-step: 2 backbones
x 2 tasks) and 2 (sequential: MiniGPT-4, 2 tasks x 2 regimes); a printed value that
does not follow from those tables is flagged. Exact-match reliability and generality
follow, ours only (the paper reports token accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np

from reports.paper import REFERENCE_ROW, paper_table5, paper_tables
from reports.results import COLUMNS, EM_SCORES, SCORES, Results
from reports.stats import Estimate, Sample, estimate
from reports.tables import ABLATIONS, PAPER_METHOD_ORDER, method_label, method_sort_key, seeds_note
from unike.grid import ONE_STEP, SEQUENTIAL_REGIMES, TASKS


@dataclass(frozen=True)
class Setting:
    label: str
    paper_table: int  # the paper table whose cells the setting averages
    regimes: tuple[str, ...]  # our regimes of the setting


SETTINGS: dict[str, Setting] = {
    "one-step": Setting("One-step editing", 1, (ONE_STEP.name,)),  # keys: the paper CSV's settings
    "sequential": Setting("Sequential editing", 2, SEQUENTIAL_REGIMES),
}
SCORE_LABELS = {"reliability": "Reliability", "generality": "Generality", "locality": "Locality",
                "reliability_em": "Reliability EM", "generality_em": "Generality EM"}
# Printed values are rounded to 0.1, so up to 0.05 of disagreement is rounding; more than
# this is a printed number that the paper's own tables do not give.
FLAG_THRESHOLD = 0.15


@dataclass(frozen=True)
class SummaryCell:
    ours: Estimate | None
    printed: float | None  # the paper's Table 5
    recomputed: float | None  # the same average from the paper's Tables 1-2

    @property
    def flagged(self) -> bool:
        return (self.printed is not None and self.recomputed is not None
                and abs(self.printed - self.recomputed) > FLAG_THRESHOLD)

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.printed is None:
            return None
        return self.ours.mean - self.printed


@dataclass(frozen=True)
class SummaryRow:
    method: str
    label: str
    cells: dict[str, tuple[SummaryCell, ...]]  # setting -> one cell per SCORES entry
    em: dict[str, tuple[Estimate | None, ...]]  # setting -> ours per EM_SCORES entry (no paper value)
    k: dict[str, int]  # setting -> number of our cells averaged (0: none)


@dataclass(frozen=True)
class Table5:
    rows: tuple[SummaryRow, ...]
    seeds_note: str  # reports.tables.seeds_note of our cells
    settings: tuple[str, ...] = tuple(SETTINGS)
    scores: tuple[str, ...] = tuple(SCORES)
    em_scores: tuple[str, ...] = tuple(EM_SCORES)
    number: int = 5
    title: str = "average results of one-step and sequential editing"

    def row(self, method: str) -> SummaryRow:
        return next(r for r in self.rows if r.method == method)

    def cell(self, method: str, setting: str, score: str) -> SummaryCell:
        return self.row(method).cells[setting][self.scores.index(score)]

    @property
    def notes(self) -> tuple[str, ...]:
        """One sentence per printed value that does not follow from the paper's Tables 1-2."""
        out = []
        for r in self.rows:
            for setting in self.settings:
                for score, c in zip(self.scores, r.cells[setting]):
                    if c.flagged:
                        out.append(f"{r.label}, {SETTINGS[setting].label.lower()}, {SCORE_LABELS[score].lower()}: "
                                   f"the paper prints {c.printed:.1f}, but its Table {SETTINGS[setting].paper_table} "
                                   f"gives {c.recomputed:.1f}.")
        return tuple(out)


def _recomputed(table: int, method: str, weights: np.ndarray) -> float | None:
    cells = [sum(v[c] * w for c, w in zip(COLUMNS, weights) if w) for k, v in paper_tables().items()
             if k[0] == f"table{table}" and k[4] == method]
    return float(np.mean(cells)) if cells else None


def table5(results: Results, exclude: Collection[str] = ABLATIONS) -> Table5:
    """Rows: the paper's Table 5 methods, then any other method of ours (not ``exclude``)."""
    regimes = {r for s in SETTINGS.values() for r in s.regimes}
    ours_methods = {m for (_, m, t, r) in results.cells if t in TASKS and r in regimes}
    methods = ({m for _, m in paper_table5()} | ours_methods) - set(exclude) - {REFERENCE_ROW}
    rows = []
    shown: list[Sample] = []
    for method in sorted(methods, key=lambda m: method_sort_key(m, PAPER_METHOD_ORDER)):
        cells: dict[str, tuple[SummaryCell, ...]] = {}
        em: dict[str, tuple[Estimate | None, ...]] = {}
        k: dict[str, int] = {}
        for setting, spec in SETTINGS.items():
            samples = [s for (_, m, t, r), s in sorted(results.cells.items())
                       if m == method and t in TASKS and r in spec.regimes]
            shown += samples
            printed = paper_table5().get((setting, method), {})
            cells[setting] = tuple(SummaryCell(estimate(samples, w), printed.get(score),
                                               _recomputed(spec.paper_table, method, w))
                                   for score, w in SCORES.items())
            em[setting] = tuple(estimate(samples, w) for w in EM_SCORES.values())
            k[setting] = len(samples)
        rows.append(SummaryRow(method, method_label(method), cells, em, k))
    return Table5(tuple(rows), seeds_note(shown))
