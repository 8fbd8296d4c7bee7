"""Figure 4 (a, b, c), Figure 5a and a generality-vs-locality scatter, from the per-edit rows.

The data of each figure is computed first (typed, testable without looking at pixels),
then drawn with matplotlib's Agg canvas. Generality is mean(T-Gen, M-Gen) and locality
mean(T-Loc, M-Loc) of the per-edit rows; error bars are the 95% bootstrap CIs of
reports.stats. Files carry no timestamps or version strings, so re-rendering the same
inputs gives byte-identical PNG and PDF files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

import matplotlib.style
import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reports.paper import REFERENCE_ROW, paper_figure4c
from reports.results import SCORES, Results
from reports.stats import Estimate, estimate
from unike.grid import ONE_STEP, TASKS
from reports.tables import ABLATION_LABELS, ABLATIONS, method_label, method_sort_key

GEN_COLOR, LOC_COLOR = "#1f77b4", "#d62728"
# Figure 4c's zeta treatments (config key -> paper label and the row of paper_figure4c_printed.csv).
ZETA_TREATMENTS: dict[str, tuple[str, str]] = {
    "none": ("w/o ζ", "none"), "random": ("random ζ", "random"),
    "semantic": ("semantic ζ", "semantic"), "truthfulness": ("ζ (ours)", "unike"),
}
SERIES_LABELS = {"latent-ike": "Latent-IKE", "ike": "IKE"}
SPACES_COLUMNS = {"space": pl.String, "polarity": pl.String, "triplet": pl.Int64, "x": pl.Float64, "y": pl.Float64}


@dataclass(frozen=True)
class Point:
    x: float
    method: str
    generality: Estimate
    locality: Estimate


@dataclass(frozen=True)
class Bar:
    treatment: str  # config key: none | random | semantic | truthfulness
    label: str
    method: str | None
    ours: Point | None
    paper: tuple[float, float]  # (generality, locality) printed in the paper


@dataclass(frozen=True)
class Missing:
    """A configured point whose method has no one-step rows for the figure's backbone and task."""

    panel: str
    what: str
    method: str

    def __str__(self) -> str:
        return f"({self.panel}) {self.what}: {self.method}"


@dataclass(frozen=True)
class Figure4:
    backbone: str
    task: str
    a: dict[str, tuple[Point, ...]]  # series (latent-ike | ike) -> points over K
    b_fixed: tuple[Point, ...]  # points over the fixed alpha
    b_adaptive: Point | None
    c: tuple[Bar, ...]
    missing: tuple[Missing, ...]


def figure4_methods(section: Mapping[str, Any] | None) -> set[str]:
    """Every method named by a report.figure4 config section."""
    if not section:
        return set()
    a, b = section.get("a", {}), section.get("b", {})
    names = {m for series in a.values() for m in series.values()}
    names |= set(b.get("fixed", {}).values()) | ({b["adaptive"]} if "adaptive" in b else set())
    return names | set(section.get("c", {}).values())


def renamed_methods(section: Mapping[str, Any], method_map: Mapping[str, str]) -> dict[str, Any]:
    """`section` with every method under its paper row id (see Results.with_paper_names)."""
    def rename(value):
        if isinstance(value, Mapping):
            return {k: rename(v) for k, v in value.items()}
        return method_map.get(value, value)

    return {k: (v if k in ("backbone", "task") else rename(v)) for k, v in section.items()}


def _point(results: Results, backbone: str, task: str, method: str, x: float) -> Point | None:
    sample = results.get(backbone, method, task, ONE_STEP.name)
    if sample is None:
        return None
    return Point(x, method, estimate([sample], SCORES["generality"]), estimate([sample], SCORES["locality"]))


def figure4(results: Results, section: Mapping[str, Any]) -> Figure4:
    """Points of the configured methods; configured points without runs are listed as missing.

    YAML gives the K and alpha keys as numbers; strings such as "8" are accepted too.
    """
    backbone, task = section["backbone"], section["task"]
    missing: list[Missing] = []

    def points(panel: str, what: str, mapping: Mapping[Any, str]) -> tuple[Point, ...]:
        out = []
        for key, method in sorted(mapping.items(), key=lambda kv: float(kv[0])):
            p = _point(results, backbone, task, method, float(key))
            if p is None:
                missing.append(Missing(panel, what.format(key), method))
            else:
                out.append(p)
        return tuple(out)

    a = {series: points("a", f"{SERIES_LABELS[series]}, K = {{}}", mapping)
         for series, mapping in section.get("a", {}).items()}
    b = section.get("b", {})
    b_fixed = points("b", "fixed α = {}", b.get("fixed", {}))
    b_adaptive = None
    if "adaptive" in b:
        b_adaptive = _point(results, backbone, task, b["adaptive"], 0.0)
        if b_adaptive is None:
            missing.append(Missing("b", "adaptive α", b["adaptive"]))
    bars = []
    for treatment, (label, paper_key) in ZETA_TREATMENTS.items():
        method = section.get("c", {}).get(treatment)
        ours = _point(results, backbone, task, method, 0.0) if method else None
        if method and ours is None:
            missing.append(Missing("c", label, method))
        paper = paper_figure4c()[paper_key]
        bars.append(Bar(treatment, label, method, ours, (paper["generality"], paper["locality"])))
    return Figure4(backbone, task, a, b_fixed, b_adaptive, tuple(bars), tuple(missing))


