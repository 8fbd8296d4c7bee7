"""SERAC on untrained tiny backbones: routing, no label leak into the scope classifier,
answer words no train label holds, memory and restore, determinism, configurable parts."""

from dataclasses import replace

import pytest
import torch

from baselines.serac import (
    META,
    SERAC,
    WEIGHTS,
    ScopeClassifier,
    ScopeInput,
    SERACHparams,
    _vocabulary_words,
    cf_sample,
)
from unike.backbones import answer_predictions
from unike.data import ROWS, case_samples, edit_prompt, load_cases, vqa_prompt
from unike.editing import NoEdit, parse_hparams
from unike.harness import make_sequences, pre_edit_predictions, run_sequences

from tests.conftest import make_backbone

FAST = dict(cls_steps=150, cls_batch=32, cf_steps=4, cf_batch=4)


@pytest.fixture(scope="module")
def train_cases(world_dir):
    return load_cases(world_dir / "vqa_train.json", "e-vqa", world_dir)


def _prepare(backbone, cases, out, seed=0, **hp):
    h = parse_hparams(SERACHparams, {**FAST, **hp}, "serac")
    return SERAC.prepare(backbone, h, cases, out, seed), {**FAST, **hp}


@pytest.fixture(scope="module")
def prepared_opt(tmp_path_factory, world_config, train_cases):
    backbone = make_backbone(world_config, "opt")
    out = tmp_path_factory.mktemp("serac_opt")
    summary, hp = _prepare(backbone, train_cases, out)
    return backbone, out, hp, summary


def test_prepare_trains_both_parts_and_writes_its_folder(prepared_opt, train_cases):
    _, out, _, summary = prepared_opt
    assert (out / WEIGHTS).is_file() and (out / META).is_file()
    assert summary["cls_loss_last"] < summary["cls_loss_first"]
    assert summary["n_cf_trainable"] > 0
    # The saved editor's figures on the train cases held out of both parts' training.
    assert summary["cf_steps"] == FAST["cf_steps"]
    for name in ("validation", "validation_vocab"):
        figures = summary[name]
        assert figures["n_cases"] >= 1 and summary["n_fit"] + figures["n_cases"] == len(train_cases)
        assert all(0.0 <= figures[row] <= 1.0 for row in ROWS) and figures["cf_nll"] > 0


def test_counterfactual_model_copies_an_answer_word_no_train_label_has(world_config, train_cases, vqa_cases,
                                                                       tmp_path):
    """An edit whose answer is a word of no train record is answered with that word when
    routed: the vocabulary labels teach the counterfactual model to copy any word (with
    train labels only, it answered eval edits with train labels)."""
    backbone = make_backbone(world_config, "opt")
    seen = {w for c in train_cases for label in (c.alt, c.pred, c.loc_ans, c.m_loc_a) for w in label.split()}
    new_words = [w for w in _vocabulary_words(backbone.tokenizer) if w not in seen][:3]
    assert new_words
    # An untrained 2-layer backbone learns to copy faster at a larger learning rate.
    _, hp = _prepare(backbone, train_cases, tmp_path, cls_steps=1, cf_steps=600, cf_batch=16, cf_lr=3e-3,
                     cf_label_shuffle=0.4, cf_label_vocab=0.5)
    editor = SERAC(backbone, hp, tmp_path)
    for case, word in zip(vqa_cases, new_words):
        edit = replace(case, alt=word)
        editor.edit(edit)
        preds, _ = editor.predict([case_samples(edit)[0]])  # the edit input itself: in scope (score 1)
        assert editor.last_routed == [0]
        assert backbone.tokenizer.decode(preds[0]).strip() == word
        editor.restore()


def test_routes_in_scope_rephrase_to_the_counterfactual_model_and_locality_to_the_base(prepared_opt, train_cases):
    backbone, out, hp, _ = prepared_opt
    editor = SERAC(backbone, hp, out)
    case = train_cases[0]
    samples = case_samples(case)  # rel, t_gen, m_gen, t_loc, m_loc
    base_preds, _ = NoEdit(backbone).predict(samples)
    editor.edit(case)
    preds, targets = editor.predict(samples)
    scores = editor.last_scores
    assert scores[1] > 0.5 and 1 in editor.last_routed  # the rephrase: in scope
    assert scores[3] < 0.5 and 3 not in editor.last_routed  # the text locality input: out of scope
    cf_batch = backbone.encode([cf_sample(case, samples[i]) for i in editor.last_routed])
    cf_preds = answer_predictions(editor.cf.logits(cf_batch), cf_batch)
    for j, i in enumerate(editor.last_routed):
        assert torch.equal(preds[i], cf_preds[j])
    for i in set(range(5)) - set(editor.last_routed):
        assert torch.equal(preds[i], base_preds[i])
    assert [len(p) for p in preds] == [len(t) for t in targets]


def test_hard_routing_follows_the_threshold(prepared_opt, vqa_cases):
    backbone, out, hp, _ = prepared_opt
    samples = case_samples(vqa_cases[0])
    everything = SERAC(backbone, {**hp, "threshold": 0.0}, out)
    nothing = SERAC(backbone, {**hp, "threshold": 1.0}, out)
    for editor in (everything, nothing):
        editor.edit(vqa_cases[0])
        editor.predict(samples)
    assert everything.last_routed == [i for i in range(5) if everything.last_scores[i] > 0.0]
    assert nothing.last_routed == []
    soft = SERAC(backbone, {**hp, "routing": "soft"}, out)
    soft.edit(vqa_cases[0])
    preds, targets = soft.predict(samples)
    assert [len(p) for p in preds] == [len(t) for t in targets]


