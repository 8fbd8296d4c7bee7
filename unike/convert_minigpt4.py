"""MiniGPT-4 (Vicuna-7B v0) as one `Blip2ForConditionalGeneration` directory.

MiniGPT-4 is BLIP-2's vision side (EVA ViT-g + `ln_vision` + Q-Former with 32 queries)
feeding Vicuna through one linear layer (`llama_proj`). It ships as four pieces, loaded in
this order by MiniGPT-4 (later pieces win where they overlap):

1. `eva_vit_g.pth`                 EVA-CLIP-g's visual tower, a flat state dict: `cls_token`,
                                   `pos_embed`, `patch_embed.*`, 40 `blocks.N.*` (MiniGPT-4 builds
                                   39) and the final `norm.*` and CLIP projection `head.*`, which
                                   MiniGPT-4's ViT does not have
2. `blip2_pretrained_flant5xxl.pth` LAVIS' BLIP-2 FlanT5-XXL pretraining checkpoint,
                                   `{"model": ...}` with the parameters that were trained:
                                   `ln_vision`, `query_tokens`, the Q-Former without its text
                                   branch, and `t5_proj` (the projection into FlanT5, unused
                                   here), plus the Q-Former's `position_ids` buffer
3. `prerained_minigpt4_7b.pth`     (sic) MiniGPT-4 stage 2 as its runner saves a checkpoint:
                                   `{"model", "optimizer", "config", "scaler", "epoch"}`; "model"
                                   holds `llama_proj` (the one trained layer) and the buffers of
                                   the frozen modules: `Qformer.bert.embeddings.position_ids` and
                                   one RoPE `inv_freq` per LLaMA layer
4. Vicuna-7B v0                    a Hugging Face LLaMA directory (weights + tokenizer)

Transformers' Blip2 is the same architecture, so the conversion is a renaming
(docs/real-backbones.md has the table) plus two adaptations: EVA's separate `q_bias` and
`v_bias` become the fused `qkv.bias` (zeros for k, as EVA computes it), and the tokenizer
gets an `<image>` placeholder token (embedding and LM-head rows set to the mean of the
existing rows, so it can never be the argmax). Every tensor MiniGPT-4 uses must land
somewhere and every weight of the converted model must come from a checkpoint: anything
else is an error naming the keys. Only the entries of the real files that MiniGPT-4 never
uses (listed in `UNUSED`) are skipped, and the skipped names are recorded in
unike_backbone.json. The RoPE buffers are skipped too (transformers recomputes them from
the Vicuna config), after checking that they equal what it computes.

Nothing here downloads anything; checkpoints are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EVA_DEPTH = 39  # MiniGPT-4's create_eva_vit_g builds 39 blocks: EVA-CLIP-g's last block is not used
EVA_HEAD_DIM = 88  # EVA ViT-g: 1408 wide, 16 heads
EVA_LAYER_NORM_EPS = 1e-6
QFORMER_HEAD_DIM = 64  # BERT-base: 768 wide, 12 heads
QFORMER_LAYER_NORM_EPS = 1e-12
LLM_DTYPE = "float16"  # Vicuna v0 is distributed in fp16; stored as is (lossless)
# MiniGPT-4 (April 2023) registered LLaMA's inv_freq as a persistent buffer and saves buffers.
_ROPE_BUFFER = re.compile(r"llama_model\.model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")

# Entries of the real files that MiniGPT-4 loads (strict=False) but never uses.
UNUSED: list[tuple[str, str]] = [
    (r"visual_encoder\.(norm|head)\.(weight|bias)",
     "EVA-CLIP's final norm and CLIP projection head (commented out in MiniGPT-4's ViT)"),
    (r"t5_proj\.(weight|bias)", "BLIP-2's projection into FlanT5 (MiniGPT-4 has llama_proj instead)"),
    (r"Qformer\.bert\.embeddings\.position_ids",
     "Q-Former text position ids (buffer; only the query tokens enter the Q-Former)"),
    (_ROPE_BUFFER.pattern, "LLaMA RoPE buffer (transformers recomputes it from the Vicuna config; checked equal)"),
]
# MiniGPT-4 loaded the RoPE buffers from Vicuna's weight files, which FastChat's apply_delta
# writes in float16, so their values are compared at fp16 resolution.
ROPE_RTOL = torch.finfo(torch.float16).eps


class ConversionError(ValueError):
    """A checkpoint that does not fit MiniGPT-4: the message names the keys and files."""


@dataclass
class Sources:
    eva_vit: Path
    qformer: Path
    minigpt4: Path
    vicuna: Path


@dataclass
class Mapped:
    """The converted vision-side state dict and where each original tensor went."""

    state: dict[str, torch.Tensor]
    landed: dict[str, str]  # original key -> converted key
    skipped: dict[str, str] = field(default_factory=dict)  # original key -> reason
    origin: dict[str, str] = field(default_factory=dict)  # original key -> source file


# ------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, unwrapped from the `{"model": ..., ...}` dict LAVIS' and
    MiniGPT-4's runners save (its optimizer, config, scaler and epoch are not needed)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - e.g. pickled objects other than tensors
        raise ConversionError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: non-tensor entries {sorted(bad)[:10]}")
    return obj


def merge_sources(eva: dict, qformer: dict, minigpt4: dict, names: tuple[str, str, str]) -> tuple[dict, dict]:
    """MiniGPT-4's namespace in its load order: the EVA weights under `visual_encoder.`,
    then the Q-Former checkpoint, then the MiniGPT-4 checkpoint (later ones win)."""
    merged, origin = {}, {}
    for prefix, sd, name in (("visual_encoder.", eva, names[0]), ("", qformer, names[1]), ("", minigpt4, names[2])):
        for k, v in sd.items():
            key = prefix + k
            if key in merged:
                log.info("%s overrides %s from %s (MiniGPT-4's load order)", name, key, origin[key])
            merged[key], origin[key] = v, name
    return merged, origin


# ------------------------------------------------------------------------ key mapping
_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight", "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_FIXED = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
    "query_tokens": "query_tokens",
    "Qformer.bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
    "Qformer.bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
    "llama_proj.weight": "language_projection.weight",
    "llama_proj.bias": "language_projection.bias",
}
_QFORMER_LAYER = re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)")
_QFORMER_PARTS = [  # (original prefix, converted prefix) inside one layer
    ("attention.self.", "attention.attention."),
    ("attention.output.", "attention.output."),
    ("crossattention.self.", "crossattention.attention."),
    ("crossattention.output.", "crossattention.output."),
    ("intermediate_query.", "intermediate_query."),
    ("output_query.", "output_query."),
]
_QFORMER_LEAVES = {"query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias",
                   "dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"}


def hf_key(key: str, vision_layers: int) -> str | None:
    """The converted key of one MiniGPT-4 key, or None (q_bias / v_bias are fused apart)."""
    if key in _FIXED:
        return _FIXED[key]
    m = _BLOCK.fullmatch(key)
    if m and int(m.group(1)) < vision_layers and m.group(2) in _BLOCK_PARTS:
        return f"vision_model.encoder.layers.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}"
    m = _QFORMER_LAYER.fullmatch(key)
    if m:
        for src, dst in _QFORMER_PARTS:
            if m.group(2).startswith(src) and m.group(2)[len(src):] in _QFORMER_LEAVES:
                return f"qformer.encoder.layer.{m.group(1)}.{dst}{m.group(2)[len(src):]}"
    return None


def unused_reason(key: str, vision_layers: int, ignore: tuple[str, ...] = ()) -> str | None:
    m = _BLOCK.fullmatch(key)
    if m and int(m.group(1)) >= vision_layers:
        return f"EVA block beyond MiniGPT-4's depth {vision_layers}"
    for pattern, reason in UNUSED:
        if re.fullmatch(pattern, key):
            return reason
    for pattern in ignore:
        if fnmatchcase(key, pattern):
            return f"ignored on request ({pattern})"
    return None


def map_vision_side(merged: dict[str, torch.Tensor], vision_layers: int, origin: dict[str, str] | None = None,
                    ignore: tuple[str, ...] = ()) -> Mapped:
    """Rename MiniGPT-4's vision side to Blip2ForConditionalGeneration keys (float32)."""
    out = Mapped({}, {}, origin=dict(origin or {}))
    unexpected = []
    fused: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in merged.items():
        reason = unused_reason(key, vision_layers, ignore)
        if reason:
            out.skipped[key] = reason
            continue
        m = _BLOCK.fullmatch(key)
        if m and m.group(2) in ("attn.q_bias", "attn.v_bias"):
            fused.setdefault(int(m.group(1)), {})[m.group(2)[5]] = value
            out.landed[key] = f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"
            continue
        target = hf_key(key, vision_layers)
        if target is None:
            unexpected.append(key)
            continue
        out.state[target] = value.float()
        out.landed[key] = target
    if unexpected:
        raise ConversionError(f"unexpected keys ({len(unexpected)}; not part of MiniGPT-4, pass ignore patterns "
                              "to skip them on purpose): "
                              + "; ".join(f"{k} (from {out.origin.get(k, '?')})" for k in sorted(unexpected)))
    for layer, parts in sorted(fused.items()):
        if set(parts) != {"q", "v"}:
            lacking = "q_bias" if "q" not in parts else "v_bias"
            raise ConversionError(f"missing key visual_encoder.blocks.{layer}.attn.{lacking}")
        q, v = parts["q"].float(), parts["v"].float()
        out.state[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def required_keys(vision_layers: int, qformer_layers: int, cross_frequency: int) -> dict[str, str]:
    """Every original key MiniGPT-4 uses -> the file it is expected in."""
    eva, qf, mg = "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "prerained_minigpt4_7b.pth"
    keys = {k: eva for k in ("visual_encoder.cls_token", "visual_encoder.pos_embed",
                             "visual_encoder.patch_embed.proj.weight", "visual_encoder.patch_embed.proj.bias")}
    for i in range(vision_layers):
        for part in [*_BLOCK_PARTS, "attn.q_bias", "attn.v_bias"]:
            keys[f"visual_encoder.blocks.{i}.{part}"] = eva
    keys.update({k: qf for k in ("ln_vision.weight", "ln_vision.bias", "query_tokens",
                                 "Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.embeddings.LayerNorm.bias")})
    for i in range(qformer_layers):
        for src, _ in _QFORMER_PARTS:
            if src.startswith("crossattention.") and i % cross_frequency:
                continue
            leaves = ("query", "key", "value") if src.endswith("self.") else ("dense", "LayerNorm")
            if src == "intermediate_query.":
                leaves = ("dense",)
            for leaf in leaves:
                for kind in ("weight", "bias"):
                    keys[f"Qformer.bert.encoder.layer.{i}.{src}{leaf}.{kind}"] = qf
    keys.update({"llama_proj.weight": mg, "llama_proj.bias": mg})
    return keys


def check_rope_buffers(merged: dict, text_config, source: str) -> None:
    """MiniGPT-4's checkpoint holds each LLaMA layer's RoPE `inv_freq`; transformers
    recomputes them from the config. They must equal what it computes for the Vicuna
    config, so that the converted model rotates positions as MiniGPT-4 did."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    found = {int(m.group(1)): key for key in merged if (m := _ROPE_BUFFER.fullmatch(key))}
    if not found:
        return
    layers = text_config.num_hidden_layers
    if sorted(found) != list(range(layers)):
        raise ConversionError(f"the MiniGPT-4 checkpoint has RoPE buffers for layers {sorted(found)} but {source} "
                              f"has {layers} layers: a checkpoint of another LLM")
    expected = LlamaRotaryEmbedding(text_config).inv_freq.float()
    for key in sorted(found.values()):
        got = merged[key].float()
        if got.shape != expected.shape:
            raise ConversionError(f"{key} has shape {tuple(got.shape)}, not the {tuple(expected.shape)} of "
                                  f"{source} (head_dim {text_config.head_dim})")
        rel = ((got - expected).abs() / expected).max().item()
        if rel > ROPE_RTOL:
            raise ConversionError(f"{key} differs from the RoPE frequencies of {source} "
                                  f"({text_config.rope_parameters}) by up to {rel:.3g} (relative): another RoPE "
                                  "base or scaling")


def check_required(merged: dict, vision_layers: int, qformer: dict) -> None:
    required = required_keys(vision_layers, qformer["num_hidden_layers"], qformer["cross_attention_frequency"])
    missing = {k: f for k, f in required.items() if k not in merged}
    if missing:
        raise ConversionError(f"missing keys ({len(missing)}): "
                              + "; ".join(f"{k} (expected in {f})" for k, f in sorted(missing.items())))


# ------------------------------------------------------------------------ configs
def _shape(merged: dict, key: str) -> tuple[int, ...]:
    if key not in merged:
        raise ConversionError(f"missing key {key}")
    return tuple(merged[key].shape)


def vision_config(merged: dict, vision_layers: int, heads: int | None) -> dict:
    width = _shape(merged, "visual_encoder.cls_token")[-1]
    patch = _shape(merged, "visual_encoder.patch_embed.proj.weight")[-1]
    n_pos = _shape(merged, "visual_encoder.pos_embed")[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ConversionError(f"visual_encoder.pos_embed has {n_pos} positions: not 1 + a square grid")
    available = {int(m.group(1)) for k in merged if (m := _BLOCK.fullmatch(k))}
    if vision_layers > len(available):
        raise ConversionError(f"the EVA checkpoint has {len(available)} blocks, fewer than the {vision_layers} "
                              "MiniGPT-4 uses")
    heads = heads or width // EVA_HEAD_DIM
    return dict(hidden_size=width, intermediate_size=_shape(merged, "visual_encoder.blocks.0.mlp.fc1.weight")[0],
                num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=grid * patch,
                patch_size=patch, hidden_act="gelu", layer_norm_eps=EVA_LAYER_NORM_EPS, qkv_bias=True,
                attention_dropout=0.0)


def qformer_config(merged: dict, heads: int | None) -> dict:
    hidden = _shape(merged, "query_tokens")[-1]
    layers = sorted({int(m.group(1)) for k in merged if (m := _QFORMER_LAYER.fullmatch(k))})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"Q-Former layers {layers}: expected 0..N-1")
    cross = sorted({int(m.group(1)) for k in merged
                    if (m := _QFORMER_LAYER.fullmatch(k)) and m.group(2).startswith("crossattention.")})
    if not cross or cross[0] != 0:
        raise ConversionError(f"Q-Former cross-attention layers {cross}: expected layer 0 and every k-th")
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise ConversionError(f"Q-Former cross-attention layers {cross} are not every {freq}-th layer")
    encoder_width = _shape(merged, "Qformer.bert.encoder.layer.0.crossattention.self.key.weight")[1]
    return dict(hidden_size=hidden, num_hidden_layers=len(layers),
                num_attention_heads=heads or hidden // QFORMER_HEAD_DIM,
                intermediate_size=_shape(merged, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")[0],
                cross_attention_frequency=freq, encoder_hidden_size=encoder_width, hidden_act="gelu",
                layer_norm_eps=QFORMER_LAYER_NORM_EPS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ------------------------------------------------------------------------ the text side
def vicuna_config(vicuna: Path):
    """The Vicuna directory's config.json as transformers parses it (the config the
    converted model's text side gets)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    vicuna = Path(vicuna)
    if not (vicuna / "config.json").is_file():
        raise ConversionError(f"{vicuna}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(vicuna, local_files_only=True)
    if config.model_type != "llama":
        raise ConversionError(f"{vicuna}: a {config.model_type!r} model, expected LLaMA (Vicuna)")
    return config


def _can_read_sentencepiece() -> bool:
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    return is_sentencepiece_available() and is_protobuf_available()


def vicuna_tokenizer(vicuna: Path):
    """The Vicuna directory's tokenizer as `AutoTokenizer` reads it (offline).

    A merged Vicuna directory (FastChat's `apply_delta` saves the slow LLaMA tokenizer) has
    a SentencePiece `tokenizer.model` and no `tokenizer.json`. Transformers 5 converts that
    file only with sentencepiece and protobuf installed; without them it falls back to its
    tiktoken reader and fails asking for tiktoken, so that case is refused up front."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    vicuna = Path(vicuna)
    if (not (vicuna / "tokenizer.json").is_file() and (vicuna / "tokenizer.model").is_file()
            and not _can_read_sentencepiece()):
        raise ConversionError(f"{vicuna} has a SentencePiece tokenizer.model and no tokenizer.json: reading it "
                              "needs `pip install sentencepiece protobuf` (transformers 5 would ask for tiktoken)")
    return AutoTokenizer.from_pretrained(vicuna, local_files_only=True)


def add_image_token(llm, tokenizer) -> int:
    """Add `<image>` (and a pad token if missing) to the tokenizer; new embedding and
    LM-head rows are the mean of the existing rows. A mean LM-head row scores the mean
    of the other logits, so the placeholder can never be the argmax."""
    from tokenizers import AddedToken

    from unike.backbones import IMAGE_TOKEN

    if tokenizer.pad_token is None:  # LLaMA has none; MiniGPT-4 pads with an existing token too
        tokenizer.pad_token = tokenizer.unk_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = llm.get_input_embeddings().weight
            emb[old:] = emb[:old].float().mean(0).to(emb.dtype)
            head = llm.get_output_embeddings().weight
            if head.data_ptr() != emb.data_ptr():
                head[old:] = head[:old].float().mean(0).to(head.dtype)
    return token_id


# ------------------------------------------------------------------------ conversion
def convert(sources: Sources, out_dir: Path, *, llm_dtype: str = LLM_DTYPE, vision_layers: int = EVA_DEPTH,
            vision_heads: int | None = None, qformer_heads: int | None = None,
            ignore: tuple[str, ...] = ()) -> dict:
    """Write MiniGPT-4 as a Blip2ForConditionalGeneration directory `load_backbone` reads.

    Returns the provenance written to unike_backbone.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, Blip2Config, Blip2ForConditionalGeneration

    from unike.backbones import save_backbone

    vicuna = Path(sources.vicuna)
    text_config = vicuna_config(vicuna)
    tokenizer = vicuna_tokenizer(vicuna)  # before any weights are read: it fails fast where it cannot be read
    names = (str(sources.eva_vit), str(sources.qformer), str(sources.minigpt4))
    merged, origin = merge_sources(load_checkpoint(sources.eva_vit), load_checkpoint(sources.qformer),
                                   load_checkpoint(sources.minigpt4), names)
    vision = vision_config(merged, vision_layers, vision_heads)
    qformer = qformer_config(merged, qformer_heads)
    if qformer["encoder_hidden_size"] != vision["hidden_size"]:
        raise ConversionError(f"the Q-Former cross-attends to width {qformer['encoder_hidden_size']} but the "
                              f"ViT is {vision['hidden_size']} wide")
    check_required(merged, vision_layers, qformer)
    check_rope_buffers(merged, text_config, f"{vicuna}/config.json")
    mapped = map_vision_side(merged, vision_layers, origin, ignore)

    llm = AutoModelForCausalLM.from_pretrained(vicuna, config=text_config, dtype=getattr(torch, llm_dtype),
                                               local_files_only=True)
    image_token_id = add_image_token(llm, tokenizer)
    # The text config takes the tokenizer's special-token ids, the ones runs use: a Vicuna
    # merged onto a 2023 LLaMA conversion says bos 0 / eos 1 / pad -1 (as MiniGPT-4's own
    # Vision-CAIR/vicuna does), and transformers 5 flags -1 as outside the vocabulary.
    llm.config.update({f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")})

    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=llm.config.to_dict(),
                         num_query_tokens=_shape(merged, "query_tokens")[1], image_token_id=image_token_id)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    state = dict(mapped.state)
    state.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"converted keys do not match Blip2ForConditionalGeneration: missing {missing}, "
                              f"unexpected {unexpected}")
    wrong = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape}
    if wrong:
        back = {v: k for k, v in mapped.landed.items()}
        raise ConversionError("shape mismatches (converted key <- original key: got, expected): " + "; ".join(
            f"{k} <- {back.get(k, k)}: {g}, {e}" for k, (g, e) in sorted(wrong.items())))
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = {
        "converted_from": {"eva_vit": names[0], "qformer": names[1], "minigpt4": names[2], "vicuna": str(vicuna)},
        "converter": "unike.convert_minigpt4", "n_original_tensors": len(mapped.landed),
        "skipped_keys": mapped.skipped, "image_token_id": image_token_id, "llm_dtype": llm_dtype,
    }
    save_backbone(out_dir, model, tokenizer, "minigpt4", vision["image_size"], provenance)
    _check_written(out_dir, set(expected))
    log.info("MiniGPT-4 written to %s: %d original tensors mapped, %d unused entries skipped",
             out_dir, len(mapped.landed), len(mapped.skipped))
    return provenance


def _check_written(out_dir: Path, expected: set[str]) -> None:
    """Every weight is in the saved files (what `from_pretrained` will find)."""
    from safetensors import safe_open

    saved: set[str] = set()
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            saved.update(f.keys())
    if saved != expected:
        raise ConversionError(f"{out_dir}: saved weights differ from the model: missing "
                              f"{sorted(expected - saved)[:20]}, extra {sorted(saved - expected)[:20]}")
