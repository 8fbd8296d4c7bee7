"""The files the report step writes, relative to the report folder.

A light module (no plotting or DB imports): workflow/rules/report.smk lists these as
the rule's outputs and reports.render writes exactly these, so Snakemake tracks them all.
"""

from __future__ import annotations

TABLE_NUMBERS: tuple[int, ...] = (1, 2, 3, 4, 5)
TABLE_FORMATS: tuple[str, ...] = ("md", "html", "tex")
FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf")


def figure_names(figure4: bool, figure5a: bool) -> list[str]:
    """Figure 4 needs the config's report.figure4 section, Figure 5a the knowledge spaces."""
    return ["gen-vs-loc"] + (["figure4"] if figure4 else []) + (["figure5a"] if figure5a else [])


def report_files(figure4: bool, figure5a: bool) -> list[str]:
    files = ["index.html"] + [f"tables/table{n}.{fmt}" for n in TABLE_NUMBERS for fmt in TABLE_FORMATS]
    files += [f"figures/{name}.{fmt}" for name in figure_names(figure4, figure5a) for fmt in FIGURE_FORMATS]
    return files + (["figures/figure4.md"] if figure4 else [])  # Figure 4's points as numbers
