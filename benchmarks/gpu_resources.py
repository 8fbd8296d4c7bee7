"""Seconds per edit and peak GPU memory of every method on the two paper architectures.

BLIP-2 OPT-2.7B and MiniGPT-4 (EVA ViT-g + Q-Former + Vicuna-7B) are built at full size
with random weights, directly on the device in the run's dtype (weights change neither
speed nor memory, except where a method stops early once its edit is right: see
`top_layer_passes_per_case`). Every method of the paper configuration (config.yaml under
configs/paper.yaml, merged as Snakemake merges them) is prepared on a train split and then
makes one-step edits through the benchmark harness (`run_sequences`: the edit, then its five
scored inputs as one batch), after one warm-up edit that is reported on its own.

Edit cases come from a tiny world generated into a temporary folder (any case works with
random weights, so none are mined); its word-level tokenizer is the tokenizer of the random
models, so token counts are the tiny world's words, not BPE / SentencePiece pieces (the
prompts are of similar length). Auxiliary models that the paper configuration names by
path or package (SERAC's scope classifier and counterfactual LM, IKE's sentence embedder)
are random-weight stand-ins of the same architectures. Training loops run in `prepare`
(KE, MEND, SERAC) and UniKE's encoder training are cut to `--prepare-steps` steps: their
per-step cost and peak memory are what matter, and the JSON labels them as such.

    python benchmarks/gpu_resources.py --scale full      # one GPU; estimated 5-8 minutes (not yet run)
    python benchmarks/summary.py                         # RESULTS.md
    python benchmarks/gpu_resources.py --scale tiny --device cpu --cases 2 --out /tmp/gpu_tiny.json

`--scale tiny` is the same code at toy sizes (the architecture families of unike.tiny):
it checks that the script works, on a CPU in about a minute; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch
import transformers
import yaml

from unike.backbones import IMAGE_TOKEN, Backbone, _check_image_token, cpu_device
from unike.cli import _torch_setup
from unike.config import edited_layers, merge_overlays, method_entry, stream_layer
from unike.grid import E_VQA, ONE_STEP, SPLIT_FILES
from unike.convert_minigpt4 import qformer_config, required_keys, vision_config
from unike.data import load_cases
from unike.editing import create_editor, parse_hparams, resolve_editor
from unike.harness import (PreEditStreams, load_pre_edit, make_sequences, pre_edit_predictions, run_sequences,
                           save_pre_edit)
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import collect_triplets, extract_hidden_states, save_hidden_states, save_triplets
from unike.tiny import TinyArch, build_tokenizer, text_config
from unike.world import WorldConfig, generate_world, vocabulary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gpu_resources.json"
PUBLISHED = ROOT / "tests" / "fixtures"  # verbatim copies of the published model configs
CONFIGS = (ROOT / "config.yaml", ROOT / "configs" / "paper.yaml")
TASK = E_VQA
METHODS = ("ft", "ke", "tpatcher", "mend", "ike", "serac", "unike")
BACKBONES = ("blip2-opt-2.7b", "minigpt4-7b")  # configs/paper.yaml's names
GIB = 2**30
MEMORY_TARGET = ("minigpt4-7b", 40.0)  # issue 3: every method on MiniGPT-4 within 40 GB (GiB here)
UNIKE_TIME_TARGETS = (("README", 1.0), ("issue 3", 2.0))  # one-step UniKE edit + evaluation, seconds


@dataclasses.dataclass(frozen=True)
class VisionSide:
    """The ViT and the Q-Former as their checkpoints' tensor shapes describe them."""

    width: int
    layers: int
    heads: int
    ffn: int
    patch: int
    image_size: int  # native (pretraining) resolution
    qformer_width: int
    qformer_layers: int
    qformer_heads: int
    qformer_ffn: int
    cross_attention_every: int
    queries: int


@dataclasses.dataclass(frozen=True)
class TextSide:
    model_type: str  # opt | llama
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int | None  # embedding rows; None: the tokenizer's size
    max_positions: int


