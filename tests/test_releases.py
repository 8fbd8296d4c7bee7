"""Released tiny backbones (unike/releases.py): the key hashes everything that decides a
pretraining and nothing else; pretrain_backbone installs a matching release byte for byte
and pretrains otherwise; the default config's and the seeds overlay's backbones have a
release this machine's worlds match."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from unike import releases
from unike.cli import main
from unike.config import load_config, merge_overlays, seed_config, seeds
from unike.grid import Layout
from unike.releases import find_release, make_release, pretraining_spec, release_key, world_digest
from unike.tiny import PretrainConfig, TinyArch
from unike.world import WorldConfig, generate_world, vocabulary

from conftest import REPO, SMALL_WORLD

ARCH = dict(hidden=32, ffn=64, layers=2, heads=2, vision_hidden=32, vision_layers=1, qformer_layers=1,
            num_query_tokens=4)


def test_the_key_changes_with_each_input_and_not_with_the_png_encoding(tmp_path, world_dir, world_config):
    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    arch, train, words = TinyArch(text_model="opt", **ARCH), PretrainConfig(steps=2), vocabulary(world_config)
    key, inputs = release_key(world, arch, train, "blip2", words)
    assert release_key(world, arch, train, "blip2", words)[0] == key
    assert set(inputs) == {"arch", "pretrain", "prompt_style", "vocabulary", "world", "recipe"}
    others = [release_key(world, replace(arch, hidden=64), train, "blip2", words),
              release_key(world, arch, replace(train, seed=1), "blip2", words),
              release_key(world, arch, replace(train, context_steps=5), "blip2", words),
              release_key(world, arch, train, "minigpt4", words),
              release_key(world, arch, train, "blip2", words + ["zebra"])]
    assert len({key} | {k for k, _ in others}) == 6
    image = next(world.rglob("*.png"))
    with Image.open(image) as im:
        pixels = im.copy()
    pixels.save(image, compress_level=0)  # other bytes, the same pixels: the same world
    assert world_digest(world) == inputs["world"]
    pixels.putpixel((0, 0), tuple(255 - v for v in pixels.getpixel((0, 0))))
    pixels.save(image)
    assert world_digest(world) != inputs["world"]
    (world / "pretrain.json").write_text((world / "pretrain.json").read_text(encoding="utf-8") + " ", encoding="utf-8")
    assert len({inputs["world"], world_digest(world)}) == 2


def _run_config(tmp_path: Path, world_dir: Path, name: str, **overrides) -> Path:
    """config.yaml with the test world and a tiny-blip2-opt of two pretraining steps, its
    out_dir under tmp_path (the world copied in)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    config.update(out_dir=str(tmp_path / name), seed=SMALL_WORLD["seed"],
                  world={k: v for k, v in SMALL_WORLD.items() if k != "seed"}, **overrides)
    config["backbones"]["tiny-blip2-opt"].update(arch={"text_model": "opt", **ARCH},
                                                 pretrain={"steps": 2, "batch_size": 4, "warmup": 1})
    shutil.copytree(world_dir, tmp_path / name / "world")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _pretrain(config: Path) -> Path:
    main(["pretrain-backbone", "--config", str(config), "--backbone", "tiny-blip2-opt"])
    return Layout(load_config(config)).backbone_dir("tiny-blip2-opt")


