"""The run configuration: schema validation, cross-reference checks, the experiment grid,
and the location of every artifact (shared by the Snakemake rules and the CLI).

Kept free of torch imports: the workflow imports it to build the DAG.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from importlib import resources
from pathlib import Path

import yaml

from unike.grid import CROSS_TASK, SPLIT_FILES, Cell, Layout, regimes_for_task

class ConfigError(ValueError):
    pass


def schema() -> dict:
    return json.loads(resources.files("unike").joinpath("schemas/config.schema.json").read_text())


def load_config(source: str | Path | dict) -> dict:
    config = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
    validate(config)
    return config


def merge_overlays(base: dict, *overlays: dict) -> dict:
    """Snakemake's `--configfile` semantics on top of config.yaml: mappings merge key by key,
    any other value (a list such as `grid`) replaces the base's. Then `drop_unused_tiny_backbones`."""
    def merge(into: dict, over: dict) -> None:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    config = json.loads(json.dumps(base))
    for overlay in overlays:
        merge(config, overlay)
    drop_unused_tiny_backbones(config)
    return config


def drop_unused_tiny_backbones(config: dict) -> None:
    """config.yaml's tiny backbones merge into every overlay; a real-data config cannot use
    them (they need the tiny world), so those its grid does not name are dropped, in place."""
    if config["data"]["source"] == "mmedit":
        named = {b for cell in config["grid"] for b in cell["backbones"]}
        config["backbones"] = {n: b for n, b in config["backbones"].items() if b["source"] != "tiny" or n in named}


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
            bad = [r for r in cell["regimes"] if r not in regimes_for_task(task)]
            if bad:
                raise ConfigError(f"grid[{i}]: regime(s) {bad} do not apply to task {task!r} "
                                  f"(allowed: {list(regimes_for_task(task))})")
    for name, method in config["methods"].items():
        module = method["editor"].split(":")[0]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"methods.{name}: editor module {module!r} not found")
        unknown = sorted(set(method.get("backbone_hparams", {})) - set(config["backbones"]))
        if unknown:
            raise ConfigError(f"methods.{name}.backbone_hparams: unknown backbone name(s) {unknown}; "
                              f"defined: {sorted(config['backbones'])}")
    _check_grid_hparams(config)
    for name, b in config["backbones"].items():
        if b["source"] == "local" and "path" not in b:
            raise ConfigError(f"backbones.{name}: source 'local' needs a 'path'")
        if b["source"] == "tiny" and config["data"]["source"] != "tiny-world":
            raise ConfigError(f"backbones.{name}: tiny backbones need data.source 'tiny-world'")
    data = config["data"]
    if data["source"] == "mmedit" and not {"annotations", "image_root"} <= set(data):
        raise ConfigError("data.source 'mmedit' needs data.annotations and data.image_root")


def method_entry(config: dict, name: str, backbone: str) -> dict:
    """A method's entry as it runs on `backbone`: its `hparams` with `backbone_hparams[backbone]`
    merged over them, so one method (one table row) can take per-backbone values, such as
    VLKEB's FT learning rates or SERAC's counterfactual model on MiniGPT-4."""
    method = config["methods"][name]
    return {"editor": method["editor"],
            "hparams": {**method.get("hparams", {}), **method.get("backbone_hparams", {}).get(backbone, {})}}


def methods_for(config: dict, backbone: str) -> dict[str, dict]:
    """Every method's entry as it runs on `backbone` (see `method_entry`)."""
    return {name: method_entry(config, name, backbone) for name in config["methods"]}


def _check_grid_hparams(config: dict) -> None:
    """Every (method, backbone) of the grid parses its hyperparameters, and methods in
    sequential cells stack edits with them (IKE and UniKE's Intrin+IKE cannot): fail
    before the DAG is built, not in a job."""
    from unike.editing import parse_hparams, resolve_editor

    for i, cell in enumerate(config["grid"]):
        regimes = [r for r in cell["regimes"] if r != "one-step"]
        for name in cell["methods"]:
            for backbone in cell["backbones"]:
                entry = method_entry(config, name, backbone)
                try:
                    cls = resolve_editor(entry["editor"])
                    hparams = parse_hparams(cls.Hparams, entry["hparams"], f"methods.{name} on {backbone}")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                if regimes and not cls.supports_sequential(hparams):
                    raise ConfigError(f"grid[{i}]: methods.{name} ({entry['editor']}) edits one case at a time "
                                      f"with these hyperparameters; it cannot run regime(s) {regimes}")