def published_architectures() -> dict[str, tuple[VisionSide, TextSide]]:
    """The full-size architectures, read from the published configs in tests/fixtures
    (tests/fixtures/README.md: where each is from). Both backbones have BLIP-2's vision side
    (EVA ViT-g's 39 blocks, BERT-base Q-Former, 32 queries), as Salesforce/blip2-opt-2.7b's
    config.json describes it; MiniGPT-4's text side is Vicuna-7B v0's config.json plus the
    <image> row the converter adds."""
    from transformers import AutoConfig, Blip2Config

    blip2 = Blip2Config.from_pretrained(PUBLISHED / "blip2-opt-2.7b", local_files_only=True)
    v, q, opt = blip2.vision_config, blip2.qformer_config, blip2.text_config
    vision = VisionSide(width=v.hidden_size, layers=v.num_hidden_layers, heads=v.num_attention_heads,
                        ffn=v.intermediate_size, patch=v.patch_size, image_size=v.image_size,
                        qformer_width=q.hidden_size, qformer_layers=q.num_hidden_layers,
                        qformer_heads=q.num_attention_heads, qformer_ffn=q.intermediate_size,
                        cross_attention_every=q.cross_attention_frequency, queries=blip2.num_query_tokens)
    vicuna = AutoConfig.from_pretrained(PUBLISHED / "vicuna-7b-delta-v0", local_files_only=True)
    return {
        "blip2-opt-2.7b": (vision, TextSide("opt", opt.hidden_size, opt.num_hidden_layers, opt.num_attention_heads,
                                            opt.ffn_dim, opt.vocab_size, opt.max_position_embeddings)),
        "minigpt4-7b": (vision, TextSide("llama", vicuna.hidden_size, vicuna.num_hidden_layers,
                                         vicuna.num_attention_heads, vicuna.intermediate_size, vicuna.vocab_size + 1,
                                         vicuna.max_position_embeddings)),
    }


_TINY = TinyArch(text_model="opt")
TINY_VISION = VisionSide(width=_TINY.vision_hidden, layers=_TINY.vision_layers, heads=4, ffn=4 * _TINY.vision_hidden,
                         patch=_TINY.patch_size, image_size=_TINY.image_size, qformer_width=_TINY.vision_hidden,
                         qformer_layers=_TINY.qformer_layers, qformer_heads=4, qformer_ffn=4 * _TINY.vision_hidden,
                         cross_attention_every=2, queries=_TINY.num_query_tokens)
ARCHITECTURES = {
    "full": published_architectures(),
    "tiny": {name: (TINY_VISION, TextSide(kind, _TINY.hidden, _TINY.layers, _TINY.heads, _TINY.ffn, None, 256))
             for name, kind in (("blip2-opt-2.7b", "opt"), ("minigpt4-7b", "llama"))},
}
NATIVE_IMAGE_SIZE = ARCHITECTURES["full"]["blip2-opt-2.7b"][0].image_size  # both ViTs were pretrained at it

# Random-weight stand-ins for the auxiliary models the paper configuration names by path or
# package (none is on the GPU machine): (model_type, head, config fields).
STAND_INS = {
    "full": {
        "all-MiniLM-L6-v2": ("bert", "encoder", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                                     num_attention_heads=12, intermediate_size=1536,
                                                     max_position_embeddings=512)),
        "distilbert-base-cased": ("distilbert", "encoder", dict(vocab_size=28996, dim=768, n_layers=6, n_heads=12,
                                                                hidden_dim=3072, max_position_embeddings=512)),
        "opt-125m": ("opt", "causal-lm", dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                                              num_attention_heads=12, word_embed_proj_dim=768,
                                              max_position_embeddings=2048)),
    },
    "tiny": {
        "all-MiniLM-L6-v2": ("bert", "encoder", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, max_position_embeddings=512)),
        "distilbert-base-cased": ("distilbert", "encoder", dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                                max_position_embeddings=512)),
        "opt-125m": ("opt", "causal-lm", dict(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                                              word_embed_proj_dim=32, max_position_embeddings=512)),
    },
}
# (editor, hyperparameter) -> the stand-in it gets, unless its value is a built-in choice.
AUXILIARY_HPARAMS = {
    ("baselines.ike:IKE", "embedder"): ("all-MiniLM-L6-v2", ()),
    ("baselines.serac:SERAC", "classifier"): ("distilbert-base-cased", ("tiny",)),
    ("baselines.serac:SERAC", "counterfactual"): ("opt-125m", ("backbone",)),
}
# The training-loop lengths of the methods that train in `prepare`.
PREPARE_STEP_HPARAMS = {
    "baselines.ke:KnowledgeEditor": ("steps",),
    "baselines.mend:MEND": ("steps",),
    "baselines.serac:SERAC": ("cls_steps", "cf_steps"),
}
# The per-edit step limits of the methods that train until the edit is right: an
# untrained toy model never gets there, so the CPU test caps them (`--edit-steps`).
EDIT_STEP_HPARAMS = {"baselines.tpatcher:TPatcher": ("max_steps",), "unike.method.editor:UniKE": ("max_steps",)}


