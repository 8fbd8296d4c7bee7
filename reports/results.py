"""The per-edit rows of the results DuckDB, grouped into cells.

Every number of the report is computed from these rows (never from per-run
summaries); the DuckDB is only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from reports.stats import Sample

# The paper's metrics (token accuracy; locality: agreement with the pre-edit predictions).
METRICS: tuple[str, ...] = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
# Exact match of the accuracy metrics: not in the paper, shown beside token accuracy, which
# alone flatters answers that share most tokens with the target (e.g. E-IC captions).
EM_METRICS: tuple[str, ...] = ("rel_em", "t_gen_em", "m_gen_em")
# The columns of every Sample's values, in this order; score weights are over them.
COLUMNS: tuple[str, ...] = METRICS + EM_METRICS


def weights(**by_column: float) -> np.ndarray:
    """A weight vector over COLUMNS (unnamed columns weigh 0)."""
    unknown = set(by_column) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown column(s) {sorted(unknown)}")
    return np.array([by_column.get(c, 0.0) for c in COLUMNS])


# The paper's summary scores (Table 5, Figure 4): generality is the mean of T-Gen and M-Gen,
# locality the mean of T-Loc and M-Loc.
SCORES: dict[str, np.ndarray] = {
    "reliability": weights(rel=1.0),
    "generality": weights(t_gen=0.5, m_gen=0.5),
    "locality": weights(t_loc=0.5, m_loc=0.5),
}
# The same for exact match (locality has none: it is agreement, not correctness).
EM_SCORES: dict[str, np.ndarray] = {
    "reliability_em": weights(rel_em=1.0),
    "generality_em": weights(t_gen_em=0.5, m_gen_em=0.5),
}

# (backbone, method, runs.task, regime). A cross-task cell holds the rows of both
# case tasks (the paper reports one mixed score set for cross-task editing).
CellKey = tuple[str, str, str, str]

_ROWS_SQL = f"""
SELECT r.backbone, r.method, r.task AS run_task, r.regime, r.seed, m.fact_id, r.run_id, m.sequence_id,
       {", ".join(f"100 * m.{c} AS {c}" for c in COLUMNS)}
FROM edit_metrics AS m JOIN runs AS r USING (run_id)
ORDER BY r.backbone, r.method, r.task, r.regime, r.run_id, m.case_id
"""


@dataclass(frozen=True)
class Results:
    """Per-edit rows, one Sample per cell; a cell's runs are its seeds (see reports.stats)."""

    cells: dict[CellKey, Sample]

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection) -> Results:
        grouped: dict[CellKey, list[tuple]] = {}
        for backbone, method, run_task, regime, *row in con.execute(_ROWS_SQL).fetchall():
            grouped.setdefault((backbone, method, run_task, regime), []).append(tuple(row))
        cells = {}
        for key, rows in grouped.items():
            seeds, facts, run_ids, sequence_ids, *values = zip(*rows)
            cells[key] = Sample.of_rows("|".join(key), np.array(values, dtype=float).T, seeds, facts,
                                        list(zip(run_ids, sequence_ids)))
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
