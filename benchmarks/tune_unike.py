"""UniKE's hyperparameters, searched on a validation split of the *train* data only.

The eval split is never touched. Per backbone, a seeded 20% of each task's train cases
(the backbone's own mistakes, mined by the DAG) is held out as validation; everything
UniKE learns from the train split is rebuilt without them: the triplet memory (hidden
states of the validation cases' edit inputs removed), the encoders and zeta (retrained on
the rest), and the FFN-input memory of the memory loss (the rest only). Pre-edit
predictions of the validation cases are computed here.

The search is coordinate-wise from the config's `unike` entry: each hyperparameter in
turn takes each of its candidate values with the others at their current best, and the
best value is kept before the next one. The score is the mean over the backbones of the
mean of Rel, Gen, Loc over both tasks (Gen and Loc each the mean of their T- and M- parts,
as Table 5): one config entry serves every backbone, as the paper's one setting does. Writes
benchmarks/results/unike_tuning.json; needs a finished default run (`snakemake --cores 2`).

    python benchmarks/tune_unike.py --config config.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from unike.backbones import load_backbone
from unike.config import load_config
from unike.grid import ONE_STEP, SPLIT_FILES, TASKS, Layout
from unike.data import edit_sample, load_cases
from unike.editing import create_editor
from unike.harness import make_sequences, pre_edit_predictions, pre_edit_tensors, run_sequences
from unike.method.editor import UniKE, UniKEHparams
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import load_triplets, save_hidden_states, save_triplets

RESULTS = Path(__file__).resolve().parent / "results" / "unike_tuning.json"
CANDIDATES = {  # the config's value joins each list
    "n_neurons": [5, 10, 20],
    "beta": [0.0, 0.1, 0.3],
    "lr": [3e-3, 1e-2, 3e-2],
    "max_steps": [25, 50, 100],
    "top_k": [8, 16, 40],
}
VALIDATION_SHARE = 0.2


def split_train(cases: list, seed: int) -> tuple[list, list]:
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(VALIDATION_SHARE * len(cases)))
    held = set(order[:n_val])
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def knowledge_without(source: Path, target: Path, validation: list, enc_cfg: EncoderConfig) -> int:
    """A copy of the knowledge folder without the triplets of the validation edit inputs,
    its encoders retrained; returns how many triplets were removed."""
    held = {(str(edit_sample(c).image), edit_sample(c).prompt) for c in validation}
    triplets = load_triplets(source / "triplets.json")
    keep = [i for i, t in enumerate(triplets) if (t.image, t.prompt) not in held]
    with safe_open(str(source / "hidden_states.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        states = {k: f.get_tensor(k)[keep].contiguous() for k in f.keys()}
    target.mkdir(parents=True)
    save_triplets(target / "triplets.json", [triplets[i] for i in keep])
    save_hidden_states(target / "hidden_states.safetensors", states, layers)
    pretrain_encoders(target, enc_cfg)
    return len(triplets) - len(keep)


def validation_setup(config: dict, layout: Layout, name: str, hparams: UniKEHparams, root: Path) -> dict:
    """Backbone `name` with a validation split of its train cases (both tasks) held out of
    everything UniKE learns from the train split: knowledge and encoders (`knowledge_without`)
    and the prepared FFN memory, written under `root`."""
    enc_cfg = EncoderConfig(**{"seed": config["seed"], **config.get("knowledge", {}).get("encoders", {})})
    backbone = load_backbone(name, layout.backbone_dir(name))
    fit, validation = {}, {}
    for task in TASKS:
        cases = load_cases(layout.annotations(name) / SPLIT_FILES[(task, "train")], task, layout.image_root)
        fit[task], validation[task] = split_train(cases, config["seed"])
    knowledge, prepared = root / name / "knowledge", root / name / "prepared"
    removed = knowledge_without(layout.knowledge(name), knowledge, [c for t in TASKS for c in validation[t]], enc_cfg)
    prepared.mkdir()
    UniKE.prepare(backbone, hparams, [c for t in TASKS for c in fit[t]], prepared, config["seed"], knowledge=knowledge)
    return {"backbone": backbone, "validation": validation, "knowledge": knowledge, "prepared": prepared,
            "triplets_removed": removed}


def score(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    rel = sum(r["rel"] for r in rows) / n
    gen = sum(r["t_gen"] + r["m_gen"] for r in rows) / (2 * n)
    loc = sum(r["t_loc"] + r["m_loc"] for r in rows) / (2 * n)
    return {"rel": rel, "gen": gen, "loc": loc, "mean": (rel + gen + loc) / 3}


def validation_command(description: str, method_help: str) -> tuple[argparse.Namespace, dict, Layout]:
    """The command line of the validation-split scripts (this one, unike_gate.py): --config
    and --method; torch threads as the config says."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--method", default="unike", help=method_help)
    args = parser.parse_args()
    config = load_config(args.config)
    torch.set_num_threads(config["threads"])
    return args, config, Layout(config)


