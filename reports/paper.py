"""The paper's printed numbers (packaged reference CSVs), keyed like our cells."""

from __future__ import annotations

import csv
import io
from functools import cache
from importlib import resources

from reports.results import METRICS

# The paper's row id of the unedited backbone: the reference row of every table.
REFERENCE_ROW = "backbone"
# (paper table, paper backbone, runs.task, regime, method)
PaperKey = tuple[str, str, str, str, str]


def reference_text(name: str) -> str:
    """A packaged reference CSV (works from an installed wheel, not only the repo)."""
    return resources.files("reports").joinpath("reference", name).read_text(encoding="utf-8")


def _records(name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(reference_text(name))))


@cache
def paper_tables() -> dict[PaperKey, dict[str, float]]:
    """Paper Tables 1-4 as {(table, backbone, task, regime, method): {metric: percent}}."""
    return {(r["table"], r["backbone"], r["task"], r["regime"], r["method"]): {m: float(r[m]) for m in METRICS}
            for r in _records("paper_tables_1to4.csv")}


@cache
def paper_table5() -> dict[tuple[str, str], dict[str, float]]:
    """The paper's printed Table 5 as {(setting, method): {score: percent}}."""
    return {(r["setting"], r["method"]): {s: float(r[s]) for s in ("reliability", "generality", "locality")}
            for r in _records("paper_table5_printed.csv")}


@cache
def paper_figure4c() -> dict[str, dict[str, float]]:
    """The paper's printed Figure 4c bar values as {zeta treatment: {score: percent}}."""
    return {r["zeta_treatment"]: {s: float(r[s]) for s in ("generality", "locality")}
            for r in _records("paper_figure4c_printed.csv")}


@cache
def paper_method_ids() -> frozenset[str]:
    """Every method row id of the paper's printed numbers (what config `paper_name`s refer to)."""
    return frozenset(k[4] for k in paper_tables()) | frozenset(m for _, m in paper_table5())
