"""Tiny backbones: tokenizer coverage, deterministic pretraining, save/load like real weights."""

import json

import torch

from unike.backbones import cpu_name, load_backbone
from unike.data import case_samples
from unike.tiny import (COLLAPSED_SPREAD, PretrainConfig, TinyArch, answer_predictions_of, build_tokenizer,
                        context_use, corpus_samples, image_feature_spread, pretrain)
from unike.world import vocabulary

ARCH = dict(hidden=32, ffn=64, layers=2, heads=2, vision_hidden=32, vision_layers=1, qformer_layers=1,
            num_query_tokens=4)


def test_every_world_text_tokenizes_without_unknowns(world_dir, world_config):
    tok = build_tokenizer(vocabulary(world_config))
    texts = [t for r in json.loads((world_dir / "pretrain.json").read_text()) for t in (r["prompt"], r["answer"])]
    for name in ("vqa_eval.json", "caption_train_edit.json"):
        texts += [r[f] for r in json.loads((world_dir / name).read_text())
                  for f in ("src", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")]
    texts += ["###Human: <Img>", "</Img> Question: x Short answer:"]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids[:-1])
    assert tok.convert_ids_to_tokens(tok("Short answer:", add_special_tokens=False)["input_ids"]) == ["short", "answer", ":"]


def test_pretraining_is_deterministic_and_reloads_to_identical_outputs(tmp_path, world_dir, world_config, vqa_cases):
    train = PretrainConfig(steps=4, batch_size=8, warmup=2)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        report = pretrain(world_dir, out, TinyArch(text_model="llama", **ARCH), train, "minigpt4",
                          vocabulary(world_config))
        outs.append(out)
        assert 0.0 <= report["heldout"]["token_acc"] <= 1.0 and (out / "training.json").exists()
        by_topic = report["heldout"]["by_topic"]
        assert {"name", "diet", "habitat", "caption", "text-diet", "scene-count"} <= set(by_topic)
        assert sum(t["n"] for t in by_topic.values()) == report["heldout"]["n"]
        # which CPU made it: the same seed gives other weights on another CPU model
        assert report["device"] == f"cpu {cpu_name()} x1 threads" and cpu_name()
    a, b = (load_backbone(n, o) for n, o in zip("ab", outs))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = a.encode(case_samples(vqa_cases[0]))
    assert torch.equal(a.logits(batch), b.logits(b.encode(case_samples(vqa_cases[0]))))
    assert a.prompt_style == "minigpt4" and a.model.config.text_config.model_type == "llama"
    images = sorted({s.image for s in corpus_samples(json.loads((world_dir / "pretrain_eval.json").read_text()), world_dir)
                     if s.image is not None})
    recorded = json.loads((outs[0] / "training.json").read_text())["image_feature_spread"]
    assert recorded == image_feature_spread(a, images) > 0


def test_image_feature_spread_is_zero_for_an_image_blind_backbone_and_positive_otherwise(backbone, world_dir):
    images = sorted(world_dir.rglob("*.png"))[:16]
    assert image_feature_spread(backbone, images) > COLLAPSED_SPREAD
    with torch.no_grad():  # every image now projects to the bias: what collapsed pretraining converged to
        backbone.model.language_projection.weight.zero_()
        backbone.model.language_projection.bias.fill_(0.5)
    backbone.clear_image_cache()
    assert image_feature_spread(backbone, images) == 0.0


def test_context_use_keeps_means_the_backbones_own_answer_and_follow_the_stated_one(backbone, world_dir):
    """Keeping is measured against what the backbone says to the same prompt without the
    context, right or wrong: a record whose context is the empty string keeps by
    definition, on any backbone. Following is the exact match of the stated value."""
    records = json.loads((world_dir / "context_eval.json").read_text())
    follow = [r for r in records if r["topic"] == "context-follow"]
    bare = [r | {"prompt": r["prompt"].rsplit("Prompt: ", 1)[-1]} for r in records if r["topic"] == "context-other"]
    use = context_use(backbone, follow + bare, world_dir)
    assert use["heldout"]["keep_other"] == 1.0 and use["heldout_n"]["keep_other"] == len(bare) > 0
    hits = [bool((p == t).all()) for p, t in answer_predictions_of(backbone, corpus_samples(follow, world_dir))]
    assert use["heldout"]["follow"] == sum(hits) / len(hits)
    assert set(use["follow_by_statement"]) == {r["statement"] for r in follow}
