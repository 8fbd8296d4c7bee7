"""Per-edit cost of every intrinsic editor (FT, KE, MEND, T-Patcher, UniKE), side by side:
the harness's way against the plain way, both in one run.

Plain way (`PlainBackbone`, `plain_rows`): what a straightforward batch-size-1
implementation does (EasyEdit's loop). Per edit, the unedited model's locality predictions
are computed; every forward pass of the edit (each training step of FT, T-Patcher and
UniKE, the one gradient pass of KE and MEND, the passes that look at the edit input first)
runs the whole model, the vision tower included; the five scored inputs are evaluated one
at a time. Images are decoded once, as a dataset holds them.

Harness way (`harness_rows`): `run_sequences` as the pipeline runs it. Pre-edit predictions
are read from the cache, image features computed once per image, the layers below the
edited ones run once per edit (`Backbone.prefix`), and the five scored inputs go through
the model as one batch, from their residual streams at UniKE's first edited layer, which
the pre-edit pass cached (`unike.harness.PreEditStreams`), for every editor that changes
nothing below that layer (all five here: `scores_from` in the JSON).

Both ways run each editor's own code; only the backbone under it differs. They must give
the same metrics on every case: the script checks that.

Architecture: every figure is from untrained tiny backbones as deep as the paper's (32
layers; TinyArch's default width 128, or `--hidden`), an OPT one (BLIP-2 prompts) and a LLaMA one
(MiniGPT-4 prompts), on a small tiny world; no run is needed. Depth is what the prefix
saves: on the default 4-layer tiny backbones UniKE edits every layer, leaving nothing below
to save, and issue 14 asks for UniKE on a deep toy with the last 4 layers edited. Each
editor runs with config.yaml's hyperparameters and edits its own layers: FT and T-Patcher
the last one, KE and MEND the FFNs of the last 3, UniKE the last `--edited`
(`prefix_layer` in the JSON: the first layer a training step runs). The trained editors
are prepared by their own `prepare` on the train split (KE and MEND with `--prepare-steps`
training steps: an edit costs the same whatever the network learnt), UniKE's knowledge
folder by the pipeline's functions. On untrained backbones T-Patcher and UniKE, which
train until the edit is right, run to their step limits; T-Patcher's 300 is cut to
`--edit-steps` (50, UniKE's own limit) for the plain way to fit in a run. That lowers its
speed-up if anything: the per-edit work, where the harness saves less than per step, weighs
more.

Seconds: CPU seconds of this process per case (edit, evaluation, scoring, restore) on
`threads` torch threads: the machine may be shared, and CPU time leaves out the others.
Each case counts its fastest of `--repeats` runs of each way. Figures to
benchmarks/results/per_edit.json.

Where the harness stays under 3x on this toy, the reason is in the editor, not in the
layers below it. A UniKE training step keeps the edited layers' own work (latent IKE's
retrieval and feature shifting, the neurons, the backward pass, the memory loss over
~5,000 FFN inputs per layer), which both ways pay: on this narrow toy latent IKE alone
costs as much as the four edited layers it shifts, so leaving out the 28 below and the
vision tower cuts a step by less than 3x (docs/unike.md, "Training on a prefix").

    python benchmarks/per_edit.py --cases 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpu_resources import method_setup  # this script's folder is on sys.path
from unike.backbones import Backbone, Batch, Prefix, cpu_device
from unike.config import load_config
from unike.data import ROWS, Sample, case_samples, load_cases
from unike.editing import Editor, NoEdit, create_editor, parse_hparams, resolve_editor
from unike.grid import SPLIT_FILES, TASKS
from unike.harness import PreEditStreams, pre_edit_predictions, pre_edit_tensors, run_sequences
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import collect_triplets, extract_hidden_states, save_hidden_states, save_triplets
from unike.metrics import LOCALITY_ROWS, score_case
from unike.tiny import TinyArch, build_model, build_tokenizer
from unike.world import WorldConfig, generate_world, vocabulary

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
METHODS = ("ft", "ke", "mend", "tpatcher", "unike")  # the intrinsic editors of config.yaml

# A small tiny world: enough train cases for the trained editors and UniKE's knowledge,
# eval cases to edit.
WORLD = dict(n_creatures=12, n_familiar=8, n_changed=4, n_eval_subjects=3, pretrain_images_per_creature=2,
             n_pretrain_scenes=12, n_vqa_eval=20, n_caption_eval=20, n_vqa_train=24, n_caption_train=16, n_context=40,
             seed=1)


# ---------------------------------------------------------------- the plain way
class PlainPrefix(Prefix):
    """No prefix: `PlainBackbone.logits_from` runs its batch from the pixels at every pass.
    Only KE's and MEND's gradient pass (`upper_logits`) reads the stream at the bottom,
    layer 0's input, and runs every layer from it; that is computed when first read."""

    def __init__(self, backbone: Backbone, batch: Batch):
        self.layer, self.batch, self._backbone, self._bottom = 0, batch, backbone, None

    def _layer0(self) -> Prefix:
        if self._bottom is None:
            self._bottom = Backbone.prefix(self._backbone, self.batch, 0)
        return self._bottom

    @property
    def hidden(self) -> torch.Tensor:
        return self._layer0().hidden

    @property
    def layer_kwargs(self) -> dict:
        return self._layer0().layer_kwargs


