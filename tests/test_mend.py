"""MEND on untrained tiny backbones (OPT and LLaMA): a briefly trained hypernetwork really
edits, its checkpoint reloads exactly, restore is bit-exact, runs are reproducible and
sequential edits accumulate."""

import copy

import pytest
import torch

from baselines.mend import MEND, ProgressLog, edited_linears, save_prepared, train_mend
from unike.data import edit_sample
from unike.editing import parse_hparams
from unike.harness import make_sequences, run_sequences

# Strong enough to flip an untrained model's answer in one edit: a large initial step size,
# and the edit input's own NLL in the objective so a few training steps on a handful of
# cases teach the network to write the target.
HP = {"n_layers": 2, "rank": 8, "steps": 12, "edit_lr": 0.05, "lr": 1e-3, "lr_lr": 1e-2, "c_edit": 1.0,
      "c_rel": 1.0, "c_loc": 0.1, "log_every": 4}


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
    hp = parse_hparams(MEND.Hparams, {**HP, **overrides}, "mend")
    trained = train_mend(backbone, hp, cases, seed)
    save_prepared(trained, folder)
    return trained


def _accuracy(editor, case):
    (pred,), (target,) = editor.predict([edit_sample(case)])
    return float((pred == target).float().mean())


def test_trained_mend_edits_and_restores_bit_exactly(backbone, vqa_cases, tmp_path):
    case = vqa_cases[0]
    before = _weights(backbone)
    summary = MEND.prepare(backbone, parse_hparams(MEND.Hparams, HP, "mend"), vqa_cases[:4], tmp_path, 0)
    assert summary["steps"] == HP["steps"] and (tmp_path / "mend.safetensors").is_file()
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())  # training edits nothing
    editor = MEND(backbone, HP, tmp_path)
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
    editor = MEND(backbone, HP, tmp_path)
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
        editor = MEND(b, HP, folder)
        rows = run_sequences(editor, make_sequences({"e-vqa": vqa_cases[:3]}, "one-step", 0), _pre(b, vqa_cases[:3]))
        return (folder / "mend.safetensors").read_bytes(), [{k: v for k, v in r.items() if k != "edit_s"} for r in rows]

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
    editor = MEND(backbone, HP, tmp_path)
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
    twin = MEND(other, HP, tmp_path)
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
        MEND(backbone, {**HP, "steps": 2, "rank": 4}, tmp_path)
    with pytest.raises(ValueError, match="needs the folder"):
        MEND(backbone, HP)


def test_training_logs_progress(backbone, vqa_cases, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="baselines.mend"):
        trained = train_mend(backbone, parse_hparams(MEND.Hparams, {**HP, "steps": 4, "log_every": 2}, "mend"),
                             vqa_cases[:2], 0)
    assert [h["step"] for h in trained.history] == [2, 4]
    assert sum("MEND step" in r.message for r in caplog.records) == 2
    assert isinstance(ProgressLog("x", 1, 1).history, list)


def test_captured_factors_give_the_true_weight_gradient(backbone, vqa_cases):
    from baselines.mend import answer_nll, capture_factors, clean_prefix

    linears = edited_linears(backbone, 2)
    batch = backbone.encode([edit_sample(vqa_cases[0])])
    prefix = clean_prefix(backbone, batch, 0)
    _, loss, factors = capture_factors(backbone, prefix, batch, linears)
    weights = [lin.module.weight for lin in linears]
    for w in weights:
        w.requires_grad_(True)
    try:
        true_loss = answer_nll(backbone.logits(batch), batch, 0)
        grads = torch.autograd.grad(true_loss, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    assert torch.allclose(loss, true_loss)
    for lin, g in zip(linears, grads):
        u, delta = factors[lin.name]
        assert torch.allclose(delta.T @ u, g, atol=1e-6, rtol=1e-4)


def test_counterfactual_targets_change_only_the_edited_slot(backbone, vqa_cases, caption_cases):
    import random

    from baselines.mend import Counterfactuals, training_cases

    cf = Counterfactuals(backbone, top_k=4)
    for case in (vqa_cases[0], caption_cases[0]):
        alts = cf.alternatives(case)
        assert alts and len(alts) <= 4 and case.alt not in alts and case.pred not in alts
        assert all(len(a.split()) == len(case.alt.split()) for a in alts)
        edited = cf.sample(case, random.Random(0))
        assert edited.alt in alts and edited.src == case.src and edited.loc == case.loc
    order = training_cases(backbone, vqa_cases[:3], 12, 0, 0.5, 4)
    assert order == training_cases(backbone, vqa_cases[:3], 12, 0, 0.5, 4)
    assert 0 < sum(c.case_id.endswith("#cf") for c in order) < 12


def test_std_floor_bounds_the_z_score_of_a_dimension_training_never_moved():
    from baselines.mend import GradientTransform

    torch.manual_seed(0)
    u, delta = torch.randn(200, 3), torch.randn(200, 2)
    u[:, 1] = 0.5  # a dimension constant over the whole train split
    probe_u, probe_delta = torch.zeros(1, 3), torch.zeros(1, 2)
    probe_u[0, 1] = 1.5
    z = {}
    for floor in (0.0, 0.5):
        gt = GradientTransform(3, 2, n_modes=1, rank=2, n_hidden=1, std_floor=floor)  # identity at init
        gt.train()(u, delta, 0)
        z[floor] = gt.eval()(probe_u, probe_delta, 0)[0][0, 1].item()
    assert z[0.0] > 1e5 and 0 < z[0.5] < 5
