"""KE on untrained tiny backbones (OPT and LLaMA): a briefly trained hypernetwork really
edits, its checkpoint reloads exactly, restore is bit-exact, runs are reproducible and
sequential edits accumulate."""

import copy

import pytest
import torch

from baselines.ke import KnowledgeEditor, condition_ids, train_ke
from baselines.mend import edited_linears, save_prepared
from unike.data import edit_sample
from unike.editing import parse_hparams
from unike.harness import make_sequences, run_sequences

# A small hypernetwork trained for a few dozen steps on a handful of cases, with a scale
# large enough that its update can flip an untrained model's answer in one edit.
HP = {"n_layers": 2, "lstm_hidden": 16, "condition_dim": 32, "hidden_dim": 16, "max_scale": 30.0, "lr": 1e-2,
      "warmup": 5, "steps": 60, "margin_every": 10, "log_every": 20}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def _prepare(backbone, cases, folder, seed=0, **overrides):
    hp = parse_hparams(KnowledgeEditor.Hparams, {**HP, **overrides}, "ke")
    trained = train_ke(backbone, hp, cases, seed)
    save_prepared(trained, folder)
    return trained


def _accuracy(editor, case):
    (pred,), (target,) = editor.predict([edit_sample(case)])
    return float((pred == target).float().mean())


def test_trained_ke_edits_and_restores_bit_exactly(backbone, vqa_cases, tmp_path):
    case = vqa_cases[0]
    before = _weights(backbone)
    hp = parse_hparams(KnowledgeEditor.Hparams, HP, "ke")
    summary = KnowledgeEditor.prepare(backbone, hp, vqa_cases[:4], tmp_path, 0)
    assert summary["steps"] == HP["steps"] and (tmp_path / "ke.safetensors").is_file()
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())  # training edits nothing
    editor = KnowledgeEditor(backbone, HP, tmp_path)
    pre = _accuracy(editor, case)
    assert pre < 1.0  # an untrained model does not know the new fact
    editor.edit(case)
    assert _accuracy(editor, case) > pre
    changed = {k for k, v in backbone.model.state_dict().items() if not torch.equal(v, before[k])}
    expected = {f"language_model.{'model.decoder.' if backbone.text.kind == 'opt' else 'model.'}{lin.name}.weight"
                for lin in edited_linears(backbone, HP["n_layers"])}
    assert changed == expected  # only the FFN weights of the edited layers (no LLaMA gate)
    editor.restore()
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_checkpoint_reloads_to_identical_outputs(backbone, vqa_cases, tmp_path):
    trained = _prepare(backbone, vqa_cases[:4], tmp_path, steps=8)
    editor = KnowledgeEditor(backbone, HP, tmp_path)
    loaded, saved = editor.net.state_dict(), trained.net.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    # The in-memory network and the reloaded one predict the same update.
    case = vqa_cases[1]
    editor.edit(case)
    after_reloaded = {lin.name: lin.module.weight.clone() for lin in editor.linears}
    editor.restore()
    editor.net = trained.net
    editor.edit(case)
    assert all(torch.equal(after_reloaded[lin.name], lin.module.weight) for lin in editor.linears)
    editor.restore()


def test_same_seed_same_numbers(world_config, vqa_cases, tmp_path):
    from tests.conftest import make_backbone

    def run(folder):
        b = make_backbone(world_config, "opt", seed=3)
        _prepare(b, vqa_cases[:3], folder, seed=5, steps=8)
        editor = KnowledgeEditor(b, HP, folder)
        rows = run_sequences(editor, make_sequences({"e-vqa": vqa_cases[:3]}, "one-step", 0), _pre(b, vqa_cases[:3]))
        return (folder / "ke.safetensors").read_bytes(), [{k: v for k, v in r.items() if k != "edit_s"} for r in rows]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run(tmp_path / "a") == run(tmp_path / "b")