class Clock:
    """Wall time and peak memory of one stage; CUDA work is waited for before each reading."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        """Free what earlier stages left and restart the peak-memory counter."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def peak(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB}
        # No per-stage GPU figure on the CPU: the process's high-water RSS (ru_maxrss is in KiB).
        return {"peak_gib": None, "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def progress(message: str, t_start: float) -> None:
    print(f"[{time.time() - t_start:7.1f} s] {message}", flush=True)


# ---------------------------------------------------------------- models
def checkpoint_shapes(v: VisionSide) -> dict[str, torch.Tensor]:
    """Meta tensors named and shaped like MiniGPT-4's vision-side checkpoint entries: what
    the converter reads its vision and Q-Former configs from."""
    shapes = {
        "visual_encoder.cls_token": (1, 1, v.width),
        "visual_encoder.pos_embed": (1, (v.image_size // v.patch) ** 2 + 1, v.width),
        "visual_encoder.patch_embed.proj.weight": (v.width, 3, v.patch, v.patch),
        "visual_encoder.blocks.0.mlp.fc1.weight": (v.ffn, v.width),
        "query_tokens": (1, v.queries, v.qformer_width),
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (v.qformer_width, v.width),
        "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight": (v.qformer_ffn, v.qformer_width),
    }
    keys = required_keys(v.layers, v.qformer_layers, v.cross_attention_every)
    return {k: torch.empty(shapes.get(k, (0,)), device="meta") for k in keys}


def blip2_config(vision: VisionSide, text: TextSide, tokenizer):
    from transformers import Blip2Config

    shapes = checkpoint_shapes(vision)
    vocab = text.vocab or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"{vocab} embedding rows cannot hold the tokenizer's {len(tokenizer)} ids")
    text_side = text_config(text.model_type, text.hidden, text.layers, text.heads, text.ffn, text.max_positions,
                            tokenizer, vocab)
    return Blip2Config(vision_config=vision_config(shapes, vision.layers, vision.heads),
                       qformer_config=qformer_config(shapes, vision.qformer_heads),
                       text_config=text_side.to_dict(), num_query_tokens=vision.queries,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def build_model(config, device: torch.device | str, dtype: torch.dtype):
    """Random weights created on `device` in `dtype` (a 7B model never exists in fp32 on
    the CPU); `device="meta"` builds the architecture without memory."""
    from transformers import Blip2ForConditionalGeneration

    with torch.device(device):
        return Blip2ForConditionalGeneration._from_config(config, dtype=dtype).eval()


def parameter_counts(model) -> dict[str, int]:
    parts = {"vision": [model.vision_model], "qformer": [model.qformer], "projection": [model.language_projection],
             "language_model": [model.language_model]}
    counts = {k: sum(p.numel() for m in ms for p in m.parameters()) for k, ms in parts.items()}
    counts["qformer"] += model.query_tokens.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def write_stand_in(name: str, scale: str, tokenizer, root: Path) -> Path:
    """A random-weight model directory of `name`'s architecture, with the run's tokenizer
    (SERAC requires its counterfactual LM to share the backbone's token ids)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_type, head, fields = STAND_INS[scale][name]
    vocab = max(fields.get("vocab_size", 0), len(tokenizer))  # at least the tokenizer's ids
    config = AutoConfig.for_model(model_type, **{**fields, "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id,
                                                 "bos_token_id": tokenizer.bos_token_id,
                                                 "eos_token_id": tokenizer.eos_token_id})
    model = (AutoModelForCausalLM if head == "causal-lm" else AutoModel).from_config(config)
    path = root / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- data and methods
@dataclasses.dataclass
class Cases:
    world: WorldConfig
    train: list
    eval: list  # the first one is the warm-up edit


def make_cases(config: dict, root: Path, n_eval: int, n_train: int) -> Cases:
    """E-VQA train and eval cases of a fresh tiny world (no pretraining corpus)."""
    world = WorldConfig.from_dict({"seed": config["seed"], **config.get("world", {}), "pretrain_images_per_creature": 0,
                                   "n_pretrain_scenes": 0, "n_vqa_eval": n_eval, "n_vqa_train": n_train,
                                   "n_caption_eval": 0, "n_caption_train": 0, "n_context": 0})
    generate_world(root, world)
    return Cases(world, load_cases(root / SPLIT_FILES[(TASK, "train")], TASK, root),
                 load_cases(root / SPLIT_FILES[(TASK, "eval")], TASK, root))


@dataclasses.dataclass
class MethodSetup:
    name: str
    cls: type
    entry: dict  # editor spec and the hyperparameters used, as `create_editor` takes them
    hparams: object  # parsed, as `prepare` takes them
    recorded: dict  # every hyperparameter as used; stand-ins named by the model they stand in for
    changed: dict  # hyperparameter -> {"config": ..., "used": ...}


def method_setup(name: str, config: dict, backbone: str, prepare_steps: int, stand_in,
                 edit_steps: int = 0) -> MethodSetup:
    """The configured method as it runs on `backbone`, with its training loops cut to
    `prepare_steps` and its per-edit step limit to `edit_steps` (0: as configured), and its
    auxiliary models replaced by stand-ins (`stand_in(name) -> Path`)."""
    entry = method_entry(config, name, backbone)
    spec, values = entry["editor"], dict(entry["hparams"])
    cls = resolve_editor(spec)
    configured = dataclasses.asdict(parse_hparams(cls.Hparams, values, name))
    used, shown = {}, {}
    if prepare_steps:
        used.update({field: prepare_steps for field in PREPARE_STEP_HPARAMS.get(spec, ())})
    if edit_steps:
        used.update({field: min(edit_steps, configured[field]) for field in EDIT_STEP_HPARAMS.get(spec, ())})
    for (editor, field), (aux, builtin) in AUXILIARY_HPARAMS.items():
        if editor == spec and configured[field] not in builtin:
            used[field], shown[field] = str(stand_in(aux)), f"stand-in:{aux}"
    hparams = parse_hparams(cls.Hparams, {**values, **used}, name)
    recorded = {**dataclasses.asdict(hparams), **shown}
    return MethodSetup(name, cls, {"editor": spec, "hparams": {**values, **used}}, hparams, recorded,
                       {field: {"config": configured[field], "used": recorded[field]} for field in used})


@contextlib.contextmanager
def counting_passes(backbone: Backbone):
    """Counts forward passes of the backbone's top decoder layer, which every way of
    running the model (whole stack, cached prefix) goes through."""
    count = [0]
    handle = backbone.text.layers[-1].register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def build_knowledge(backbone: Backbone, cases: Cases, folder: Path, config: dict, n_triplets: int,
                    prepare_steps: int, clock: Clock) -> dict:
    """UniKE's knowledge folder through the DAG's own steps (collect_triplets,
    extract_hidden_states, pretrain_encoders) on the train split."""
    folder.mkdir(parents=True)
    clock.reset_peak()
    t0 = clock.now()
    triplets = collect_triplets(backbone, cases.train, n_triplets, config["data"].get("mining_max_new_tokens", 10))
    save_triplets(folder / "triplets.json", triplets)
    layers = edited_layers(config, len(backbone.text))
    states = extract_hidden_states(backbone, triplets, layers)
    save_hidden_states(folder / "hidden_states.safetensors", states, layers)
    encoders = EncoderConfig(**{"seed": config["seed"], **config.get("knowledge", {}).get("encoders", {}),
                                **({"steps": prepare_steps} if prepare_steps else {})})
    pretrain_encoders(folder, encoders)
    # UniKE moves these states to the device; a real knowledge folder holds up to n_triplets.
    state_bytes = sum(t.numel() * t.element_size() for t in states.values())
    return {"s": clock.now() - t0, **clock.peak(), "triplets": len(triplets), "edited_layers": layers,
            "encoder_steps": encoders.steps, "state_bytes_per_triplet": state_bytes // max(len(triplets), 1),
            "config_n_triplets": config.get("knowledge", {}).get("n_triplets", 15000)}


def measure_method(setup: MethodSetup, backbone: Backbone, cases: Cases, pre_edit: dict, streams: PreEditStreams,
                   knowledge: Path | None, work: Path, seed: int, clock: Clock) -> dict:
    """Prepare (if the method trains), one warm-up edit, then one-step edits of the other
    eval cases; the editor is restored and released whatever happens."""
    record: dict = {"status": "ok", "editor": setup.entry["editor"], "cases": len(cases.eval) - 1}
    stage, editor = "prepare", None
    try:
        backbone.clear_image_cache()  # each method computes its own image features, as its own job would
        prepared = None
        if setup.cls.needs_training:
            prepared = work / "prepared" / backbone.name / setup.name
            prepared.mkdir(parents=True)
            extra = {"knowledge": knowledge} if setup.cls.needs_knowledge else {}
            clock.reset_peak()
            t0 = clock.now()
            summary = setup.cls.prepare(backbone, setup.hparams, cases.train, prepared, seed, **extra)
            record["prepare"] = {"s": clock.now() - t0, **clock.peak(), "train_cases": len(cases.train),
                                 "summary": summary}
            backbone.clear_image_cache()  # editing is a job of its own in the DAG
        stage = "create"
        clock.reset_peak()
        t0 = clock.now()
        editor = create_editor(setup.entry, backbone, prepared, knowledge if setup.cls.needs_knowledge else None)
        record["create_s"] = clock.now() - t0
        stage = "edit"
        sequences = make_sequences({TASK: cases.eval}, ONE_STEP.name, seed)
        with counting_passes(backbone) as passes:
            t0 = clock.now()
            (warmup,) = run_sequences(editor, sequences[:1], pre_edit, streams=streams)
            record["warmup"] = {"edit_s": warmup["edit_s"], "s": clock.now() - t0}
            passes[0] = 0
            t0 = clock.now()
            rows = run_sequences(editor, sequences[1:], pre_edit, progress_every=5, streams=streams)
            wall = clock.now() - t0
        edit_s = [r["edit_s"] for r in rows]
        record.update({"edit_s_median": statistics.median(edit_s), "edit_s_mean": statistics.mean(edit_s),
                       "s_per_case": wall / len(rows), "top_layer_passes_per_case": passes[0] / len(rows),
                       **clock.peak()})
    except Exception as e:  # noqa: BLE001 - one method's failure (an OOM, say) must not lose the run
        traceback.print_exc()
        record.update({"status": "error", "stage": stage, "error": f"{type(e).__name__}: {e}"[:2000]})
    finally:
        if editor is not None:
            # Undo patches and hooks even after a failed edit, so later methods run on the
            # plain backbone; a second failure here changes nothing about what is recorded.
            with contextlib.suppress(Exception):
                editor.restore()
            with contextlib.suppress(Exception):
                editor.close()
        del editor
        clock.reset_peak()
    return record


# ---------------------------------------------------------------- the run
def measure_backbone(name: str, record: dict, args, config: dict, cases: Cases, tokenizer, stand_in,
                     work: Path, clock: Clock, write, t_start: float) -> None:
    """Fills `record` as it goes, so that a failure keeps what was measured."""
    setups = [method_setup(method, config, name, args.prepare_steps, stand_in, args.edit_steps)
              for method in args.methods]
    entry = config["backbones"][name]
    vision, text = ARCHITECTURES[args.scale][name]
    # The paper config's image size (364: EasyEdit's, interpolated from the native 224),
    # scaled with the vision tower's native size at tiny scale.
    image_size = round(entry.get("image_size", NATIVE_IMAGE_SIZE) * vision.image_size / NATIVE_IMAGE_SIZE)
    record.update({"prompt_style": entry["prompt_style"], "image_size": image_size,
                   "architecture": {"vision": dataclasses.asdict(vision),
                                    "text": {**dataclasses.asdict(text), "vocab": text.vocab or len(tokenizer)}},
                   "methods": {}})
    clock.reset_peak()
    t0 = clock.now()
    torch.manual_seed(config["seed"])
    model = build_model(blip2_config(vision, text, tokenizer), args.device, args.dtype)
    _check_image_token(Path(name), model, tokenizer)
    backbone = Backbone(name, model, tokenizer, entry["prompt_style"], image_size, args.device)
    record.update({"build_s": clock.now() - t0, "parameters": parameter_counts(model),
                   "model_gib": (torch.cuda.memory_allocated(clock.device) / GIB if clock.device.type == "cuda"
                                 else None)})
    progress(f"{name}: {record['parameters']['total']:,} parameters built in {record['build_s']:.1f} s", t_start)
    pre_edit_path = work / "pre_edit" / f"{name}.json"
    streams_path = work / "pre_edit" / f"{name}.streams.safetensors"  # as cache_pre_edit keeps them
    preds = pre_edit_predictions(backbone, cases.eval, (streams_path, stream_layer(config, len(backbone.text))))
    save_pre_edit(pre_edit_path, preds, name)
    pre_edit = load_pre_edit(pre_edit_path, cases.eval)
    streams = PreEditStreams([streams_path])
    knowledge = None
    if any(s.cls.needs_knowledge for s in setups):
        knowledge = work / "knowledge" / name
        record["knowledge"] = build_knowledge(backbone, cases, knowledge, config, args.triplets, args.prepare_steps,
                                              clock)
        progress(f"{name}: knowledge folder ({record['knowledge']['triplets']} triplets) in "
                 f"{record['knowledge']['s']:.1f} s", t_start)
    for setup in setups:
        progress(f"{name} / {setup.name}: measuring", t_start)
        m = measure_method(setup, backbone, cases, pre_edit, streams, knowledge, work, config["seed"], clock)
        record["methods"][setup.name] = {**m, "hparams": setup.recorded, "changed_hparams": setup.changed}
        write()
        if m["status"] == "ok":
            peak = "" if m["peak_gib"] is None else f", peak {m['peak_gib']:.2f} GiB"
            progress(f"{name} / {setup.name}: {m['s_per_case']:.3f} s per edit incl. evaluation "
                     f"(edit {m['edit_s_median']:.3f} s){peak}", t_start)
        else:
            progress(f"{name} / {setup.name}: FAILED at {m['stage']}: {m['error'][:200]}", t_start)


def target_checks(result: dict) -> list[dict]:
    """The issue's targets against the measurements; `pass` is null where they do not apply
    (tiny scale, no GPU) or nothing was measured."""
    applies = result["scale"] == "full" and result["device_type"] == "cuda"
    checks = []
    backbone, limit = MEMORY_TARGET
    for method, m in result["backbones"].get(backbone, {}).get("methods", {}).items():
        peaks = [x for x in (m.get("peak_gib"), m.get("prepare", {}).get("peak_gib")) if x is not None]
        value = max(peaks) if peaks and m["status"] == "ok" else None
        checks.append({"target": f"peak GPU memory <= {limit:g} GiB (issue 3)", "backbone": backbone,
                       "method": method, "value": value, "limit": limit, "unit": "GiB",
                       "pass": value <= limit if applies and value is not None else None})
    for backbone, b in result["backbones"].items():
        m = b.get("methods", {}).get("unike")
        if m is None:
            continue
        value = m.get("s_per_case") if m["status"] == "ok" else None
        for source, limit in UNIKE_TIME_TARGETS:
            checks.append({"target": f"one-step edit + evaluation <= {limit:g} s ({source})", "backbone": backbone,
                           "method": "unike", "value": value, "limit": limit, "unit": "s",
                           "pass": value <= limit if applies and value is not None else None})
    return checks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="default: bfloat16 on a GPU (the paper config's), float32 on the CPU; bfloat16 on the "
                             "CPU runs the GPU's half-precision path (tests/test_gpu_resources.py does)")
    parser.add_argument("--cases", type=int, default=10, help="timed one-step edits per method (after one warm-up)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="method names of the paper config")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--edit-steps", type=int, default=0,
                        help="cap on the per-edit step limit of T-Patcher and UniKE (0: as configured; "
                             "the CPU test's untrained toy models never get an edit right)")
    parser.add_argument("--prepare-steps", type=int, default=20,
                        help="steps of the training loops in prepare (KE, MEND, SERAC) and of UniKE's encoders "
                             "(0: as configured, e.g. MEND's 20000)")
    parser.add_argument("--train-cases", type=int, default=220,
                        help="train split for prepare (220 fill T-Patcher's 40000-token memory on both backbones)")
    parser.add_argument("--triplets", type=int, default=64, help="UniKE knowledge triplets")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the paper config's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    args.device = torch.device(args.device)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    return args


def load_paper_config() -> dict:
    # Snakemake's --configfile merge. Not schema-validated here: the GPU machine has no
    # jsonschema, and each method's hyperparameters are still checked by `parse_hparams`.
    return merge_overlays(*(yaml.safe_load(p.read_text(encoding="utf-8")) for p in CONFIGS))


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = load_paper_config()
    unknown = sorted(set(args.methods) - set(config["methods"]))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; the paper config has {sorted(config['methods'])}")
    _torch_setup({"threads": args.threads or config["threads"], "seed": config["seed"]})  # as every DAG job does
    clock = Clock(args.device)
    device_name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                   else cpu_device(torch.get_num_threads()))
    result = {
        "scale": args.scale, "device": device_name, "device_type": args.device.type,
        "dtype": str(args.dtype).removeprefix("torch."), "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "complete": False, "config": [str(p.relative_to(ROOT)) for p in CONFIGS], "task": TASK,
        "cases": args.cases, "warmup_cases": 1, "train_cases": args.train_cases, "prepare_steps": args.prepare_steps,
        "edit_steps": args.edit_steps,
        "notes": {
            "weights": "random: speed and memory do not depend on them, except for methods that stop once the edit "
                       "is right (UniKE, T-Patcher): top_layer_passes_per_case shows how many steps ran",
            "tokenizer": "the tiny world's word-level tokenizer, not BPE / SentencePiece: token counts of prompts "
                         "and answers are similar, not equal",
            "prepare": "KE, MEND and SERAC trained for prepare_steps steps in prepare, UniKE's encoders too: "
                       "their peak memory and cost per step are a full run's, their prepare time is not "
                       "(T-Patcher, IKE and UniKE prepare without a training loop)",
            "memory": ("torch.cuda.max_memory_allocated, reset before each stage (prepare; editor creation and "
                       "edits)" if args.device.type == "cuda" else
                       "no GPU: peak_gib is null; process_peak_rss_gib is the process's high-water mark so far"),
            "s_per_case": "wall time of run_sequences over the timed cases (edit, five scored inputs as one "
                          "batch, scoring, restore) divided by their number; edit_s is the harness's own edit timing",
        },
        "stand_ins": {}, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                      "transformers": transformers.__version__},
        "backbones": {},
    }

    def write() -> None:
        result["wall_s"] = time.time() - t_start
        result["checks"] = target_checks(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Not sorted: methods stay in the order they ran.
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="gpu_resources_") as tmp:
        work = Path(tmp)
        cases = make_cases(config, work / "world", args.cases + 1, args.train_cases)
        tokenizer = build_tokenizer(vocabulary(cases.world))
        stand_in_paths: dict[str, Path] = {}

        def stand_in(aux: str) -> Path:
            if aux not in stand_in_paths:
                stand_in_paths[aux] = write_stand_in(aux, args.scale, tokenizer, work / "stand_ins")
                model_type, _, fields = STAND_INS[args.scale][aux]
                result["stand_ins"][aux] = {"model_type": model_type, **fields, "weights": "random, float32"}
            return stand_in_paths[aux]

        result["tokenizer_size"] = len(tokenizer)
        progress(f"{len(cases.train)} train / {len(cases.eval)} eval cases; methods {args.methods}; "
                 f"{args.scale} size on {device_name}, {result['dtype']}", t_start)
        for name in args.backbones:
            record = result["backbones"][name] = {}
            try:
                measure_backbone(name, record, args, config, cases, tokenizer, stand_in, work, clock, write, t_start)
            except Exception as e:  # noqa: BLE001 - e.g. an OOM building the model: go on with the next
                traceback.print_exc()
                record["error"] = f"{type(e).__name__}: {e}"[:2000]
                progress(f"{name}: FAILED: {e}", t_start)
            clock.reset_peak()  # the backbone is released before the next is built
            write()
    result["complete"] = True
    write()
    for check in result["checks"]:
        progress(f"target {check['backbone']} / {check['method']}: {check['target']}: value {check['value']} "
                 f"-> {check['pass']}", t_start)
    progress(f"written {args.out}", t_start)


if __name__ == "__main__":
    main()