@dataclass(frozen=True)
class TradeoffPoint:
    method: str
    label: str
    generality: Estimate
    locality: Estimate


def tradeoff(results: Results, exclude: Collection[str]) -> dict[str, tuple[TradeoffPoint, ...]]:
    """Per backbone, every one-step method's generality and locality (both tasks' cells
    weighted equally, as in Table 5); no-edit and ``exclude`` (Figure 4 sweeps) left out."""
    out: dict[str, tuple[TradeoffPoint, ...]] = {}
    for backbone in results.backbones():
        methods = {m for (b, m, t, r) in results.cells if b == backbone and t in TASKS and r == ONE_STEP.name}
        points = []
        for method in sorted(methods - set(exclude) - {REFERENCE_ROW}, key=method_sort_key):
            samples = [s for t in TASKS if (s := results.get(backbone, method, t, ONE_STEP.name))]
            label = ABLATION_LABELS[method] if method in ABLATIONS else method_label(method)
            points.append(TradeoffPoint(method, label, estimate(samples, SCORES["generality"]),
                                        estimate(samples, SCORES["locality"])))
        if points:
            out[backbone] = tuple(points)
    return out


def read_spaces(path: Path) -> pl.DataFrame:
    """One backbone's t-SNE coordinates (written by the knowledge step), checked."""
    df = pl.read_parquet(path)
    missing = [c for c in SPACES_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} missing; expected {list(SPACES_COLUMNS)}")
    df = df.select(list(SPACES_COLUMNS)).cast(SPACES_COLUMNS)  # type: ignore[arg-type]
    for column, allowed in (("space", {"semantic", "truthfulness"}), ("polarity", {"positive", "negative"})):
        bad = set(df[column].unique().to_list()) - allowed
        if bad:
            raise ValueError(f"{path}: column {column!r} has value(s) {sorted(bad)}; allowed: {sorted(allowed)}")
    # A fixed order makes the drawing (which marker lies on top) deterministic.
    return df.sort(["space", "polarity", "triplet"])


# --------------------------------------------------------------------------- drawing

def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, dpi=120, metadata={"Software": None})
    fig.savefig(pdf, metadata={"Creator": None, "Producer": None, "CreationDate": None})
    return [png, pdf]


def _errorbar(ax: Axes, xs: list[float], estimates: list[Estimate], **kw: Any) -> None:
    ys = [e.mean for e in estimates]
    err = [[e.mean - e.lo for e in estimates], [e.hi - e.mean for e in estimates]]
    ax.errorbar(xs, ys, yerr=err, capsize=3, marker="o", **kw)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")


