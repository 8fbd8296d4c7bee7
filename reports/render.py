"""Render the report (Table 1 in md/html/tex + an offline index page) from the DuckDB.

Output is a pure function of the DB contents and the packaged reference CSVs:
no timestamps, no host names, stable ordering, so re-rendering the same DB
gives byte-identical files (and clean diffs when results change).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import jinja2

from reports.tables import METRIC_LABELS, TASK_LABELS, Table1, table1

# Columns of the provenance table on the index page, in display order.
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "run_id", "method", "backbone", "task", "regime", "n_edits", "config_hash", "code_version",
    "metric_version", "device", "wall_s", "edit_s_mean", "peak_mem_mb",
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
                       tex=tex_escape, md=md_escape)
    env.globals.update(METRIC_LABELS=METRIC_LABELS, TASK_LABELS=TASK_LABELS)
    return env


def _environments() -> dict[str, jinja2.Environment]:
    return {
        "md": _env(False, "–"),
        "html": _env(True, "–"),
        # TeX is full of braces, so the TeX template uses << >> / <% %> / <# #> instead.
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


def render_report(db_path: Path, out_dir: Path, backbone_map: dict[str, str]) -> list[Path]:
    """Write ``out_dir/tables/table1.{md,html,tex}`` and ``out_dir/index.html``; return their paths."""
    # Opened directly rather than via unike.store so reports never import the unike package.
    with duckdb.connect(str(db_path), read_only=True) as con:
        t1: Table1 = table1(con, backbone_map)
        runs = _runs(con)

    envs = _environments()
    outputs = {
        Path("tables/table1.md"): envs["md"].get_template("table1.md.j2").render(t=t1),
        Path("tables/table1.html"): envs["html"].get_template("table1.html.j2").render(t=t1),
        Path("tables/table1.tex"): envs["tex"].get_template("table1.tex.j2").render(t=t1),
        Path("index.html"): envs["html"].get_template("index.html.j2").render(
            t=t1, runs=runs, columns=PROVENANCE_COLUMNS),
    }
    written = []
    for rel, text in outputs.items():
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written