def test_no_answer_reaches_the_scope_classifier(monkeypatch, world_config, train_cases, vqa_cases, tmp_path):
    seen: list[ScopeInput] = []
    original = ScopeClassifier.embed

    def spy(self, inputs):
        seen.extend(inputs)
        return original(self, inputs)

    monkeypatch.setattr(ScopeClassifier, "embed", spy)
    backbone = make_backbone(world_config, "llama")
    _, hp = _prepare(backbone, train_cases, tmp_path, cls_steps=20)
    editor = SERAC(backbone, hp, tmp_path)
    scored = []
    for case in vqa_cases[:2]:
        editor.edit(case)
        samples = case_samples(case)
        scored += samples
        editor.predict(samples)
    editor.restore()

    assert seen and all(type(x) is ScopeInput for x in seen)
    assert "answer" not in ScopeInput.__dataclass_fields__
    allowed = {p for c in train_cases + vqa_cases[:2]
               for p in (edit_prompt(c.task, c.src), edit_prompt(c.task, c.rephrase), c.loc, vqa_prompt(c.m_loc_q))}
    assert {x.prompt for x in seen} <= allowed
    for s in scored:
        assert all(not x.prompt.endswith(" " + s.answer) for x in seen)
    with pytest.raises(TypeError, match="ScopeInput"):
        editor.scope.embed(scored[:1])  # a Sample carries its answer: refused


def test_memory_accumulates_and_restore_clears_it(prepared_opt, vqa_cases):
    backbone, out, hp, _ = prepared_opt
    editor = SERAC(backbone, hp, out)
    assert SERAC.supports_sequential(editor.hparams) and SERAC.needs_training
    samples = case_samples(vqa_cases[0])
    plain, _ = NoEdit(backbone).predict(samples)
    for case in vqa_cases[:3]:
        editor.edit(case)
    assert len(editor.memory) == 3 and editor.memory_embeddings.shape[0] == 3
    editor.restore()
    assert editor.memory == [] and editor.memory_embeddings is None
    preds, _ = editor.predict(samples)
    assert all(torch.equal(a, b) for a, b in zip(plain, preds)) and editor.last_routed == []


def test_same_seed_same_numbers(world_config, train_cases, vqa_cases, tmp_path):
    from safetensors.torch import load_file

    def run(name):
        backbone = make_backbone(world_config, "opt", seed=5)
        out = tmp_path / name
        out.mkdir()
        _, hp = _prepare(backbone, train_cases, out, cls_steps=20)
        pre = {cid: {r: torch.tensor(v) for r, v in rows.items()}
               for cid, rows in pre_edit_predictions(backbone, vqa_cases[:4]).items()}
        sequences = make_sequences({"e-vqa": vqa_cases[:4]}, "one-step", 0) + [vqa_cases[:4]]  # and a sequence
        rows = run_sequences(SERAC(backbone, hp, out), sequences, pre)
        return load_file(str(out / WEIGHTS)), [{k: v for k, v in r.items() if k != "edit_s"} for r in rows]

    (wa, ra), (wb, rb) = run("a"), run("b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra == rb


def test_configured_paths_must_exist(world_config, train_cases, tmp_path):
    backbone = make_backbone(world_config, "opt")
    for key in ("classifier", "counterfactual"):
        with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
            _prepare(backbone, train_cases, tmp_path, **{key: str(tmp_path / "distilbert-base-cased")})


def test_prepared_folder_must_match_the_architecture(prepared_opt):
    backbone, out, hp, _ = prepared_opt
    with pytest.raises(ValueError, match="prepared with"):
        SERAC(backbone, {**hp, "cls_dim": 32}, out)


def test_external_encoder_and_counterfactual_lm_from_local_folders(world_config, train_cases, vqa_cases, tmp_path):
    """EasyEdit's layout (a Hugging Face encoder classifier, a separate small causal LM fed
    projected image features), here with tiny random models saved locally."""
    from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM

    backbone = make_backbone(world_config, "opt")
    tok = backbone.tokenizer
    encoder_dir, lm_dir = tmp_path / "encoder", tmp_path / "lm"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(encoder_dir)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, ffn_dim=96,
                             num_attention_heads=2, word_embed_proj_dim=48, max_position_embeddings=256,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)).save_pretrained(lm_dir)
    for d in (encoder_dir, lm_dir):
        tok.save_pretrained(d)
    out = tmp_path / "prepared"
    out.mkdir()
    _, hp = _prepare(backbone, train_cases, out, classifier=str(encoder_dir), counterfactual=str(lm_dir),
                     cls_steps=3, cf_steps=3, cf_layers=1)
    editor = SERAC(backbone, hp, out)
    assert any(n.startswith("projection.") for n in editor.cf.trainable)  # the image projection trains
    assert all(n.startswith(("projection.", "lm.model.decoder.layers.1.")) for n in editor.cf.trainable)
    editor.edit(vqa_cases[0])
    preds, targets = editor.predict(case_samples(vqa_cases[0]))
    assert [len(p) for p in preds] == [len(t) for t in targets]
