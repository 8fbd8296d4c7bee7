"""configs/paper.yaml without the weights: the DAG builds (no tiny-world jobs), a real run
stops in seconds naming each missing input; and real-style backbone folders load through
the one `load_backbone` path with the settings of a config entry."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from unike.backbones import load_backbone
from unike.data import Sample
from unike.editing import resolve_editor
from unike.grid import Cell
from unike.config import format_missing, grid_cells, merge_overlays, method_entry, missing_paths, validate

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "paper.yaml"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(PAPER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def paper() -> dict:
    """The effective paper configuration: configs/paper.yaml merged over config.yaml."""
    config = merge_overlays(*(yaml.safe_load(p.read_text()) for p in (REPO / "config.yaml", PAPER)))
    validate(config)
    return config


def test_paper_config_is_complete_and_lists_the_paper_grid(paper):
    cells = set(grid_cells(paper))
    baselines = ("ft", "ke", "tpatcher", "mend", "serac", "unike")
    for method in ("backbone", "ike", *baselines):  # Table 1
        for backbone in ("blip2-opt-2.7b", "minigpt4-7b"):
            for task in ("e-vqa", "e-ic"):
                assert Cell(method, backbone, task, "one-step") in cells
    for method in baselines:  # Tables 2 and 3: sequential and cross-task on MiniGPT-4, without IKE
        for task in ("e-vqa", "e-ic"):
            assert {Cell(method, "minigpt4-7b", task, r) for r in ("seq-10", "seq-20")} <= cells
        assert Cell(method, "minigpt4-7b", "cross-task", "cross-10") in cells
    assert not {c for c in cells if c.method == "ike" and c.regime != "one-step"}
    for task in ("e-vqa", "e-ic"):  # Table 4
        for variant in ("unike-only-intrin", "unike-only-latent-ike", "unike-intrin+ike", "unike-intrin+latent-ike"):
            assert Cell(variant, "minigpt4-7b", task, "one-step") in cells
    figure4 = paper["report"]["figure4"]  # every point of Figure 4 is a cell of the grid
    points = [*figure4["a"]["latent-ike"], *figure4["a"]["ike"], *figure4["b"]["fixed"], figure4["b"]["adaptive"],
              *figure4["c"]]
    assert {Cell(m, figure4["backbone"], figure4["task"], "one-step") for m in points} <= cells
    assert {b["paper_name"] for b in paper["backbones"].values()} == {"blip2-opt", "minigpt4"}
    assert paper["data"]["source"] == "mmedit" and paper["device"] == "cuda" and paper["dtype"] == "bfloat16"
    # SERAC's counterfactual model must share the backbone's tokenizer: OPT-125m for BLIP-2 OPT
    # only; MiniGPT-4 uses its own Vicuna (EasyEdit's small_name), last layer trained.
    serac = {b: method_entry(paper, "serac", b)["hparams"] for b in ("blip2-opt-2.7b", "minigpt4-7b")}
    assert serac["blip2-opt-2.7b"]["counterfactual"].endswith("opt-125m")
    assert serac["minigpt4-7b"]["counterfactual"] == "backbone" and serac["minigpt4-7b"]["cf_layers"] == 1


def _real_backbone_rows() -> list[tuple[set[str], set[str], str]]:
    """docs/baselines.md, "Settings for the real backbones": (methods, settings, source) of each table row."""
    text = (REPO / "docs" / "baselines.md").read_text(encoding="utf-8")
    section = text.split("\n## Settings for the real backbones\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows.append((set(re.findall(r"`([^`]+)`", cells[0])), set(re.findall(r"`([^`]+)`", cells[1])), cells[3]))
    return rows


def test_every_unike_variant_runs_the_papers_unike_settings(paper):
    """The paper overlay changes `unike` only; each Table 4 / Figure 4 variant of the grid
    reaches n_neurons 10 and top_k 40 through its `base:`, unless it overrides one itself."""
    tiny = yaml.safe_load((REPO / "config.yaml").read_text())["methods"]
    overlay = yaml.safe_load(PAPER.read_text())["methods"]
    variants = {c.method for c in grid_cells(paper) if c.method != "unike"
                and paper["methods"][c.method]["editor"] == paper["methods"]["unike"]["editor"]}
    assert len(variants) >= 15
    for name in variants:
        hparams = method_entry(paper, name, "minigpt4-7b")["hparams"]
        declared = {**tiny.get(name, {}).get("hparams", {}), **overlay.get(name, {}).get("hparams", {})}
        for key, value in (("n_neurons", 10), ("top_k", 40)):
            assert hparams[key] == declared.get(key, value), (name, key)


def test_paper_settings_are_the_published_ones_not_the_tiny_worlds(paper):
    """The real backbones run the published settings (UniKE: the paper's Appendix D.3), not
    config.yaml's tiny-world tuning, and every baseline setting either file gives has its
    source in docs/baselines.md ("Settings for the real backbones")."""
    tiny = yaml.safe_load((REPO / "config.yaml").read_text())
    overlay = yaml.safe_load(PAPER.read_text())
    backbones = sorted(paper["backbones"])
    for backbone in backbones:  # 10 key-value pairs in each edited layer, the top-40 hidden states
        unike = method_entry(paper, "unike", backbone)["hparams"]
        assert unike["n_neurons"] == 10 and unike["top_k"] == 40, backbone
    knowledge = paper["knowledge"]  # the last four layers, >15K triplets, encoders at Adam 1e-4
    assert knowledge["edited_layers"] == 4 and knowledge["n_triplets"] >= 15000
    assert knowledge["encoders"]["lr"] == 1e-4
    # Training loops sized for the tiny world's CPU budget are not what the real backbones run.
    assert knowledge["encoders"]["steps"] > tiny["knowledge"]["encoders"]["steps"]
    for method, field in (("ke", "steps"), ("mend", "steps"), ("tpatcher", "max_steps"), ("unike", "max_steps")):
        for backbone in backbones:
            assert method_entry(paper, method, backbone)["hparams"][field] > tiny["methods"][method]["hparams"][field], \
                (method, field, backbone)
    # No method of the paper grid silently keeps a tiny-world value: every setting config.yaml
    # gives it is restated in configs/paper.yaml or documented as the published value, and
    # every baseline setting either file gives has a row with a source.
    rows = _real_backbone_rows()
    baselines = {c.method for c in grid_cells(paper) if paper["methods"][c.method]["editor"].startswith("baselines.")}
    assert baselines == {"ft", "ke", "tpatcher", "mend", "ike", "serac"}
    for method in sorted(baselines | {"unike"}):
        own = overlay["methods"].get(method, {})
        restated = set(own.get("hparams", {})) | {k for b in own.get("backbone_hparams", {}).values() for k in b}
        inherited = set(tiny["methods"][method].get("hparams", {})) - restated
        if method == "unike":  # UniKE's sources are in docs/unike.md; all its tiny-world values are restated
            assert not inherited, f"configs/paper.yaml keeps config.yaml's tiny-world unike {sorted(inherited)}"
            continue
        documented = {s for methods, settings, source in rows if method in methods and source for s in settings}
        missing = (restated | inherited) - documented
        assert not missing, f"docs/baselines.md has no source for {method}'s {sorted(missing)} on the real backbones"
        fields = {f.name for f in dataclasses.fields(resolve_editor(paper["methods"][method]["editor"]).Hparams)}
        assert documented <= fields, f"docs/baselines.md names {method} settings that do not exist: {documented - fields}"


def test_dry_run_builds_the_dag_without_tiny_world_jobs(tmp_path, paper):
    result = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(line.split() for line in (result.stdout + result.stderr).splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    assert int(counts["edit_eval"]) == len(grid_cells(paper))
    assert int(counts["cache_pre_edit"]) == 4  # 2 backbones x 2 tasks
    assert not {"make_world", "pretrain_backbone", "mine_edits"} & set(counts)
    # merged over config.yaml: its tiny backbones and eval limits are not inherited
    effective = yaml.safe_load((tmp_path / paper["out_dir"] / "config.effective.yaml").read_text())
    assert set(effective["backbones"]) == {"blip2-opt-2.7b", "minigpt4-7b"}
    assert effective["data"]["n_eval"] == {"e-vqa": None, "e-ic": None}


def test_a_real_run_without_the_inputs_fails_fast_naming_each(tmp_path, paper):
    t0 = time.time()
    result = snakemake(tmp_path, "--cores", "1")
    elapsed = time.time() - t0
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s"
    for path in (paper["backbones"]["blip2-opt-2.7b"]["path"], paper["backbones"]["minigpt4-7b"]["path"],
                 paper["data"]["annotations"], paper["data"]["image_root"]):
        assert path in out
    assert "Salesforce/blip2-opt-2.7b" in out and "convert-minigpt4" in out and "docs/real-backbones.md" in out
    assert not (tmp_path / paper["out_dir"] / "logs").exists()  # no job started


def _mmedit_record(i: int) -> dict:
    return {"src": "what is this", "pred": "dog", "alt": "cat", "rephrase": "what is this", "loc": "what is",
            "loc_ans": "this", "m_loc_q": "what is this", "m_loc_a": "cat", "image": f"val2014/img{i}.jpg",
            "image_rephrase": f"val2014_image_rephrase/img{i}.png", "m_loc": f"val2014/loc{i}.jpg"}


def test_missing_paths_checks_backbones_annotations_and_images(tmp_path, paper):
    config = json.loads(json.dumps(paper))
    for name, entry in config["backbones"].items():
        entry["path"] = str(tmp_path / "models" / name)
        (tmp_path / "models" / name).mkdir(parents=True)
        for f in ("config.json", "tokenizer_config.json"):
            (tmp_path / "models" / name / f).write_text("{}")
    config["data"].update(annotations=str(tmp_path / "ann"), image_root=str(tmp_path / "img"))
    serac = config["methods"]["serac"]  # the auxiliary models SERAC's settings name
    serac["hparams"]["classifier"] = str(tmp_path / "models" / "distilbert")
    serac["backbone_hparams"]["blip2-opt-2.7b"]["counterfactual"] = str(tmp_path / "models" / "opt-125m")
    (tmp_path / "models" / "distilbert").mkdir()
    (tmp_path / "ann").mkdir()
    for f in ("vqa_train.json", "vqa_eval.json", "caption_train_edit.json", "caption_eval_edit.json"):
        (tmp_path / "ann" / f).write_text(json.dumps([_mmedit_record(0)]))
    for rel in ("val2014/img0.jpg", "val2014_image_rephrase/img0.png", "val2014/loc0.jpg"):
        (tmp_path / "img" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "img" / rel).write_bytes(b"")
    opt125m = str(tmp_path / "models" / "opt-125m")
    assert dict(missing_paths(config)).keys() == {opt125m}  # found before any job, not inside prepare_editor
    assert "methods.serac (hparams.counterfactual, on blip2-opt-2.7b)" in dict(missing_paths(config))[opt125m]
    (tmp_path / "models" / "opt-125m").mkdir()
    assert missing_paths(config) == []

    (tmp_path / "img" / "val2014_image_rephrase" / "img0.png").unlink()
    (tmp_path / "models" / "minigpt4-7b" / "config.json").unlink()
    (tmp_path / "ann" / "vqa_eval.json").unlink()
    missing = dict(missing_paths(config))
    assert set(missing) == {str(tmp_path / "img" / "val2014_image_rephrase" / "img0.png"),
                            str(tmp_path / "models" / "minigpt4-7b" / "config.json"),
                            str(tmp_path / "ann" / "vqa_eval.json")}
    assert "convert-minigpt4" in missing[str(tmp_path / "models" / "minigpt4-7b" / "config.json")]
    assert "image_root" in missing[str(tmp_path / "img" / "val2014_image_rephrase" / "img0.png")]
    assert "3 input(s)" in format_missing(list(missing.items()))


# ------------------------------------------------------------------------ real-style folders
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A Blip2 OPT folder as the hub ships it: save_pretrained only, no unike_backbone.json,
    a ViT pretrained at 224 with patch 14 (tiny widths)."""
    from unike.tiny import TinyArch, build_model, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(["what", "is", "this", "cat"])
    arch = TinyArch(text_model="opt", hidden=32, ffn=64, layers=1, heads=2, vision_hidden=32, vision_layers=1,
                    qformer_layers=1, num_query_tokens=4, patch_size=14, image_size=224)
    model = build_model(arch, tokenizer)
    out = tmp_path_factory.mktemp("hf") / "blip2-opt-tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_a_hub_folder_loads_without_metadata(hf_folder, picture):
    assert not (hf_folder / "unike_backbone.json").exists()
    backbone = load_backbone("blip2-opt-tiny", hf_folder)
    assert backbone.prompt_style == "blip2" and backbone.image_size == 224  # from the OPT text model, native size
    batch = backbone.encode([Sample(picture, "question: what is this short answer:", "cat")])
    assert torch.isfinite(backbone.logits(batch)).all()


def test_image_size_from_the_config_entry_interpolates_and_changes_features(hf_folder, picture):
    native = load_backbone("b", hf_folder, entry={"prompt_style": "blip2"})
    easyedit = load_backbone("b", hf_folder, entry={"prompt_style": "blip2", "image_size": 364})
    assert easyedit.image_size == 364 and easyedit.load_pixels([picture]).shape == (1, 3, 364, 364)
    f224, f364 = native.image_features([picture]), easyedit.image_features([picture])
    assert f224.shape == f364.shape == (1, 4, 32) and torch.isfinite(f364).all()
    assert not torch.allclose(f224, f364, atol=1e-4)
    # identical weights: only the resolution (and the interpolated positions) differ
    with torch.no_grad():
        direct = easyedit.model.get_image_features(easyedit.load_pixels([picture]),
                                                   interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(f364, direct)


def test_entry_settings_are_checked(hf_folder, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        load_backbone("b", hf_folder, entry={"image_size": 300})
    assert load_backbone("b", hf_folder, "cpu", "bfloat16").model.language_model.dtype == torch.float32
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in hf_folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "unike_backbone.json").write_text(json.dumps({"prompt_style": "minigpt4", "image_size": 224}))
    with pytest.raises(ValueError, match="prompt style"):
        load_backbone("b", copy, entry={"prompt_style": "blip2"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone("b", tmp_path / "nowhere")


def test_an_old_snapshot_without_image_token_id_gets_the_placeholder(hf_folder, tmp_path):
    """Snapshots of Salesforce/blip2-opt-2.7b before the hub added <image> lack image_token_index."""
    old = tmp_path / "old"
    old.mkdir()
    for f in hf_folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((old / "config.json").read_text())
    config.pop("image_token_index", None)
    config.pop("image_token_id", None)
    (old / "config.json").write_text(json.dumps(config))
    backbone = load_backbone("old", old)
    assert backbone.image_token_id == backbone.tokenizer.convert_tokens_to_ids("<image>")
