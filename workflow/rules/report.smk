# Single writer of the DuckDB, then read-only rendering. Both run on the submit host.

from reports.outputs import report_files

localrules: aggregate, report

# Figure 5a plots UniKE's knowledge spaces (t-SNE), one file per backbone of the grid, of
# `seed`'s chain (the figure shows one space per backbone; other seeds' are not embedded).
SPACES = ([str(LAYOUT.knowledge(b) / "spaces.parquet") for b in sorted({c.backbone for c in CELLS})]
          if "knowledge" in config else [])
FIGURE4 = settings.figure4_points(config)


rule aggregate:
    input:
        RUN_FILES,
    output:
        str(LAYOUT.db),
    log:
        top_log("aggregate"),
    shell:
        "{PYTHON} -m unike aggregate --config {CONFIG_FILE} {input:q} > {log:q} 2>&1"


rule report:
    input:
        db=str(LAYOUT.db),
        spaces=SPACES,
    output:
        # Every file the step writes (reports.render checks it writes exactly these).
        [str(LAYOUT.report / f) for f in report_files(figure4=bool(FIGURE4), figure5a=bool(SPACES))],
    params:
        # What decides the rendering besides the DB: the paper names and Figure 4's points.
        settings=settings.settings_hash({
            "figure4": FIGURE4,
            "backbones": {b: config["backbones"][b]["paper_name"] for b in BACKBONES},
            "methods": {m: e.get("paper_name") for m, e in config["methods"].items()},
        }),
    log:
        top_log("report"),
    shell:
        "{PYTHON} -m unike report --config {CONFIG_FILE} --spaces {input.spaces:q} > {log:q} 2>&1"
