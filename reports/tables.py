"""Paper tables computed from the aggregated DuckDB, next to the paper's numbers.

Layering: this module only reads the DuckDB and the packaged reference CSVs;
it must never import torch, transformers or model code (a test enforces it).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

import duckdb

METRICS: tuple[str, ...] = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
METRIC_LABELS: dict[str, str] = {
    "rel": "Rel.", "t_gen": "T-Gen.", "m_gen": "M-Gen.", "t_loc": "T-Loc.", "m_loc": "M-Loc.",
}
TASKS: tuple[str, ...] = ("e-vqa", "e-ic")
TASK_LABELS: dict[str, str] = {"e-vqa": "E-VQA", "e-ic": "E-IC"}

# Row order and names as printed in the paper's Table 1.
PAPER_METHOD_ORDER: tuple[str, ...] = ("backbone", "ft", "ke", "tpatcher", "mend", "ike", "serac", "unike")
METHOD_LABELS: dict[str, str] = {
    "backbone": "Backbone model", "ft": "FT (last layer)", "ke": "KE", "tpatcher": "T-Patcher",
    "mend": "MEND", "ike": "In-Context Editing", "serac": "SERAC", "unike": "UniKE",
}
PAPER_BACKBONE_ORDER: tuple[str, ...] = ("blip2-opt", "minigpt4")
PAPER_BACKBONE_LABELS: dict[str, str] = {"blip2-opt": "BLIP-2 OPT", "minigpt4": "MiniGPT-4"}

@dataclass(frozen=True)
class Cell:
    """One metric of one (backbone, method, task), in percent."""

    ours: float | None
    paper: float | None

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours - self.paper


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    cells: dict[str, tuple[Cell, ...]]  # task -> one Cell per METRICS entry
    n: dict[str, int]  # task -> number of our edit cases behind the means (0: none)


@dataclass(frozen=True)
class BackboneGroup:
    backbone: str | None  # our backbone name; None for a paper-only group
    paper_backbone: str | None  # None when the paper has no such backbone
    rows: tuple[Row, ...]

    @property
    def label(self) -> str:
        paper = PAPER_BACKBONE_LABELS.get(self.paper_backbone or "", self.paper_backbone)
        if self.backbone is None:
            return f"{paper} (paper only)"
        if self.paper_backbone is None:
            return f"{self.backbone} (not in paper)"
        return f"{self.backbone} (paper: {paper})"


@dataclass(frozen=True)
class Table1:
    groups: tuple[BackboneGroup, ...]
    tasks: tuple[str, ...] = TASKS
    metrics: tuple[str, ...] = METRICS

    def row(self, backbone: str, method: str) -> Row:
        """Row for our backbone name (or a paper backbone name for paper-only groups)."""
        for g in self.groups:
            if (g.backbone or g.paper_backbone) == backbone:
                for r in g.rows:
                    if r.method == method:
                        return r
        raise KeyError((backbone, method))

    def cell(self, backbone: str, method: str, task: str, metric: str) -> Cell:
        return self.row(backbone, method).cells[task][METRICS.index(metric)]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_sort_key(method: str) -> tuple[int, str]:
    """Paper order first, then any other method (e.g. a new baseline) alphabetically."""
    order = PAPER_METHOD_ORDER.index(method) if method in PAPER_METHOD_ORDER else len(PAPER_METHOD_ORDER)
    return order, method


def _backbone_sort_key(paper_backbone: str | None, ours: str | None) -> tuple[int, str, str]:
    order = (PAPER_BACKBONE_ORDER.index(paper_backbone) if paper_backbone in PAPER_BACKBONE_ORDER
             else len(PAPER_BACKBONE_ORDER))
    # Paper-only groups ("" sorts first) precede ours for the same paper backbone; they never coexist.
    return order, paper_backbone or "", ours or ""


def reference_text(name: str) -> str:
    """A packaged reference CSV (works from an installed wheel, not only the repo)."""
    return resources.files("reports").joinpath("reference", name).read_text(encoding="utf-8")


def load_paper_table1() -> dict[tuple[str, str, str], dict[str, float]]:
    """Paper Table 1 as {(paper_backbone, method, task): {metric: percent}}."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for rec in csv.DictReader(io.StringIO(reference_text("paper_tables_1to4.csv"))):
        if rec["table"] == "table1":
            out[(rec["backbone"], rec["method"], rec["task"])] = {m: float(rec[m]) for m in METRICS}
    return out


# Means are taken over per-case rows (never over precomputed summaries), pooled
# over every one-step run (e.g. several seeds) of a (backbone, method, task).
_OURS_SQL = f"""
SELECT r.backbone, r.method, m.task, count(*) AS n,
       {", ".join(f"100 * avg(m.{c}) AS {c}" for c in METRICS)}
FROM edit_metrics AS m JOIN runs AS r USING (run_id)
WHERE r.regime = 'one-step' AND m.task IN ('e-vqa', 'e-ic')
GROUP BY r.backbone, r.method, m.task
ORDER BY r.backbone, r.method, m.task
"""


def table1(con: duckdb.DuckDBPyConnection, backbone_map: dict[str, str]) -> Table1:
    """Table 1 (one-step editing on E-VQA and E-IC), ours beside the paper's.

    Groups are per *our* backbone (a tiny and a full-size model mapped to the
    same paper backbone must not be pooled); paper backbones we have no runs for
    are still shown, paper-only, so the full paper table stays visible.
    """
    ours: dict[tuple[str, str, str], tuple[int, dict[str, float]]] = {}
    for backbone, method, task, n, *vals in con.execute(_OURS_SQL).fetchall():
        ours[(backbone, method, task)] = (n, dict(zip(METRICS, vals)))
    paper = load_paper_table1()

    paper_backbones = {b for b, _, _ in paper}
    # Unmapped names fall back to themselves, so a backbone named like the paper's matches it.
    mapped = {b: backbone_map.get(b, b) for b in sorted({b for b, _, _ in ours})}
    mapped = {b: (p if p in paper_backbones else None) for b, p in mapped.items()}
    specs: list[tuple[str | None, str | None]] = list(mapped.items())
    specs += [(None, p) for p in sorted(paper_backbones - set(mapped.values()))]
    specs.sort(key=lambda s: _backbone_sort_key(s[1], s[0]))

    groups = []
    for ours_b, paper_b in specs:
        methods = {m for b, m, _ in ours if b == ours_b} | {m for b, m, _ in paper if b == paper_b}
        rows = []
        for method in sorted(methods, key=method_sort_key):
            cells: dict[str, tuple[Cell, ...]] = {}
            n: dict[str, int] = {}
            for task in TASKS:
                n_cases, our_vals = ours.get((ours_b, method, task), (0, {}))  # type: ignore[arg-type]
                paper_vals = paper.get((paper_b, method, task), {})  # type: ignore[arg-type]
                cells[task] = tuple(Cell(our_vals.get(m), paper_vals.get(m)) for m in METRICS)
                n[task] = n_cases
            rows.append(Row(method, method_label(method), cells, n))
        groups.append(BackboneGroup(ours_b, paper_b, tuple(rows)))
    return Table1(tuple(groups))
