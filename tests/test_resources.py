"""unike.resources: what each job asks its executor for, with figures computed by hand."""

from __future__ import annotations

import json
import struct

import pytest

from unike.resources import (JobSizer, load_dtype, load_measurements, parameter_count, retry_growth,
                             safetensors_parameters)

MINIGPT4 = 7_832_696_320  # PUBLISHED_PARAMETERS["minigpt4"]


def config(tmp_path, **data) -> dict:
    """configs/paper.yaml's shape: one local MiniGPT-4 (weights absent) on MMEdit."""
    return {
        "out_dir": str(tmp_path / "out"), "device": "cuda", "dtype": "bfloat16",
        "backbones": {"minigpt4-7b": {"source": "local", "paper_name": "minigpt4", "prompt_style": "minigpt4",
                                      "path": str(tmp_path / "absent")},
                      "tiny-minigpt4": {"source": "tiny", "paper_name": "minigpt4", "prompt_style": "minigpt4"}},
        "data": {"source": "mmedit", "annotations": str(tmp_path / "ann"), "image_root": str(tmp_path),
                 "n_eval": {"e-vqa": None, "e-ic": None}, **data},
        "knowledge": {"n_triplets": 1000},
        "methods": {"ft": {"editor": "baselines.ft:FineTune"}, "serac": {"editor": "baselines.serac:SERAC"},
                    "ike": {"editor": "baselines.ike:IKE"}, "unike": {"editor": "unike.method.editor:UniKE"}},
    }


def write_safetensors(path, shapes: dict[str, list[int]]) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"},
                         **{k: {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())


def test_retry_doubles_per_attempt_and_refuses_attempt_zero():
    assert [retry_growth(3000, a) for a in (1, 2, 3)] == [3000, 6000, 12000]
    with pytest.raises(ValueError, match="attempt must be at least 1, got 0"):
        retry_growth(3000, 0)


@pytest.mark.parametrize("device, dtype, fallback, loaded", [
    ("cuda", "bfloat16", True, "bfloat16"), ("cuda", "float16", True, "float16"),
    ("cpu", "bfloat16", True, "float32"), ("cpu", "bfloat16", False, "bfloat16"), ("cpu", "float32", False, "float32"),
])
def test_load_dtype_takes_the_entry_over_the_config_and_the_cpu_fallback(device, dtype, fallback, loaded):
    cfg = {"device": device, "dtype": "float32", "cpu_float32_fallback": fallback}
    assert load_dtype(cfg, {"dtype": dtype}) == loaded


def test_load_dtype_names_a_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_dtype({"device": "cuda", "dtype": "int8"}, {})


def test_parameters_from_config_then_weights_then_published(tmp_path):
    write_safetensors(tmp_path / "model-1.safetensors", {"a": [3, 4], "b": [5]})
    write_safetensors(tmp_path / "model-2.safetensors", {"c": [2, 2, 2]})
    assert safetensors_parameters(tmp_path) == 12 + 5 + 8
    entry = {"paper_name": "minigpt4"}
    assert parameter_count(entry, tmp_path) == (25, "weights")
    assert parameter_count({**entry, "resources": {"parameters": 7}}, tmp_path) == (7, "config")
    assert parameter_count(entry, tmp_path / "absent") == (MINIGPT4, "published")


def test_host_memory_is_the_tiny_request_plus_the_weights_and_half_again(tmp_path):
    sizer = JobSizer(config(tmp_path))
    # 7,832,696,320 params x 2 bytes (bf16) x 1.5 = 23,498,088,960 B = 22,409.8 MiB -> 22,410
    assert sizer.mem_mb("cache_pre_edit", "minigpt4-7b") == 3000 + 22_410
    assert sizer.mem_mb("edit_eval", "minigpt4-7b") == 4000 + 22_410
    assert sizer.mem_mb("pretrain_encoders", "minigpt4-7b") == 4000  # loads no backbone
    assert sizer.mem_mb("edit_eval", "tiny-minigpt4") == 4000
    cpu = JobSizer({**config(tmp_path), "device": "cpu"})  # bf16 loads in fp32 there: twice the bytes
    assert cpu.mem_mb("cache_pre_edit", "minigpt4-7b") == 3000 + 44_820


def test_gpu_memory_from_weights_published_method_figures_and_overrides(tmp_path):
    cfg = config(tmp_path)
    sizer = JobSizer(cfg)
    # 7,832,696,320 x 2 B x 1.25 = 19.58 GB -> 20
    assert sizer.gpu_mem_gb("cache_pre_edit", "minigpt4-7b") == 20
    assert sizer.gpu_mem_gb("edit_eval", "minigpt4-7b", "ft") == 20
    assert sizer.gpu_mem_gb("edit_eval", "minigpt4-7b", "serac") == 57  # EasyEdit's 56.8 GB
    assert sizer.gpu_mem_gb("edit_eval", "tiny-minigpt4", "serac") == 1
    cfg["backbones"]["minigpt4-7b"]["resources"] = {"gpu_mem_gb": 30.5, "mem_mb": 50_000}
    assert sizer.gpu_mem_gb("edit_eval", "minigpt4-7b", "serac") == 31
    assert sizer.mem_mb("edit_eval", "minigpt4-7b") == 50_000


def test_time_grows_with_cases_regime_and_method(tmp_path):
    sizer = JobSizer(config(tmp_path, n_eval={"e-vqa": 100, "e-ic": 37}))
    # 10 min start-up + cases x s per case x 2 (safety), rounded up
    assert sizer.runtime("edit_eval", "minigpt4-7b", "e-vqa", "ft", "one-step") == 10 + 7  # 100 x 2 x 2 / 60 = 6.7
    assert sizer.runtime("edit_eval", "minigpt4-7b", "e-vqa", "ike", "one-step") == 10 + 9  # 100 x 2.5 x 2 / 60 = 8.3
    assert sizer.edited_cases("minigpt4-7b", "e-ic", "seq-10") == 30  # full sequences only
    assert sizer.edited_cases("minigpt4-7b", "cross-task", "cross-10") == 70  # min(100 // 5, 37 // 5) x 10
    assert sizer.runtime("cache_pre_edit", "minigpt4-7b", "e-ic") == 10 + 3  # 37 x 2 x 2 / 60 = 2.5
    assert sizer.runtime("prepare_editor", "minigpt4-7b", "e-ic", "serac") == 24 * 60  # nothing measured
    assert sizer.runtime("edit_eval", "tiny-minigpt4", "e-ic", "ft", "one-step") == 120


def test_cases_from_the_annotation_file_else_mmedit_sizes(tmp_path):
    sizer = JobSizer(config(tmp_path))
    assert sizer.split_cases("minigpt4-7b", "e-vqa", "eval") == 2093
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "vqa_eval.json").write_text(json.dumps([{}] * 12))
    assert sizer.split_cases("minigpt4-7b", "e-vqa", "eval") == 12
    assert sizer.split_cases("minigpt4-7b", "e-ic", "train") == 2849


