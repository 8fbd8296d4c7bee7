"""Backbones: a `Blip2ForConditionalGeneration` plus what editing needs around it.

Both paper backbones (BLIP-2 OPT and MiniGPT-4) and their tiny stand-ins are the same
transformers class with an OPT or a LLaMA text model; they differ only in the prompt
wrapper and in the names of the text model's parts. Everything model-specific lives in
`TextStack`, so editors never branch on the architecture.

Inputs are `Sample`s (image path or None, prompt, answer). `Backbone.encode` turns a list
of them into one right-padded `Batch` in which image rows and text-only rows mix freely:
image features are written into the placeholder positions of the rows that have an image.
Image features come from a cache keyed by path, because no method edits the vision side.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from unike.data import Sample
from unike.resources import resolve_dtype

log = logging.getLogger(__name__)
PromptStyle = Literal["blip2", "minigpt4"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
MINIGPT4_BEFORE_IMAGE = "###Human: <Img>"
MINIGPT4_AFTER_IMAGE = "</Img> "


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    answer_mask: torch.Tensor  # (B, T) True on answer tokens
    image_rows: list[int]  # rows holding image placeholders, in order
    images: list[Path]  # one per image row
    image_features: torch.Tensor | None = None  # (len(image_rows), Q, D), filled by Backbone

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def answer_targets(self) -> list[torch.Tensor]:
        """Per row, the answer token ids (what teacher forcing must predict)."""
        return [self.input_ids[i][self.answer_mask[i]] for i in range(len(self))]


@dataclass
class Prefix:
    """Residual stream entering decoder layer `layer`, plus the kwargs that layer was
    called with (causal mask, positions, rotary tables): enough to run the rest of the
    stack without recomputing the layers below."""

    layer: int
    hidden: torch.Tensor
    layer_kwargs: dict = field(repr=False)


@dataclass
class Stream:
    """The residual stream (B, T, d) entering decoder layer `layer` for one batch, computed
    before any edit (the pre-edit cache, `unike.harness.PreEditStreams`): for an editor that
    changes nothing below `layer`, the layers below compute it again after every edit, so
    scoring may start there (`Backbone.logits`)."""

    layer: int
    hidden: torch.Tensor


class _StopForward(Exception):
    pass


class TextStack:
    """Uniform access to the decoder of an OPT or LLaMA causal LM."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.kind = lm.config.model_type
        if self.kind == "opt":
            decoder = lm.model.decoder
            self.layers = decoder.layers
            self._final = [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]
        elif self.kind == "llama":
            self.layers = lm.model.layers
            self._final = [lm.model.norm]
        else:
            raise ValueError(f"unsupported text model type {self.kind!r} (expected opt or llama)")

    def __len__(self) -> int:
        return len(self.layers)

    def ffn_linears(self, layer: int) -> dict[str, nn.Linear]:
        """The FFN's input projections ("in") and output projection ("out") of one layer."""
        block = self.layers[layer]
        if self.kind == "opt":
            return {"in.fc1": block.fc1, "out.fc2": block.fc2}
        mlp = block.mlp
        return {"in.gate_proj": mlp.gate_proj, "in.up_proj": mlp.up_proj, "out.down_proj": mlp.down_proj}

    def ffn_io(self, layer: int) -> tuple[nn.Module, nn.Module]:
        """The module whose input is the FFN's input and the one whose output is the FFN's
        output (OPT: fc1 and fc2; LLaMA: the MLP, both)."""
        block = self.layers[layer]
        return (block.fc1, block.fc2) if self.kind == "opt" else (block.mlp, block.mlp)

    def ffn_residual_module(self, layer: int) -> nn.Module:
        """The module whose input is what the layer adds its FFN's output to (the stream
        after attention): the FFN's norm, or OPT-350m's (post-norm) fc1."""
        block = self.layers[layer]
        if self.kind == "llama":
            return block.post_attention_layernorm
        return block.final_layer_norm if block.do_layer_norm_before else block.fc1

    def finish_layer(self, layer: int, residual: torch.Tensor, ffn_output: torch.Tensor,
                     shape: torch.Size) -> torch.Tensor:
        """Decoder layer `layer`'s output (`shape`) from the two inputs of its last residual
        addition, with the same operations as the layer's own forward (bit-identical)."""
        if self.kind == "llama":
            return residual + ffn_output
        block = self.layers[layer]
        hidden = (residual + ffn_output).view(shape)
        return hidden if block.do_layer_norm_before else block.final_layer_norm(hidden)

    def ffn_parameters(self, layer: int) -> dict[str, nn.Parameter]:
        prefix = f"layers.{layer}."
        return {
            prefix + name.split(".", 1)[1] + "." + pname: p
            for name, lin in self.ffn_linears(layer).items()
            for pname, p in lin.named_parameters()
        }

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self._final:
            hidden = module(hidden)
        return self.lm.lm_head(hidden)