def draw_figure4(data: Figure4, stem: Path) -> list[Path]:
    with matplotlib.style.context("default"):  # independent of any matplotlibrc on the machine
        fig = _new_figure(15, 4.6)
        ax_a, ax_b, ax_c = fig.subplots(1, 3)

        for series, points in data.a.items():
            style = "-" if series == "latent-ike" else "--"
            xs = [p.x for p in points]
            _errorbar(ax_a, xs, [p.generality for p in points], color=GEN_COLOR, linestyle=style,
                      label=f"Generality ({SERIES_LABELS[series]})")
            _errorbar(ax_a, xs, [p.locality for p in points], color=LOC_COLOR, linestyle=style,
                      label=f"Locality ({SERIES_LABELS[series]})")
        ax_a.set(xlabel="Number of in-context examples / hidden states (K)", ylabel="%",
                 title="(a) IKE vs latent IKE (with intrinsic editing)")

        xs = [p.x for p in data.b_fixed]
        _errorbar(ax_b, xs, [p.generality for p in data.b_fixed], color=GEN_COLOR, label="Generality")
        _errorbar(ax_b, xs, [p.locality for p in data.b_fixed], color=LOC_COLOR, label="Locality")
        if data.b_adaptive is not None:
            for est, color, name in ((data.b_adaptive.generality, GEN_COLOR, "Generality"),
                                     (data.b_adaptive.locality, LOC_COLOR, "Locality")):
                ax_b.axhline(est.mean, color=color, linestyle=":", label=f"{name} (adaptive α)")
                ax_b.axhspan(est.lo, est.hi, color=color, alpha=0.12, linewidth=0)
        ax_b.set(xlabel="Value of the fixed α", ylabel="%", title="(b) fixed vs adaptive α")

        width = 0.2
        for i, bar in enumerate(data.c):
            for j, (score, color) in enumerate((("generality", GEN_COLOR), ("locality", LOC_COLOR))):
                x = i + (j - 0.5) * 2 * width
                if bar.ours is not None:
                    est = bar.ours.generality if score == "generality" else bar.ours.locality
                    ax_c.bar(x - width / 2, est.mean, width, color=color,
                             yerr=[[est.mean - est.lo], [est.hi - est.mean]], capsize=3,
                             label=f"{score.capitalize()} (ours)" if i == 0 else None)
                ax_c.bar(x + width / 2, bar.paper[j], width, color="white", edgecolor=color, hatch="//",
                         label=f"{score.capitalize()} (paper)" if i == 0 else None)
        ax_c.set_xticks(range(len(data.c)), [b.label for b in data.c])
        ax_c.set(ylabel="%", title="(c) treatments of ζ", ylim=(0, 125))  # headroom for the legend

        for ax in (ax_a, ax_b, ax_c):
            if ax.has_data():
                ax.legend(fontsize=7, ncol=2 if ax is ax_c else 1)
            else:
                _empty(ax, "no configured runs")
        fig.suptitle(f"Figure 4 (ours: {data.backbone}, {data.task}; mean and 95% bootstrap CI over facts, and seeds "
                     "where a point has several)")
        if data.missing:
            fig.supxlabel("Missing (no runs): " + "; ".join(str(m) for m in data.missing), fontsize=7, wrap=True)
        return _save(fig, stem)


def draw_figure5a(spaces: Mapping[str, pl.DataFrame], stem: Path) -> list[Path]:
    """Two panels per backbone: semantic and truthfulness space, positives vs negatives."""
    with matplotlib.style.context("default"):
        fig = _new_figure(9, 4 * len(spaces))
        axes = fig.subplots(len(spaces), 2, squeeze=False)
        for row, (backbone, df) in zip(axes, sorted(spaces.items())):
            for ax, space in zip(row, ("semantic", "truthfulness")):
                for polarity, color in (("positive", GEN_COLOR), ("negative", LOC_COLOR)):
                    part = df.filter((pl.col("space") == space) & (pl.col("polarity") == polarity))
                    ax.scatter(part["x"].to_list(), part["y"].to_list(), s=8, color=color, alpha=0.6,
                               label=f"{polarity} ({part.height})")
                if ax.has_data():
                    ax.legend(fontsize=7)
                else:
                    _empty(ax, "no points")
                ax.set(title=f"{backbone}: {space} space", xticks=[], yticks=[])
        fig.suptitle("Figure 5a: t-SNE of the knowledge representations of h_pos and h_neg")
        return _save(fig, stem)


def draw_tradeoff(points: Mapping[str, tuple[TradeoffPoint, ...]], stem: Path) -> list[Path]:
    """Generality against locality of every method, one panel per backbone (cf. paper Figure 2a)."""
    with matplotlib.style.context("default"):
        fig = _new_figure(6 * max(1, len(points)), 5)
        axes = fig.subplots(1, max(1, len(points)), squeeze=False)[0]
        if not points:
            _empty(axes[0], "no one-step runs")
        for ax, (backbone, pts) in zip(axes, sorted(points.items())):
            for p in pts:
                ax.errorbar(p.locality.mean, p.generality.mean,
                            xerr=[[p.locality.mean - p.locality.lo], [p.locality.hi - p.locality.mean]],
                            yerr=[[p.generality.mean - p.generality.lo], [p.generality.hi - p.generality.mean]],
                            marker="o", capsize=2, color="#444")
                ax.annotate(p.label, (p.locality.mean, p.generality.mean), xytext=(4, 4),
                            textcoords="offset points", fontsize=7)
            ax.set(xlabel="Locality (%)", ylabel="Generality (%)", title=f"{backbone} (one-step, E-VQA + E-IC)")
        fig.suptitle("Generality vs locality (mean and 95% CI)")
        return _save(fig, stem)
