"""Per-edit cost, side by side: the harness's way against the plain way.

Plain way (what a straightforward implementation does, as EasyEdit's batch-size-1 loop):
per edit, the unedited model's locality predictions are computed, every FT step runs the
whole model including the vision tower, and the five scored inputs are evaluated one at a
time through `Blip2ForConditionalGeneration.forward`.
Harness way: pre-edit predictions read from the cache, image features computed once per
image, FT steps run only the edited layer on a cached prefix, one batch per case.

Both ways must give the same metrics; the script checks that and writes the timings to
benchmarks/results/per_edit.json. Needs the default run's backbones, data and pre-edit
cache (run `snakemake --cores 2` first).

    python benchmarks/per_edit.py --config config.yaml --cases 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from baselines.ft import FineTune
from unike.backbones import Backbone, Batch, load_backbone
from unike.config import load_config
from unike.grid import SPLIT_FILES, Layout
from unike.data import case_samples, edit_sample, load_cases, ROWS, Sample
from unike.harness import load_pre_edit, make_sequences, run_sequences
from unike.metrics import score_case

RESULTS = Path(__file__).resolve().parent / "results" / "per_edit.json"


def plain_forward(backbone: Backbone, sample: Sample) -> tuple[torch.Tensor, Batch]:
    batch = backbone.encode([sample])
    if sample.image is None:
        logits = backbone.model.language_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    else:
        logits = backbone.model(pixel_values=backbone.load_pixels([sample.image]), input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask).logits
    return logits, batch


def plain_predict(backbone: Backbone, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits, batch = plain_forward(backbone, sample)
    mask = batch.answer_mask[0, 1:]
    return logits[0, :-1].argmax(-1)[mask], batch.input_ids[0, 1:][mask]


def plain_run(backbone: Backbone, cases, hparams) -> list[dict]:
    editor = FineTune(backbone, hparams)  # only for its parameters, optimiser and snapshot
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        samples = case_samples(case)
        pre = {row: plain_predict(backbone, samples[ROWS.index(row)])[0] for row in ("t_loc", "m_loc")}
        params = list(editor.params.values())
        opt = editor._optimizer(params)
        for p in params:
            p.requires_grad_(True)
        for _ in range(editor.hparams.steps):
            logits, batch = plain_forward(backbone, edit_sample(case))
            mask = batch.answer_mask[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1][mask], batch.input_ids[:, 1:][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        preds, targets = zip(*(plain_predict(backbone, s) for s in samples))
        rows.append({"case_id": case.case_id, **score_case(dict(zip(ROWS, preds)), dict(zip(ROWS, targets)), pre),
                     "total_s": time.perf_counter() - t0})
        editor.restore()
    return rows


def harness_run(backbone: Backbone, cases, pre_edit, hparams) -> list[dict]:
    editor = FineTune(backbone, hparams)
    t0 = time.perf_counter()
    rows = run_sequences(editor, make_sequences({cases[0].task: cases}, "one-step", 0), pre_edit, progress_every=10**9)
    total = time.perf_counter() - t0
    return [{**r, "total_s": total / len(rows)} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--cases", type=int, default=20, help="at most this many eval cases per task")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each way, alternating; the fastest counts (the least disturbed by the machine)")
    args = parser.parse_args()
    config = load_config(args.config)
    layout = Layout(config)
    torch.set_num_threads(config["threads"])
    hparams = config["methods"]["ft"].get("hparams", {})
    figures = {"device": f"cpu {platform.machine()} x{config['threads']} threads", "method": "ft", "hparams": hparams,
               "repeats": args.repeats, "backbones": {}}
    for name in config["backbones"]:
        for task in ("e-vqa", "e-ic"):
            n_cached = config["data"]["n_eval"][task]  # cache_pre_edit covers the first n_eval cases
            cases = load_cases(layout.annotations(name) / SPLIT_FILES[(task, "eval")], task, layout.image_root,
                               limit=min(args.cases, n_cached) if n_cached else args.cases)
            pre_edit = load_pre_edit(layout.pre_edit(name, task), cases)
            timings = {"plain": float("inf"), "harness": float("inf")}
            results = {}
            for _ in range(args.repeats):
                for way, run in (("plain", lambda b: plain_run(b, cases, hparams)),
                                 ("harness", lambda b: harness_run(b, cases, pre_edit, hparams))):
                    backbone = load_backbone(name, layout.backbone_dir(name))  # fresh: no warm image cache
                    torch.manual_seed(0)
                    rows = run(backbone)
                    timings[way] = min(timings[way], sum(r["total_s"] for r in rows) / len(rows))
                    results[way] = rows
            for p, h in zip(results["plain"], results["harness"]):
                for m in ("rel", "t_gen", "m_gen", "t_loc", "m_loc"):
                    assert abs(p[m] - h[m]) < 1e-6, (name, task, p["case_id"], m, p[m], h[m])
            figures["backbones"].setdefault(name, {})[task] = {
                "cases": len(cases), "plain_s_per_edit": round(timings["plain"], 4),
                "harness_s_per_edit": round(timings["harness"], 4),
                "speedup": round(timings["plain"] / timings["harness"], 2), "same_metrics": True}
            print(name, task, figures["backbones"][name][task], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