class Backbone:
    def __init__(self, name: str, model, tokenizer, prompt_style: PromptStyle, image_size: int, device: str = "cpu",
                 requested_dtype: str | None = None):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.image_size = image_size
        self.device = torch.device(device)
        self.text = TextStack(model.language_model)
        # What the config asked for; `dtype` may differ (the CPU's float32 fallback).
        self.requested_dtype = requested_dtype or str(self.dtype).removeprefix("torch.")
        self.num_query_tokens = model.config.num_query_tokens
        self.image_token_id = model.config.image_token_id
        self.bos_id = tokenizer.bos_token_id
        self._feature_cache: dict[Path, torch.Tensor] = {}
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the text model runs in: that of everything an editor adds to it
        (the vision side may differ: in float16 transformers keeps the Q-Former in float32)."""
        return self.text.lm.dtype

    # ---------------------------------------------------------------- tokenization
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_answer_ids(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        full = self._ids(prompt + " " + answer)
        head = self._ids(prompt)
        if full[: len(head)] != head or len(full) == len(head):
            raise ValueError(
                f"prompt/answer boundary is not a clean token boundary: {prompt!r} + {answer!r} "
                f"tokenizes as {full} but the prompt alone as {head}"
            )
        return head, full[len(head):]

    def sample_ids(self, sample: Sample) -> tuple[list[int], int]:
        """Token ids of one sample and the index where its answer starts."""
        prompt, answer = self._prompt_answer_ids(sample.prompt, sample.answer)
        if sample.image is None:
            ids = [self.bos_id] + prompt
        elif self.prompt_style == "blip2":
            # BLIP-2 OPT: query embeddings first, then BOS and the text.
            ids = [self.image_token_id] * self.num_query_tokens + [self.bos_id] + prompt
        else:
            # MiniGPT-4: "###Human: <Img>" + image embeds + "</Img> " + text. The text after
            # the image is tokenized on its own, as MiniGPT-4 does with its segments.
            prompt, answer = self._prompt_answer_ids(MINIGPT4_AFTER_IMAGE + sample.prompt, sample.answer)
            ids = ([self.bos_id] + self._ids(MINIGPT4_BEFORE_IMAGE)
                   + [self.image_token_id] * self.num_query_tokens + prompt)
        return ids + answer, len(ids)

    def encode(self, samples: list[Sample], with_eos: bool = False) -> Batch:
        rows, starts = zip(*(self.sample_ids(s) for s in samples))
        if with_eos:
            rows = [r + [self.tokenizer.eos_token_id] for r in rows]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        answer = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, s) in enumerate(zip(rows, starts)):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
            answer[i, s : len(r)] = True
        image_rows = [i for i, s in enumerate(samples) if s.image is not None]
        batch = Batch(input_ids, attention, answer, image_rows, [samples[i].image for i in image_rows])
        n_placeholders = int((input_ids == self.image_token_id).sum())
        assert n_placeholders == len(image_rows) * self.num_query_tokens, "image placeholder count mismatch"
        return batch

    # ---------------------------------------------------------------- images
    def load_pixels(self, paths: list[Path]) -> torch.Tensor:
        """BLIP-2's eval preprocessing (LAVIS `BlipImageEvalProcessor`, also EasyEdit's):
        RGB, bicubic resize of the whole image to `image_size` x `image_size` (no crop),
        scale to [0, 1], normalise with the CLIP mean and std."""
        mean = np.array(CLIP_MEAN, dtype=np.float32)
        std = np.array(CLIP_STD, dtype=np.float32)
        arrays = []
        for path in paths:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
                arrays.append((np.asarray(im, dtype=np.float32) / 255.0 - mean) / std)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def image_features(self, paths: list[Path]) -> torch.Tensor:
        """Projected Q-Former outputs, (len(paths), num_query_tokens, text hidden), cached
        by path. At an `image_size` other than the vision tower's native one (EasyEdit's
        364 on a 224 model) the ViT position embeddings are interpolated (bicubic)."""
        missing = list(dict.fromkeys(p for p in paths if p not in self._feature_cache))
        if missing:
            vision_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
            pixels = self.load_pixels(missing).to(self.device, vision_dtype)
            interpolate = self.image_size != self.model.config.vision_config.image_size
            feats = self.model.get_image_features(pixels, interpolate_pos_encoding=interpolate).pooler_output
            self._feature_cache.update(zip(missing, feats))
        return torch.stack([self._feature_cache[p] for p in paths])

    def clear_image_cache(self) -> None:
        self._feature_cache.clear()

    # ---------------------------------------------------------------- forward
    def to_device(self, batch: Batch) -> Batch:
        if batch.image_rows and batch.image_features is None:
            batch.image_features = self.image_features(batch.images)
        batch.input_ids = batch.input_ids.to(self.device)
        batch.attention_mask = batch.attention_mask.to(self.device)
        batch.answer_mask = batch.answer_mask.to(self.device)
        return batch

    def input_embeds(self, batch: Batch) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        if batch.image_rows:
            mask = (batch.input_ids == self.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, batch.image_features.to(embeds.dtype))
        return embeds

    def logits(self, batch: Batch, stream: Stream | None = None) -> torch.Tensor:
        """Logits (B, T, V) of the whole model, or only of the layers from `stream.layer`
        up, started from `stream` (the batch's own, computed before: bit-identical to
        running the layers below, which that stream's user has not edited)."""
        if stream is not None:
            return self.logits_from(self.stream_prefix(batch, stream))
        batch = self.to_device(batch)
        out = self.text.lm(inputs_embeds=self.input_embeds(batch), attention_mask=batch.attention_mask)
        return out.logits

    def _layer_input(self, embeds: torch.Tensor, attention_mask: torch.Tensor, layer: int
                     ) -> tuple[torch.Tensor, dict]:
        """Run the stack only up to decoder layer `layer`: its input and the kwargs it gets."""
        captured = {}

        def grab(_module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            # No KV cache: replaying the layers must not append to a cache on every call.
            captured["kwargs"] = {k: v for k, v in kwargs.items()
                                  if k not in ("hidden_states", "cache", "past_key_values", "past_key_value")}
            captured["kwargs"]["use_cache"] = False
            raise _StopForward

        handle = self.text.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.text.lm(inputs_embeds=embeds, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]

    @torch.no_grad()
    def prefix(self, batch: Batch, layer: int) -> Prefix:
        """Run the stack only up to decoder layer `layer` and capture its input."""
        batch = self.to_device(batch)
        hidden, kwargs = self._layer_input(self.input_embeds(batch), batch.attention_mask, layer)
        return Prefix(layer, hidden, kwargs)

    @torch.no_grad()
    def stream_prefix(self, batch: Batch, stream: Stream) -> Prefix:
        """`stream` as the prefix of `batch` at its layer. Every decoder layer gets the same
        kwargs (causal mask, positions, rotary tables), which depend on the token ids and
        the mask, not on the embeddings' values: they come from the bare token embeddings,
        so neither the vision side nor any layer runs."""
        if tuple(stream.hidden.shape[:2]) != tuple(batch.input_ids.shape):
            raise ValueError(f"{self.name}: a cached stream of {tuple(stream.hidden.shape[:2])} tokens does not fit "
                             f"a batch of {tuple(batch.input_ids.shape)} (a stale pre-edit cache: rerun cache_pre_edit)")
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        _, kwargs = self._layer_input(self.model.get_input_embeddings()(ids), mask, 0)
        return Prefix(stream.layer, stream.hidden.to(self.device), kwargs)

    def logits_from(self, prefix: Prefix) -> torch.Tensor:
        hidden = prefix.hidden
        for block in self.text.layers[prefix.layer:]:
            hidden = block(hidden, **prefix.layer_kwargs)
        return self.text.head(hidden)

    def logits_above(self, prefix: Prefix, layer_output: torch.Tensor) -> torch.Tensor:
        """`logits_from(prefix)` given the output of layer `prefix.layer` (which its caller
        knows without running the layer): only the layers above it run."""
        return self.logits_from(Prefix(prefix.layer + 1, layer_output, prefix.layer_kwargs))

    @torch.no_grad()
    def greedy(self, samples: list[Sample], max_new_tokens: int = 12) -> list[str]:
        """Greedy answers to the samples' prompts (their `answer` is ignored). Prompts of
        equal token length (and image presence) are decoded together, without padding."""
        eos = self.tokenizer.eos_token_id
        prompts = []
        for sample in samples:
            ids, start = self.sample_ids(Sample(sample.image, sample.prompt, "x"))
            prompts.append(ids[:start])
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (ids, sample) in enumerate(zip(prompts, samples)):
            groups.setdefault((len(ids), sample.image is not None), []).append(i)
        answers: list[str] = [""] * len(samples)
        for (_, has_image), members in groups.items():
            ids = torch.tensor([prompts[i] for i in members], device=self.device)
            images = [samples[i].image for i in members] if has_image else []
            feats = self.image_features(images) if has_image else None
            done = torch.zeros(len(members), dtype=torch.bool, device=self.device)
            new = []
            for _ in range(max_new_tokens):
                batch = Batch(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool),
                              list(range(len(members))) if has_image else [], images, feats)
                nxt = self.logits(batch)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                new.append(nxt)
                done |= nxt == eos
                if bool(done.all()):
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            tokens = torch.stack(new, dim=1).tolist()
            for i, row in zip(members, tokens):
                row = row[: row.index(eos)] if eos in row else row
                answers[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return answers


def cpu_name() -> str:
    """The CPU's model name where Linux tells it, else the architecture. Provenance: float
    sums, and through pretraining the tiny backbones themselves, differ between CPU models
    (docs/tiny-world.md, "Machines")."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def cpu_device(threads: int) -> str:
    return f"cpu {cpu_name()} x{threads} threads"


def answer_predictions(logits: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Per row, the argmax prediction at each answer position (teacher forcing)."""
    pred = logits[:, :-1].argmax(-1)
    mask = batch.answer_mask[:, 1:]
    return [pred[i][mask[i]] for i in range(len(batch))]


BACKBONE_META = "unike_backbone.json"
# The prompt wrapper each text model is paired with in the paper (used when neither the
# config nor unike_backbone.json names one: an untouched Hugging Face BLIP-2 OPT folder).
PROMPT_STYLE_OF_TEXT_MODEL: dict[str, PromptStyle] = {"opt": "blip2", "llama": "minigpt4"}


def backbone_settings(path: Path, model_config, entry: dict | None = None) -> dict:
    """Prompt style and image size of a backbone directory.

    Sources, strongest first: the config's backbone entry (`prompt_style`, `image_size`),
    the directory's `unike_backbone.json` (written by `save_backbone`: tiny backbones and
    the converted MiniGPT-4), then what the model itself says (text model type, native
    vision resolution). A prompt style that contradicts unike_backbone.json is an error.
    """
    path = Path(path)
    entry = entry or {}
    meta_path = path / BACKBONE_META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    text_type = model_config.text_config.model_type
    if entry.get("prompt_style") and meta.get("prompt_style") and entry["prompt_style"] != meta["prompt_style"]:
        raise ValueError(f"{path}: the config asks for prompt style {entry['prompt_style']!r} but "
                         f"{meta_path} says {meta['prompt_style']!r}")
    style = entry.get("prompt_style") or meta.get("prompt_style") or PROMPT_STYLE_OF_TEXT_MODEL.get(text_type)
    if style not in PROMPT_STYLE_OF_TEXT_MODEL.values():
        raise ValueError(f"{path}: no prompt style for text model {text_type!r}; set prompt_style in the config")
    native = model_config.vision_config.image_size
    image_size = int(entry.get("image_size") or meta.get("image_size") or native)
    source = ("config entry" if entry.get("image_size") else BACKBONE_META if meta.get("image_size")
              else "native size of the vision tower")
    patch = model_config.vision_config.patch_size
    if image_size % patch:
        raise ValueError(f"{path}: image_size {image_size} is not a multiple of the patch size {patch}")
    return {"prompt_style": style, "image_size": image_size, "native_image_size": native, "image_size_from": source}


def _is_placeholder_token(tokenizer, token_id: int) -> bool:
    """A special or added token: matched whole, never produced by splitting ordinary text."""
    return token_id in tokenizer.all_special_ids or token_id in tokenizer.added_tokens_decoder


def _check_image_token(path: Path, model, tokenizer) -> None:
    """The image placeholder id must exist in the model and be a token no text produces."""
    token_id = model.config.image_token_id
    if token_id is None:
        # Snapshots of Salesforce/blip2-opt-2.7b from before the hub added <image>: add the
        # token; it must fit in the existing embedding rows (OPT pads its vocabulary).
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        model.config.image_token_id = token_id
    rows = model.get_input_embeddings().weight.shape[0]
    if not 0 <= token_id < rows:
        raise ValueError(f"{path}: image_token_id {token_id} is outside the text embeddings ({rows} rows); "
                         "use a current snapshot of the model (its config sets image_token_index)")
    if token_id < len(tokenizer) and not _is_placeholder_token(tokenizer, token_id):
        raise ValueError(f"{path}: image_token_id {token_id} ({tokenizer.convert_ids_to_tokens(token_id)!r}) "
                         "is an ordinary token that text can produce; it must be an added placeholder token")


def load_backbone(name: str, path: Path, device: str = "cpu", dtype: str = "float32", *,
                  entry: dict | None = None, cpu_float32_fallback: bool = True) -> Backbone:
    """Load a backbone directory: one path for tiny backbones (`save_backbone`), the
    converted MiniGPT-4 (`unike.convert_minigpt4`) and untouched Hugging Face folders such
    as Salesforce/blip2-opt-2.7b (no unike_backbone.json).

    `entry` is the config's backbone entry: its `prompt_style`, `image_size` and `dtype`
    win over the directory's metadata and over `dtype`. A half dtype on the CPU loads in
    float32 unless `cpu_float32_fallback` is off (`resolve_dtype`); the backbone records
    the dtype asked for (`requested_dtype`) beside the one it runs in (`dtype`). Offline
    only: nothing is downloaded (HF_HUB_OFFLINE=1, local files only).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    path = Path(path)
    entry = entry or {}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json is missing: {path} is not a Blip2ForConditionalGeneration "
                                "directory (see docs/real-backbones.md)")
    requested = entry.get("dtype", dtype)
    dtype = resolve_dtype(requested, device, cpu_float32_fallback)
    if dtype != requested:
        log.info("dtype %s requested on %s: loading in float32 (cpu_float32_fallback)", requested, device)
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype),
                                                          local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    settings = backbone_settings(path, model.config, entry)
    _check_image_token(path, model, tokenizer)
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no BOS token")
    log.info("%s: %s, prompt style %s, %d px images (%s; native %d), %s on %s", name, path,
             settings["prompt_style"], settings["image_size"], settings["image_size_from"],
             settings["native_image_size"], dtype, device)
    return Backbone(name, model, tokenizer, settings["prompt_style"], settings["image_size"], device,
                    requested_dtype=requested)


def save_backbone(backbone_dir: Path, model, tokenizer, prompt_style: PromptStyle, image_size: int, extra: dict) -> None:
    """Write a backbone directory `load_backbone` reads: `save_pretrained` weights and
    tokenizer plus unike_backbone.json (prompt style, default image size, provenance)."""
    backbone_dir = Path(backbone_dir)
    model.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    meta = {"prompt_style": prompt_style, "image_size": image_size, **extra}
    (backbone_dir / BACKBONE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
