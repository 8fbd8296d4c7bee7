"""The run configuration: schema validation, cross-reference checks, the experiment grid,
and the location of every artifact (shared by the Snakemake rules and the CLI).

Kept free of torch imports: the workflow imports it to build the DAG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

import yaml

from unike.grid import REGIMES, RUN_TASKS, SPLIT_FILES, TASKS, Cell, Layout, case_tasks, regime, regimes_for_task

class ConfigError(ValueError):
    pass


def schema() -> dict:
    """The config's JSON schema, with the grid's names filled in from unike.grid (their one owner)."""
    schema = json.loads(resources.files("unike").joinpath("schemas/config.schema.json").read_text(encoding="utf-8"))
    for name, values in (("task", TASKS), ("run_task", RUN_TASKS), ("regime", tuple(REGIMES))):
        schema["$defs"][name]["enum"] = list(values)
    return schema


def load_config(source: str | Path | dict) -> dict:
    config = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text(encoding="utf-8"))
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
    if config.get("data", {}).get("source") == "mmedit":
        named = {b for cell in config["grid"] for b in cell["backbones"]}
        config["backbones"] = {n: b for n, b in config["backbones"].items() if b["source"] != "tiny" or n in named}


def validate(config: dict) -> None:
    import jsonschema

    try:
        jsonschema.validate(config, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<top>"
        raise ConfigError(f"config is invalid at {where}: {e.message}") from None
    _check_seeds(config)
    expand_bases(config)
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
    from unike.editing import resolve_editor

    for name, method in config["methods"].items():
        try:  # every entry, in the grid or not: prepared-folder owners are chosen among all of them
            resolve_editor(method["editor"])
        except ValueError as e:
            raise ConfigError(f"methods.{name}: {e}") from None
        unknown = sorted(set(method.get("backbone_hparams", {})) - set(config["backbones"]))
        if unknown:
            raise ConfigError(f"methods.{name}.backbone_hparams: unknown backbone name(s) {unknown}; "
                              f"defined: {sorted(config['backbones'])}")
    paper_names = [m["paper_name"] for m in config["methods"].values() if "paper_name" in m]
    twice = sorted({n for n in paper_names if paper_names.count(n) > 1})
    if twice:
        raise ConfigError(f"methods: paper_name(s) {twice} are given to more than one method")
    _check_grid_hparams(config)
    _check_figure4(config)
    for name, b in config["backbones"].items():
        if b["source"] == "local" and "path" not in b:
            raise ConfigError(f"backbones.{name}: source 'local' needs a 'path'")
        if b["source"] == "tiny" and config["data"]["source"] != "tiny-world":
            raise ConfigError(f"backbones.{name}: tiny backbones need data.source 'tiny-world'")
    data = config["data"]
    if data["source"] == "mmedit" and not {"annotations", "image_root"} <= set(data):
        raise ConfigError("data.source 'mmedit' needs data.annotations and data.image_root")


def _check_seeds(config: dict) -> None:
    """What the schema cannot say: a seed is a whole int (JSON Schema takes 1.0 for an
    integer; it would name the folder seed1.0/), and `seed` is not listed again."""
    extra = config.get("extra_seeds", [])
    for where, seed in (("seed", config["seed"]), *((f"extra_seeds[{i}]", s) for i, s in enumerate(extra))):
        if type(seed) is not int:
            raise ConfigError(f"{where}: {seed!r} is not an integer")
    if config["seed"] in extra:
        raise ConfigError(f"extra_seeds: {config['seed']} is already `seed`; list only the other seeds")


def paper_names(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(backbone, method) -> the paper's row id, for the backbones and the methods that have one."""
    return ({name: b["paper_name"] for name, b in config["backbones"].items()},
            {name: m["paper_name"] for name, m in config["methods"].items() if "paper_name" in m})


def seeds(config: dict) -> list[int]:
    """Every seed the grid runs with: `seed`, then each of `extra_seeds`."""
    return [config["seed"], *config.get("extra_seeds", [])]


