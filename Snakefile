# UniKE benchmark suite. Rules live in workflow/rules; this file only loads and checks
# the config and names the final targets.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


# The default lives beside this file; --configfile / --config merge on top of it.
configfile: Path(workflow.basedir) / "config.yaml"


validate(config, "unike/schemas/config.schema.json")

from unike.config import Layout, grid_cells, validate as validate_config

validate_config(config)
LAYOUT = Layout(config)
CELLS = grid_cells(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/backbones.smk"
include: "workflow/rules/edit.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        LAYOUT.report / "index.html",
