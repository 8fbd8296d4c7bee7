"""IKE on untrained tiny backbones (retrieval, context fitting, protocol). The tiny world's
context records, in the same format, are tested in tests/test_world.py."""

import json
import logging

import pytest
import torch

from baselines.ike import IKE, IKEHparams
from unike.data import case_samples, edit_sample, Sample, vqa_prompt
from unike.editing import NoEdit
from unike.harness import make_sequences, pre_edit_predictions, run_sequences
from unike.incontext import (
    BANK_JSON,
    BANK_TENSORS,
    DEMO_SEPARATOR,
    SentenceEmbedder,
    own_demonstration,
    render,
    retrieval_query,
)


@pytest.fixture(scope="module")
def bank(tmp_path_factory, world_config, vqa_cases):
    """A demonstration bank built from the eval cases themselves (so each case's own
    demonstrations are in it)."""
    from tests.conftest import make_backbone

    out = tmp_path_factory.mktemp("ike_bank")
    summary = IKE.prepare(make_backbone(world_config, "opt"), IKEHparams(), vqa_cases, out, 0)
    assert summary["n_demos"] == 3 * len(vqa_cases)
    return out


def test_bank_holds_three_demonstrations_per_record(bank, vqa_cases):
    from safetensors.torch import load_file

    demos = json.loads((bank / BANK_JSON).read_text())["demos"]
    emb = load_file(str(bank / BANK_TENSORS))["embeddings"]
    assert emb.shape == (len(demos), 384) and torch.allclose(emb.norm(dim=-1), torch.ones(len(demos)), atol=1e-5)
    case = vqa_cases[0]
    assert [d["kind"] for d in demos[:3]] == ["copy", "update", "retain"]
    src = vqa_prompt(case.src)
    assert demos[0]["text"] == f"New Fact: {src} {case.alt}\nPrompt: {src} {case.alt}"
    assert demos[1]["text"] == f"New Fact: {src} {case.alt}\nPrompt: {vqa_prompt(case.rephrase)} {case.alt}"
    assert demos[2]["text"] == f"New Fact: {src} {case.alt}\nPrompt: {case.loc} {case.loc_ans}"


def test_embedder_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    emb = SentenceEmbedder()
    e = emb(["what does this creature eat? fish", "what does this creature eat? fish", "how many shapes?"])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-5) and float(e[0] @ e[2]) < 0.9


def test_missing_embedder_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        SentenceEmbedder(str(tmp_path / "absent"))


def test_retrieval_returns_the_edits_own_fact_first(backbone, bank, vqa_cases):
    editor = IKE(backbone, {"k": 5}, bank)
    demos = editor.demonstrations
    for case in vqa_cases[:3]:
        editor.edit(case)
        top = demos.retrieved
        assert len(top) == 5 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)
        assert demos.demos[top[0][0]] == own_demonstration(case)
        assert top[0][1] == pytest.approx(max(float(x) for x in demos.embeddings @ demos.embedder([retrieval_query(case)])[0]))
        assert demos.context()[-1] == own_demonstration(case)  # the edit's own fact goes last
        editor.restore()


def test_scored_inputs_get_demos_then_the_stated_fact_and_keep_their_image(backbone, bank, vqa_cases):
    case = vqa_cases[0]
    editor = IKE(backbone, {"k": 2}, bank)
    editor.edit(case)
    for sample in case_samples(case):
        fitted, dropped = editor.demonstrations.fit(sample)
        assert dropped == 0 and fitted.image == sample.image and fitted.answer == sample.answer
        expected = "".join(d + DEMO_SEPARATOR for d in editor.demonstrations.context())
        expected += f"New Fact: {vqa_prompt(case.src)} {case.alt}\nPrompt: {sample.prompt}"
        assert fitted.prompt == expected


def test_context_limit_drops_least_similar_demos_first_and_logs(backbone, bank, vqa_cases, caplog):
    case = vqa_cases[1]
    sample = edit_sample(case)
    full = IKE(backbone, {"k": 4}, bank).demonstrations
    assert full.context_limit == backbone.model.config.text_config.max_position_embeddings
    full.edit(case)
    n_positions = lambda s: len(backbone.sample_ids(s)[0])
    retrieved = [full.demos[i] for i, _ in full.retrieved]
    whole = Sample(sample.image, render(retrieved + [own_demonstration(case)], case, sample.prompt), sample.answer)
    assert full.fit(sample) == (whole, 0)
    # A limit that leaves room for exactly the two most similar demonstrations.
    tok = backbone.tokenizer
    sizes = [len(tok(d + DEMO_SEPARATOR, add_special_tokens=False)["input_ids"]) for d in retrieved]
    limit = n_positions(whole) - sum(sizes[2:])
    editor = IKE(backbone, {"k": 4, "context_limit": limit}, bank)
    editor.edit(case)
    with caplog.at_level(logging.INFO, logger="unike.incontext"):
        preds, targets = editor.predict(case_samples(case))
    demos = editor.demonstrations
    assert demos.dropped[0] == 2 and demos.n_dropped_total == sum(demos.dropped)
    assert "dropped" in caplog.text and case.case_id in caplog.text
    fitted, dropped = demos.fit(sample)
    assert dropped == 2 and n_positions(fitted) == limit
    assert fitted.prompt == render(retrieved[:2] + [own_demonstration(case)], case, sample.prompt)
    assert [len(p) for p in preds] == [len(t) for t in targets]
    with pytest.raises(ValueError, match="context limit"):
        tiny = IKE(backbone, {"k": 6, "context_limit": 10}, bank)
        tiny.edit(case)
        tiny.predict([sample])


def test_restore_forgets_and_ike_holds_one_edit(backbone, bank, vqa_cases):
    case = vqa_cases[0]
    editor = IKE(backbone, {"k": 4}, bank)
    samples = case_samples(case)
    plain, _ = NoEdit(backbone).predict(samples)
    editor.edit(case)
    with pytest.raises(RuntimeError, match="one edit"):
        editor.edit(vqa_cases[1])
    editor.restore()
    again, _ = editor.predict(samples)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert not IKE.supports_sequential(editor.hparams) and IKE.needs_training
    with pytest.raises(ValueError, match="sequential"):
        run_sequences(editor, [vqa_cases[:2]], {})


def test_same_seed_same_numbers(world_config, bank, vqa_cases):
    from tests.conftest import make_backbone

    def run():
        b = make_backbone(world_config, "llama", seed=3)
        pre = {cid: {r: torch.tensor(v) for r, v in rows.items()}
               for cid, rows in pre_edit_predictions(b, vqa_cases[:3]).items()}
        rows = run_sequences(IKE(b, {"k": 6}, bank), make_sequences({"e-vqa": vqa_cases[:3]}, "one-step", 0), pre)
        return [{k: v for k, v in r.items() if k != "edit_s"} for r in rows]

    assert run() == run()


def test_hparams_are_checked(backbone, bank):
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        IKE(backbone, {"topk": 3}, bank)
    with pytest.raises(ValueError, match="embedded with"):
        IKE(backbone, {"embedder": "/elsewhere"}, bank)
