"""Misuse of the command line ends in one line naming the bad value, before any model loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "config.yaml")
CELL = ["--method", "ft", "--backbone", "tiny-minigpt4", "--task", "e-vqa", "--regime", "one-step"]


def _unike(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unike", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _replace(args: list[str], option: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(option) + 1] = value
    return out


@pytest.mark.parametrize("option, value, message", [
    ("--method", "rome", "--method 'rome' is not one of ['backbone', "),
    ("--backbone", "llava", "--backbone 'llava' is not one of ['tiny-blip2-opt', 'tiny-minigpt4']"),
    ("--task", "e-qa", "--task 'e-qa' is not one of ['e-vqa', 'e-ic', 'cross-task']"),
    ("--regime", "seq-5", "--regime 'seq-5' is not one of ['one-step', 'seq-10', 'seq-20', 'cross-10']"),
    ("--regime", "cross-10", "--regime 'cross-10' does not apply to --task 'e-vqa' (allowed: ['one-step', "),
])
def test_a_bad_name_is_one_line_before_any_model_loads(tmp_path, option, value, message):
    # tmp_path holds no backbone, data or cache: a message about them would mean it got further
    result = _unike("edit-eval", "--config", CONFIG, *_replace(CELL, option, value), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("unike edit-eval: error: ") and message in lines[0]


def test_a_missing_pre_edit_cache_says_which_step_makes_it(tmp_path):
    """Eval cases exist, their pre-edit predictions do not: the message names the step to run."""
    from unike.world import WorldConfig, generate_world

    import yaml

    config = {**yaml.safe_load((REPO / "config.yaml").read_text()), "out_dir": str(tmp_path / "out")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    world = tmp_path / "out" / "world"
    generate_world(world, WorldConfig.from_dict({"seed": 0, **config["world"], "n_pretrain_scenes": 2,
                                                 "pretrain_images_per_creature": 1, "n_context": 0}))
    data = tmp_path / "out" / "data" / "tiny-minigpt4"
    data.mkdir(parents=True)
    (data / "vqa_eval.json").write_text((world / "vqa_eval.json").read_text())
    result = _unike("edit-eval", "--config", str(tmp_path / "c.yaml"), *CELL, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "e-vqa.json: no pre-edit cache; run `python -m unike cache-pre-edit" in result.stderr
    assert "--backbone tiny-minigpt4 --task e-vqa`" in result.stderr
    # The predictions without the streams (a folder from before they were cached): the same step.
    predictions = tmp_path / "out" / "pre_edit" / "tiny-minigpt4" / "e-vqa.json"
    predictions.parent.mkdir(parents=True)
    predictions.write_text('{"backbone": "tiny-minigpt4", "cases": {}}')
    result = _unike("edit-eval", "--config", str(tmp_path / "c.yaml"), *CELL, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "e-vqa.streams.safetensors: no pre-edit cache; run `python -m unike cache-pre-edit" in result.stderr


def test_every_text_file_is_read_and_written_as_utf8():
    """`read_text()` without an encoding uses the locale's, which fails on UTF-8 JSON under
    an ASCII locale: every text read and write in the code names its encoding (writes of
    json.dumps output are ASCII and need none)."""
    bare = []
    for package in ("unike", "baselines", "reports", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("read_text", "write_text")
                        and not any(k.arg == "encoding" for k in node.keywords)
                        and not (node.func.attr == "write_text" and _ascii_json(node))):
                    bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bare, bare


def _ascii_json(call: ast.Call) -> bool:
    """A write of json.dumps output (ASCII unless ensure_ascii=False): any encoding writes it."""
    text = ast.unparse(call.args[0]) if call.args else ""
    return text.startswith("json.dumps(") and "ensure_ascii=False" not in text
