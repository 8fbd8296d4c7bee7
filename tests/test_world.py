"""Tests of the tiny-world generator (small config, a few seconds)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unike.world import (
    CAPTION_REPHRASE_TEMPLATES,
    CONTEXT_TOPICS,
    CONTEXT_WORDS,
    DEMO_SEPARATOR,
    MMEDIT_FIELDS,
    NAME_TEMPLATES,
    REPHRASE_TEMPLATES,
    WorldConfig,
    creature_index,
    edit_facts,
    generate_world,
    make_creatures,
    tokenize,
    vocabulary,
)
from unike.world import _static_vocabulary

from tests.conftest import SMALL_WORLD

EDIT_FILES = ("vqa_train.json", "vqa_eval.json", "caption_train_edit.json", "caption_eval_edit.json")
CONTEXT_FILES = ("context.json", "context_eval.json")


@pytest.fixture(scope="module")
def cfg(world_config) -> WorldConfig:
    return world_config  # the session's small world (tests/conftest.py)


def load(world_dir: Path, name: str):
    return json.loads((world_dir / name).read_text())


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path, world_dir, cfg):
    summary = generate_world(tmp_path, cfg)
    a, b = all_files(world_dir), all_files(tmp_path)
    assert a.keys() == b.keys()
    assert any(k.endswith(".png") for k in a) and any(k.endswith(".json") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    assert summary.n_images == sum(k.endswith(".png") for k in a)


def test_edit_records_schema(world_dir):
    for name in EDIT_FILES:
        records = load(world_dir, name)
        assert records, name
        ids = [r["case_id"] for r in records]
        assert len(set(ids)) == len(ids)
        for r in records:
            assert set(r) == set(MMEDIT_FIELDS) | {"case_id", "fact_id"}
            assert all(isinstance(v, str) and v for v in r.values())
            for key in ("image", "image_rephrase", "m_loc"):
                assert (world_dir / r[key]).is_file()


def test_record_counts(world_dir, cfg):
    assert len(load(world_dir, "vqa_eval.json")) == cfg.n_vqa_eval
    assert len(load(world_dir, "vqa_train.json")) == cfg.n_vqa_train
    assert len(load(world_dir, "caption_eval_edit.json")) == cfg.n_caption_eval
    assert len(load(world_dir, "caption_train_edit.json")) == cfg.n_caption_train


def test_edits_are_changes_and_splits_disjoint(world_dir):
    world = load(world_dir, "world.json")
    creatures = world["creatures"]
    split_of = {}
    for name in EDIT_FILES:
        split = "train" if "train" in name else "eval"
        for r in load(world_dir, name):
            assert r["alt"] != r["pred"]
            idx = creature_index(r["image"])
            assert idx == creature_index(r["image_rephrase"])
            c = creatures[idx]
            assert c["split"] == split and c["changed_facts"]
            assert r["fact_id"] == f"c{idx:03d}-" + ("caption" if name.startswith("caption") else
                                                     next(f for f in c["changed_facts"] if c["current"][f] == r["alt"]))
            split_of.setdefault(idx, set()).add(split)
            # loc is about an unchanged creature of the split's own locality pool.
            loc_names = [u["name"] for u in creatures if u["name"] in tokenize(r["loc"])]
            assert len(loc_names) == 1
            assert next(u for u in creatures if u["name"] == loc_names[0])["split"] == f"loc-{split}"
    assert all(len(s) == 1 for s in split_of.values())
    train = {i for i, s in split_of.items() if s == {"train"}}
    evals = {i for i, s in split_of.items() if s == {"eval"}}
    assert train and evals and not train & evals


def test_pretrain_has_only_old_facts_of_familiar_creatures(world_dir):
    creatures = load(world_dir, "world.json")["creatures"]
    by_name = {c["name"]: c for c in creatures}
    for name in ("pretrain.json", "pretrain_eval.json"):
        for r in load(world_dir, name):
            idx = creature_index(r["image"])
            c = creatures[idx] if idx is not None else None
            if c is None:
                named = [by_name[t] for t in tokenize(r["prompt"]) if t in by_name]
                c = named[0] if named else None
            assert c is None or c["familiar"], r
            for fact in (c or {}).get("changed_facts", ()):
                assert c["current"][fact] not in r["answer"], r


def test_rephrase_templates_never_src(world_dir):
    held_out = set(CAPTION_REPHRASE_TEMPLATES) | {t for ts in REPHRASE_TEMPLATES.values() for t in ts}
    creatures = load(world_dir, "world.json")["creatures"]
    for name in EDIT_FILES:
        for r in load(world_dir, name):
            assert r["src"] not in held_out
            assert r["rephrase"] in held_out
            if name.startswith("caption"):
                assert len(tokenize(r["alt"])) >= 6 and creatures[creature_index(r["image"])]["changed_facts"]
    # ... but the rephrase templates are part of the pretraining corpus.
    prompts = {r["prompt"] for r in load(world_dir, "pretrain.json")}
    assert held_out <= prompts


def test_edit_images_fresh(world_dir):
    def digests(records, keys):
        return {hashlib.sha256((world_dir / r[k]).read_bytes()).hexdigest()
                for r in records for k in keys if r.get(k)}

    pre = digests(load(world_dir, "pretrain.json"), ["image"])
    for name in EDIT_FILES:
        edit = digests(load(world_dir, name), ["image", "image_rephrase", "m_loc"])
        assert not pre & edit


def test_rerender_differs(world_dir):
    for r in load(world_dir, "vqa_eval.json"):
        a = np.asarray(Image.open(world_dir / r["image"]), dtype=np.float32)
        b = np.asarray(Image.open(world_dir / r["image_rephrase"]), dtype=np.float32)
        assert a.shape == b.shape == (64, 64, 3)
        assert np.abs(a - b).mean() > 2.0


def test_scene_cells_distinct(world_dir):
    scenes = load(world_dir, "world.json")["scenes"]
    assert scenes
    for objects in scenes.values():
        assert 1 <= len(objects) <= 3
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
        assert len({o["shape"] for o in objects}) == len(objects)
        assert len({o["color"] for o in objects}) == len(objects)


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match="n_creaturez"):
        WorldConfig.from_dict({"n_creaturez": 3})


@pytest.mark.parametrize("bad, key", [(dict(n_eval_subjects=0), "n_eval_subjects"),
                                      (dict(n_eval_subjects=300), "n_eval_subjects"),
                                      (dict(image_size=16), "image_size"),
                                      (dict(n_creatures=400), "n_creatures"),
                                      (dict(n_familiar=400), "n_familiar"),
                                      (dict(n_changed=95), "n_changed"),
                                      (dict(n_context=-1), "n_context")])
def test_config_validation(bad, key):
    with pytest.raises(ValueError, match=f"WorldConfig.{key} "):
        WorldConfig(**bad)


def test_vocabulary_covers_outputs(world_dir, cfg):
    vocab = vocabulary(cfg)
    assert vocab == sorted(set(vocab))
    assert {"?", ":"} <= set(vocab)
    vocab_set = set(vocab)
    texts = []
    for name in ("pretrain.json", "pretrain_eval.json") + CONTEXT_FILES:
        texts += [t for r in load(world_dir, name) for t in (r["prompt"], r["answer"])]
    for name in EDIT_FILES:
        texts += [r[k] for r in load(world_dir, name) for k in MMEDIT_FIELDS
                  if k not in ("image", "image_rephrase", "m_loc")]
    missing = {tok for t in texts for tok in tokenize(t)} - vocab_set
    assert not missing


def test_names_unique_and_distinct_from_vocabulary(world_dir, cfg):
    creatures = load(world_dir, "world.json")["creatures"]
    names = [c["name"] for c in creatures]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z]+", n) for n in names)
    assert not set(names) & _static_vocabulary()
    signatures = {tuple(c["signature"].values()) for c in creatures}
    assert len(signatures) == len(creatures)
    # Regenerating with another seed changes the world.
    other = vocabulary(WorldConfig.from_dict({**SMALL_WORLD, "seed": SMALL_WORLD["seed"] + 1}))
    assert other != vocabulary(cfg)


def edit_inputs(world_dir: Path, split: str) -> set[tuple[str | None, str]]:
    """Every (image, prompt) an editor is given or scored on in a split's edit files:
    the edit input, both generality inputs and both locality inputs, images by content."""
    def image(rel):
        return hashlib.sha256((world_dir / rel).read_bytes()).hexdigest()

    inputs = set()
    for name in EDIT_FILES:
        if split in name:
            for r in load(world_dir, name):
                inputs |= {(image(r["image"]), r["src"]), (image(r["image"]), r["rephrase"]),
                           (image(r["image_rephrase"]), r["rephrase"]), (None, r["loc"]),
                           (image(r["m_loc"]), r["m_loc_q"])}
    return inputs


@pytest.mark.parametrize("world", ["small", "default"])
def test_no_eval_input_among_the_train_inputs(world, world_dir, tmp_path):
    """What trained editors learn from (memory losses, KL terms, SERAC's negatives, IKE's
    bank: all the train split's inputs) never holds an eval input, locality included,
    and the splits share no fact."""
    if world == "default":
        world_dir = tmp_path
        generate_world(world_dir, WorldConfig())
    train, evals = edit_inputs(world_dir, "train"), edit_inputs(world_dir, "eval")
    assert train and evals and not train & evals
    facts = {s: {r["fact_id"] for n in EDIT_FILES if s in n for r in load(world_dir, n)} for s in ("train", "eval")}
    assert facts["train"] and facts["eval"] and not facts["train"] & facts["eval"]
    if world == "default":  # enough distinct facts to train editors on and to measure
        assert len(facts["train"]) >= 400 and len(facts["eval"]) >= 100
        for task in ("vqa", "caption"):
            eval_facts = {r["fact_id"] for n in EDIT_FILES if n.startswith(task) and "eval" in n
                          for r in load(world_dir, n)}
            assert len(eval_facts) >= 50, task


def test_one_case_per_fact_until_the_facts_run_out(cfg):
    creatures = make_creatures(cfg)
    facts = edit_facts("vqa", "eval", creatures)
    assert len(facts) >= 4 and len(set(facts)) == len(facts)
    assert {c.split for c, _ in facts} == {"eval"}
    assert all(f in c.changed_facts for c, f in facts)
    n_train_subjects = cfg.n_changed + cfg.n_creatures - cfg.n_familiar - cfg.n_eval_subjects
    assert [f for _, f in edit_facts("caption", "train", creatures)] == ["caption"] * n_train_subjects
    # Edit subjects are both familiar creatures whose facts changed and creatures new to the backbone.
    assert {c.familiar for c in creatures if c.split in ("train", "eval")} == {True, False}
    assert all(c.familiar and not c.changed_facts for c in creatures if c.split.startswith("loc-"))


def test_training_captions_name_another_creature_and_held_out_ones_the_pictured_one(cfg, tmp_path):
    """A followed caption in training calls the pictured creature by another creature's
    name (only copying can fill that slot); held out, as an edit's caption does, by its own."""
    world_dir = tmp_path / "world"  # the small world with enough context records for held-out captions
    generate_world(world_dir, dataclasses.replace(cfg, n_context=400))
    creatures = load(world_dir, "world.json")["creatures"]
    for name in CONTEXT_FILES:
        named = [(r["answer"].split()[1], creatures[creature_index(r["image"])]["name"])
                 for r in load(world_dir, name) if r["topic"] == "context-follow" and r.get("statement") == "caption"]
        assert named, name
        if name == "context.json":  # drawn at random among the train creatures: rarely the pictured one
            assert sum(said != shown for said, shown in named) >= 0.8 * len(named), named
        else:
            assert all(said == shown for said, shown in named), named


def test_context_records_follow_the_stated_fact_or_keep_the_old_world(world_dir):
    """Each record's answer is the stated value (follow) or the old world's (another
    creature or fact); nothing states a changed fact's current value; the eval split's
    creatures are never the subject of a training record."""
    world = load(world_dir, "world.json")
    creatures = world["creatures"]
    by_name = {c["name"]: c for c in creatures}
    held_out = {c["name"] for c in creatures if c["split"] == "eval"}
    for name in CONTEXT_FILES:
        records = load(world_dir, name)
        assert {r["topic"] for r in records} <= set(CONTEXT_TOPICS) and records, name
        for r in records:
            head, _, query = r["prompt"].rpartition(DEMO_SEPARATOR)
            fact, prompt = query.split("\nPrompt: ")
            stated = fact.removeprefix("New Fact: ")
            if r["topic"] == "context-name":  # a name stated and asked back: no picture, no fact
                assert r["image"] is None and r["answer"] in by_name and stated.endswith(" " + r["answer"])
                assert set(tokenize(r["prompt"])) <= set(tokenize(" ".join(NAME_TEMPLATES + CONTEXT_WORDS))) | {
                    r["answer"]}
                continue
            if r["topic"] == "context-follow":
                assert stated.endswith(" " + r["answer"])
            else:  # the old world's answer about whoever the prompt asks about
                named = [by_name[t] for t in tokenize(prompt) if t in by_name]
                asked = named[0] if named else creatures[creature_index(r["image"])] if creature_index(r["image"]) else None
                assert asked is None or r["answer"] in asked["old"].values(), r
            words = set(tokenize(r["prompt"] + " " + r["answer"]))
            for c in creatures:
                if c["name"] in words:
                    for f in c["changed_facts"]:
                        # a stated value never is the current one (captions: with the creature's name)
                        assert f"the {c['name']}? {c['current'][f]}" not in r["prompt"]
                        assert not re.search(rf"a {c['name']} eating .*{c['current'][f]}", r["prompt"])
            pictured = creature_index(r["image"])
            if name == "context.json":
                assert not (words & held_out) and (pictured is None or creatures[pictured]["name"] not in held_out)
            elif r["topic"] != "context-other" and pictured is not None:
                assert creatures[pictured]["name"] in held_out
    records = load(world_dir, "context.json")
    assert {r["topic"] for r in records} == set(CONTEXT_TOPICS)
    assert {r["answer"] for r in records if r["topic"] == "context-name"} == set(by_name)
    assert any(r["image"] for r in records) and any(r["image"] is None for r in records)
    assert any(DEMO_SEPARATOR in r["prompt"] for r in records)


def test_context_records_fit_the_tiny_context(world_dir, cfg):
    from tests.conftest import make_backbone
    from unike.tiny import build_tokenizer, corpus_samples

    vocab = vocabulary(cfg)
    assert {"new", "fact", "prompt"} <= set(vocab)
    tok = build_tokenizer(vocab)
    records = load(world_dir, "context.json") + load(world_dir, "context_eval.json")
    ids = tok([r["prompt"] + " " + r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    backbone = make_backbone(cfg, "llama")
    samples = corpus_samples(records, world_dir)
    assert all(s.prompt == r["prompt"] for s, r in zip(samples, records))  # not wrapped again
    limit = backbone.model.config.text_config.max_position_embeddings
    assert max(len(backbone.sample_ids(s)[0]) for s in samples) < limit  # room for EOS
