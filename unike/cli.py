"""One command-line entry for every step the workflow runs: `python -m unike STEP ...`.

Each step reads the validated config, finds its inputs and outputs through `Layout`,
and writes its outputs atomically enough that Snakemake's own bookkeeping can resume.
Heavy imports (torch, transformers) happen inside the steps that need them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

from unike.data import DataError
from unike.config import (ConfigError, cell_config_hash, figure4_points, load_config, method_entry, methods_for,
                          paper_names, seed_config, seeds, use_released_backbones)
from unike.grid import CROSS_TASK, REGIMES, RUN_TASKS, SPLIT_FILES, Cell, Layout, case_tasks, regime, regimes_for_task

log = logging.getLogger("unike")


def _setup(args) -> tuple[dict, Layout]:
    # Every step runs offline, wherever it runs (local, Slurm job, container): set here,
    # before any step imports transformers / huggingface_hub (they read these at import),
    # rather than in a Snakemake profile, which a run without that profile would skip.
    # An explicit value in the environment wins.
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    config = load_config(args.config)
    _check_names(config, args)
    return config, Layout(config)


def _check_names(config: dict, args) -> None:
    """The step's --method/--backbone/--task/--regime name entries of the config (or the
    grid's vocabulary): a misspelt one ends here, in one line, before any model loads."""
    known = {"method": sorted(config["methods"]), "backbone": sorted(config["backbones"]),
             "task": list(RUN_TASKS), "regime": list(REGIMES)}
    for option, names in known.items():
        value = getattr(args, option, None)
        if value is not None and value not in names:
            raise ConfigError(f"--{option} {value!r} is not one of {names}")
    if getattr(args, "regime", None) is not None and args.regime not in regimes_for_task(args.task):
        raise ConfigError(f"--regime {args.regime!r} does not apply to --task {args.task!r} "
                          f"(allowed: {list(regimes_for_task(args.task))})")


def _torch_setup(config: dict):
    import torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch


def cmd_make_world(args) -> None:
    config, layout = _setup(args)
    from unike.world import WorldConfig, generate_world

    summary = generate_world(layout.world, WorldConfig.of(config))
    log.info("tiny world written to %s: %s", layout.world, summary)