def seed_config(config: dict, seed: int) -> dict:
    """The config of `seed`'s chain: the config itself for its `seed`; for one of its
    `extra_seeds`, a single-seed run of that seed into its folder (Layout.seed_prefix).
    Every step and settings hash of a chain reads its own seed; `extra_seeds` is in no
    hash, so adding seeds reruns nothing of the existing chains."""
    if seed == config["seed"]:
        return config
    if seed not in config.get("extra_seeds", []):
        raise ConfigError(f"seed {seed} is neither `seed` nor one of `extra_seeds` ({seeds(config)})")
    layout = Layout(config)
    single = {k: v for k, v in config.items() if k != "extra_seeds"}
    return {**single, "seed": seed, "out_dir": str(layout.out / layout.seed_prefix(seed))}


def expand_bases(config: dict) -> None:
    """Resolve every method's `base:` in place: the entry takes its base's editor, and the
    base's `hparams` and `backbone_hparams` with its own merged over them (not its
    `paper_name`: a variant is not the paper's row). It runs after Snakemake merged every
    config file, so an overlay that changes `unike` reaches each variant built on it; the
    effective config the steps read holds the resolved entries."""
    methods = config["methods"]
    done: set[str] = set()

    def resolve(name: str, chain: tuple[str, ...]) -> None:
        entry = methods[name]
        if name in done or "base" not in entry:
            done.add(name)
            return
        base = entry["base"]
        if base not in methods:
            raise ConfigError(f"methods.{name}.base: unknown method {base!r}; defined: {sorted(methods)}")
        if base in chain:
            raise ConfigError(f"methods.{name}.base: a cycle of bases: {' -> '.join((*chain, name, base))}")
        resolve(base, (*chain, name))
        parent = methods[base]
        if entry.get("editor", parent["editor"]) != parent["editor"]:
            raise ConfigError(f"methods.{name}: editor {entry['editor']!r} differs from its base {base!r}'s "
                              f"{parent['editor']!r}")
        per_backbone = {b: {**parent.get("backbone_hparams", {}).get(b, {}), **values}
                        for b, values in entry.get("backbone_hparams", {}).items()}
        methods[name] = {**{k: v for k, v in entry.items() if k != "base"}, "editor": parent["editor"],
                         "hparams": {**parent.get("hparams", {}), **entry.get("hparams", {})},
                         "backbone_hparams": {**parent.get("backbone_hparams", {}), **per_backbone}}
        if not methods[name]["backbone_hparams"]:
            del methods[name]["backbone_hparams"]
        done.add(name)

    for name in list(methods):
        resolve(name, ())


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
        regimes = [r for r in cell["regimes"] if regime(r).length > 1]
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


# ---------------------------------------------------------------- what decides each output
# Each rule's `params:` carries the hash of exactly the settings that decide its output, so
# Snakemake's params trigger reruns a job when one of them changes and no other job (its
# input files' mtimes carry the change downstream). `edit-eval` records its cell's hash in
# the run provenance and `aggregate` refuses runs whose hash differs from the config's.
def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def world_settings(config: dict) -> dict:
    """The tiny world generator's settings (make_world)."""
    return {"seed": config["seed"], "world": config.get("world")}


def use_released_backbones(config: dict) -> bool:
    """Whether pretrain_backbone installs a released backbone of the same key (unike.releases)."""
    return config.get("use_released_backbones", True)


def pretrain_settings(config: dict, backbone: str) -> dict:
    """A tiny backbone's pretraining (pretrain_backbone): the world, its entry, and whether a
    release may stand in for pretraining it here."""
    entry = {k: v for k, v in config["backbones"][backbone].items() if k != "resources"}  # job sizes only
    return {**world_settings(config), "backbone": entry, "use_released_backbones": use_released_backbones(config)}


def model_settings(config: dict, backbone: str) -> dict:
    """What every step that runs a backbone on the edit data depends on: the backbone as
    loaded (entry, device, dtype, whether a CPU loads a half dtype in float32) and the data
    source (its split files are inputs)."""
    data = {k: v for k, v in config["data"].items() if k != "n_eval"}  # n_eval: eval steps only
    return {**pretrain_settings(config, backbone), "device": config["device"],
            "dtype": config.get("dtype", "float32"),
            "cpu_float32_fallback": config.get("cpu_float32_fallback", True), "data": data}


