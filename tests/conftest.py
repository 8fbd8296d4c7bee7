"""Shared fixtures: a small tiny world and untrained tiny backbones built in-process
(seconds), for tests that need real model code but not a pretrained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unike.backbones import Backbone
from unike.data import load_cases
from unike.tiny import TinyArch, build_model, build_tokenizer
from unike.world import WorldConfig, generate_world, vocabulary

SMALL_WORLD = dict(n_creatures=14, n_familiar=8, n_changed=4, n_eval_subjects=4, pretrain_images_per_creature=2,
                   n_pretrain_scenes=12, n_vqa_eval=6, n_caption_eval=4, n_vqa_train=8, n_caption_train=6,
                   n_context=40, seed=1)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def world_config() -> WorldConfig:
    return WorldConfig.from_dict(SMALL_WORLD)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory, world_config) -> Path:
    out = tmp_path_factory.mktemp("tiny_world")
    generate_world(out, world_config)
    return out


@pytest.fixture(scope="session")
def vqa_cases(world_dir):
    return load_cases(world_dir / "vqa_eval.json", "e-vqa", world_dir)


@pytest.fixture(scope="session")
def caption_cases(world_dir):
    return load_cases(world_dir / "caption_eval_edit.json", "e-ic", world_dir)


def make_backbone(world_config: WorldConfig, text_model: str, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary(world_config))
    arch = TinyArch(text_model=text_model, hidden=32, ffn=64, layers=2, heads=2, vision_hidden=32,
                    vision_layers=1, qformer_layers=1, num_query_tokens=4)
    style = "blip2" if text_model == "opt" else "minigpt4"
    return Backbone(f"test-{text_model}", build_model(arch, tokenizer), tokenizer, style, arch.image_size)


@pytest.fixture(params=["opt", "llama"])
def backbone(request, world_config) -> Backbone:
    return make_backbone(world_config, request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models (and bf16 matmuls on the CPU) run faster on one thread than on two on a
    busy machine; modules that train many tiny editors use it (pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
