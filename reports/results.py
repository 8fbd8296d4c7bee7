"""The per-edit rows of the results DuckDB, grouped into cells.

Every number of the report is computed from these rows (never from per-run
summaries); the DuckDB is only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from reports.stats import Sample
from unike.grid import ONE_STEP

METRICS: tuple[str, ...] = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
# Weights over METRICS of the paper's summary scores (Table 5, Figure 4): generality is
# the mean of T-Gen and M-Gen, locality the mean of T-Loc and M-Loc.
SCORES: dict[str, np.ndarray] = {
    "reliability": np.array([1.0, 0.0, 0.0, 0.0, 0.0]),
    "generality": np.array([0.0, 0.5, 0.5, 0.0, 0.0]),
    "locality": np.array([0.0, 0.0, 0.0, 0.5, 0.5]),
}

# (backbone, method, runs.task, regime). A cross-task cell holds the rows of both
# case tasks (the paper reports one mixed score set for cross-task editing).
CellKey = tuple[str, str, str, str]

# One-step units are cases; other regimes resample whole sequences (see reports.stats).
_ROWS_SQL = f"""
SELECT r.backbone, r.method, r.task AS run_task, r.regime,
       CASE WHEN r.regime = '{ONE_STEP.name}' THEN r.run_id || '/case/' || m.case_id
            ELSE r.run_id || '/seq/' || CAST(m.sequence_id AS VARCHAR) END AS unit,
       {", ".join(f"100 * m.{c} AS {c}" for c in METRICS)}
FROM edit_metrics AS m JOIN runs AS r USING (run_id)
ORDER BY r.backbone, r.method, r.task, r.regime, r.run_id, m.case_id
"""


@dataclass(frozen=True)
class Results:
    """Per-edit rows, one Sample per cell; all runs of a cell (e.g. several seeds) are pooled."""

    cells: dict[CellKey, Sample]

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection) -> Results:
        grouped: dict[CellKey, tuple[list[str], list[tuple[float, ...]]]] = {}
        for backbone, method, run_task, regime, unit, *vals in con.execute(_ROWS_SQL).fetchall():
            units, values = grouped.setdefault((backbone, method, run_task, regime), ([], []))
            units.append(unit)
            values.append(tuple(vals))
        cells = {}
        for key, (units, values) in grouped.items():
            _, inverse = np.unique(np.array(units, dtype=object), return_inverse=True)
            cells[key] = Sample("|".join(key), np.array(values, dtype=float), inverse.astype(np.int64))
        return cls(cells)

    def with_paper_names(self, method_map: dict[str, str], paper_ids: set[str]) -> Results:
        """The same cells with each method under its paper row id (config `paper_name`), so
        tables match the paper's rows by it. A method without one keeps its own name, which
        must then differ from every paper row id: a renamed or unmapped method never meets
        the paper's numbers by accident."""
        clash = sorted({m for (_, m, _, _) in self.cells if m not in method_map and m in paper_ids})
        if clash:
            raise ValueError(f"method(s) {clash} have no paper_name but are named like the paper's rows; "
                             "give them paper_name in the config, or other names")
        return Results({(b, method_map.get(m, m), t, r): s for (b, m, t, r), s in self.cells.items()})

    def get(self, backbone: str, method: str, task: str, regime: str) -> Sample | None:
        return self.cells.get((backbone, method, task, regime))

    def backbones(self) -> list[str]:
        return sorted({k[0] for k in self.cells})