def eval_settings(config: dict, backbone: str, task: str) -> dict:
    """Steps that score a task's eval cases (cache_pre_edit, edit_eval): also how many."""
    n_eval = config["data"].get("n_eval", {})
    return {**model_settings(config, backbone), "n_eval": {t: n_eval.get(t) for t in case_tasks(task)}}


def pre_edit_settings(config: dict, backbone: str, task: str) -> dict:
    """cache_pre_edit: the eval cases it scores, and where it keeps their streams
    (`stream_layer`, from `knowledge.edited_layers`)."""
    return {**eval_settings(config, backbone, task), "edited_layers": config.get("knowledge", {}).get("edited_layers")}


def knowledge_settings(config: dict, backbone: str, stage: str) -> dict:
    """One stage of UniKE's knowledge pipeline: the `knowledge:` keys that stage reads.
    Encoders and the t-SNE do not run the backbone; their inputs carry its changes."""
    knowledge = config.get("knowledge", {})
    keys = KNOWLEDGE_STAGE_KEYS[stage]
    own = {k: knowledge.get(k) for k in keys}
    if stage in ("collect_triplets", "extract_hidden_states"):
        return {**model_settings(config, backbone), "knowledge": own}
    return {"seed": config["seed"], "knowledge": own}


KNOWLEDGE_STAGE_KEYS = {"collect_triplets": ("n_triplets",), "extract_hidden_states": ("edited_layers",),
                        "pretrain_encoders": ("encoders",), "embed_spaces": ("spaces_points", "tsne")}


def prepare_settings(config: dict, method: str, backbone: str, task: str) -> dict:
    """A trained method's preparation (prepare_editor): its editor and what `prepare`
    reads of its hyperparameters (`Editor.prepare_key`), on the train split of the task."""
    from unike.editing import preparation

    editor, key = preparation(method_entry(config, method, backbone), f"methods.{method}")
    return {**model_settings(config, backbone), "task": task, "editor": editor, "prepare_key": key}


def cell_settings(config: dict, cell: Cell) -> dict:
    """Everything that decides a grid cell's numbers (edit_eval): the method as it runs on
    the backbone (every hyperparameter's value, defaults included), less the
    hyperparameters its editor does not read with these values (`Editor.unread_hparams`),
    the eval data, the metric definition and, for methods that read UniKE's knowledge, the
    `knowledge:` section."""
    from unike.editing import parse_hparams, resolve_editor
    from unike.metrics import METRIC_VERSION

    entry = method_entry(config, cell.method, cell.backbone)
    cls = resolve_editor(entry["editor"])
    hparams = parse_hparams(cls.Hparams, entry["hparams"], f"methods.{cell.method}")
    unread = cls.unread_hparams(hparams)
    # Every value the editor runs with, its defaults included: a default changed in the
    # code reruns the cells that read it, as a changed config value does.
    method = {**entry, "hparams": {k: v for k, v in dataclasses.asdict(hparams).items() if k not in unread}}
    settings = {**eval_settings(config, cell.backbone, cell.task), "cell": cell.__dict__, "method": method,
                "metric_version": METRIC_VERSION}
    if cls.needs_knowledge:
        settings["knowledge"] = config.get("knowledge", {})
    return settings


def cell_config_hash(config: dict, cell: Cell) -> str:
    return settings_hash(cell_settings(config, cell))


# ---------------------------------------------------------------- Figure 4
# Which hyperparameter is each Figure 4 curve's x (or bar's treatment); the config's
# `report.figure4` names only the methods of each curve, their values come from here.
FIGURE4_X = {("a", "latent-ike"): "top_k", ("a", "ike"): "ike_k", ("b", "fixed"): "alpha", ("c", None): "zeta"}


