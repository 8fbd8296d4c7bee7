"""Per-edit cost, side by side: the harness's way against the plain way.

FT (default, `--method ft`). Plain way (what a straightforward implementation does, as
EasyEdit's batch-size-1 loop): per edit, the unedited model's locality predictions are
computed, every FT step runs the whole model including the vision tower, and the five
scored inputs are evaluated one at a time through `Blip2ForConditionalGeneration.forward`.
Harness way: pre-edit predictions read from the cache, image features computed once per
image, FT steps run only the edited layer on a cached prefix, one batch per case. Needs the
default run's backbones, data and pre-edit cache (run `snakemake --cores 2` first).

UniKE (`--method unike`): UniKE's editor, whose training steps run only the edited layers
on a prefix computed once per edit (`UniKE._step_logits`), against the same editor with
the whole model run at every step (`FullModelUniKE`), both through the harness. On the
default tiny backbones (4 layers, all edited) there is nothing below the edited layers to
save, so this builds untrained tiny backbones as deep as the paper's (32 layers, the last 4
edited, the default tiny width) on a small tiny world, with UniKE's knowledge and prepared
folder made by the pipeline's own functions; needs nothing from a run.

Both ways must give the same metrics; the script checks that and writes the timings to
benchmarks/results/per_edit.json (FT) or per_edit_unike.json (UniKE).

    python benchmarks/per_edit.py --config config.yaml --cases 40 --repeats 3
    python benchmarks/per_edit.py --method unike --cases 10 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from baselines.ft import FineTune
from unike.backbones import Backbone, Batch, load_backbone
from unike.config import load_config
from unike.grid import ONE_STEP, SPLIT_FILES, TASKS, Layout
from unike.data import case_samples, edit_sample, load_cases, ROWS, Sample
from unike.harness import load_pre_edit, make_sequences, run_sequences
from unike.harness import pre_edit_predictions, pre_edit_tensors
from unike.method.editor import UniKE, UniKEHparams
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import collect_triplets, extract_hidden_states, save_hidden_states, save_triplets
from unike.metrics import score_case
from unike.tiny import TinyArch, build_model, build_tokenizer
from unike.world import WorldConfig, generate_world, vocabulary

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


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
    rows = run_sequences(editor, make_sequences({cases[0].task: cases}, ONE_STEP.name, 0), pre_edit, progress_every=10**9)
    total = time.perf_counter() - t0
    return [{**r, "total_s": total / len(rows)} for r in rows]


def ft_main(args) -> None:
    config = load_config(args.config)
    layout = Layout(config)
    torch.set_num_threads(config["threads"])
    hparams = config["methods"]["ft"].get("hparams", {})
    figures = {"device": f"cpu {platform.machine()} x{config['threads']} threads", "method": "ft", "hparams": hparams,
               "repeats": args.repeats, "backbones": {}}
    for name in config["backbones"]:
        for task in TASKS:
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
                for m in METRICS:
                    assert abs(p[m] - h[m]) < 1e-6, (name, task, p["case_id"], m, p[m], h[m])
            figures["backbones"].setdefault(name, {})[task] = {
                "cases": len(cases), "plain_s_per_edit": round(timings["plain"], 4),
                "harness_s_per_edit": round(timings["harness"], 4),
                "speedup": round(timings["plain"] / timings["harness"], 2), "same_metrics": True}
            print(name, task, figures["backbones"][name][task], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "per_edit.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- UniKE
class FullModelUniKE(UniKE):
    """UniKE with the plain training loop: every step runs the whole model."""

    def _step_logits(self, batch, prefix):
        return self._forward(batch)[0, :-1]


# A small tiny world: enough train cases for a knowledge memory, eval cases to edit.
UNIKE_WORLD = dict(n_creatures=12, n_familiar=8, n_changed=4, n_eval_subjects=3, pretrain_images_per_creature=2, n_pretrain_scenes=12,
                   n_vqa_eval=20, n_caption_eval=20, n_vqa_train=24, n_caption_train=16, n_context=40, seed=1)


def deep_unike_setup(root: Path, arch: TinyArch, edited: int, hparams: dict, n_eval: int, seed: int = 0) -> dict:
    """An untrained tiny backbone of `arch` on the small world under `root` (made if
    missing), UniKE's knowledge on its last `edited` layers from the
    train split (triplets, hidden states, encoders: the pipeline's functions), UniKE
    prepared on the train split, and the first `n_eval` eval cases of each task with their
    pre-edit predictions."""
    world = WorldConfig.from_dict(UNIKE_WORLD)
    world_dir = root / "world"
    if not world_dir.exists():
        generate_world(world_dir, world)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary(world))
    backbone = Backbone(f"deep-{arch.text_model}", build_model(arch, tokenizer), tokenizer,
                        "blip2" if arch.text_model == "opt" else "minigpt4", arch.image_size)
    train = [c for task in TASKS
             for c in load_cases(world_dir / SPLIT_FILES[(task, "train")], task, world_dir)]
    knowledge, prepared = root / f"knowledge-{arch.text_model}", root / f"prepared-{arch.text_model}"
    knowledge.mkdir()
    prepared.mkdir()
    triplets = collect_triplets(backbone, train, limit=len(train), max_new_tokens=3)
    save_triplets(knowledge / "triplets.json", triplets)
    edited_layers = list(range(arch.layers - edited, arch.layers))
    save_hidden_states(knowledge / "hidden_states.safetensors",
                       extract_hidden_states(backbone, triplets, edited_layers), edited_layers)
    pretrain_encoders(knowledge, EncoderConfig(truth_dim=16, hidden=64, steps=50, batch_size=16, seed=seed))
    UniKE.prepare(backbone, UniKEHparams(**hparams), train, prepared, seed, knowledge=knowledge)
    cases = {task: load_cases(world_dir / SPLIT_FILES[(task, "eval")], task, world_dir, limit=n_eval)
             for task in TASKS}
    pre_edit = {task: pre_edit_tensors(pre_edit_predictions(backbone, cs), cs) for task, cs in cases.items()}
    return {"backbone": backbone, "knowledge": knowledge, "prepared": prepared, "cases": cases, "pre_edit": pre_edit}


def unike_rows(editor_cls: type[UniKE], setup: dict, hparams: dict, task: str) -> list[dict]:
    """One-step edits of the setup's eval cases of `task` through the harness; each
    row also has `edit_cpu_s`, the process's CPU time of its edit (on a machine shared with
    other jobs, wall time measures them too; torch runs on the config's threads)."""
    editor = editor_cls(setup["backbone"], hparams, setup["prepared"], knowledge=setup["knowledge"])
    cases = setup["cases"][task]
    cpu = []
    edit = editor.edit

    def timed_edit(case):
        t0 = time.process_time()
        edit(case)
        cpu.append(time.process_time() - t0)

    editor.edit = timed_edit
    try:
        rows = run_sequences(editor, make_sequences({task: cases}, ONE_STEP.name, 0), setup["pre_edit"][task],
                             progress_every=10**9)
    finally:
        editor.close()
    return [{**r, "edit_cpu_s": s} for r, s in zip(rows, cpu)]


def unike_main(args) -> None:
    config = load_config(args.config)
    torch.set_num_threads(config["threads"])
    hparams = config["methods"]["unike"].get("hparams", {})
    figures = {"device": f"cpu {platform.machine()} x{config['threads']} threads", "method": "unike",
               "hparams": hparams, "repeats": args.repeats, "layers": args.layers, "edited_layers": args.edited,
               "arch": f"untrained tiny backbones, {args.layers} layers (TinyArch defaults otherwise)", "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for text_model in ("opt", "llama"):
            setup = deep_unike_setup(Path(tmp), TinyArch(text_model=text_model, layers=args.layers), args.edited,
                                     hparams, args.cases, config["seed"])
            for task in TASKS:
                timings = {"full_model": float("inf"), "prefix": float("inf")}
                results = {}
                for _ in range(args.repeats):
                    for way, cls in (("full_model", FullModelUniKE), ("prefix", UniKE)):
                        rows = unike_rows(cls, setup, hparams, task)
                        timings[way] = min(timings[way], sum(r["edit_cpu_s"] for r in rows) / len(rows))
                        results[way] = rows
                same = all(p[m] == q[m] for p, q in zip(results["full_model"], results["prefix"]) for m in METRICS)
                assert same, (text_model, task, results)
                figures["backbones"].setdefault(setup["backbone"].name, {})[task] = {
                    "cases": len(results["prefix"]), "full_model_s_per_edit": round(timings["full_model"], 4),
                    "prefix_s_per_edit": round(timings["prefix"], 4),
                    "speedup": round(timings["full_model"] / timings["prefix"], 2), "same_metrics": same}
                print(setup["backbone"].name, task, figures["backbones"][setup["backbone"].name][task], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "per_edit_unike.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("ft", "unike"), default="ft")
    parser.add_argument("--config", default="config.yaml", help="ft: the run to read; unike: the unike hparams, threads")
    parser.add_argument("--cases", type=int, default=20, help="at most this many eval cases per task")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each way, alternating; the fastest counts (the least disturbed by the machine)")
    parser.add_argument("--layers", type=int, default=32, help="unike: depth of the toy backbones (the paper's: 32)")
    parser.add_argument("--edited", type=int, default=4, help="unike: edited layers at the top (the paper's: 4)")
    args = parser.parse_args()
    (unike_main if args.method == "unike" else ft_main)(args)


if __name__ == "__main__":
    main()