def grid_cells(config: dict) -> list[Cell]:
    cells = {Cell(m, b, t, r) for c in config["grid"] for m in c["methods"] for b in c["backbones"]
             for t in c["tasks"] for r in c["regimes"] if r in regimes_for_task(t)}
    return sorted(cells)


def cell_config_hash(config: dict, cell: Cell) -> str:
    """Hash of everything that decides a cell's numbers."""
    relevant = {
        "seed": config["seed"], "dtype": config.get("dtype", "float32"), "cell": cell.__dict__,
        "method": config["methods"][cell.method], "backbone": config["backbones"][cell.backbone],
        "data": config["data"], "world": config.get("world"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def edited_layers(config: dict, n_layers: int) -> list[int]:
    """UniKE's edited layers: the last `knowledge.edited_layers` decoder layers."""
    n = config.get("knowledge", {}).get("edited_layers", 4)
    return list(range(max(0, n_layers - n), n_layers))


# ---------------------------------------------------------------- external inputs
WHERE_TO_GET = {
    "blip2-opt": "the Hugging Face model Salesforce/blip2-opt-2.7b, downloaded on a machine with internet "
                 "(huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir <path>)",
    "minigpt4": "python -m unike convert-minigpt4 --config <config> --backbone {name} --eva-vit eva_vit_g.pth "
                "--qformer blip2_pretrained_flant5xxl.pth --minigpt4 prerained_minigpt4_7b.pth "
                "--vicuna <Vicuna-7B v0 dir>",
    "annotations": "MMEdit's annotation files (EasyEdit's MMEdit release: editing-data/vqa/vqa_{train,eval}.json and "
                   "editing-data/caption/caption_{train,eval}_edit.json), copied flat into data.annotations",
    "image_root": "MMEdit's image archive (COCO val2014 images and the rephrased images), unpacked into "
                  "data.image_root",
}


def missing_paths(config: dict) -> list[tuple[str, str]]:
    """External inputs of the grid that are not on disk, as (path, where to get it):
    local backbone directories and, for `data.source: mmedit`, the annotation files, the
    image root and the images of each file's first record (a wrong image_root shows there).
    Tiny backbones and the tiny world are built by the DAG and are never missing."""
    missing: list[tuple[str, str]] = []
    used = {cell.backbone for cell in grid_cells(config)}
    for name in sorted(used):
        entry = config["backbones"][name]
        if entry["source"] != "local":
            continue
        path = Path(entry["path"])
        how = f"backbones.{name}: {WHERE_TO_GET[entry['paper_name']].format(name=name)}; docs/real-backbones.md"
        if not path.is_dir():
            missing.append((str(path), how))
        else:
            missing += [(str(path / f), how) for f in ("config.json", "tokenizer_config.json")
                        if not (path / f).is_file()]
    data = config["data"]
    if data["source"] != "mmedit":
        return missing
    annotations, image_root = Path(data["annotations"]), Path(data["image_root"])
    how = f"data.annotations: {WHERE_TO_GET['annotations']}; docs/real-backbones.md"
    if not annotations.is_dir():
        missing.append((str(annotations), how))
    else:
        missing += [(str(annotations / f), how) for f in sorted(set(SPLIT_FILES.values()))
                    if not (annotations / f).is_file()]
    how = f"data.image_root: {WHERE_TO_GET['image_root']}; docs/real-backbones.md"
    if not image_root.is_dir():
        missing.append((str(image_root), how))
        return missing
    for f in sorted(set(SPLIT_FILES.values())):
        try:
            first = json.loads((annotations / f).read_text())[0]
            images = [first[k] for k in ("image", "image_rephrase", "m_loc")]
        except (OSError, ValueError, IndexError, KeyError, TypeError):
            continue  # a missing or malformed file is reported above or by the data loader
        missing += [(str(image_root / rel), f"{how} (image of {annotations / f} record 0: is data.image_root the "
                     "folder the records' image paths are relative to?)")
                    for rel in images if isinstance(rel, str) and not (image_root / rel).is_file()]
    return missing


def format_missing(missing: list[tuple[str, str]]) -> str:
    lines = [f"{len(missing)} input(s) of this configuration are missing:"]
    lines += [f"  {path}\n      get it: {how}" for path, how in missing]
    return "\n".join(lines)