def main() -> None:
    args, config, layout = validation_command(__doc__, "the config entry whose hyperparameters start the search")
    base = config["methods"][args.method]
    if base.get("backbone_hparams"):
        raise SystemExit(f"{args.method} has backbone_hparams: this search looks for one setting for every backbone")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        setups = {}  # backbone -> what one evaluation needs
        for name in config["backbones"]:
            st = setups[name] = validation_setup(config, layout, name, UniKEHparams(**base.get("hparams", {})), Path(tmp))
            st["pre_edit"] = {t: pre_edit_tensors(pre_edit_predictions(st["backbone"], cases), cases)
                              for t, cases in st["validation"].items()}

        def evaluate(values: dict) -> dict:
            """Scores per backbone and their mean: one setting serves both, as one config entry does."""
            per_backbone = {}
            for name, st in setups.items():
                editor = create_editor({"editor": base["editor"], "hparams": values}, st["backbone"], st["prepared"],
                                       st["knowledge"])
                rows = []
                for task, cases in st["validation"].items():
                    rows += run_sequences(editor, make_sequences({task: cases}, ONE_STEP.name, config["seed"]),
                                          st["pre_edit"][task], progress_every=10**9)
                editor.close()
                per_backbone[name] = score(rows)
            return {"values": dict(values), "backbones": per_backbone,
                    "mean": sum(b["mean"] for b in per_backbone.values()) / len(per_backbone)}

        best = asdict(UniKEHparams(**base.get("hparams", {})))
        trials = [evaluate(best)]
        for field, candidates in CANDIDATES.items():
            results = {}
            for value in sorted(set(candidates) | {best[field]}):
                values = {**best, field: value}
                trial = next((t for t in trials if t["values"] == values), None)
                if trial is None:
                    trial = evaluate(values)
                    trials.append(trial)
                results[value] = trial
                print(field, value, round(results[value]["mean"], 4),
                      {n: round(b["mean"], 4) for n, b in results[value]["backbones"].items()}, flush=True)
            best[field] = max(results, key=lambda v: (results[v]["mean"], v == best[field]))
    searched = [{**t, "values": {f: t["values"][f] for f in CANDIDATES}} for t in trials]
    chosen = {f: best[f] for f in CANDIDATES}
    report = {"method": args.method, "start": base.get("hparams", {}), "validation_share": VALIDATION_SHARE,
              "candidates": CANDIDATES, "chosen": chosen, "trials": searched, "start_scores": searched[0],
              "chosen_scores": next(t for t in searched if t["values"] == chosen), "seconds": round(time.time() - t0, 1),
              "backbones": {n: {"validation_cases": {t: len(c) for t, c in st["validation"].items()},
                                "triplets_removed": st["triplets_removed"]} for n, st in setups.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report["chosen"]))


if __name__ == "__main__":
    main()
