"""The MiniGPT-4 converter on tiny fakes of the real files, and the published configs of
both paper backbones.

Each fake holds exactly the key families its real file holds (each family below cites the
code that puts it there), at toy sizes:
- `eva_vit_g.pth`: EVA-CLIP-g's visual tower, one block more than MiniGPT-4 uses, with the
  final norm and CLIP projection head MiniGPT-4's ViT lacks;
- `blip2_pretrained_flant5xxl.pth`: LAVIS' FlanT5 pretraining checkpoint, i.e. what was
  trained there (ln_vision, query tokens, the Q-Former without its text branch, t5_proj)
  plus the Q-Former's position_ids buffer;
- `prerained_minigpt4_7b.pth`: MiniGPT-4's runner checkpoint (model, optimizer, config,
  scaler, epoch) whose model part is llama_proj plus the frozen modules' buffers
  (position_ids, one RoPE inv_freq per LLaMA layer);
- Vicuna: a random LLaMA directory whose config is the published Vicuna-7B v0 config.json
  (tests/fixtures) with toy sizes; for Vision-CAIR's merged Vicuna, its published tokenizer
  files beside a synthetic vocabulary with LLaMA's special-token ids.
The converted model is checked tensor by tensor against the originals, and its image
features against a forward pass written here with plain torch ops over the original key
names. The published configs (tests/fixtures/README.md) are parsed as the loaders parse them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from unike import convert_minigpt4
from unike.backbones import (CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, Sample, _is_placeholder_token, backbone_settings,
                             load_backbone)
from unike.convert_minigpt4 import (ConversionError, Sources, check_rope_buffers, convert, vicuna_config,
                                    vicuna_tokenizer)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VICUNA_CONFIG = FIXTURES / "vicuna-7b-delta-v0"
VISION_CAIR_VICUNA = FIXTURES / "vision-cair-vicuna-13b-v0"
BLIP2_OPT_CONFIG = FIXTURES / "blip2-opt-2.7b"
EVA = dict(width=40, heads=4, patch=4, image=16, blocks=3, mlp=72, clip_dim=24)  # MiniGPT-4 uses blocks - 1
USED_BLOCKS = 2
QF = dict(width=32, heads=4, layers=3, cross_every=2, ffn=64, queries=32, max_positions=40, t5_width=20)
LLM = dict(width=48, heads=4, layers=2, ffn=96)
WORDS = ["question", "short", "answer", ":", "what", "is", "this", "a", "cat", "dog", "###", "human", "<", "img",
         ">", "</", "/"]
# MiniGPT-4's LLaMA builds its RoPE with the class default base (minigpt4/models/modeling_llama.py:78,
# Vision-CAIR/MiniGPT-4@525970b); the published Vicuna config has no rope_theta, i.e. the same default.
MINIGPT4_ROPE_BASE = 10000


# ------------------------------------------------------------------------ fake checkpoints
def _rand(gen, *shape, scale=0.3):
    return torch.randn(*shape, generator=gen) * scale


def _norm(gen, prefix, width):
    return {f"{prefix}.weight": 1 + _rand(gen, width, scale=0.1), f"{prefix}.bias": _rand(gen, width, scale=0.1)}


def _linear(gen, prefix, out_dim, in_dim, bias=True):
    sd = {f"{prefix}.weight": _rand(gen, out_dim, in_dim, scale=in_dim ** -0.5)}
    if bias:
        sd[f"{prefix}.bias"] = _rand(gen, out_dim, scale=0.1)
    return sd


def minigpt4_inv_freq(head_dim: int, base: float = MINIGPT4_ROPE_BASE) -> torch.Tensor:
    """The buffer as MiniGPT-4's LlamaRotaryEmbedding computes it (modeling_llama.py:80)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def fake_eva(gen) -> dict:
    """eva_vit_g.pth: EVA-CLIP-g's `visual` tower as a flat state dict (LAVIS loads it into
    its VisionTransformer with strict=False, lavis/models/eva_vit.py create_eva_vit_g)."""
    d, n = EVA["width"], (EVA["image"] // EVA["patch"]) ** 2
    # Embeddings: EVA-01/clip/vit_model.py:261-267 (baaivision/EVA@5623d08).
    sd = {"cls_token": _rand(gen, 1, 1, d), "pos_embed": _rand(gen, 1, n + 1, d),
          "patch_embed.proj.weight": _rand(gen, d, 3, EVA["patch"], EVA["patch"], scale=0.2),
          "patch_embed.proj.bias": _rand(gen, d, scale=0.1)}
    # All of EVA-CLIP-g's blocks: 40 (EVA-01/clip/model_configs/EVA_CLIP_g_14.json "layers"), one more
    # than MiniGPT-4 builds (depth=39, minigpt4/models/eva_vit.py:421); the file has 40 (AILab-CVC/SEED
    # issue 18). q/v biases without a k bias: vit_model.py Attention; no layer scale (init_values None).
    for i in range(EVA["blocks"]):
        p = f"blocks.{i}"
        sd |= _norm(gen, f"{p}.norm1", d) | _norm(gen, f"{p}.norm2", d)
        sd |= _linear(gen, f"{p}.attn.qkv", 3 * d, d, bias=False)
        sd |= {f"{p}.attn.q_bias": _rand(gen, d, scale=0.1), f"{p}.attn.v_bias": _rand(gen, d, scale=0.1)}
        sd |= _linear(gen, f"{p}.attn.proj", d, d) | _linear(gen, f"{p}.mlp.fc1", EVA["mlp"], d)
        sd |= _linear(gen, f"{p}.mlp.fc2", d, EVA["mlp"])
    # The final norm and the CLIP projection head: vit_model.py:285-287 with use_mean_pooling=False and
    # num_classes = CLIP's embed_dim (EVA-01/clip/eva_model.py:292-305); no fc_norm without mean pooling.
    # LAVIS' and MiniGPT-4's ViT comment both out (minigpt4/models/eva_vit.py:284-286).
    sd |= _norm(gen, "norm", d) | _linear(gen, "head", EVA["clip_dim"], d)
    return sd


def fake_qformer_checkpoint(gen) -> dict:
    """blip2_pretrained_flant5xxl.pth's "model": the parameters LAVIS' Blip2T5 trains, plus
    buffers (the runner keeps buffers and drops frozen parameters: lavis/runners/runner_base.py:586-607,
    salesforce/LAVIS@506965b). Not stored: the frozen ViT and FlanT5 (LAVIS issues 128 and 131)."""
    h, d = QF["width"], EVA["width"]
    # ln_vision is trained by Blip2T5 (only the ViT is frozen: lavis/models/blip2_models/blip2_t5.py:64-69).
    sd = _norm(gen, "ln_vision", d) | {"query_tokens": _rand(gen, 1, QF["queries"], h, scale=0.5)}
    sd |= _norm(gen, "Qformer.bert.embeddings.LayerNorm", h)
    # The embeddings' position_ids buffer (lavis/models/blip2_models/Qformer.py:69-71) survives
    # Blip2T5 setting word/position embeddings to None (blip2_t5.py:75-76).
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(QF["max_positions"]).expand((1, -1))
    for i in range(QF["layers"]):
        p = f"Qformer.bert.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            sd |= _linear(gen, f"{p}.attention.self.{name}", h, h)
        sd |= _linear(gen, f"{p}.attention.output.dense", h, h) | _norm(gen, f"{p}.attention.output.LayerNorm", h)
        if i % QF["cross_every"] == 0:
            sd |= _linear(gen, f"{p}.crossattention.self.query", h, h)
            sd |= _linear(gen, f"{p}.crossattention.self.key", h, d)
            sd |= _linear(gen, f"{p}.crossattention.self.value", h, d)
            sd |= _linear(gen, f"{p}.crossattention.output.dense", h, h)
            sd |= _norm(gen, f"{p}.crossattention.output.LayerNorm", h)
        sd |= _linear(gen, f"{p}.intermediate_query.dense", QF["ffn"], h)
        sd |= _linear(gen, f"{p}.output_query.dense", h, QF["ffn"]) | _norm(gen, f"{p}.output_query.LayerNorm", h)
        # No text-branch FFN (intermediate / output): set to None before training (blip2_t5.py:77-79;
        # "missing from the stage-2 pre-trained checkpoint", LAVIS issue 344). No Qformer.cls either (:74).
    # The projection into FlanT5 (blip2_t5.py:92-94), trained, hence saved.
    sd |= _linear(gen, "t5_proj", QF["t5_width"], h)
    return sd


def fake_minigpt4_checkpoint(gen, head_dim: int) -> dict:
    """prerained_minigpt4_7b.pth as MiniGPT-4's runner saves it (minigpt4/runners/runner_base.py:575-600,
    Vision-CAIR/MiniGPT-4@525970b): the state dict minus every parameter with requires_grad False,
    the optimizer, the config, the AMP scaler and the epoch."""
    proj = torch.nn.Linear(QF["width"], LLM["width"])
    with torch.no_grad():
        for name, value in _linear(gen, "p", LLM["width"], QF["width"]).items():
            getattr(proj, name.split(".")[1]).copy_(value)
    # AdamW over the trainable parameters in two groups, weight decay on matrices only
    # (runner_base.py:99-127; rates of train_configs/minigpt4_stage2_finetune.yaml), after one
    # step so that it has state.
    optimizer = torch.optim.AdamW([{"params": [proj.weight], "weight_decay": 0.05},
                                   {"params": [proj.bias], "weight_decay": 0}], lr=3e-5, betas=(0.9, 0.999))
    proj(torch.randn(2, QF["width"], generator=gen)).sum().backward()
    optimizer.step()
    model = {
        # MiniGPT-4 freezes the ViT, ln_vision, the Q-Former, the query tokens and LLaMA
        # (minigpt4/models/mini_gpt4.py:54, 58, 78, 81, 103), so their parameters are dropped;
        # their buffers stay: the Q-Former's position_ids (minigpt4/models/Qformer.py:69) ...
        "Qformer.bert.embeddings.position_ids": torch.arange(QF["max_positions"]).expand((1, -1)),
        # ... and one persistent RoPE inv_freq per LLaMA layer (minigpt4/models/modeling_llama.py:81).
        **{f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": minigpt4_inv_freq(head_dim)
           for i in range(LLM["layers"])},
        # llama_proj, the one trained layer (mini_gpt4.py:106).
        **{f"llama_proj.{k}": v.detach().clone() for k, v in proj.state_dict().items()},
    }
    return {"model": model, "optimizer": optimizer.state_dict(),
            # Config.to_dict is OmegaConf.to_container (minigpt4/common/config.py:165-166): plain
            # containers; a few entries of minigpt4_stage2_finetune.yaml.
            "config": {"model": {"arch": "mini_gpt4", "model_type": "pretrain_vicuna", "freeze_vit": True,
                                 "freeze_qformer": True},
                       "datasets": {"cc_sbu_align": {"vis_processor": {"train": {"image_size": 224}}}},
                       "run": {"task": "image_text_pretrain", "amp": True}},
            # run.amp is True in MiniGPT-4's training configs: a GradScaler (runner_base.py:137).
            "scaler": torch.amp.GradScaler("cpu").state_dict(), "epoch": 4}


def expected_skips(eva: dict, minigpt4: dict) -> set[str]:
    """The fakes' keys MiniGPT-4 never uses, family by family (see the builders above)."""
    eva_unused = {f"visual_encoder.{k}" for k in eva
                  if k.startswith((f"blocks.{USED_BLOCKS}.", "norm.", "head."))}
    return (eva_unused | {"t5_proj.weight", "t5_proj.bias", "Qformer.bert.embeddings.position_ids"}
            | {k for k in minigpt4 if k.endswith("rotary_emb.inv_freq")})


def llama_like_tokenizer():
    """Like LLaMA's: <unk>, <s>, </s>, no pad token and no <image> token."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_llama_tokenizer(path: Path, published: Path) -> None:
    """A Vicuna directory's tokenizer: the published tokenizer_config.json and
    special_tokens_map.json verbatim, and a synthetic tokenizer.json in place of LLaMA's
    SentencePiece tokenizer.model (not copied: large) with its layout and ids: BPE with byte
    fallback, `<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte pieces `<0x00>`..`<0xFF>`, then word
    pieces; and the post-processor LLaMA's tokenizer.json has (`<s>` first)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from tokenizers.models import BPE

    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(published / name, path / name)
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz")
    tok = Tokenizer(BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", fuse_unk=True,
                        byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))


def fake_vicuna(path, gen, published: Path = VICUNA_CONFIG):
    """A random LLaMA whose config is a published Vicuna config.json, parsed by the
    converter's own reader, at toy sizes (everything else as published). Where the published
    directory's tokenizer files are in tests/fixtures, the tokenizer is those files with a
    synthetic vocabulary (`write_llama_tokenizer`); otherwise a word-level LLaMA-like one."""
    from transformers import LlamaForCausalLM

    if (published / "tokenizer_config.json").is_file():
        write_llama_tokenizer(Path(path), published)
        tok = vicuna_tokenizer(path)
    else:
        tok = llama_like_tokenizer()
        tok.save_pretrained(path)
    config = vicuna_config(published)
    config.update(dict(hidden_size=LLM["width"], num_hidden_layers=LLM["layers"], intermediate_size=LLM["ffn"],
                       num_attention_heads=LLM["heads"], num_key_value_heads=LLM["heads"],
                       head_dim=LLM["width"] // LLM["heads"], vocab_size=len(tok)))
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_rand(gen, *p.shape, scale=0.2) + (1 if p.dim() == 1 else 0))  # norms near 1
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4_originals")
    gen = torch.Generator().manual_seed(0)
    eva, qformer = fake_eva(gen), fake_qformer_checkpoint(gen)
    minigpt4 = fake_minigpt4_checkpoint(gen, LLM["width"] // LLM["heads"])
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": qformer}, root / "blip2_pretrained_flant5xxl.pth")  # LAVIS reads checkpoint["model"]
    torch.save(minigpt4, root / "prerained_minigpt4_7b.pth")
    vicuna = fake_vicuna(root / "vicuna-7b", gen)
    sources = Sources(root / "eva_vit_g.pth", root / "blip2_pretrained_flant5xxl.pth",
                      root / "prerained_minigpt4_7b.pth", root / "vicuna-7b")
    return {"root": root, "sources": sources, "eva": eva, "qformer": qformer, "minigpt4": minigpt4["model"],
            "proj": {k: v for k, v in minigpt4["model"].items() if k.startswith("llama_proj.")}, "vicuna": vicuna}


CONVERT_KW = dict(llm_dtype="float32", vision_layers=USED_BLOCKS, vision_heads=EVA["heads"], qformer_heads=QF["heads"])


@pytest.fixture(scope="module")
def converted(originals, tmp_path_factory):
    out = tmp_path_factory.mktemp("minigpt4_converted") / "minigpt4"
    provenance = convert(originals["sources"], out, **CONVERT_KW)
    return out, provenance


@pytest.fixture(scope="module")
def hf_model(converted):
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(converted[0], dtype=torch.float32).eval()


# ------------------------------------------------------------------------ every tensor lands
def test_every_original_tensor_lands_and_nothing_is_left_at_init(originals, converted, hf_model):
    state = hf_model.state_dict()
    skips = expected_skips(originals["eva"], originals["minigpt4"])
    used = {f"visual_encoder.{k}": v for k, v in originals["eva"].items()}
    used |= originals["qformer"] | originals["minigpt4"]
    used = {k: v for k, v in used.items() if k not in skips}

    # Found by value, independently of the converter's renaming table.
    covered: set[str] = set()
    d = EVA["width"]
    for key, value in used.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            layer = key.split(".")[2]
            fused = state[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"]
            part = fused[:d] if key.endswith("q_bias") else fused[2 * d:]
            assert torch.equal(part, value), key
            assert torch.equal(fused[d:2 * d], torch.zeros(d))  # EVA has no k bias
            covered.add(f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias")
            continue
        hits = [k for k, v in state.items() if v.shape == value.shape and torch.equal(v, value.to(v.dtype))]
        assert len(hits) == 1, f"{key}: found in {hits}"
        covered.add(hits[0])

    vicuna = originals["vicuna"]
    for key, value in vicuna.items():
        got = state[f"language_model.{key}"]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            n = value.shape[0]
            assert torch.equal(got[:n], value), key
            assert got.shape[0] == n + 1 and torch.allclose(got[n], value.mean(0))  # the <image> row
        else:
            assert torch.equal(got, value), key
        covered.add(f"language_model.{key}")

    assert covered == set(state), f"left at init: {sorted(set(state) - covered)}"
    assert set(converted[1]["skipped_keys"]) == skips
    assert converted[1]["n_original_tensors"] == len(used)


def test_the_converted_directory_loads_with_no_missing_or_unexpected_keys(converted):
    from transformers import Blip2ForConditionalGeneration

    _, info = Blip2ForConditionalGeneration.from_pretrained(converted[0], output_loading_info=True)
    assert {k: sorted(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert not info["error_msgs"]


def test_converted_config_fits_the_minigpt4_prompt(converted, hf_model):
    out, provenance = converted
    cfg = hf_model.config
    assert cfg.num_query_tokens == 32 and cfg.text_config.model_type == "llama"
    assert cfg.vision_config.num_hidden_layers == USED_BLOCKS and cfg.vision_config.image_size == EVA["image"]
    assert cfg.qformer_config.cross_attention_frequency == QF["cross_every"]
    meta = json.loads((out / "unike_backbone.json").read_text())
    assert meta["prompt_style"] == "minigpt4" and meta["image_size"] == EVA["image"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == cfg.image_token_id == provenance["image_token_id"]
    assert tok.pad_token == "<unk>"
    # text never produces the placeholder, and the placeholder is one token
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [cfg.image_token_id]
    # The text side keeps the published Vicuna config (only the sizes are the fake's), whose
    # special-token ids are LLaMA's, the tokenizer's.
    published = json.loads((VICUNA_CONFIG / "config.json").read_text())
    for name in ("hidden_act", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                 "eos_token_id", "pad_token_id"):
        assert getattr(cfg.text_config, name) == published[name], name
    assert (published["bos_token_id"], published["eos_token_id"], published["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_a_2023_llama_conversions_special_ids_give_way_to_the_tokenizers(originals, tmp_path):
    """MiniGPT-4's own Vicuna v0 (Vision-CAIR/vicuna, 13B) carries the first LLaMA
    conversion's ids in its config.json: bos 0, eos 1, pad -1. Its published tokenizer files
    (tokenizer_config.json, special_tokens_map.json; tests/fixtures) name `<s>`, `</s>`, `<unk>`
    and no pad token. The converted text config takes the tokenizer's ids."""
    from transformers import AutoTokenizer

    published = json.loads((VISION_CAIR_VICUNA / "config.json").read_text())
    tok_config = json.loads((VISION_CAIR_VICUNA / "tokenizer_config.json").read_text())
    fake_vicuna(tmp_path / "vicuna", torch.Generator().manual_seed(2), VISION_CAIR_VICUNA)
    # tokenizer_config.json as the converter reads it: transformers 5 takes the 4.28-era
    # {"__type": "AddedToken", "content": ...} entries as the tokens named (LLaMA's ids in the
    # vocabulary) and keeps "pad_token": null as no pad token.
    vicuna_tok = vicuna_tokenizer(tmp_path / "vicuna")
    assert type(vicuna_tok).__name__ == tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert (vicuna_tok.bos_token, vicuna_tok.eos_token, vicuna_tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (vicuna_tok.unk_token_id, vicuna_tok.bos_token_id, vicuna_tok.eos_token_id) == (0, 1, 2)
    assert tok_config["pad_token"] is None and vicuna_tok.pad_token is None and vicuna_tok.pad_token_id is None

    s = originals["sources"]
    convert(Sources(s.eva_vit, s.qformer, s.minigpt4, tmp_path / "vicuna"), tmp_path / "out", **CONVERT_KW)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    text = config["text_config"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    # The converter's handling: pad is <unk> (a valid id), <image> an added placeholder after the
    # vocabulary (transformers 5 writes image_token_id as image_token_index, the published name).
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", vicuna_tok.unk_token_id)
    image_id = config["image_token_index"]
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == image_id == len(vicuna_tok)
    assert _is_placeholder_token(tok, image_id)
    assert tok(f"a {IMAGE_TOKEN} cat", add_special_tokens=False)["input_ids"].count(image_id) == 1
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [text[k] for k in ids] == [getattr(tok, k) for k in ids] == [1, 2, 0] != [published[k] for k in ids]
    assert text["rms_norm_eps"] == published["rms_norm_eps"] and text["vocab_size"] == len(tok)


def test_a_vicuna_tokenizer_model_without_sentencepiece_is_refused_up_front(tmp_path, monkeypatch):
    """A merged Vicuna directory as published: config.json, tokenizer_config.json and
    special_tokens_map.json (tests/fixtures) beside a SentencePiece tokenizer.model and no
    tokenizer.json. Without sentencepiece and protobuf, transformers 5 falls back to its
    tiktoken reader and fails asking for tiktoken; the converter names the missing packages
    instead, before reading any checkpoint (those named here do not exist)."""
    vicuna = tmp_path / "vicuna"
    vicuna.mkdir()
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(VISION_CAIR_VICUNA / name, vicuna / name)
    (vicuna / "tokenizer.model").write_bytes(b"\n\x09\n\x05<unk>\x18\x02")  # a one-piece model; never read
    monkeypatch.setattr(convert_minigpt4, "_can_read_sentencepiece", lambda: False)
    missing = [tmp_path / name for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "minigpt4.pth")]
    message = r"tokenizer\.model and no tokenizer\.json: .*pip install sentencepiece protobuf"
    with pytest.raises(ConversionError, match=message):
        convert(Sources(*missing, vicuna), tmp_path / "out", **CONVERT_KW)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ an independent forward
def _layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def eva_forward(sd: dict, pixels: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """EVA ViT-g as in MiniGPT-4's eva_vit.py (pre-norm blocks, eps 1e-6, q/v biases only)."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=EVA["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    b, n, c = x.shape
    for i in range(depth):
        p = f"blocks.{i}"
        h = _layer_norm(x, sd, f"{p}.norm1", 1e-6)
        bias = torch.cat([sd[f"{p}.attn.q_bias"], torch.zeros(c), sd[f"{p}.attn.v_bias"]])
        q, k, v = F.linear(h, sd[f"{p}.attn.qkv.weight"], bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(h, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = _layer_norm(x, sd, f"{p}.norm2", 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
                     sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        x = x + h
    return x


def _bert_attention(sd, prefix, x, context, heads):
    q = F.linear(x, sd[f"{prefix}.self.query.weight"], sd[f"{prefix}.self.query.bias"])
    k = F.linear(context, sd[f"{prefix}.self.key.weight"], sd[f"{prefix}.self.key.bias"])
    v = F.linear(context, sd[f"{prefix}.self.value.weight"], sd[f"{prefix}.self.value.bias"])
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probs = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    ctx = (probs @ v).transpose(1, 2).reshape(x.shape)
    out = F.linear(ctx, sd[f"{prefix}.output.dense.weight"], sd[f"{prefix}.output.dense.bias"])
    return _layer_norm(out + x, sd, f"{prefix}.output.LayerNorm", 1e-12)


def qformer_forward(sd: dict, image_embeds: torch.Tensor, heads: int) -> torch.Tensor:
    """LAVIS' Q-Former on query embeddings only (MiniGPT-4's encode_img), by original keys."""
    x = sd["query_tokens"].expand(image_embeds.shape[0], -1, -1)
    x = _layer_norm(x, sd, "Qformer.bert.embeddings.LayerNorm", 1e-12)
    for i in range(QF["layers"]):
        p = f"Qformer.bert.encoder.layer.{i}"
        x = _bert_attention(sd, f"{p}.attention", x, x, heads)
        if f"{p}.crossattention.self.query.weight" in sd:
            x = _bert_attention(sd, f"{p}.crossattention", x, image_embeds, heads)
        h = F.gelu(F.linear(x, sd[f"{p}.intermediate_query.dense.weight"], sd[f"{p}.intermediate_query.dense.bias"]))
        h = F.linear(h, sd[f"{p}.output_query.dense.weight"], sd[f"{p}.output_query.dense.bias"])
        x = _layer_norm(h + x, sd, f"{p}.output_query.LayerNorm", 1e-12)
    return x


def test_image_features_match_an_independent_minigpt4_forward(originals, hf_model):
    pixels = torch.randn(2, 3, EVA["image"], EVA["image"], generator=torch.Generator().manual_seed(1))
    qf = originals["qformer"]
    with torch.no_grad():
        vit = eva_forward(originals["eva"], pixels, USED_BLOCKS, EVA["heads"])
        # LAVIS' ln_vision is a plain LayerNorm (eps 1e-5); transformers' post_layernorm uses
        # the vision config's 1e-6, the one deviation of the conversion (as for HF's BLIP-2).
        image_embeds = _layer_norm(vit, qf, "ln_vision", 1e-5)
        ref = F.linear(qformer_forward(qf, image_embeds, QF["heads"]), originals["proj"]["llama_proj.weight"],
                       originals["proj"]["llama_proj.bias"])
        out = hf_model.get_image_features(pixels)
    torch.testing.assert_close(out.last_hidden_state, image_embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pooler_output, ref, atol=1e-4, rtol=1e-4)
    assert out.pooler_output.shape == (2, QF["queries"], LLM["width"])


# ------------------------------------------------------------------------ the Backbone on it
def test_backbone_encode_and_logits_run_on_the_converted_model(converted, tmp_path):
    image = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    backbone = load_backbone("minigpt4-fake", converted[0])
    assert backbone.prompt_style == "minigpt4" and backbone.num_query_tokens == 32
    samples = [Sample(image, "Question: what is this Short answer:", "a cat"), Sample(None, "what is this", "dog")]
    batch = backbone.encode(samples)
    ids, start = backbone.sample_ids(samples[0])
    assert ids.count(backbone.image_token_id) == 32 and backbone.tokenizer.decode(ids[start:]) == "a cat"
    logits = backbone.logits(batch)
    assert logits.shape[:2] == batch.input_ids.shape and torch.isfinite(logits).all()
    with torch.no_grad():
        ref = backbone.model(pixel_values=backbone.load_pixels([image]), input_ids=batch.input_ids[:1],
                             attention_mask=batch.attention_mask[:1]).logits
    n = int(batch.attention_mask[0].sum())
    torch.testing.assert_close(logits[0, :n], ref[0, :n], atol=1e-5, rtol=1e-5)
    # the placeholder row of the LM head is the mean row: never the argmax
    assert not (logits.argmax(-1) == backbone.image_token_id).any()


# ------------------------------------------------------------------------ clear failures
def _sources_with(originals, tmp_path, *, eva=None, qformer=None, minigpt4=None):
    """The fakes with some state dicts replaced (MiniGPT-4's inside its runner wrapper)."""
    s = originals["sources"]
    if eva is not None:
        torch.save(eva, tmp_path / "eva_vit_g.pth")
    if qformer is not None:
        torch.save({"model": qformer}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    if minigpt4 is not None:
        wrapper = torch.load(s.minigpt4, weights_only=True)
        torch.save(wrapper | {"model": minigpt4}, tmp_path / "prerained_minigpt4_7b.pth")
    return Sources(tmp_path / "eva_vit_g.pth" if eva is not None else s.eva_vit,
                   tmp_path / "blip2_pretrained_flant5xxl.pth" if qformer is not None else s.qformer,
                   tmp_path / "prerained_minigpt4_7b.pth" if minigpt4 is not None else s.minigpt4, s.vicuna)


def _rope_key(layer: int) -> str:
    return f"llama_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"


def test_a_missing_key_is_named(originals, tmp_path):
    qformer = dict(originals["qformer"])
    del qformer["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    with pytest.raises(ConversionError, match=r"missing keys.*layer\.1\.output_query\.dense\.bias"):
        convert(_sources_with(originals, tmp_path, qformer=qformer), tmp_path / "out", **CONVERT_KW)
    eva = {k: v for k, v in originals["eva"].items() if k != "blocks.0.attn.v_bias"}
    with pytest.raises(ConversionError, match=r"visual_encoder\.blocks\.0\.attn\.v_bias"):
        convert(_sources_with(originals, tmp_path, eva=eva), tmp_path / "out", **CONVERT_KW)
    assert not (tmp_path / "out").exists()


def test_an_unexpected_key_is_named(originals, tmp_path):
    eva = dict(originals["eva"]) | {"blocks.0.attn.rel_scale": torch.ones(3)}
    with pytest.raises(ConversionError, match=r"unexpected keys.*visual_encoder\.blocks\.0\.attn\.rel_scale"):
        convert(_sources_with(originals, tmp_path, eva=eva), tmp_path / "out", **CONVERT_KW)
    # ... unless explicitly acknowledged
    provenance = convert(_sources_with(originals, tmp_path, eva=eva), tmp_path / "out",
                         ignore=("visual_encoder.blocks.*.attn.rel_scale",), **CONVERT_KW)
    assert "visual_encoder.blocks.0.attn.rel_scale" in provenance["skipped_keys"]


def test_a_qformer_checkpoint_with_other_parts_is_refused(originals, tmp_path):
    """A BLIP-2 stage-1 checkpoint (contrastive / matching heads, the Q-Former's text branch)
    is not the Q-Former MiniGPT-4 was trained on: its extra keys are named, not skipped."""
    h = QF["width"]
    stage1 = dict(originals["qformer"]) | {"itm_head.weight": torch.ones(2, h), "temp": torch.ones(()),
                                           "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.ones(4, h)}
    with pytest.raises(ConversionError, match=r"unexpected keys \(3;.*intermediate\.dense\.weight.*itm_head\.weight"
                                              r".*temp \(from .*blip2_pretrained_flant5xxl\.pth\)"):
        convert(_sources_with(originals, tmp_path, qformer=stage1), tmp_path / "out", **CONVERT_KW)


def test_rope_buffers_of_another_base_or_depth_are_refused(originals, tmp_path):
    head_dim = LLM["width"] // LLM["heads"]
    other_base = dict(originals["minigpt4"]) | {_rope_key(1): minigpt4_inv_freq(head_dim, base=500000)}
    with pytest.raises(ConversionError, match=rf"^{re.escape(_rope_key(1))} differs from the RoPE frequencies of "
                                              r".*vicuna-7b/config\.json"):
        convert(_sources_with(originals, tmp_path, minigpt4=other_base), tmp_path / "out", **CONVERT_KW)
    deeper = dict(originals["minigpt4"]) | {_rope_key(LLM["layers"]): minigpt4_inv_freq(head_dim)}
    with pytest.raises(ConversionError,
                       match=rf"RoPE buffers for layers \[0, 1, 2\] but .* has {LLM['layers']} layers"):
        convert(_sources_with(originals, tmp_path, minigpt4=deeper), tmp_path / "out", **CONVERT_KW)
    assert not (tmp_path / "out").exists()


def test_pickled_objects_are_refused(originals, tmp_path):
    import argparse

    torch.save({"model": originals["proj"], "config": argparse.Namespace(lr=1.0)}, tmp_path / "bad.pth")
    s = originals["sources"]
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert(Sources(s.eva_vit, s.qformer, tmp_path / "bad.pth", s.vicuna), tmp_path / "out", **CONVERT_KW)


def test_cli_step_writes_into_the_configured_backbone_path(originals, tmp_path, monkeypatch):
    import unike.convert_minigpt4 as conv
    from unike.cli import main

    out = tmp_path / "models" / "minigpt4-7b"
    config = {"out_dir": str(tmp_path / "results"), "seed": 0, "device": "cpu", "threads": 1,
              "backbones": {"minigpt4-7b": {"source": "local", "paper_name": "minigpt4", "prompt_style": "minigpt4",
                                            "path": str(out)}},
              "data": {"source": "mmedit", "annotations": str(tmp_path), "image_root": str(tmp_path)},
              "methods": {"backbone": {"editor": "unike.editing:NoEdit"}},
              "grid": [{"methods": ["backbone"], "backbones": ["minigpt4-7b"], "tasks": ["e-vqa"],
                        "regimes": ["one-step"]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    # the real defaults (39 EVA blocks, fp16) do not fit the fakes
    real = conv.convert
    monkeypatch.setattr(conv, "convert", lambda sources, out_dir, **kw: real(sources, out_dir, **kw, **CONVERT_KW))
    s = originals["sources"]
    main(["convert-minigpt4", "--config", str(tmp_path / "c.yaml"), "--backbone", "minigpt4-7b",
          "--eva-vit", str(s.eva_vit), "--qformer", str(s.qformer), "--minigpt4", str(s.minigpt4),
          "--vicuna", str(s.vicuna), "--ignore", "nothing.*"])
    assert (out / "config.json").is_file() and (out / "unike_backbone.json").is_file()
    assert load_backbone("minigpt4-7b", out).prompt_style == "minigpt4"


# ------------------------------------------------------------------------ the published configs
def test_the_published_vicuna_config_gives_minigpt4s_rope():
    """Vicuna-7B v0's config.json read by the converter: the RoPE it implies (no rope_theta in
    the file, so transformers' default) is the one MiniGPT-4 ran, at full size."""
    config = vicuna_config(VICUNA_CONFIG)
    published = json.loads((VICUNA_CONFIG / "config.json").read_text())
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, name) == published[name], name
    assert "rope_theta" not in published and config.rope_parameters["rope_theta"] == MINIGPT4_ROPE_BASE
    head_dim = published["hidden_size"] // published["num_attention_heads"]
    buffers = {_rope_key(i): minigpt4_inv_freq(head_dim) for i in range(published["num_hidden_layers"])}
    check_rope_buffers(buffers, config, "vicuna")
    check_rope_buffers({k: v.half() for k, v in buffers.items()}, config, "vicuna")  # fp16-rounded on the way
    with pytest.raises(ConversionError, match=rf"^{re.escape(_rope_key(0))} differs"):
        check_rope_buffers(buffers | {_rope_key(0): minigpt4_inv_freq(head_dim, base=1e6)}, config, "vicuna")


OPT_VOCAB_SIZE = 50265  # entries in OPT's vocab.json (ids 0..50264); added tokens follow


def write_opt_tokenizer(path: Path) -> None:
    """Salesforce/blip2-opt-2.7b's tokenizer: the published tokenizer_config.json,
    special_tokens_map.json and added_tokens.json verbatim, and a synthetic GPT-2 byte-level
    BPE in place of OPT's vocab.json / merges.txt (not copied: large) that keeps the published
    ids: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3 as in OPT's vocab.json, the 256 byte symbols,
    then filler entries up to OPT's 50265, after which the added `<image>` (50265) comes."""
    from tokenizers import pre_tokenizers

    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copyfile(BLIP2_OPT_CONFIG / name, path / name)
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    tokens += [f"filler{i}" for i in range(len(tokens), OPT_VOCAB_SIZE)]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")  # no merges: bytes stay bytes


def published_blip2_opt_config():
    """config.json parsed by the config class `Blip2ForConditionalGeneration.from_pretrained`
    (hence `load_backbone`) parses it with."""
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.config_class.from_pretrained(BLIP2_OPT_CONFIG, local_files_only=True)


@pytest.fixture(scope="module")
def blip2_opt(tmp_path_factory):
    """A random BLIP-2 OPT directory with the published config at toy widths and depths
    (vocabulary, image size, special ids and every other field as published) and the
    published tokenizer files (`write_opt_tokenizer`)."""
    from transformers import Blip2ForConditionalGeneration

    config = published_blip2_opt_config()
    width = 16
    config.vision_config.update(dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                     num_attention_heads=2))
    config.qformer_config.update(dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                      num_attention_heads=2, encoder_hidden_size=width))
    config.text_config.update(dict(hidden_size=width, word_embed_proj_dim=width, ffn_dim=2 * width,
                                   num_hidden_layers=1, num_attention_heads=2))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blip2-opt-2.7b")
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    write_opt_tokenizer(path)
    return path


def test_the_published_blip2_opt_config_loads_through_load_backbone(blip2_opt, tmp_path):
    published = json.loads((BLIP2_OPT_CONFIG / "config.json").read_text())
    config = published_blip2_opt_config()
    # transformers 5 reads the 2024 field name image_token_index as image_token_id.
    assert config.image_token_id == published["image_token_index"]
    assert config.text_config.vocab_size == published["text_config"]["vocab_size"] > config.image_token_id
    # The loader's settings from the published config alone: OPT -> BLIP-2's prompt, the ViT's 224 px.
    settings = backbone_settings(BLIP2_OPT_CONFIG, config)
    assert (settings["prompt_style"], settings["image_size"]) == ("blip2", config.vision_config.image_size)

    backbone = load_backbone("blip2-opt-2.7b", blip2_opt)
    assert (backbone.prompt_style, backbone.image_size, backbone.num_query_tokens) == (
        "blip2", config.vision_config.image_size, published["num_query_tokens"])
    assert backbone.image_token_id == backbone.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == config.image_token_id
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(image)
    batch = backbone.encode([Sample(image, "question: what is this short answer:", "a cat")])
    logits = backbone.logits(batch)
    with torch.no_grad():
        ref = backbone.model(pixel_values=backbone.load_pixels([image]), input_ids=batch.input_ids,
                             attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_the_published_blip2_opt_tokenizer_files_load_through_load_backbone(blip2_opt):
    """Salesforce/blip2-opt-2.7b's tokenizer_config.json, special_tokens_map.json and
    added_tokens.json (tests/fixtures) as load_backbone reads them, with the published
    config.json: OPT's GPT-2 BPE with `</s>` as BOS, EOS and UNK (id 2), `<pad>` (id 1) as pad,
    and `<image>` added at the config's image_token_index (50265), a placeholder no text splits."""
    published = json.loads((BLIP2_OPT_CONFIG / "config.json").read_text())
    tok_config = json.loads((BLIP2_OPT_CONFIG / "tokenizer_config.json").read_text())
    added = json.loads((BLIP2_OPT_CONFIG / "added_tokens.json").read_text())
    backbone = load_backbone("blip2-opt-2.7b", blip2_opt)
    tok = backbone.tokenizer
    assert type(tok).__name__ == tok_config["tokenizer_class"] == "GPT2Tokenizer"
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("</s>", "</s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (2, 2, 2, 1)
    assert backbone.bos_id == 2
    # added_tokens.json and added_tokens_decoder put <image> at image_token_index, right after the vocabulary.
    image_id = published["image_token_index"]
    assert added == {IMAGE_TOKEN: image_id} and tok_config["added_tokens_decoder"][str(image_id)]["special"]
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == backbone.image_token_id == image_id == OPT_VOCAB_SIZE
    assert len(tok) == OPT_VOCAB_SIZE + 1 and _is_placeholder_token(tok, image_id)
    assert tok(f"a {IMAGE_TOKEN} cat", add_special_tokens=False)["input_ids"].count(image_id) == 1
    # "add_bos_token": true is honoured (no tokenizer.json overrides it): `</s>` starts a sequence, as in OPT.
    assert tok_config["add_bos_token"] and tok("a cat")["input_ids"][0] == 2
    # The backbone's rows: BOS 2 after the 32 placeholders, the shorter row padded with 1.
    batch = backbone.encode([Sample(None, "what is this", "a cat"),
                             Sample(None, "question: what is this short answer:", "a dog")])
    assert batch.input_ids[:, 0].tolist() == [2, 2]
    assert set(batch.input_ids[0][batch.attention_mask[0] == 0].tolist()) == {1}
    image_row = backbone.encode([Sample(Path("scene.png"), "what is this", "a cat")]).input_ids[0]
    assert image_row[:published["num_query_tokens"] + 1].tolist() == [image_id] * published["num_query_tokens"] + [2]


def test_load_pixels_is_the_published_image_processor(blip2_opt, tmp_path):
    """Backbone.load_pixels (LAVIS' eval preprocessing) against transformers' BlipImageProcessor
    configured by the published preprocessor_config.json, at the published size."""
    from transformers import BlipImageProcessor

    published = json.loads((BLIP2_OPT_CONFIG / "preprocessor_config.json").read_text())
    assert tuple(published["image_mean"]) == CLIP_MEAN and tuple(published["image_std"]) == CLIP_STD
    processor = BlipImageProcessor.from_pretrained(BLIP2_OPT_CONFIG, local_files_only=True)
    backbone = load_backbone("blip2-opt-2.7b", blip2_opt)
    assert backbone.image_size == published["size"]["height"] == published["size"]["width"]
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(image)
    with Image.open(image) as im:
        ref = processor(im, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(backbone.load_pixels([image]), ref, atol=1e-5, rtol=1e-5)
