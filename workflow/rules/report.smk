# Single writer of the DuckDB, then read-only rendering. Both run on the submit host.

from reports.outputs import report_files

localrules: aggregate, report

# Figure 5a plots UniKE's knowledge spaces (t-SNE), one file per backbone of the grid.
SPACES = ([f"{OUT}/knowledge/{b}/spaces.parquet" for b in sorted({c.backbone for c in CELLS})]
          if "knowledge" in config else [])
FIGURE4 = config.get("report", {}).get("figure4")


rule aggregate:
    input:
        RUN_FILES,
    output:
        f"{OUT}/metrics.duckdb",
    log:
        f"{OUT}/logs/aggregate.log",
    shell:
        unike("aggregate") + " {input} > {log} 2>&1"


rule report:
    input:
        db=f"{OUT}/metrics.duckdb",
        spaces=SPACES,
    output:
        # Every file the step writes (reports.render checks it writes exactly these).
        [f"{OUT}/report/{f}" for f in report_files(figure4=bool(FIGURE4), figure5a=bool(SPACES))],
    params:
        # A changed report section or backbone mapping re-renders (Snakemake's params trigger).
        figure4=FIGURE4,
        backbone_map={b: config["backbones"][b]["paper_name"] for b in BACKBONES},
    log:
        f"{OUT}/logs/report.log",
    shell:
        unike("report") + " --spaces {input.spaces} > {log} 2>&1"
