# UniKE benchmark suite. Rules live in workflow/rules; this file only loads and checks
# the config and names the final targets.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The default lives beside this file; --configfile / --config merge on top of it.
configfile: Path(workflow.basedir) / "config.yaml"


from unike.config import drop_unused_tiny_backbones, grid_cells, validate as validate_config
from unike.grid import Layout

drop_unused_tiny_backbones(config)
validate_config(config)
LAYOUT = Layout(config)
CELLS = grid_cells(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/backbones.smk"
include: "workflow/rules/knowledge.smk"
include: "workflow/rules/edit.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        LAYOUT.report / "index.html",
        # UniKE's per-backbone knowledge, in every seed's chain (its editor will consume it;
        # built and checked now).
        [str(layout.knowledge(b) / "encoders.json") for layout in CHAIN_LAYOUTS.values()
         for b in sorted({c.backbone for c in CELLS})]
        if "knowledge" in config else [],


onstart:
    # A real run (not -n) first checks the inputs from outside the DAG (real weights, MMEdit)
    # and fails in seconds, naming each missing path and where to get it.
    from unike.config import format_missing, missing_paths

    if missing_paths(config):
        raise SystemExit(format_missing(missing_paths(config)))