class PlainBackbone(Backbone):
    """The same model with no shortcut: every forward pass runs the vision tower (no
    image-feature cache) and every decoder layer (a "prefix" starts at layer 0)."""

    def __init__(self, backbone: Backbone):
        super().__init__(backbone.name, backbone.model, backbone.tokenizer, backbone.prompt_style,
                         backbone.image_size, str(backbone.device), backbone.requested_dtype)
        self._pixels: dict[Path, torch.Tensor] = {}
        self.prefix_layers: set[int] = set()  # where the editors asked for their prefixes

    def load_pixels(self, paths: list[Path]) -> torch.Tensor:
        for p in paths:  # decoded and preprocessed once, as a dataset holds them
            if p not in self._pixels:
                self._pixels[p] = super().load_pixels([p])[0]
        return torch.stack([self._pixels[p] for p in paths])

    def to_device(self, batch: Batch) -> Batch:
        self.clear_image_cache()
        batch.image_features = None
        return super().to_device(batch)

    def prefix(self, batch: Batch, layer: int) -> PlainPrefix:
        self.prefix_layers.add(layer)
        return PlainPrefix(self, batch)

    def logits_from(self, prefix: PlainPrefix) -> torch.Tensor:
        return self.logits(prefix.batch)

    def logits_above(self, prefix: PlainPrefix, layer_output: torch.Tensor) -> torch.Tensor:
        return self.logits(prefix.batch)  # the layer whose output the editor knew runs too


