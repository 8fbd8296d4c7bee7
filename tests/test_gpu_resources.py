"""benchmarks/gpu_resources.py: the full-size architectures are the published ones (and the
paper's sizes), and the whole measurement runs at tiny scale on the CPU (every method, both
backbones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unike.config import method_entry

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts import each other by name
import gpu_resources  # noqa: E402
import summary  # noqa: E402

PREPARE_STEPS = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_resources") / "gpu_resources.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_resources.py"), "--scale", "tiny", "--device", "cpu",
           "--cases", "2", "--prepare-steps", str(PREPARE_STEPS), "--edit-steps", "20", "--train-cases", "20", "--triplets", "16",
           "--threads", "1", "--dtype", "bfloat16", "--out", str(out)]  # the GPU's dtype, run on the CPU
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # bf16 on the CPU takes about twice float32's ~100 s; the limit only stops a hung run.
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_full_size_architectures_have_the_paper_parameter_counts():
    tokenizer = gpu_resources.build_tokenizer(["plix"])
    counts = {}
    for name, (vision, text) in gpu_resources.ARCHITECTURES["full"].items():
        model = gpu_resources.build_model(gpu_resources.blip2_config(vision, text, tokenizer), "meta", torch.bfloat16)
        counts[name] = gpu_resources.parameter_counts(model)
    # Salesforce/blip2-opt-2.7b: 3.74B; MiniGPT-4: EVA ViT-g (39 blocks) + Q-Former + LLaMA-7B.
    assert 3.70e9 < counts["blip2-opt-2.7b"]["total"] < 3.80e9
    assert 2.60e9 < counts["blip2-opt-2.7b"]["language_model"] < 2.70e9
    assert 7.78e9 < counts["minigpt4-7b"]["total"] < 7.88e9
    assert 6.70e9 < counts["minigpt4-7b"]["language_model"] < 6.78e9
    for c in counts.values():
        assert 0.98e9 < c["vision"] < 0.99e9 and 0.10e9 < c["qformer"] < 0.11e9
    # Job sizes use these counts for backbones whose weights are not on this machine.
    from unike.resources import MEASURED_BACKBONES, PUBLISHED_PARAMETERS

    assert PUBLISHED_PARAMETERS == {paper: counts[name]["total"] for paper, name in MEASURED_BACKBONES.items()}


def test_full_size_architectures_are_the_published_configs():
    """What the script builds (through the converter's config functions and the tiny models'
    text-config builder) has every tensor shape and parameter of the models the published
    config.json files describe: Salesforce/blip2-opt-2.7b, and MiniGPT-4 = its vision side +
    Vicuna-7B v0 with the converter's <image> row."""
    from transformers import AutoConfig, Blip2Config

    fixtures = REPO / "tests" / "fixtures"
    blip2 = Blip2Config.from_pretrained(fixtures / "blip2-opt-2.7b")
    vicuna = AutoConfig.from_pretrained(fixtures / "vicuna-7b-delta-v0")
    vicuna.vocab_size += 1
    minigpt4 = Blip2Config(vision_config=blip2.vision_config.to_dict(), qformer_config=blip2.qformer_config.to_dict(),
                           text_config=vicuna.to_dict(), num_query_tokens=blip2.num_query_tokens)
    tokenizer = gpu_resources.build_tokenizer(["plix"])
    for name, published in (("blip2-opt-2.7b", blip2), ("minigpt4-7b", minigpt4)):
        vision, text = gpu_resources.ARCHITECTURES["full"][name]
        built = gpu_resources.build_model(gpu_resources.blip2_config(vision, text, tokenizer), "meta", torch.bfloat16)
        ref = gpu_resources.build_model(published, "meta", torch.bfloat16)
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert gpu_resources.parameter_counts(built) == gpu_resources.parameter_counts(ref), name


def test_tiny_run_measures_every_method_on_both_backbones(tiny_run):
    config = gpu_resources.load_paper_config()
    assert tiny_run["complete"] and tiny_run["scale"] == "tiny" and tiny_run["prepare_steps"] == PREPARE_STEPS
    assert tiny_run["dtype"] == "bfloat16"
    assert set(tiny_run["backbones"]) == set(gpu_resources.BACKBONES)
    for name, backbone in tiny_run["backbones"].items():
        assert "error" not in backbone, backbone.get("error")
        assert list(backbone["methods"]) == list(gpu_resources.METHODS)
        assert backbone["knowledge"]["encoder_steps"] == PREPARE_STEPS and backbone["knowledge"]["triplets"] > 0
        for method, m in backbone["methods"].items():
            assert m["status"] == "ok", (name, method, m.get("error"))
            assert m["cases"] == 2
            assert m["edit_s_median"] > 0 and m["s_per_case"] >= m["edit_s_median"] and m["warmup"]["s"] > 0
            assert m["top_layer_passes_per_case"] >= 1
            # The paper config's hyperparameters, except the training-loop lengths and stand-ins.
            for field, value in method_entry(config, method, name)["hparams"].items():
                if field not in m["changed_hparams"]:
                    assert m["hparams"][field] == value, (method, field)
            if m["editor"] in gpu_resources.PREPARE_STEP_HPARAMS:
                for field in gpu_resources.PREPARE_STEP_HPARAMS[m["editor"]]:
                    assert m["hparams"][field] == PREPARE_STEPS
                    assert m["changed_hparams"][field]["used"] == PREPARE_STEPS
            assert ("prepare" in m) == (method != "ft")
    # configs/paper.yaml's FT (per-backbone learning rates), not config.yaml's
    for name, lr in (("blip2-opt-2.7b", 2e-4), ("minigpt4-7b", 1e-4)):
        ft = tiny_run["backbones"][name]["methods"]["ft"]["hparams"]
        assert ft["lr"] == lr and ft["steps"] == 15
    # SERAC: OPT-125m (a stand-in here) for BLIP-2 OPT, the backbone's own text model for MiniGPT-4
    serac = tiny_run["backbones"]["blip2-opt-2.7b"]["methods"]["serac"]["changed_hparams"]
    assert serac["counterfactual"] == {"config": "/data/models/opt-125m", "used": "stand-in:opt-125m"}
    serac = tiny_run["backbones"]["minigpt4-7b"]["methods"]["serac"]
    assert "counterfactual" not in serac["changed_hparams"]
    assert serac["hparams"]["counterfactual"] == "backbone" and serac["hparams"]["cf_layers"] == 1
    # No GPU: no memory verdicts, and none at tiny scale anyway.
    assert tiny_run["checks"] and all(c["pass"] is None for c in tiny_run["checks"])


def test_summary_renders_the_run(tiny_run):
    lines = summary.gpu_resources_section(tiny_run)
    text = "\n".join(lines)
    assert "tiny scale" in text
    rows = [line for line in lines if line.startswith("| blip2-opt-2.7b |") or line.startswith("| minigpt4-7b |")]
    assert len(rows) == 2 * len(gpu_resources.METHODS)
