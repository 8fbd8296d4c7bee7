"""The run configuration: schema validation, cross-reference checks, the experiment grid,
and the location of every artifact (shared by the Snakemake rules and the CLI).

Kept free of torch imports: the workflow imports it to build the DAG.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

TASKS = ("e-vqa", "e-ic")  # the tasks of an edit case; a run's task may also be "cross-task"
REGIMES_FOR_TASK = {"e-vqa": ("one-step", "seq-10", "seq-20"), "e-ic": ("one-step", "seq-10", "seq-20"),
                    "cross-task": ("cross-10",)}
SEQUENCE_LENGTH = {"one-step": 1, "seq-10": 10, "seq-20": 20, "cross-10": 10}


class ConfigError(ValueError):
    pass


def schema() -> dict:
    return json.loads(resources.files("unike").joinpath("schemas/config.schema.json").read_text())


def load_config(source: str | Path | dict) -> dict:
    config = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
    validate(config)
    return config


def validate(config: dict) -> None:
    import jsonschema

    try:
        jsonschema.validate(config, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<top>"
        raise ConfigError(f"config is invalid at {where}: {e.message}") from None
    for i, cell in enumerate(config["grid"]):
        for kind, known in (("methods", config["methods"]), ("backbones", config["backbones"])):
            unknown = [n for n in cell[kind] if n not in known]
            if unknown:
                raise ConfigError(f"grid[{i}]: unknown {kind[:-1]} name(s) {unknown}; defined: {sorted(known)}")
        for task in cell["tasks"]:
            bad = [r for r in cell["regimes"] if r not in REGIMES_FOR_TASK[task]]
            if bad:
                raise ConfigError(f"grid[{i}]: regime(s) {bad} do not apply to task {task!r} "
                                  f"(allowed: {list(REGIMES_FOR_TASK[task])})")
    for name, method in config["methods"].items():
        module = method["editor"].split(":")[0]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"methods.{name}: editor module {module!r} not found")
    for name, b in config["backbones"].items():
        if b["source"] == "local" and "path" not in b:
            raise ConfigError(f"backbones.{name}: source 'local' needs a 'path'")
        if b["source"] == "tiny" and config["data"]["source"] != "tiny-world":
            raise ConfigError(f"backbones.{name}: tiny backbones need data.source 'tiny-world'")
    data = config["data"]
    if data["source"] == "mmedit" and not {"annotations", "image_root"} <= set(data):
        raise ConfigError("data.source 'mmedit' needs data.annotations and data.image_root")


@dataclass(frozen=True, order=True)
class Cell:
    method: str
    backbone: str
    task: str
    regime: str


def grid_cells(config: dict) -> list[Cell]:
    cells = {Cell(m, b, t, r) for c in config["grid"] for m in c["methods"] for b in c["backbones"]
             for t in c["tasks"] for r in c["regimes"] if r in REGIMES_FOR_TASK[t]}
    return sorted(cells)


def cell_config_hash(config: dict, cell: Cell) -> str:
    """Hash of everything that decides a cell's numbers."""
    relevant = {
        "seed": config["seed"], "dtype": config.get("dtype", "float32"), "cell": cell.__dict__,
        "method": config["methods"][cell.method], "backbone": config["backbones"][cell.backbone],
        "data": config["data"], "world": config.get("world"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Layout:
    """Where each artifact lives under `out_dir`."""

    def __init__(self, config: dict):
        self.config = config
        self.out = Path(config["out_dir"])

    @property
    def world(self) -> Path:
        return self.out / "world"

    def backbone_dir(self, backbone: str) -> Path:
        b = self.config["backbones"][backbone]
        return Path(b["path"]) if b["source"] == "local" else self.out / "backbones" / backbone

    def annotations(self, backbone: str) -> Path:
        data = self.config["data"]
        return Path(data["annotations"]) if data["source"] == "mmedit" else self.out / "data" / backbone

    @property
    def image_root(self) -> Path:
        data = self.config["data"]
        return Path(data["image_root"]) if data["source"] == "mmedit" else self.world

    def pre_edit(self, backbone: str, task: str) -> Path:
        return self.out / "pre_edit" / backbone / f"{task}.json"

    def prepared(self, method: str, backbone: str, task: str) -> Path:
        """Folder of what a trained method prepared once per backbone and task."""
        return self.out / "editors" / method / backbone / task

    def run_stem(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.method / cell.backbone / cell.task / cell.regime / f"seed{self.config['seed']}"

    @property
    def db(self) -> Path:
        return self.out / "metrics.duckdb"

    @property
    def report(self) -> Path:
        return self.out / "report"


SPLIT_FILES = {("e-vqa", "train"): "vqa_train.json", ("e-vqa", "eval"): "vqa_eval.json",
               ("e-ic", "train"): "caption_train_edit.json", ("e-ic", "eval"): "caption_eval_edit.json"}