def one_by_one(predict, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`predict` (an editor's) on each sample alone: the predictions and the targets."""
    outputs = [predict([s]) for s in samples]
    return [preds[0] for preds, _ in outputs], [targets[0] for _, targets in outputs]


def plain_rows(editor: Editor, cases) -> list[dict]:
    """One-step edits of `cases` the plain way (the editor on a `PlainBackbone`), each row
    with `cpu_s`, the CPU seconds of its case, and `prefix_layer`, the lowest layer the
    editor asked for a prefix at (where the harness's passes start)."""
    unedited = NoEdit(editor.backbone)
    rows = []
    for case in cases:
        t0 = time.process_time()
        samples = case_samples(case)
        # The unedited model has none of what an editor keeps installed between edits
        # (UniKE's latent knowledge hooks; its `edit` attaches them again).
        editor.close()
        pre, _ = one_by_one(unedited.predict, [samples[ROWS.index(row)] for row in LOCALITY_ROWS])
        editor.edit(case)
        preds, targets = one_by_one(editor.predict, samples)
        scores = score_case(dict(zip(ROWS, preds)), dict(zip(ROWS, targets)), dict(zip(LOCALITY_ROWS, pre)))
        editor.restore()
        rows.append({"case_id": case.case_id, **scores, "cpu_s": time.process_time() - t0})
    return [{**r, "prefix_layer": min(editor.backbone.prefix_layers)} for r in rows]


def harness_rows(editor: Editor, cases, pre_edit: dict, streams: PreEditStreams) -> list[dict]:
    """One-step edits of `cases` through the harness, each row with `cpu_s`, the CPU
    seconds of its case (one `run_sequences` call per case: one-step sequences are
    independent)."""
    rows = []
    for case in cases:
        t0 = time.process_time()
        (row,) = run_sequences(editor, [[case]], pre_edit, progress_every=10**9, streams=streams)
        rows.append({**row, "cpu_s": time.process_time() - t0})
    stream = streams.for_editor(editor, cases[0])
    return [{**r, "scores_from": 0 if stream is None else stream.layer} for r in rows]


def edit_rows(way: str, entry: dict, setup: dict, method: str, task: str) -> list[dict]:
    """`way` ("plain" or "harness") for one method on one task of the setup; the editor is
    made (untimed) on a cold image cache and released afterwards."""
    setup["backbone"].clear_image_cache()
    backbone = PlainBackbone(setup["backbone"]) if way == "plain" else setup["backbone"]
    needs_knowledge = resolve_editor(entry["editor"]).needs_knowledge
    editor = create_editor(entry, backbone, setup["prepared"].get(method),
                           setup["knowledge"] if needs_knowledge else None)
    try:
        if way == "plain":
            return plain_rows(editor, setup["cases"][task])
        return harness_rows(editor, setup["cases"][task], setup["pre_edit"][task], setup["streams"][task])
    finally:
        editor.close()


# ---------------------------------------------------------------- the deep toy
def deep_setup(root: Path, arch: TinyArch, edited: int, entries: dict[str, dict], n_eval: int,
               seed: int = 0) -> dict:
    """An untrained tiny backbone of `arch` on the small world under `root` (made if
    missing); UniKE's knowledge on its last `edited` layers from the train split (triplets,
    hidden states, encoders: the pipeline's functions) if UniKE is among `entries`
    (method -> {"editor", "hparams"}); every trained method prepared on the train split;
    the first `n_eval` eval cases of each task with their pre-edit predictions."""
    world_dir = root / "world"
    if not world_dir.exists():
        generate_world(world_dir, WorldConfig.from_dict(WORLD))
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary(WorldConfig.from_dict(WORLD)))
    backbone = Backbone(f"deep-{arch.text_model}", build_model(arch, tokenizer), tokenizer,
                        "blip2" if arch.text_model == "opt" else "minigpt4", arch.image_size)
    train = [c for task in TASKS for c in load_cases(world_dir / SPLIT_FILES[(task, "train")], task, world_dir)]
    knowledge = root / f"knowledge-{arch.text_model}"
    if any(resolve_editor(e["editor"]).needs_knowledge for e in entries.values()):
        knowledge.mkdir()
        triplets = collect_triplets(backbone, train, limit=len(train), max_new_tokens=3)
        save_triplets(knowledge / "triplets.json", triplets)
        layers = list(range(arch.layers - edited, arch.layers))
        save_hidden_states(knowledge / "hidden_states.safetensors", extract_hidden_states(backbone, triplets, layers),
                           layers)
        pretrain_encoders(knowledge, EncoderConfig(truth_dim=16, hidden=64, steps=50, batch_size=16, seed=seed))
    prepared = {}
    for method, entry in entries.items():
        cls = resolve_editor(entry["editor"])
        if cls.needs_training:
            prepared[method] = root / f"prepared-{arch.text_model}-{method}"
            prepared[method].mkdir()
            extra = {"knowledge": knowledge} if cls.needs_knowledge else {}
            cls.prepare(backbone, parse_hparams(cls.Hparams, entry["hparams"], method), train, prepared[method], seed,
                        **extra)
    cases = {task: load_cases(world_dir / SPLIT_FILES[(task, "eval")], task, world_dir, limit=n_eval)
             for task in TASKS}
    # The pipeline's cache_pre_edit: predictions, and the streams at UniKE's first edited layer.
    stream_layer = arch.layers - edited
    pre_edit = {task: pre_edit_tensors(pre_edit_predictions(backbone, cs, (root / f"streams-{task}.safetensors",
                                                                            stream_layer)), cs)
                for task, cs in cases.items()}
    streams = {task: PreEditStreams([root / f"streams-{task}.safetensors"]) for task in TASKS}
    return {"backbone": backbone, "knowledge": knowledge, "prepared": prepared, "cases": cases, "pre_edit": pre_edit,
            "streams": streams}


def bench_entries(config: dict, prepare_steps: int, edit_steps: int) -> dict[str, dict]:
    """config.yaml's entries of the intrinsic editors with the GPU benchmark's cuts
    (`gpu_resources.method_setup`): the trained ones at `prepare_steps` training steps, the
    per-edit step limits (T-Patcher, UniKE) at most `edit_steps`."""
    def no_stand_in(model: str):
        raise ValueError(f"per_edit.py: an intrinsic editor asked for an auxiliary model ({model})")

    return {m: method_setup(m, config, "toy", prepare_steps, no_stand_in, edit_steps).entry for m in METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="the methods' hyperparameters, threads, seed")
    parser.add_argument("--cases", type=int, default=3, help="eval cases per task")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each way, alternating; per case the fastest counts")
    parser.add_argument("--layers", type=int, default=32, help="depth of the toy backbones (the paper's: 32)")
    parser.add_argument("--edited", type=int, default=4, help="UniKE's edited layers at the top (the paper's: 4)")
    parser.add_argument("--hidden", type=int, default=128,
                        help="width of the toy language models (FFN 4x); other than 128: per_edit-hidden<N>.json")
    parser.add_argument("--prepare-steps", type=int, default=20, help="training steps of KE's and MEND's prepare")
    parser.add_argument("--edit-steps", type=int, default=50,
                        help="at most this many training steps per edit (T-Patcher, UniKE: 50 is UniKE's own)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    config = load_config(args.config)
    torch.set_num_threads(config["threads"])
    entries = {m: e for m, e in bench_entries(config, args.prepare_steps, args.edit_steps).items()
               if m in args.methods}
    figures = {"device": cpu_device(config["threads"]), "repeats": args.repeats,
               "layers": args.layers, "hidden": args.hidden, "stream_layer": args.layers - args.edited,
               "arch": f"untrained tiny backbones, {args.layers} layers, width {args.hidden} (FFN {4 * args.hidden}; "
               "TinyArch defaults otherwise)", "prepare_steps": args.prepare_steps, "edit_steps": args.edit_steps,
               "methods": {m: {"editor": e["editor"], "hparams": e["hparams"], "backbones": {}}
                           for m, e in entries.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for text_model in ("opt", "llama"):
            arch = TinyArch(text_model=text_model, layers=args.layers, hidden=args.hidden, ffn=4 * args.hidden)
            setup = deep_setup(Path(tmp) / text_model, arch, args.edited, entries, args.cases, config["seed"])
            name = setup["backbone"].name
            for method, entry in entries.items():
                for task in TASKS:
                    runs = {"plain": [], "harness": []}
                    for _ in range(args.repeats):
                        for way, done in runs.items():
                            done.append(edit_rows(way, entry, setup, method, task))
                    # Per case, the fastest of its repeats: the run least disturbed by the machine.
                    cpu = {way: statistics.mean(min(r["cpu_s"] for r in case) for case in zip(*done))
                           for way, done in runs.items()}
                    first = [[r[m] for m in METRICS] for r in runs["plain"][0]]
                    same = all([[r[m] for m in METRICS] for r in rows] == first
                               for done in runs.values() for rows in done)
                    assert same, (method, name, task, runs)
                    figures["methods"][method]["prefix_layer"] = runs["plain"][0][0]["prefix_layer"]
                    figures["methods"][method]["scores_from"] = runs["harness"][0][0]["scores_from"]
                    figures["methods"][method]["backbones"].setdefault(name, {})[task] = {
                        "cases": len(first), "plain_s_per_edit": round(cpu["plain"], 4),
                        "harness_s_per_edit": round(cpu["harness"], 4),
                        "speedup": round(cpu["plain"] / cpu["harness"], 2), "same_metrics": same}
                    print(method, name, task, figures["methods"][method]["backbones"][name][task], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "per_edit.json" if args.hidden == TinyArch.hidden else f"per_edit-hidden{args.hidden}.json"
    (RESULTS / name).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