def measurements(tmp_path, total=MINIGPT4, scale="full") -> dict:
    record = {"parameters": {"total": total},
              "knowledge": {"s": 32.0, "triplets": 64, "state_bytes_per_triplet": 1_000_000, "config_n_triplets": 15000},
              "methods": {
                  "ft": {"status": "ok", "editor": "baselines.ft:FineTune", "s_per_case": 0.5,
                         "peak_reserved_gib": 30.0},
                  "unike": {"status": "ok", "editor": "unike.method.editor:UniKE", "s_per_case": 1.0,
                            "peak_reserved_gib": 10.0,
                            "prepare": {"s": 60.0, "train_cases": 220, "peak_reserved_gib": 45.0}},
                  "mend": {"status": "ok", "editor": "baselines.mend:MEND", "s_per_case": 1.0, "peak_reserved_gib": 20,
                           "prepare": {"s": 100.0, "train_cases": 220, "peak_reserved_gib": 25.0},
                           "changed_hparams": {"steps": {"config": 20000, "used": 20}}}}}
    path = tmp_path / "gpu_resources.json"
    path.write_text(json.dumps({"scale": scale, "device_type": "cuda", "backbones": {"minigpt4-7b": record}}))
    return load_measurements(path)


def test_measurements_replace_the_defaults(tmp_path):
    cfg = config(tmp_path, n_eval={"e-vqa": 120, "e-ic": None})
    cfg["methods"]["mend"] = {"editor": "baselines.mend:MEND"}
    cfg["methods"]["unike-variant"] = {"editor": "unike.method.editor:UniKE"}
    sizer = JobSizer(cfg, measurements(tmp_path))
    assert sizer.runtime("edit_eval", "minigpt4-7b", "e-vqa", "ft", "one-step") == 10 + 2  # 120 x 0.5 x 2 / 60
    # 30 GiB reserved = 32.2 GB -> 33
    assert sizer.gpu_mem_gb("edit_eval", "minigpt4-7b", "ft") == 33
    # a variant takes its editor's measurement; prepare's 45 GiB = 48.3 GB, plus the knowledge
    # states of 1000 - 64 more triplets at 1 MB each = 0.94 GB -> 49.3 -> 50
    assert sizer.gpu_mem_gb("prepare_editor", "minigpt4-7b", "unike-variant", needs_knowledge=True) == 50
    # prepare scaled by its cut training loop (20000 / 20 steps): 100 s x 1000 x 2 / 60 = 3333.3 min
    assert sizer.runtime("prepare_editor", "minigpt4-7b", "e-vqa", "mend") == 10 + 3334
    # extract_hidden_states: 1000 triplets x 32 s / 64 x 2 / 60 = 16.7
    assert sizer.runtime("extract_hidden_states", "minigpt4-7b") == 10 + 17


def test_measurements_of_another_scale_or_architecture_are_ignored(tmp_path):
    assert measurements(tmp_path, scale="tiny") == {}
    other = JobSizer(config(tmp_path, n_eval={"e-vqa": 120}), measurements(tmp_path, total=MINIGPT4 * 2))
    assert other.runtime("edit_eval", "minigpt4-7b", "e-vqa", "ft", "one-step") == 10 + 8  # 120 x 2 x 2 / 60


def test_schema_names_a_bad_backbone_resource():
    import yaml

    from unike.config import ConfigError, merge_overlays, validate
    from smoke_run import REPO

    paper = merge_overlays(*(yaml.safe_load((REPO / p).read_text()) for p in ("config.yaml", "configs/paper.yaml")))
    paper["backbones"]["minigpt4-7b"]["resources"] = {"mem_mb": 0}
    with pytest.raises(ConfigError, match="backbones/minigpt4-7b/resources/mem_mb: 0 is less than the minimum of 1"):
        validate(paper)
