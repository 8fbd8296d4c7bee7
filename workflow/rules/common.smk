import functools
import re
from pathlib import Path

import yaml

OUT = config["out_dir"]
THREADS = config["threads"]
ON_GPU = config["device"].startswith("cuda")
BACKBONES = sorted(config["backbones"])
TINY_BACKBONES = [b for b in BACKBONES if config["backbones"][b]["source"] == "tiny"]


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    backbone=_alternatives(BACKBONES),
    method=_alternatives(sorted(config["methods"])),
    task="e-vqa|e-ic|cross-task",
    regime="one-step|seq-10|seq-20|cross-10",
    seed=r"\d+",


# The steps read the exact config Snakemake validated (merged --configfile/--config),
# written once per content change so its timestamp does not trigger reruns.
EFFECTIVE_CONFIG = Path(OUT) / "config.effective.yaml"
_text = yaml.safe_dump(config, sort_keys=True)
if not EFFECTIVE_CONFIG.exists() or EFFECTIVE_CONFIG.read_text() != _text:
    EFFECTIVE_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    EFFECTIVE_CONFIG.write_text(_text)

UNIKE = f"python -m unike {{step}} --config {EFFECTIVE_CONFIG}"


def unike(step):
    return UNIKE.format(step=step)


@functools.cache
def needs_training(method):
    """The editor class's capability flag (imports the method's module once)."""
    from unike.editing import resolve_editor

    return resolve_editor(config["methods"][method]["editor"]).needs_training
