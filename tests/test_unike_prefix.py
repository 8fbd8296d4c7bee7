"""The harness's way of editing (benchmarks/per_edit.py) gives the plain way's metrics, case
by case, for every intrinsic editor: the plain way runs the whole model, the vision tower
included, at every pass of an edit, recomputes the pre-edit predictions and scores the
inputs one at a time. UniKE's training steps run only the edited layers."""

import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # scripts import each other by name
from per_edit import METRICS, PlainBackbone, deep_setup, edit_rows  # noqa: E402
from unike.editing import create_editor  # noqa: E402
from unike.grid import TASKS  # noqa: E402
from unike.tiny import TinyArch  # noqa: E402

UNIKE = {"n_neurons": 3, "max_steps": 8, "top_k": 4, "memory_size": 2000, "memory_top_k": 64}
ENTRIES = {  # few steps each: the two ways must agree, whatever the editors learn
    "ft": {"editor": "baselines.ft:FineTune", "hparams": {"steps": 3}},
    "ke": {"editor": "baselines.ke:KnowledgeEditor", "hparams": {"steps": 3, "condition_dim": 64}},
    "mend": {"editor": "baselines.mend:MEND", "hparams": {"steps": 3, "rank": 8}},
    "tpatcher": {"editor": "baselines.tpatcher:TPatcher", "hparams": {"max_steps": 5, "memory_size": 2000}},
    "unike": {"editor": "unike.method.editor:UniKE", "hparams": UNIKE},
}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module", params=["opt", "llama"])
def setup(request, tmp_path_factory):
    """An untrained 4-layer tiny backbone (the test backbones' width), UniKE editing the last 2 layers."""
    arch = TinyArch(text_model=request.param, hidden=32, ffn=64, layers=4, heads=2, vision_hidden=32, vision_layers=1,
                    qformer_layers=1, num_query_tokens=4)
    return deep_setup(tmp_path_factory.mktemp(f"deep-{request.param}"), arch, edited=2, entries=ENTRIES, n_eval=3)


def passes(setup, backbone) -> tuple[list[int], int]:
    """Completed forward passes of each decoder layer, and of the vision tower, in one UniKE edit."""
    layers = [0] * len(backbone.text)
    vision = [0]
    handles = [block.register_forward_hook(lambda *_, i=i: layers.__setitem__(i, layers[i] + 1))
               for i, block in enumerate(backbone.text.layers)]
    handles.append(backbone.model.vision_model.register_forward_hook(lambda *_: vision.__setitem__(0, vision[0] + 1)))
    backbone.clear_image_cache()
    editor = create_editor(ENTRIES["unike"], backbone, setup["prepared"]["unike"], setup["knowledge"])
    try:
        editor.edit(setup["cases"]["e-vqa"][0])
        editor.restore()
    finally:
        editor.close()
        for h in handles:
            h.remove()
    return layers, vision[0]


def test_unike_training_steps_run_only_the_edited_layers(setup):
    (harness, harness_vision), (plain, plain_vision) = passes(setup, setup["backbone"]), passes(
        setup, PlainBackbone(setup["backbone"]))
    # The top layer runs the knowledge pair's pass, the FFN inputs' pass and one pass per step, both ways.
    assert plain[0] == plain[-1] == harness[-1] >= 5
    assert plain_vision == plain[-1]  # the plain way: the vision tower at every pass too
    assert harness[0] == harness[1] == harness_vision == 1  # the harness: the layers below the edited ones once
    # The first edited layer: the knowledge pair's and the FFN inputs' passes; a step adds its neurons only.
    assert harness[2] == 2


def test_unike_learns_the_same_neurons_both_ways_bit_for_bit(setup):
    """A training step that starts above the first edited layer (its attention and FFN
    output kept from the pass before training) computes what the whole model computes."""
    learnt = []
    for backbone in (setup["backbone"], PlainBackbone(setup["backbone"])):
        editor = create_editor(ENTRIES["unike"], backbone, setup["prepared"]["unike"], setup["knowledge"])
        try:
            editor.edit(setup["cases"]["e-ic"][0])
            learnt.append([p.detach().clone() for p in editor.patcher.parameters()])
            editor.restore()
        finally:
            editor.close()
    assert learnt[0] and all(torch.equal(a, b) for a, b in zip(*learnt))


@pytest.mark.parametrize("method,lowest", [("ft", 3), ("tpatcher", 3), ("unike", 2), ("ke", 1), ("mend", 1)])
def test_scoring_starts_from_the_cached_streams_where_nothing_below_is_edited(setup, method, lowest):
    """The streams are at UniKE's first edited layer (2 of 4 here): FT, T-Patcher and UniKE
    score from them; KE and MEND, editing the last 3 layers, run the whole model."""
    editor = create_editor(ENTRIES[method], setup["backbone"], setup["prepared"].get(method), setup["knowledge"])
    try:
        assert editor.lowest_edited_layer == lowest
        for task in TASKS:
            stream = setup["streams"][task].for_editor(editor, setup["cases"][task][0])
            assert (stream is not None and stream.layer == 2) if lowest >= 2 else stream is None
    finally:
        editor.close()


@pytest.mark.parametrize("method", ENTRIES)
def test_the_harness_gives_the_plain_ways_metrics(setup, method):
    for task in TASKS:
        plain = edit_rows("plain", ENTRIES[method], setup, method, task)
        harness = edit_rows("harness", ENTRIES[method], setup, method, task)
        assert [[r[m] for m in METRICS] for r in harness] == [[r[m] for m in METRICS] for r in plain]
