"""UniKE's hyperparameters, searched on a validation split of the *train* data only.

The eval split is never touched. Per backbone, a seeded 20% of each task's train cases
(the backbone's own mistakes, mined by the DAG) is held out as validation; everything
UniKE learns from the train split is rebuilt without them: the triplet memory (hidden
states of the validation cases' edit inputs removed), the encoders and zeta (retrained on
the rest), and the FFN-input memory of the memory loss (the rest only). Pre-edit
predictions of the validation cases are computed here.

The search is coordinate-wise from the config's `unike` entry: each hyperparameter in
turn takes each of its candidate values with the others at their current best, and the
best value (mean of Rel, Gen, Loc over both tasks, Gen and Loc each the mean of their T-
and M- parts, as Table 5) is kept before the next one. Writes
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
from unike.config import SPLIT_FILES, Layout, load_config
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


def score(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    rel = sum(r["rel"] for r in rows) / n
    gen = sum(r["t_gen"] + r["m_gen"] for r in rows) / (2 * n)
    loc = sum(r["t_loc"] + r["m_loc"] for r in rows) / (2 * n)
    return {"rel": rel, "gen": gen, "loc": loc, "mean": (rel + gen + loc) / 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--method", default="unike", help="the config entry whose hyperparameters start the search")
    args = parser.parse_args()
    config = load_config(args.config)
    layout = Layout(config)
    torch.set_num_threads(config["threads"])
    base = config["methods"][args.method]
    enc_cfg = EncoderConfig(**{"seed": config["seed"], **config.get("knowledge", {}).get("encoders", {})})
    report = {"method": args.method, "start": base.get("hparams", {}), "validation_share": VALIDATION_SHARE,
              "candidates": CANDIDATES, "backbones": {}}
    for name in config["backbones"]:
        t0 = time.time()
        backbone = load_backbone(name, layout.backbone_dir(name))
        fit, validation = {}, {}
        for task in ("e-vqa", "e-ic"):
            cases = load_cases(layout.annotations(name) / SPLIT_FILES[(task, "train")], task, layout.image_root)
            fit[task], validation[task] = split_train(cases, config["seed"])
        with tempfile.TemporaryDirectory() as tmp:
            knowledge, prepared = Path(tmp) / "knowledge", Path(tmp) / "prepared"
            removed = knowledge_without(layout.knowledge(name), knowledge, validation["e-vqa"] + validation["e-ic"],
                                        enc_cfg)
            prepared.mkdir()
            hp = UniKEHparams(**base.get("hparams", {}))
            UniKE.prepare(backbone, hp, fit["e-vqa"] + fit["e-ic"], prepared, config["seed"], knowledge=knowledge)
            pre_edit = {t: pre_edit_tensors(pre_edit_predictions(backbone, cases), cases)
                        for t, cases in validation.items()}

            def evaluate(values: dict) -> dict:
                torch.manual_seed(config["seed"])  # W_zeta starts random per edit: every trial draws the same
                editor = create_editor({"editor": base["editor"], "hparams": values}, backbone, prepared, knowledge)
                rows = []
                for task, cases in validation.items():
                    rows += run_sequences(editor, make_sequences({task: cases}, "one-step", config["seed"]),
                                          pre_edit[task], progress_every=10**9)
                editor.close()
                return score(rows)

            best = asdict(hp)
            trials = [{"values": dict(best), **evaluate(best)}]
            for field, candidates in CANDIDATES.items():
                results = {}
                for value in sorted(set(candidates) | {best[field]}):
                    values = {**best, field: value}
                    if value == best[field]:
                        results[value] = next(t for t in trials if t["values"] == values)
                    else:
                        results[value] = {"values": values, **evaluate(values)}
                        trials.append(results[value])
                    print(name, field, value, {k: round(v, 3) for k, v in results[value].items() if k != "values"},
                          flush=True)
                best[field] = max(results, key=lambda v: (results[v]["mean"], v == best[field]))
        chosen = next(t for t in trials if t["values"] == best)
        report["backbones"][name] = {
            "validation_cases": {t: len(c) for t, c in validation.items()}, "triplets_removed": removed,
            "start": {k: v for k, v in trials[0].items() if k != "values"},
            "chosen": {f: best[f] for f in CANDIDATES}, "chosen_scores": {k: v for k, v in chosen.items() if k != "values"},
            "trials": [{"values": {f: t["values"][f] for f in CANDIDATES}, **{k: v for k, v in t.items() if k != "values"}}
                       for t in trials],
            "seconds": round(time.time() - t0, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps({n: b["chosen"] for n, b in report["backbones"].items()}))


if __name__ == "__main__":
    main()
