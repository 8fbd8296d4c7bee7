import functools
import re
from pathlib import Path

import yaml

from unike.config import SPLIT_FILES

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
_text = yaml.safe_dump(config, sort_keys=False)  # method order decides prepared-folder owners
if not EFFECTIVE_CONFIG.exists() or EFFECTIVE_CONFIG.read_text() != _text:
    EFFECTIVE_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    EFFECTIVE_CONFIG.write_text(_text)

UNIKE = f"python -m unike {{step}} --config {EFFECTIVE_CONFIG}"


def unike(step):
    return UNIKE.format(step=step)


def external_input(path):
    """A file from outside the DAG (real weights, MMEdit): an input once it exists, so a
    dry run works without it; a real run checks every such path first (onstart)."""
    return [str(path)] if Path(path).exists() else []


def annotation_files(backbone, tasks, split):
    """The MMEdit split files of `tasks`: mined by the DAG (tiny world) or given (mmedit)."""
    paths = [LAYOUT.annotations(backbone) / SPLIT_FILES[(t, split)] for t in tasks]
    if config["data"]["source"] == "mmedit":
        return [f for p in paths for f in external_input(p)]
    return [str(p) for p in paths]


@functools.cache
def editor_flag(method, flag):
    """A capability flag of the method's editor class (imports its module once)."""
    from unike.editing import resolve_editor

    return getattr(resolve_editor(config["methods"][method]["editor"]), flag)


@functools.cache
def prepare_owners(backbone):
    """Method -> the method whose prepared folder it uses on `backbone` (variants share one)."""
    from unike.config import methods_for
    from unike.editing import prepare_owners

    return prepare_owners(methods_for(config, backbone))


def knowledge_files(wildcards):
    """UniKE's per-backbone knowledge, for editors that need it."""
    if not editor_flag(wildcards.method, "needs_knowledge"):
        return []
    return [f"{OUT}/knowledge/{wildcards.backbone}/hidden_states.safetensors",
            f"{OUT}/knowledge/{wildcards.backbone}/encoders.safetensors"]
