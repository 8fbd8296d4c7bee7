"""Tests of the tiny-world generator (small config, a few seconds)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unike.world import (
    CAPTION_REPHRASE_TEMPLATES,
    MMEDIT_FIELDS,
    REPHRASE_TEMPLATES,
    WorldConfig,
    generate_world,
    tokenize,
    vocabulary,
)
from unike.world import _static_vocabulary

from tests.conftest import SMALL_WORLD

EDIT_FILES = ("vqa_train.json", "vqa_eval.json", "caption_train_edit.json", "caption_eval_edit.json")
CREATURE_IMG = re.compile(r"images/(creatures|rephrase)/c(\d{3})_")


@pytest.fixture(scope="module")
def cfg(world_config) -> WorldConfig:
    return world_config  # the session's small world (tests/conftest.py)


def load(world_dir: Path, name: str):
    return json.loads((world_dir / name).read_text())


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def creature_of(image: str | None) -> int | None:
    m = CREATURE_IMG.match(image or "")
    return int(m.group(2)) if m else None


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
            assert set(r) == set(MMEDIT_FIELDS) | {"case_id"}
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
            idx = creature_of(r["image"])
            assert idx == creature_of(r["image_rephrase"])
            c = creatures[idx]
            assert c["split"] == split and c["changed_fact"] is not None
            split_of.setdefault(idx, set()).add(split)
            # loc is about an unchanged creature.
            loc_names = [u["name"] for u in creatures if u["name"] in tokenize(r["loc"])]
            assert len(loc_names) == 1
            assert next(u for u in creatures if u["name"] == loc_names[0])["changed_fact"] is None
    assert all(len(s) == 1 for s in split_of.values())
    train = {i for i, s in split_of.items() if s == {"train"}}
    evals = {i for i, s in split_of.items() if s == {"eval"}}
    assert train and evals and not train & evals


def test_pretrain_has_only_old_facts(world_dir):
    creatures = load(world_dir, "world.json")["creatures"]
    by_name = {c["name"]: c for c in creatures}
    for name in ("pretrain.json", "pretrain_eval.json"):
        for r in load(world_dir, name):
            idx = creature_of(r["image"])
            c = creatures[idx] if idx is not None else None
            if c is None:
                named = [by_name[t] for t in tokenize(r["prompt"]) if t in by_name]
                c = named[0] if named else None
            if c is None or c["changed_fact"] is None:
                continue
            fact = c["changed_fact"]
            assert c["current"][fact] not in tokenize(r["answer"]), r


def test_rephrase_templates_never_src(world_dir):
    held_out = set(CAPTION_REPHRASE_TEMPLATES) | {t for ts in REPHRASE_TEMPLATES.values() for t in ts}
    creatures = load(world_dir, "world.json")["creatures"]
    for name in EDIT_FILES:
        for r in load(world_dir, name):
            assert r["src"] not in held_out
            assert r["rephrase"] in held_out
            if name.startswith("caption"):
                assert creatures[creature_of(r["image"])]["changed_fact"] == "habitat"
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


@pytest.mark.parametrize("bad", [dict(n_changed=3), dict(n_changed=30), dict(image_size=16),
                                 dict(n_creatures=100, n_changed=4)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


def test_vocabulary_covers_outputs(world_dir, cfg):
    vocab = vocabulary(cfg)
    assert vocab == sorted(set(vocab))
    assert {"?", ":"} <= set(vocab)
    vocab_set = set(vocab)
    texts = []
    for name in ("pretrain.json", "pretrain_eval.json"):
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
