"""The MiniGPT-4 converter on tiny fake checkpoints with the original key names.

The fakes follow MiniGPT-4's files: `eva_vit_g.pth` (a flat EVA ViT state dict with one
block more than MiniGPT-4 uses), `blip2_pretrained_flant5xxl.pth` (LAVIS `{"model": ...}`
with the stage-1 heads and Q-Former text branch MiniGPT-4 drops), `prerained_minigpt4_7b.pth`
(`llama_proj`) and a random LLaMA directory standing in for Vicuna. The converted model is
checked tensor by tensor against the originals, and its image features against a forward
pass written here with plain torch ops over the original key names.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from unike.backbones import IMAGE_TOKEN, load_backbone
from unike.data import Sample
from unike.convert_minigpt4 import ConversionError, Sources, convert

EVA = dict(width=40, heads=4, patch=4, image=16, blocks=3, mlp=72)  # MiniGPT-4 uses blocks - 1
USED_BLOCKS = 2
QF = dict(width=32, heads=4, layers=3, cross_every=2, ffn=64, queries=32)
LLM = dict(width=48, heads=4, layers=2, ffn=96)
WORDS = ["question", "short", "answer", ":", "what", "is", "this", "a", "cat", "dog", "###", "human", "<", "img",
         ">", "</", "/"]


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


def fake_eva(gen) -> dict:
    d, n = EVA["width"], (EVA["image"] // EVA["patch"]) ** 2
    sd = {"cls_token": _rand(gen, 1, 1, d), "pos_embed": _rand(gen, 1, n + 1, d),
          "patch_embed.proj.weight": _rand(gen, d, 3, EVA["patch"], EVA["patch"], scale=0.2),
          "patch_embed.proj.bias": _rand(gen, d, scale=0.1)}
    for i in range(EVA["blocks"]):
        p = f"blocks.{i}"
        sd |= _norm(gen, f"{p}.norm1", d) | _norm(gen, f"{p}.norm2", d)
        sd |= _linear(gen, f"{p}.attn.qkv", 3 * d, d, bias=False)
        sd |= {f"{p}.attn.q_bias": _rand(gen, d, scale=0.1), f"{p}.attn.v_bias": _rand(gen, d, scale=0.1)}
        sd |= _linear(gen, f"{p}.attn.proj", d, d) | _linear(gen, f"{p}.mlp.fc1", EVA["mlp"], d)
        sd |= _linear(gen, f"{p}.mlp.fc2", d, EVA["mlp"])
    return sd


def fake_qformer_checkpoint(gen) -> dict:
    """BLIP-2 stage 1 as LAVIS saves it: what MiniGPT-4 uses plus what it drops."""
    h, d = QF["width"], EVA["width"]
    sd = _norm(gen, "ln_vision", d) | {"query_tokens": _rand(gen, 1, QF["queries"], h, scale=0.5)}
    sd |= _norm(gen, "Qformer.bert.embeddings.LayerNorm", h)
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
        # the text branch MiniGPT-4 sets to None
        sd |= _linear(gen, f"{p}.intermediate.dense", QF["ffn"], h)
        sd |= _linear(gen, f"{p}.output.dense", h, QF["ffn"]) | _norm(gen, f"{p}.output.LayerNorm", h)
    unused = {
        "Qformer.bert.embeddings.word_embeddings.weight": _rand(gen, 30, h),
        "Qformer.bert.embeddings.position_embeddings.weight": _rand(gen, 64, h),
        "Qformer.bert.embeddings.position_ids": torch.arange(64).unsqueeze(0),
        "Qformer.cls.predictions.bias": _rand(gen, 30),
        "Qformer.cls.predictions.transform.dense.weight": _rand(gen, h, h),
        "vision_proj.weight": _rand(gen, 16, h), "text_proj.weight": _rand(gen, 16, h),
        "itm_head.weight": _rand(gen, 2, h), "temp": torch.tensor(0.07),
    }
    return sd | unused


UNUSED_QFORMER_KEYS = {"Qformer.bert.embeddings.word_embeddings.weight",
                       "Qformer.bert.embeddings.position_embeddings.weight", "Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.bias",
                       "Qformer.cls.predictions.transform.dense.weight", "vision_proj.weight", "text_proj.weight",
                       "itm_head.weight", "temp"}


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


def fake_vicuna(path, gen):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_like_tokenizer()
    config = LlamaConfig(hidden_size=LLM["width"], num_hidden_layers=LLM["layers"], intermediate_size=LLM["ffn"],
                         num_attention_heads=LLM["heads"], num_key_value_heads=LLM["heads"], vocab_size=len(tok),
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_rand(gen, *p.shape, scale=0.2) + (1 if p.dim() == 1 else 0))  # norms near 1
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4_originals")
    gen = torch.Generator().manual_seed(0)
    eva, qformer = fake_eva(gen), fake_qformer_checkpoint(gen)
    proj = _linear(gen, "llama_proj", LLM["width"], QF["width"])
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": qformer}, root / "blip2_pretrained_flant5xxl.pth")
    torch.save({"model": proj}, root / "prerained_minigpt4_7b.pth")
    vicuna = fake_vicuna(root / "vicuna-7b", gen)
    sources = Sources(root / "eva_vit_g.pth", root / "blip2_pretrained_flant5xxl.pth",
                      root / "prerained_minigpt4_7b.pth", root / "vicuna-7b")
    return {"root": root, "sources": sources, "eva": eva, "qformer": qformer, "proj": proj, "vicuna": vicuna}


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
    used = {f"visual_encoder.{k}": v for k, v in originals["eva"].items() if not k.startswith(f"blocks.{USED_BLOCKS}.")}
    used |= {k: v for k, v in originals["qformer"].items()
             if k not in UNUSED_QFORMER_KEYS and ".intermediate." not in k and not any(
                 f"layer.{i}.output." in k for i in range(QF["layers"]))}
    used |= originals["proj"]

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
    skipped = converted[1]["skipped_keys"]
    expected_skips = UNUSED_QFORMER_KEYS | {f"visual_encoder.{k}" for k in originals["eva"]
                                            if k.startswith(f"blocks.{USED_BLOCKS}.")}
    expected_skips |= {k for k in originals["qformer"] if ".intermediate." in k or any(
        f"layer.{i}.output." in k for i in range(QF["layers"]))}
    assert set(skipped) == expected_skips
    assert converted[1]["n_original_tensors"] == len(used)


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
def _sources_with(originals, tmp_path, *, eva=None, qformer=None):
    s = originals["sources"]
    if eva is not None:
        torch.save(eva, tmp_path / "eva_vit_g.pth")
    if qformer is not None:
        torch.save({"model": qformer}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    return Sources(tmp_path / "eva_vit_g.pth" if eva is not None else s.eva_vit,
                   tmp_path / "blip2_pretrained_flant5xxl.pth" if qformer is not None else s.qformer,
                   s.minigpt4, s.vicuna)


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