def cmd_pretrain_backbone(args) -> None:
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.releases import find_release, install_release, pretraining_spec, release_key
    from unike.tiny import pretrain

    if config["backbones"][args.backbone]["source"] != "tiny":
        raise SystemExit(f"{args.backbone} is not a tiny backbone: nothing to pretrain")
    out = layout.backbone_dir(args.backbone)
    out.mkdir(parents=True, exist_ok=True)
    arch, train, prompt_style, words = pretraining_spec(config, args.backbone)
    key, _ = release_key(layout.world, arch, train, prompt_style, words)
    release = find_release(key) if use_released_backbones(config) else None
    if release is not None:
        meta = install_release(release, out)
        log.info("%s: installed the released backbone %s (pretrained on %s, released at %s; docs/tiny-world.md, "
                 "\"Released backbones\")", args.backbone, release, meta["made_on"], meta["commit"][:12])
        return
    log.info("%s: pretraining (release key %s: %s)", args.backbone, key,
             "no release of it in released/" if use_released_backbones(config) else "use_released_backbones off")
    report = pretrain(layout.world, out, arch, train, prompt_style, words, threads=config["threads"])
    report["release_key"] = key  # scripts/release_backbones.py checks it
    (out / "training.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log.info("%s: held-out answer-token accuracy %.3f", args.backbone, report["heldout"]["token_acc"])


def _load_backbone(config: dict, layout: Layout, name: str):
    from unike.backbones import load_backbone

    return load_backbone(name, layout.backbone_dir(name), config["device"], config.get("dtype", "float32"),
                         entry=config["backbones"][name],
                         cpu_float32_fallback=config.get("cpu_float32_fallback", True))


def _mining_tokens(config: dict) -> int:
    """Greedy answer length of mining (edits and triplets); the schema documents the default."""
    return config["data"].get("mining_max_new_tokens", 12)


def cmd_mine_edits(args) -> None:
    """Keep the tiny world's edit candidates the backbone really gets wrong; `pred` becomes
    its greedy answer."""
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.data import edit_sample, load_cases

    backbone = _load_backbone(config, layout, args.backbone)
    out_dir = layout.annotations(args.backbone)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for (task, split), filename in sorted(SPLIT_FILES.items()):
        records = json.loads((layout.world / filename).read_text(encoding="utf-8"))
        cases = load_cases(layout.world / filename, task, layout.world)
        answers = backbone.greedy([edit_sample(c) for c in cases], _mining_tokens(config))
        kept = []
        for record, answer in zip(records, answers):
            if answer != record["alt"]:
                kept.append({**record, "pred": answer})
        said_old = sum(a == r["pred"] for r, a in zip(records, answers))
        summary[filename] = {"candidates": len(records), "mistakes": len(kept), "said_old_fact": said_old}
        log.info("%s %s: %d of %d candidates are real mistakes (%d give the outdated fact)",
                 args.backbone, filename, len(kept), len(records), said_old)
        (out_dir / filename).write_text(json.dumps(kept, indent=1) + "\n", encoding="utf-8")
    (out_dir / "mining.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _eval_cases(config: dict, layout: Layout, backbone: str, task: str):
    from unike.data import load_cases

    limit = config["data"].get("n_eval", {}).get(task)
    return load_cases(layout.annotations(backbone) / SPLIT_FILES[(task, "eval")], task, layout.image_root,
                      skip_bad=config["data"].get("skip_bad_records", False), limit=limit)


def _train_cases(config: dict, layout: Layout, backbone: str, task: str):
    from unike.data import load_cases

    return [case for t in case_tasks(task) for case in load_cases(
        layout.annotations(backbone) / SPLIT_FILES[(t, "train")], t, layout.image_root,
        skip_bad=config["data"].get("skip_bad_records", False))]


def cmd_prepare_editor(args) -> None:
    """Train what a method needs (once per backbone and task) on the train split."""
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.editing import parse_hparams, prepare_owners, resolve_editor

    method = method_entry(config, args.method, args.backbone)
    cls = resolve_editor(method["editor"])
    if not cls.needs_training:
        raise SystemExit(f"{args.method} ({method['editor']}) needs no preparation")
    owner = prepare_owners(methods_for(config, args.backbone))[args.method]
    if owner != args.method:
        raise SystemExit(f"{args.method} uses the folder prepared for {owner} (same editor and preparation)")
    backbone = _load_backbone(config, layout, args.backbone)
    cases = _train_cases(config, layout, args.backbone, args.task)
    out_dir = layout.prepared(args.method, args.backbone, args.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    extra = {"knowledge": layout.knowledge(args.backbone)} if cls.needs_knowledge else {}
    summary = cls.prepare(backbone, parse_hparams(cls.Hparams, method["hparams"], args.method), cases,
                          out_dir, config["seed"], **extra)
    record = {"method": args.method, "backbone": args.backbone, "task": args.task, "n_train_cases": len(cases),
              "prepare_s": time.time() - t0, "hparams": method["hparams"], "summary": summary}
    # Written last: its presence tells Snakemake the folder is complete.
    (out_dir / "prepared.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("%s prepared for %s/%s in %.1f s", args.method, args.backbone, args.task, record["prepare_s"])


def cmd_collect_triplets(args) -> None:
    """UniKE: the backbone's own mistakes on the train split of both tasks."""
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.method.knowledge import collect_triplets, save_triplets

    backbone = _load_backbone(config, layout, args.backbone)
    cases = _train_cases(config, layout, args.backbone, CROSS_TASK)  # the train splits of every task
    limit = config.get("knowledge", {}).get("n_triplets", 15000)
    triplets = collect_triplets(backbone, cases, limit, _mining_tokens(config))
    out = layout.knowledge(args.backbone)
    out.mkdir(parents=True, exist_ok=True)
    save_triplets(out / "triplets.json", triplets)
    log.info("%d triplets from %d train inputs", len(triplets), len(cases))


def cmd_extract_hidden_states(args) -> None:
    """UniKE: h_sem, h_pos, h_neg at every edited layer for every triplet."""
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.config import edited_layers
    from unike.method.knowledge import extract_hidden_states, load_triplets, save_hidden_states

    backbone = _load_backbone(config, layout, args.backbone)
    out = layout.knowledge(args.backbone)
    layers = edited_layers(config, len(backbone.text))
    states = extract_hidden_states(backbone, load_triplets(out / "triplets.json"), layers)
    save_hidden_states(out / "hidden_states.safetensors", states, layers)
    log.info("hidden states of layers %s written", layers)


def cmd_pretrain_encoders(args) -> None:
    """UniKE: per-layer semantic and truthfulness encoders (Eq. 4, Eq. 5) and zeta."""
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.method.encoders import EncoderConfig, pretrain_encoders

    cfg = EncoderConfig(**{"seed": config["seed"], **config.get("knowledge", {}).get("encoders", {})})
    report = pretrain_encoders(layout.knowledge(args.backbone), cfg)
    log.info("encoders of layers %s trained", report["layers"])


def cmd_embed_spaces(args) -> None:
    """UniKE, Figure 5a: the semantic and truthfulness spaces of the last edited layer in 2-D (t-SNE)."""
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.method.encoders import embed_spaces
    from unike.method.tsne import TSNEConfig

    knowledge = config.get("knowledge", {})
    out = layout.knowledge(args.backbone)
    summary = embed_spaces(out, out / "spaces.parquet", knowledge.get("spaces_points", 500),
                           TSNEConfig(**{"seed": config["seed"], **knowledge.get("tsne", {})}))
    log.info("spaces of layer %d (%d triplets) written; t-SNE KL %s", summary["layer"], summary["n_triplets"],
             summary["kl"])


def cmd_cache_pre_edit(args) -> None:
    config, layout = _setup(args)
    _torch_setup(config)
    from unike.config import stream_layer
    from unike.harness import pre_edit_predictions, save_pre_edit

    backbone = _load_backbone(config, layout, args.backbone)
    cases = _eval_cases(config, layout, args.backbone, args.task)
    layer = stream_layer(config, len(backbone.text))
    preds = pre_edit_predictions(backbone, cases, (layout.pre_edit_streams(args.backbone, args.task), layer))
    save_pre_edit(layout.pre_edit(args.backbone, args.task), preds, args.backbone)
    log.info("pre-edit predictions of %d %s cases cached, with their streams at layer %d", len(cases), args.task,
             layer)


def _code_version() -> str:
    import hashlib

    import unike

    root = Path(unike.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("unike", "baselines"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return f"0.1.0+{digest.hexdigest()[:12]}"


def _device_string(config: dict) -> str:
    import torch

    if config["device"].startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(config["device"]))
    from unike.backbones import cpu_device

    return cpu_device(torch.get_num_threads())


def cmd_edit_eval(args) -> None:
    config, layout = _setup(args)
    torch = _torch_setup(config)
    from unike.editing import create_editor, prepare_owners, resolve_editor
    from unike.harness import PreEditStreams, drift_summary, load_pre_edit, make_sequences, run_sequences
    from unike.metrics import METRIC_VERSION
    from unike.store import write_run

    t_start = time.time()
    cell = Cell(args.method, args.backbone, args.task, args.regime)
    cases_by_task = {task: _eval_cases(config, layout, cell.backbone, task) for task in case_tasks(cell.task)}
    sequences = make_sequences(cases_by_task, cell.regime, config["seed"])
    if not sequences:
        counts = ", ".join(f"{len(c)} {t}" for t, c in cases_by_task.items())
        raise ConfigError(f"{cell}: no edit sequence: {cell.regime} needs {regime(cell.regime).length} cases a "
                          f"sequence and the eval split has {counts} (data.n_eval, or the mined cases)")
    pre_edit = {}
    for task in cases_by_task:
        for path in (layout.pre_edit(cell.backbone, task), layout.pre_edit_streams(cell.backbone, task)):
            if not path.is_file():
                raise ConfigError(f"{path}: no pre-edit cache; run `python -m unike cache-pre-edit --config "
                                  f"{args.config} --backbone {cell.backbone} --task {task}` first")
        pre_edit.update(load_pre_edit(layout.pre_edit(cell.backbone, task), cases_by_task[task]))
    streams = PreEditStreams([layout.pre_edit_streams(cell.backbone, task) for task in cases_by_task])
    backbone = _load_backbone(config, layout, cell.backbone)
    method = method_entry(config, cell.method, cell.backbone)
    cls = resolve_editor(method["editor"])
    prepared = (layout.prepared(prepare_owners(methods_for(config, cell.backbone))[cell.method], cell.backbone,
                                cell.task) if cls.needs_training else None)
    editor = create_editor(method, backbone, prepared,
                           layout.knowledge(cell.backbone) if cls.needs_knowledge else None)
    log.info("%s: %d sequences, %d edits", cell, len(sequences), sum(map(len, sequences)))
    drift: list[list[float]] = []
    try:
        rows = run_sequences(editor, sequences, pre_edit, drift=drift, streams=streams)
    finally:
        editor.close()

    stem = layout.run_stem(cell)
    run_id = "/".join([cell.method, cell.backbone, cell.task, cell.regime, f"seed{config['seed']}"])
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if config["device"].startswith("cuda")
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    provenance = {
        "run_id": run_id, **cell.__dict__, "seed": config["seed"], "n_edits": len(rows),
        "config_hash": cell_config_hash(config, cell), "code_version": _code_version(),
        "metric_version": METRIC_VERSION, "device": _device_string(config),
        "dtype": str(backbone.dtype).removeprefix("torch."), "dtype_requested": backbone.requested_dtype,
        "wall_s": time.time() - t_start,
        "edit_s_mean": sum(r["edit_s"] for r in rows) / max(len(rows), 1), "peak_mem_mb": peak_mb,
        "hparams": method["hparams"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    if drift:  # multi-edit sequences of an editor that changes weights in place
        provenance["weight_drift"] = drift_summary(drift)
        log.info("%s: weight drift after each edit (mean over sequences) %s", run_id,
                 provenance["weight_drift"]["after_edit_mean"])
    write_run(stem.with_suffix(".parquet"), stem.with_suffix(".json"),
              [{"run_id": run_id, **r} for r in rows], provenance)
    log.info("%s: %d rows written to %s", run_id, len(rows), stem.with_suffix(".parquet"))


def cmd_aggregate(args) -> None:
    config, layout = _setup(args)
    from unike.store import aggregate

    pairs = [(Path(p), Path(p).with_suffix(".json")) for p in args.runs]
    stale = []
    for _, provenance_path in pairs:
        provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
        cell = Cell(provenance["method"], provenance["backbone"], provenance["task"], provenance["regime"])
        # Each run against its own seed's settings: the seed is one of them.
        if (provenance["seed"] not in seeds(config)
                or provenance["config_hash"] != cell_config_hash(seed_config(config, provenance["seed"]), cell)):
            stale.append(str(provenance_path))
    if stale:
        raise ConfigError(f"{len(stale)} run(s) were made under other settings than the config's (config_hash "
                          f"differs, or a seed it does not list): {', '.join(stale)}; rerun them (snakemake reruns "
                          "them once the rules carry their settings: --forcerun edit_eval)")
    aggregate(pairs, layout.db)
    log.info("%s rebuilt from %d runs", layout.db, len(pairs))


def cmd_report(args) -> None:
    """Tables 1-5, figures and index.html from the DuckDB (and the knowledge spaces given)."""
    config, layout = _setup(args)
    from reports.render import render_report

    backbone_map, method_map = paper_names(config)
    # Each file is knowledge/<backbone>/spaces.parquet: its folder names the backbone.
    spaces = {Path(p).parent.name: Path(p) for p in args.spaces}
    render_report(layout.db, layout.report, backbone_map, method_map, figure4_points(config), spaces)
    log.info("report written to %s", layout.report / "index.html")


def cmd_convert_minigpt4(args) -> None:
    """Convert MiniGPT-4 (EVA ViT-g, BLIP-2 Q-Former, llama_proj, Vicuna-7B v0) into the
    configured path of a MiniGPT-4 backbone (docs/real-backbones.md)."""
    config, layout = _setup(args)
    from unike.convert_minigpt4 import Sources, convert

    entry = config["backbones"][args.backbone]
    if entry["source"] != "local" or entry["prompt_style"] != "minigpt4":
        raise SystemExit(f"backbones.{args.backbone} must be a local backbone with prompt_style minigpt4")
    out = layout.backbone_dir(args.backbone)
    sources = Sources(Path(args.eva_vit), Path(args.qformer), Path(args.minigpt4), Path(args.vicuna))
    provenance = convert(sources, out, ignore=tuple(args.ignore))
    log.info("%s: %d original tensors converted into %s", args.backbone, provenance["n_original_tensors"], out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unike", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)

    def step(name, fn, *options):
        p = sub.add_parser(name, help=fn.__doc__)
        p.add_argument("--config", required=True, help="config YAML")
        for opt in options:
            p.add_argument(f"--{opt}", required=True)
        p.set_defaults(fn=fn)
        return p

    step("make-world", cmd_make_world)
    step("pretrain-backbone", cmd_pretrain_backbone, "backbone")
    step("mine-edits", cmd_mine_edits, "backbone")
    step("cache-pre-edit", cmd_cache_pre_edit, "backbone", "task")
    step("prepare-editor", cmd_prepare_editor, "method", "backbone", "task")
    step("collect-triplets", cmd_collect_triplets, "backbone")
    step("extract-hidden-states", cmd_extract_hidden_states, "backbone")
    step("pretrain-encoders", cmd_pretrain_encoders, "backbone")
    step("embed-spaces", cmd_embed_spaces, "backbone")
    step("edit-eval", cmd_edit_eval, "method", "backbone", "task", "regime")
    step("aggregate", cmd_aggregate).add_argument("runs", nargs="*", help="run Parquet files")
    step("report", cmd_report).add_argument(
        "--spaces", nargs="*", default=[], metavar="PARQUET",
        help="knowledge/<backbone>/spaces.parquet files for Figure 5a (none: no Figure 5a)")
    step("convert-minigpt4", cmd_convert_minigpt4, "backbone", "eva-vit", "qformer", "minigpt4", "vicuna").add_argument(
        "--ignore", action="append", default=[], help="glob of MiniGPT-4 keys to skip on purpose (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataError) as e:  # bad input: one line naming it, no traceback
        raise SystemExit(f"unike {args.step}: error: {e}") from None


if __name__ == "__main__":
    main()
