"""The pre-edit streams: each scored input's residual stream entering one layer, kept by the
pre-edit pass, lets scoring after an edit run only the layers from there up, for editors
that change nothing below. It must change no logit and no row, bit for bit."""

import pytest
import torch
from safetensors import safe_open

from baselines.ft import FineTune
from tests.conftest import make_backbone
from unike.backbones import Stream
from unike.data import case_samples
from unike.editing import NoEdit
from unike.harness import PreEditStreams, pre_edit_predictions, pre_edit_tensors, run_sequences

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
LAYER = 1  # the test backbones have 2 decoder layers; FT edits layer 1


def cached(backbone, cases, tmp_path):
    """The pre-edit pass with streams at LAYER, as cache_pre_edit runs it: (predictions, streams)."""
    path = tmp_path / f"{backbone.name}.streams.safetensors"
    preds = pre_edit_predictions(backbone, cases, (path, LAYER))
    return pre_edit_tensors(preds, cases), PreEditStreams([path])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_file_holds_each_cases_layer_input_bit_for_bit(world_config, vqa_cases, caption_cases, tmp_path, dtype):
    for text_model in ("opt", "llama"):
        backbone = make_backbone(world_config, text_model)
        backbone.model.to(dtype)
        cases = vqa_cases[:3] + caption_cases[:2]
        path = tmp_path / f"{text_model}.safetensors"
        with_streams = pre_edit_predictions(backbone, cases, (path, LAYER))
        assert with_streams == pre_edit_predictions(backbone, cases)  # the same predictions either way
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["layer"] == str(LAYER) and sorted(f.keys()) == sorted(c.case_id for c in cases)
            for case in cases:
                expected = backbone.prefix(backbone.encode(case_samples(case)), LAYER).hidden
                assert f.get_tensor(case.case_id).dtype == dtype
                assert torch.equal(f.get_tensor(case.case_id), expected), case.case_id


def test_after_an_edit_the_logits_from_a_stream_are_the_whole_models(backbone, vqa_cases, caption_cases, tmp_path):
    cases = vqa_cases[:2] + caption_cases[:2]
    _, streams = cached(backbone, cases, tmp_path)
    editor = FineTune(backbone, {"steps": 3, "lr": 1e-2})
    editor.edit(vqa_cases[0])
    for case in cases:
        batch = backbone.encode(case_samples(case))
        stream = streams.for_editor(editor, case)
        assert stream is not None and stream.layer == LAYER
        assert torch.equal(backbone.logits(batch, stream), backbone.logits(batch)), case.case_id
    editor.restore()


def test_the_harness_gives_the_same_rows_with_and_without_streams(backbone, vqa_cases, tmp_path):
    cases = vqa_cases[:4]
    pre_edit, streams = cached(backbone, cases, tmp_path)
    sequences = [[c] for c in cases[:2]] + [cases[1:4]]  # one-step edits and a sequence of three

    def rows(with_streams):
        out = run_sequences(FineTune(backbone, {"steps": 3, "lr": 1e-2}), sequences, pre_edit,
                            streams=streams if with_streams else None)
        return [{k: v for k, v in r.items() if k != "edit_s"} for r in out]

    assert rows(True) == rows(False)


def test_a_stream_serves_only_editors_that_change_nothing_below_it(backbone, vqa_cases, tmp_path):
    case = vqa_cases[0]
    _, streams = cached(backbone, [case], tmp_path)
    assert streams.for_editor(NoEdit(backbone), case) is None  # promises nothing: the whole model runs
    editor = FineTune(backbone)
    assert streams.for_editor(editor, case).layer == LAYER
    editor.lowest_edited_layer = 0  # an editor that edits below the stream's layer
    assert streams.for_editor(editor, case) is None
    editor.lowest_edited_layer = LAYER
    with pytest.raises(KeyError, match=f"none for case {vqa_cases[1].case_id}.*cache_pre_edit"):
        streams.for_editor(editor, vqa_cases[1])


def test_a_stream_of_another_batch_is_refused(backbone, vqa_cases):
    batch = backbone.encode(case_samples(vqa_cases[0]))
    hidden = backbone.prefix(batch, LAYER).hidden
    for other in (hidden[:, :-1], hidden[:-1]):  # another tokenisation, another set of inputs
        with pytest.raises(ValueError, match="does not fit a batch.*stale pre-edit cache"):
            backbone.logits(batch, Stream(LAYER, other))