def _pre(backbone, cases):
    from unike.harness import pre_edit_predictions

    preds = pre_edit_predictions(backbone, cases)
    return {cid: {r: torch.tensor(v) for r, v in rows.items()} for cid, rows in preds.items()}


def test_sequential_edits_accumulate(backbone, vqa_cases, tmp_path):
    _prepare(backbone, vqa_cases[:4], tmp_path, steps=8)
    first, second = vqa_cases[0], vqa_cases[1]
    editor = KnowledgeEditor(backbone, HP, tmp_path)
    w0 = {lin.name: lin.module.weight.clone() for lin in editor.linears}
    editor.edit(second)
    alone = {lin.name: lin.module.weight.clone() for lin in editor.linears}
    editor.restore()
    editor.edit(first)
    w1 = {lin.name: lin.module.weight.clone() for lin in editor.linears}
    editor.edit(second)
    w2 = {lin.name: lin.module.weight.clone() for lin in editor.linears}

    # The second edit is predicted at the once-edited weights and added to them: a copy of
    # the backbone holding W1 and edited with `second` alone ends at the same weights.
    other = copy.deepcopy(backbone)
    twin = KnowledgeEditor(other, HP, tmp_path)
    with torch.no_grad():
        for lin in twin.linears:
            lin.module.weight.copy_(w1[lin.name])
    twin.edit(second)
    assert all(torch.equal(lin.module.weight, w2[lin.name]) for lin in twin.linears)
    assert any(not torch.equal(w2[n], alone[n]) for n in w2)  # the first edit is kept
    assert any(not torch.equal(w2[n], w1[n]) for n in w2)
    editor.restore()
    assert all(torch.equal(lin.module.weight, w0[lin.name]) for lin in editor.linears)

    rows = run_sequences(editor, [[first, second]], _pre(backbone, [first, second]))
    assert [r["case_id"] for r in rows] == [first.case_id, second.case_id]


def test_stale_prepared_folder_is_refused(backbone, vqa_cases, tmp_path):
    _prepare(backbone, vqa_cases[:2], tmp_path, steps=2)
    with pytest.raises(ValueError, match="re-run prepare-editor"):
        KnowledgeEditor(backbone, {**HP, "steps": 2, "hidden_dim": 8}, tmp_path)
    with pytest.raises(ValueError, match="needs the folder"):
        KnowledgeEditor(backbone, HP)


def test_training_logs_progress(backbone, vqa_cases, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="baselines.ke"):
        trained = train_ke(backbone, parse_hparams(KnowledgeEditor.Hparams, {**HP, "steps": 4, "log_every": 2}, "ke"),
                             vqa_cases[:2], 0)
    assert [h["step"] for h in trained.history] == [2, 4]
    assert sum("KE step" in r.message for r in caplog.records) == 2


def test_condition_is_pred_alt_src(backbone, vqa_cases):
    case = vqa_cases[0]
    ids = condition_ids(backbone, "{pred} >> {alt} || {src}", case)[0].tolist()
    words = backbone.tokenizer.convert_ids_to_tokens(ids)
    assert words[: len(case.pred.split())] == case.pred.lower().split() and case.alt.lower() in words


def test_lp_divergence_and_margin_schedule(backbone, vqa_cases, tmp_path):
    hp = parse_hparams(KnowledgeEditor.Hparams, {**HP, "divergence": "both", "steps": 6, "margin_every": 2,
                                                 "margin_success": -1.0}, "ke")
    trained = train_ke(backbone, hp, vqa_cases[:2], 0)
    margins = trained.extra["margins"]
    assert [m["step"] for m in margins] == [2, 4, 6]
    assert margins[-1]["kl"] == pytest.approx(hp.margin_kl_max * 0.8**3)  # shrinks after each successful window
    assert trained.extra["alpha"]["kl"] >= 0 and trained.extra["alpha"]["lp"] >= 0
    with pytest.raises(ValueError, match="divergence"):
        parse_hparams(KnowledgeEditor.Hparams, {"divergence": "l2"}, "ke")
