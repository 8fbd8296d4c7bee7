# Single writer of the DuckDB, then read-only rendering. Both run on the submit host.

localrules: aggregate, report


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
        f"{OUT}/metrics.duckdb",
    output:
        f"{OUT}/report/index.html",
        f"{OUT}/report/tables/table1.md",
        f"{OUT}/report/tables/table1.html",
        f"{OUT}/report/tables/table1.tex",
    log:
        f"{OUT}/logs/report.log",
    shell:
        unike("report") + " > {log} 2>&1"
