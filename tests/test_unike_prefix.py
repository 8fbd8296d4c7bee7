"""UniKE's training steps run only the edited layers (the layers below once per edit, as a
prefix), and the metrics are those of the whole-model loop (benchmarks/per_edit.py's
FullModelUniKE), bit for bit."""

import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # scripts import each other by name
from per_edit import METRICS, FullModelUniKE, deep_unike_setup, unike_rows  # noqa: E402
from unike.method.editor import UniKE  # noqa: E402
from unike.tiny import TinyArch  # noqa: E402

HPARAMS = {"n_neurons": 3, "max_steps": 8, "top_k": 4, "memory_size": 2000, "memory_top_k": 64}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module", params=["opt", "llama"])
def setup(request, tmp_path_factory):
    """An untrained 4-layer tiny backbone (the test backbones' width) with the last 2 layers edited."""
    arch = TinyArch(text_model=request.param, hidden=32, ffn=64, layers=4, heads=2, vision_hidden=32, vision_layers=1,
                    qformer_layers=1, num_query_tokens=4)
    return deep_unike_setup(tmp_path_factory.mktemp(f"deep-{request.param}"), arch, edited=2, hparams=HPARAMS,
                            n_eval=3)


def layer_calls(setup, editor_cls) -> list[int]:
    """Forward calls of each decoder layer during one edit."""
    backbone = setup["backbone"]
    calls = [0] * len(backbone.text)
    handles = [block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(backbone.text.layers)]
    editor = editor_cls(backbone, HPARAMS, setup["prepared"], knowledge=setup["knowledge"])
    try:
        editor.edit(setup["cases"]["e-vqa"][0])
        editor.restore()
    finally:
        editor.close()
        for h in handles:
            h.remove()
    return calls


def test_training_steps_run_only_the_edited_layers(setup):
    prefix, full = layer_calls(setup, UniKE), layer_calls(setup, FullModelUniKE)
    # Every layer: the knowledge pair's pass and the prefix (or the layers above it: the FFN
    # inputs, the "already right?" check); then one pass per step.
    assert full[0] == full[-1] == prefix[-1] >= 5  # the plain loop runs every layer at every step (here 2+)
    assert prefix[0] == prefix[1] == 2  # the prefix loop runs the layers below the edited ones once


def test_the_prefix_loop_gives_the_whole_model_loops_metrics(setup):
    for task in ("e-vqa", "e-ic"):
        plain = unike_rows(FullModelUniKE, setup, HPARAMS, task)
        ours = unike_rows(UniKE, setup, HPARAMS, task)
        assert [[r[m] for m in METRICS] for r in ours] == [[r[m] for m in METRICS] for r in plain]
