"""Paper Tables 1-4 computed from the per-edit rows, next to the paper's numbers.

Layering: the reports package only reads the DuckDB and the packaged reference CSVs;
it must never import torch, transformers or model code (a test enforces it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Collection

import numpy as np

from reports.paper import paper_tables
from reports.results import COLUMNS, EM_METRICS, METRICS, Results
from reports.stats import Estimate, Sample, estimate
from unike.grid import CROSS_10, CROSS_TASK, E_IC, E_VQA, ONE_STEP, REGIMES, SEQUENTIAL_REGIMES, TASKS

METRIC_LABELS: dict[str, str] = {
    "rel": "Rel.", "t_gen": "T-Gen.", "m_gen": "M-Gen.", "t_loc": "T-Loc.", "m_loc": "M-Loc.",
    "rel_em": "Rel. EM", "t_gen_em": "T-Gen. EM", "m_gen_em": "M-Gen. EM",
}
TASK_LABELS: dict[str, str] = {E_VQA: "E-VQA", E_IC: "E-IC", CROSS_TASK: "E-VQA + E-IC"}
REGIME_LABELS: dict[str, str] = {r.name: f"{r.length}-step" if r.length > 1 else "one-step" for r in REGIMES.values()}

# Row order and names as printed in the paper's Table 1.
PAPER_METHOD_ORDER: tuple[str, ...] = ("backbone", "ft", "ke", "tpatcher", "mend", "ike", "serac", "unike")
# Tables 2 and 3 (the paper leaves IKE out of sequential editing): any other method follows.
SEQUENTIAL_METHOD_ORDER: tuple[str, ...] = ("ft", "ke", "tpatcher", "mend", "serac", "unike")
METHOD_LABELS: dict[str, str] = {
    "backbone": "Backbone model", "ft": "FT (last layer)", "ke": "KE", "tpatcher": "T-Patcher",
    "mend": "MEND", "ike": "In-Context Editing", "serac": "SERAC", "unike": "UniKE",
}
# Table 4's rows, in the paper's order, with its labels.
ABLATION_LABELS: dict[str, str] = {
    "unike-only-intrin": "only Intrin", "unike-only-latent-ike": "only Latent-IKE",
    "unike-intrin+ike": "Intrin+IKE", "unike-intrin+latent-ike": "Intrin+Latent-IKE", "unike": "UniKE (Ours)",
}
ABLATIONS: frozenset[str] = frozenset(ABLATION_LABELS) - {"unike"}
PAPER_BACKBONE_ORDER: tuple[str, ...] = ("blip2-opt", "minigpt4")
PAPER_BACKBONE_LABELS: dict[str, str] = {"blip2-opt": "BLIP-2 OPT", "minigpt4": "MiniGPT-4"}

CI_NOTE = ("Ours: mean over edit cases [95% percentile-bootstrap CI, 1000 resamples of independent units: "
           "the cases of one fact, in sequential and cross-task editing whole edit sequences (merged where "
           "they share a fact)]; over several seeds, the mean of the seeds' means, and the CI resamples seeds, "
           "then units within each seed.")
EM_NOTE = ("EM: exact match (every answer token right) of Rel., T-Gen. and M-Gen.; the other columns, like "
           "the paper's numbers, are token accuracy, which credits an answer for the tokens it shares with "
           "the target. The paper reports no exact match.")


def seeds_note(samples: Iterable[Sample]) -> str:
    """How many seeds are behind our values (empty when there are none of ours)."""
    samples = list(samples)
    if not samples:
        return ""
    counts = sorted({s.n_seeds for s in samples})
    seeds = sorted({v for s in samples for v in s.seed_values})
    per_cell = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"Seeds per cell of ours: {per_cell} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})."


@dataclass(frozen=True)
class Cell:
    """One metric of one (backbone, method, column block), in percent."""

    ours: Estimate | None
    paper: float | None

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours.mean - self.paper


@dataclass(frozen=True)
class Block:
    """A group of columns: the five metrics of one (runs.task, regime) score set."""

    key: str
    label: str
    task: str
    regime: str


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    cells: dict[str, tuple[Cell, ...]]  # block key -> one Cell per METRICS entry
    em: dict[str, tuple[Estimate | None, ...]]  # block key -> ours per EM_METRICS entry (no paper value)
    n: dict[str, int]  # block key -> number of our edit cases behind the means, all seeds (0: none)


@dataclass(frozen=True)
class BackboneGroup:
    backbone: str | None  # our backbone name; None for a paper-only group
    paper_backbone: str | None  # None when the paper has no such backbone in this table
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
class MetricTable:
    number: int
    title: str
    caption: str
    blocks: tuple[Block, ...]
    groups: tuple[BackboneGroup, ...]
    metrics: tuple[str, ...] = METRICS
    em_metrics: tuple[str, ...] = EM_METRICS

    def row(self, backbone: str, method: str) -> Row:
        """Row for our backbone name (or a paper backbone name for paper-only groups)."""
        for g in self.groups:
            if (g.backbone or g.paper_backbone) == backbone:
                for r in g.rows:
                    if r.method == method:
                        return r
        raise KeyError((backbone, method))

    def cell(self, backbone: str, method: str, block: str, metric: str) -> Cell:
        return self.row(backbone, method).cells[block][METRICS.index(metric)]

    def em(self, backbone: str, method: str, block: str, metric: str) -> Estimate | None:
        return self.row(backbone, method).em[block][EM_METRICS.index(metric)]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_sort_key(method: str, order: tuple[str, ...] = PAPER_METHOD_ORDER) -> tuple[int, str]:
    """``order`` first, then any other method (e.g. a new baseline) alphabetically."""
    return (order.index(method) if method in order else len(order)), method


def _backbone_sort_key(paper_backbone: str | None, ours: str | None) -> tuple[int, str, str]:
    order = (PAPER_BACKBONE_ORDER.index(paper_backbone) if paper_backbone in PAPER_BACKBONE_ORDER
             else len(PAPER_BACKBONE_ORDER))
    # Paper-only groups ("" sorts first) precede ours for the same paper backbone; they never coexist.
    return order, paper_backbone or "", ours or ""


def backbone_groups(ours: Collection[str], paper: Collection[str],
                    backbone_map: dict[str, str]) -> list[tuple[str | None, str | None]]:
    """(our backbone, paper backbone) pairs in display order.

    One group per *our* backbone (a tiny and a full-size model mapped to the same paper
    backbone must not be pooled); paper backbones without runs of ours are still shown,
    paper-only, so the full paper table stays visible.
    """
    # Unmapped names fall back to themselves, so a backbone named like the paper's matches it.
    mapped = {b: backbone_map.get(b, b) for b in sorted(ours)}
    mapped = {b: (p if p in paper else None) for b, p in mapped.items()}
    specs: list[tuple[str | None, str | None]] = list(mapped.items())
    specs += [(None, p) for p in sorted(set(paper) - set(mapped.values()))]
    specs.sort(key=lambda s: _backbone_sort_key(s[1], s[0]))
    return specs


def _estimates(sample: Sample | None) -> dict[str, Estimate | None]:
    """Ours per column of COLUMNS."""
    if sample is None:
        return dict.fromkeys(COLUMNS)
    return {c: estimate([sample], w) for c, w in zip(COLUMNS, np.eye(len(COLUMNS)))}


@dataclass(frozen=True)
class _Spec:
    number: int
    title: str
    caption: str
    blocks: tuple[Block, ...]
    order: tuple[str, ...]
    labels: dict[str, str]


def _metric_table(results: Results, backbone_map: dict[str, str], spec: _Spec, include: Collection[str] | None,
                  exclude: Collection[str], grouping: Collection[str] | None = None) -> MetricTable:
    """Rows: every method with rows of ours in one of the blocks or in the paper's table,
    restricted to ``include`` (when given) and without ``exclude``. A backbone of ours gets
    a group when it has rows of a method in ``grouping`` (default: of any shown method)."""
    def wanted(method: str) -> bool:
        return (include is None or method in include) and method not in exclude

    table_id = f"table{spec.number}"
    blocks = {(b.task, b.regime) for b in spec.blocks}
    paper = {(k[1], k[4]) for k in paper_tables() if k[0] == table_id and (k[2], k[3]) in blocks}
    ours = {(b, m) for (b, m, t, r) in results.cells if (t, r) in blocks and wanted(m)}
    ours_backbones = {b for b, m in ours if grouping is None or m in grouping}

    groups = []
    shown: list[Sample] = []
    for ours_b, paper_b in backbone_groups(ours_backbones, {b for b, _ in paper}, backbone_map):
        methods = {m for b, m in ours if b == ours_b} | {m for b, m in paper if b == paper_b and wanted(m)}
        rows = []
        for method in sorted(methods, key=lambda m: method_sort_key(m, spec.order)):
            cells: dict[str, tuple[Cell, ...]] = {}
            em: dict[str, tuple[Estimate | None, ...]] = {}
            n: dict[str, int] = {}
            for block in spec.blocks:
                sample = results.get(ours_b, method, block.task, block.regime) if ours_b else None
                if sample is not None:
                    shown.append(sample)
                ests = _estimates(sample)
                paper_vals = paper_tables().get((table_id, paper_b or "", block.task, block.regime, method), {})
                cells[block.key] = tuple(Cell(ests[m], paper_vals.get(m)) for m in METRICS)
                em[block.key] = tuple(ests[m] for m in EM_METRICS)
                n[block.key] = 0 if sample is None else sample.n_rows
            rows.append(Row(method, spec.labels.get(method, method_label(method)), cells, em, n))
        groups.append(BackboneGroup(ours_b, paper_b, tuple(rows)))
    caption = " ".join(filter(None, (spec.caption, EM_NOTE, seeds_note(shown))))
    return MetricTable(spec.number, spec.title, caption, spec.blocks, tuple(groups))


_TASK_BLOCKS = tuple(Block(t, TASK_LABELS[t], t, ONE_STEP.name) for t in TASKS)
_ELSEWHERE = "Table 4's ablation variants and Figure 4's sweeps are not repeated here."


def table1(results: Results, backbone_map: dict[str, str], exclude: Collection[str] = ABLATIONS) -> MetricTable:
    """Table 1: one-step editing on E-VQA and E-IC, per backbone."""
    spec = _Spec(1, "one-step editing on E-VQA and E-IC", f"{CI_NOTE} {_ELSEWHERE}",
                 _TASK_BLOCKS, PAPER_METHOD_ORDER, {})
    return _metric_table(results, backbone_map, spec, None, exclude)


def table2(results: Results, backbone_map: dict[str, str], exclude: Collection[str] = ABLATIONS) -> MetricTable:
    """Table 2: sequential editing (K = 10, 20) on E-VQA and E-IC (paper: MiniGPT-4 only)."""
    blocks = tuple(Block(f"{t}/{r}", f"{TASK_LABELS[t]}, {REGIME_LABELS[r]}", t, r)
                   for t in TASKS for r in SEQUENTIAL_REGIMES)
    spec = _Spec(2, "sequential editing", f"{CI_NOTE} {_ELSEWHERE}", blocks, SEQUENTIAL_METHOD_ORDER, {})
    return _metric_table(results, backbone_map, spec, None, exclude)


def table3(results: Results, backbone_map: dict[str, str], exclude: Collection[str] = ABLATIONS) -> MetricTable:
    """Table 3: cross-task editing (K = 10, E-VQA and E-IC cases mixed in one sequence)."""
    blocks = (Block(CROSS_TASK, f"{TASK_LABELS[CROSS_TASK]}, {REGIME_LABELS[CROSS_10.name]}", CROSS_TASK,
                    CROSS_10.name),)
    caption = (f"{CI_NOTE} One score set over all E-VQA and E-IC cases of the cross-task runs, as in the paper. "
               f"{_ELSEWHERE}")
    spec = _Spec(3, "cross-task editing", caption, blocks, SEQUENTIAL_METHOD_ORDER, {})
    return _metric_table(results, backbone_map, spec, None, exclude)


def table4(results: Results, backbone_map: dict[str, str]) -> MetricTable:
    """Table 4: ablations of UniKE, one-step editing on E-VQA and E-IC (paper: MiniGPT-4)."""
    spec = _Spec(4, "ablation study (one-step editing)", CI_NOTE, _TASK_BLOCKS, tuple(ABLATION_LABELS),
                 ABLATION_LABELS)
    # A backbone with UniKE runs but no ablation runs has nothing to show here.
    return _metric_table(results, backbone_map, spec, ABLATION_LABELS, (), grouping=ABLATIONS)