def figure4_points(config: dict) -> dict | None:
    """`report.figure4` with every method keyed by its effective hyperparameter value: the
    form reports.figures reads ({a: {curve: {K: method}}, b: {fixed: {alpha: method},
    adaptive: method}, c: {treatment: method}}). None without the section."""
    from unike.editing import parse_hparams, resolve_editor

    section = config.get("report", {}).get("figure4")
    if section is None:
        return None

    def value(panel: str, curve: str | None, method: str):
        entry = method_entry(config, method, section["backbone"])
        cls = resolve_editor(entry["editor"])
        hparams = parse_hparams(cls.Hparams, entry["hparams"], f"methods.{method}")
        name = FIGURE4_X[(panel, curve)]
        if getattr(hparams, name, None) is None:
            raise ConfigError(f"report.figure4.{panel}: methods.{method} has no value of {name!r}, which this "
                              "panel plots")
        return getattr(hparams, name)

    def keyed(panel: str, curve: str | None, methods: list[str]) -> dict:
        out = {}
        for method in methods:
            x = value(panel, curve, method)
            if x in out:
                raise ConfigError(f"report.figure4.{panel}{'.' + curve if curve else ''}: methods {out[x]} and "
                                  f"{method} both have {FIGURE4_X[(panel, curve)]} = {x}")
            out[x] = method
        return out

    points = {"backbone": section["backbone"], "task": section["task"]}
    if "a" in section:
        points["a"] = {curve: keyed("a", curve, methods) for curve, methods in section["a"].items()}
    if "b" in section:
        points["b"] = {k: v for k, v in (("fixed", keyed("b", "fixed", section["b"].get("fixed", []))),
                                          ("adaptive", section["b"].get("adaptive"))) if v}
    if "c" in section:
        points["c"] = keyed("c", None, section["c"])
    return points


def _check_figure4(config: dict) -> None:
    """`report.figure4` names a defined backbone and defined methods (a method that has no
    runs in the grid is drawn as a missing point, not refused), with distinct x values."""
    section = config.get("report", {}).get("figure4")
    if section is None:
        return
    if section["backbone"] not in config["backbones"]:
        raise ConfigError(f"report.figure4.backbone: unknown backbone {section['backbone']!r}; "
                          f"defined: {sorted(config['backbones'])}")
    a, b = section.get("a", {}), section.get("b", {})
    named = [m for methods in a.values() for m in methods] + b.get("fixed", []) + section.get("c", [])
    named += [b["adaptive"]] if "adaptive" in b else []
    unknown = [m for m in named if m not in config["methods"]]
    if unknown:
        raise ConfigError(f"report.figure4: unknown method name(s) {unknown}; defined: {sorted(config['methods'])}")
    figure4_points(config)


def edited_layers(config: dict, n_layers: int) -> list[int]:
    """UniKE's edited layers: the last `knowledge.edited_layers` decoder layers."""
    n = config.get("knowledge", {}).get("edited_layers", 4)
    return list(range(max(0, n_layers - n), n_layers))


def stream_layer(config: dict, n_layers: int) -> int:
    """Where the pre-edit pass keeps the scored inputs' residual streams (`unike.harness`):
    UniKE's first edited layer, the lowest any built-in intrinsic editor edits."""
    return edited_layers(config, n_layers)[0]


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
    missing += _missing_method_paths(config)
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
            first = json.loads((annotations / f).read_text(encoding="utf-8"))[0]
            images = [first[k] for k in ("image", "image_rephrase", "m_loc")]
        except (OSError, ValueError, IndexError, KeyError, TypeError):
            continue  # a missing or malformed file is reported above or by the data loader
        missing += [(str(image_root / rel), f"{how} (image of {annotations / f} record 0: is data.image_root the "
                     "folder the records' image paths are relative to?)")
                    for rel in images if isinstance(rel, str) and not (image_root / rel).is_file()]
    return missing


def _missing_method_paths(config: dict) -> list[tuple[str, str]]:
    """Local paths the grid's methods name in their hyperparameters (`Editor.local_paths`)."""
    from unike.editing import parse_hparams, resolve_editor

    missing = {}
    for cell in grid_cells(config):
        entry = method_entry(config, cell.method, cell.backbone)
        cls = resolve_editor(entry["editor"])
        hparams = parse_hparams(cls.Hparams, entry["hparams"], f"methods.{cell.method}")
        for name, path in cls.local_paths(hparams).items():
            if not path.exists():
                missing[str(path)] = (f"methods.{cell.method} (hparams.{name}, on {cell.backbone}): a local copy of "
                                      "the model it names; docs/baselines.md")
    return sorted(missing.items())


def format_missing(missing: list[tuple[str, str]]) -> str:
    lines = [f"{len(missing)} input(s) of this configuration are missing:"]
    lines += [f"  {path}\n      get it: {how}" for path, how in missing]
    return "\n".join(lines)
