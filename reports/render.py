"""Render the report (Tables 1-5 in md/html/tex, figures, an offline index page) from the DuckDB.

Output is a pure function of the DB contents, the given knowledge spaces, the
report config and the packaged reference CSVs: no timestamps, no host names, stable
ordering and seeded bootstraps, so re-rendering gives byte-identical files (and
clean diffs when results change).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import jinja2

from reports import figures
from reports.outputs import report_files
from reports.paper import paper_method_ids
from reports.results import Results
from reports.stats import Estimate
from reports.summary import SCORE_LABELS, SETTINGS, table5
from reports.tables import (ABLATION_LABELS, ABLATIONS, METRIC_LABELS, PAPER_METHOD_ORDER, seeds_note, table1, table2,
                            table3, table4)

# Columns of the provenance table on the index page, in display order.
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "run_id", "method", "backbone", "task", "regime", "seed", "n_edits", "config_hash", "code_version",
    "metric_version", "device", "dtype", "dtype_requested", "wall_s", "edit_s_mean", "peak_mem_mb",
)
_FLOAT_FORMATS = {"wall_s": "{:.1f}", "edit_s_mean": "{:.3f}", "peak_mem_mb": "{:.0f}"}

_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def tex_escape(text: Any) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def md_escape(text: Any) -> str:
    # A bare "|" would split a Markdown table cell.
    return str(text).replace("|", r"\|")


def fmt_num(value: float | None, missing: str = "–") -> str:
    return missing if value is None else f"{value:.1f}"


def fmt_signed(value: float | None, missing: str = "–") -> str:
    # "+0.0" rather than "-0.0" for tiny negative differences.
    return missing if value is None else f"{round(value, 1) + 0.0:+.1f}"


def fmt_mean(value: Estimate | None, missing: str = "–") -> str:
    return missing if value is None else fmt_num(value.mean)


def fmt_ci(value: Estimate) -> str:
    return f"[{value.lo:.1f}, {value.hi:.1f}]"


def _env(autoescape: bool, missing: str, **delimiters: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reports", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,  # a typo in a template should fail, not render blank
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        **delimiters,
    )
    env.filters.update(num=partial(fmt_num, missing=missing), signed=partial(fmt_signed, missing=missing),
                       mean=partial(fmt_mean, missing=missing), ci=fmt_ci, tex=tex_escape, md=md_escape)
    env.globals.update(METRIC_LABELS=METRIC_LABELS, SCORE_LABELS=SCORE_LABELS, SETTINGS=SETTINGS)
    return env


def _environments() -> dict[str, jinja2.Environment]:
    return {
        "md": _env(False, "–"),
        "html": _env(True, "–"),
        # TeX is full of braces, so the TeX templates use << >> / <% %> / <# #> instead.
        "tex": _env(False, "--", block_start_string="<%", block_end_string="%>",
                    variable_start_string="<<", variable_end_string=">>",
                    comment_start_string="<#", comment_end_string="#>"),
    }


def _runs(con: duckdb.DuckDBPyConnection) -> list[dict[str, str]]:
    cur = con.execute(f"SELECT {', '.join(PROVENANCE_COLUMNS)} FROM runs ORDER BY run_id")
    return [
        {c: _FLOAT_FORMATS[c].format(v) if c in _FLOAT_FORMATS else str(v) for c, v in zip(PROVENANCE_COLUMNS, rec)}
        for rec in cur.fetchall()
    ]


@dataclass(frozen=True)
class FigureEntry:
    """A figure on the index page: drawn (``name`` set) or a sentence saying why not."""

    title: str
    name: str | None
    notes: tuple[str, ...] = ()
    numbers: str | None = None  # the drawn points as a Markdown file, relative to the report


def render_report(db_path: Path, out_dir: Path, backbone_map: dict[str, str], method_map: dict[str, str],
                  figure4: Mapping[str, Any] | None = None, spaces: Mapping[str, Path] | None = None) -> list[Path]:
    """Write every file of ``reports.outputs.report_files`` under ``out_dir``; return their paths.

    ``backbone_map`` and ``method_map`` give our backbones' and methods' paper names (config
    ``paper_name``): the paper's numbers are matched by them. ``figure4`` is
    ``unike.config.figure4_points`` of the config (None: no Figure 4); ``spaces`` maps a
    backbone to its knowledge/<backbone>/spaces.parquet (empty: no Figure 5a).
    """
    spaces = dict(spaces or {})
    out_dir = Path(out_dir)
    # Opened directly rather than via unike.store so reports never import the unike package.
    with duckdb.connect(str(db_path), read_only=True) as con:
        results = Results.load(con).with_paper_names(method_map, paper_method_ids())
        runs = _runs(con)
    figure4 = figures.renamed_methods(figure4, method_map) if figure4 else None

    # Figure 4's sweep methods are one-step runs too; they belong to Figure 4 only.
    sweeps = figures.figure4_methods(figure4) - set(PAPER_METHOD_ORDER) - set(ABLATION_LABELS)
    elsewhere = ABLATIONS | sweeps
    tables = [table1(results, backbone_map, elsewhere), table2(results, backbone_map, elsewhere),
              table3(results, backbone_map, elsewhere), table4(results, backbone_map), table5(results, elsewhere)]

    written: list[Path] = []
    entries: list[FigureEntry] = []
    envs = _environments()
    texts: dict[str, str] = {}
    if figure4:
        data = figures.figure4(results, figure4)
        written += figures.draw_figure4(data, out_dir / "figures/figure4")
        methods = figures.figure4_methods(figure4)
        drawn = [s for (b, m, t, _), s in results.cells.items()
                 if (b, t) == (data.backbone, data.task) and m in methods]
        texts["figures/figure4.md"] = envs["md"].get_template("figure4.md.j2").render(
            d=data, seeds_note=seeds_note(drawn), SERIES_LABELS=figures.SERIES_LABELS)
        notes = tuple(f"Missing (no runs): {m}" for m in data.missing)
        entries.append(FigureEntry(f"Figure 4: in-depth analysis ({data.backbone}, {data.task})", "figure4", notes,
                                   "figures/figure4.md"))
    else:
        entries.append(FigureEntry("Figure 4", None, ("Not drawn: the config has no report.figure4 section.",)))
    if spaces:
        written += figures.draw_figure5a({b: figures.read_spaces(p) for b, p in spaces.items()},
                                         out_dir / "figures/figure5a")
        entries.append(FigureEntry("Figure 5a: knowledge spaces (t-SNE)", "figure5a"))
    else:
        entries.append(FigureEntry("Figure 5a", None, ("Not drawn: no knowledge spaces were given "
                                                       "(the config has no knowledge section).",)))
    written += figures.draw_tradeoff(figures.tradeoff(results, sweeps), out_dir / "figures/gen-vs-loc")
    entries.append(FigureEntry("Beyond the paper: generality vs locality of every method (one-step; cf. the paper's "
                               "Figure 2a)", "gen-vs-loc"))

    for t in tables:
        kind = "table5" if t.number == 5 else "metric_table"
        for fmt in ("md", "html", "tex"):
            texts[f"tables/table{t.number}.{fmt}"] = envs[fmt].get_template(f"{kind}.{fmt}.j2").render(t=t)
    texts["index.html"] = envs["html"].get_template("index.html.j2").render(
        tables=tables, figures=entries, runs=runs, columns=PROVENANCE_COLUMNS)
    for rel, text in texts.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)

    expected = {out_dir / f for f in report_files(bool(figure4), bool(spaces))}
    # report.smk lists reports.outputs as the rule's outputs: both must name the same files.
    assert set(written) == expected, sorted(map(str, set(written) ^ expected))
    return sorted(written)