@pytest.fixture
def torch_state():
    """The step sets torch's threads and deterministic mode for its process; put them back
    for the tests after this one."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def test_pretrain_backbone_installs_a_matching_release_and_pretrains_otherwise(tmp_path, world_dir, monkeypatch,
                                                                              caplog, torch_state):
    monkeypatch.setattr(releases, "RELEASES", tmp_path / "released")
    caplog.set_level(logging.INFO, logger="unike")
    made = _pretrain(_run_config(tmp_path, world_dir, "first"))
    key = json.loads((made / "training.json").read_text(encoding="utf-8"))["release_key"]
    assert "no release of it in released/" in caplog.text and find_release(key) is None

    config = load_config(_run_config(tmp_path, world_dir, "second"))
    assert release_key(Layout(config).world, *pretraining_spec(config, "tiny-blip2-opt"))[0] == key
    folder = make_release(made, "tiny-blip2-opt", key, {"pretrain": {"seed": 1}}, "0" * 40)
    assert find_release(key) == folder
    caplog.clear()
    installed = _pretrain(tmp_path / "second.yaml")
    assert "installed the released backbone" in caplog.text and "pretraining" not in caplog.text
    weights = sorted(p.name for p in made.iterdir() if p.name != "training.json")
    assert sorted(p.name for p in installed.iterdir() if p.name != "training.json") == weights
    assert all((installed / n).read_bytes() == (made / n).read_bytes() for n in weights)
    record = json.loads((installed / "training.json").read_text(encoding="utf-8"))
    assert record["released"]["key"] == key and record["heldout"] == json.loads(
        (made / "training.json").read_text(encoding="utf-8"))["heldout"]
    with pytest.raises(ValueError, match="holds an installed release"):
        make_release(installed, "tiny-blip2-opt", key, {"pretrain": {"seed": 1}}, "0" * 40)

    caplog.clear()  # switched off, or another schedule: pretrained here
    _pretrain(_run_config(tmp_path, world_dir, "off", use_released_backbones=False))
    assert "use_released_backbones off" in caplog.text and "installed" not in caplog.text
    other = _run_config(tmp_path, world_dir, "other")
    data = yaml.safe_load(other.read_text(encoding="utf-8"))
    data["backbones"]["tiny-blip2-opt"]["pretrain"]["steps"] = 3
    other.write_text(yaml.safe_dump(data), encoding="utf-8")
    caplog.clear()
    assert json.loads((_pretrain(other) / "training.json").read_text(encoding="utf-8"))["release_key"] != key
    assert "no release of it in released/" in caplog.text


def test_a_release_replaces_the_earlier_one_of_its_backbone_and_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "RELEASES", tmp_path / "released")
    made = tmp_path / "made"
    made.mkdir()
    (made / "model.safetensors").write_bytes(b"weights")

    def release(key: str, seed: int, recorded: str | None = None) -> Path:
        (made / "training.json").write_text(json.dumps({"device": "cpu test x1 threads", "release_key": recorded or key}))
        return make_release(made, "tiny-blip2-opt", key, {"pretrain": {"seed": seed}}, "0" * 40)

    with pytest.raises(ValueError, match="was pretrained under key b{16}"):
        release("a" * 16, 0, recorded="b" * 16)
    first, other_seed = release("b" * 16, 0), release("d" * 16, 1)
    second = release("c" * 16, 0)
    assert not first.exists() and find_release("c" * 16) == second and find_release("d" * 16) == other_seed


def test_the_default_config_and_the_seeds_overlay_install_released_backbones_on_this_machine(tmp_path):
    """The default run and the seeds overlay (configs/seeds.yaml) pretrain nothing here:
    each seed's world, regenerated on this machine, with config.yaml's tiny backbones'
    settings and recipe (unike/tiny.py), has a release. Fails after a change to any of
    them: pretrain and release again (scripts/release_backbones.py, docs/tiny-world.md
    "Released backbones")."""
    config = load_config(merge_overlays(*(yaml.safe_load(path.read_text(encoding="utf-8"))
                                          for path in (REPO / "config.yaml", REPO / "configs" / "seeds.yaml"))))
    released = [json.loads(p.read_text(encoding="utf-8")) for p in releases.RELEASES.glob("*/release.json")]
    for seed in seeds(config):
        chain = seed_config(config, seed)
        world = tmp_path / f"world{seed}"
        generate_world(world, WorldConfig.of(chain))
        for name, entry in chain["backbones"].items():
            if entry["source"] == "tiny":
                key, inputs = release_key(world, *pretraining_spec(chain, name))
                same = [r for r in released if (r["backbone"], r["inputs"]["pretrain"]["seed"]) == (name, seed)]
                differs = [k for k, v in inputs.items() if same and v != same[0]["inputs"][k]]
                assert find_release(key) is not None, (
                    f"{name}, seed {seed}: no release of key {key} (released for that seed: "
                    f"{[r['key'] for r in same]}; what differs: {differs})")


def test_the_results_table_lists_each_release_from_its_own_training_record(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts import each other by name
    import summary

    folder = tmp_path / "released" / ("e" * 16)
    folder.mkdir(parents=True)
    (folder / "release.json").write_text(json.dumps({"key": "e" * 16, "backbone": "tiny-minigpt4",
                                                     "made_on": "cpu test x1 threads",
                                                     "inputs": {"pretrain": {"seed": 2}}}))
    (folder / "training.json").write_text(json.dumps({
        "heldout": {"exact_match": 0.5}, "train_s": 12.4,
        "context": {"plain_before": {"exact_match": 0.25}, "follow_by_statement": {"caption": 0.125, "text": 1.0},
                    "heldout": {"follow": 0.75, "keep_other": 0.875, "keep_otherfact": 0.625}}}))
    monkeypatch.setattr(releases, "RELEASES", tmp_path / "released")
    assert summary.releases_section()[-1] == (
        f"| tiny-minigpt4 | 2 | `{'e' * 16}` | 50.0% (25.0%) | 75.0%; caption 12%, text 100% | 87.5% / 62.5% "
        "| 12 s, cpu test x1 threads |")
    monkeypatch.setattr(releases, "RELEASES", tmp_path / "none")
    assert summary.releases_section() == []
