"""Editors and the harness on untrained tiny backbones: behaviour, not shapes."""

import pytest
import torch

from baselines.ft import FineTune
from unike.data import ROWS, case_samples, edit_sample
from unike.editing import NoEdit, create_editor, resolve_editor
from unike.harness import make_sequences, pre_edit_predictions, run_sequences


def _weights(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def _pre_edit(backbone, cases):
    return {cid: {r: torch.tensor(v) for r, v in rows.items()}
            for cid, rows in pre_edit_predictions(backbone, cases).items()}


def test_ft_edit_changes_the_target_prediction_and_restore_is_bit_exact(backbone, vqa_cases):
    case = vqa_cases[0]
    before = _weights(backbone)
    editor = FineTune(backbone, {"steps": 40, "lr": 5e-3})
    (pred,), (target,) = editor.predict([edit_sample(case)])
    assert not torch.equal(pred, target)  # an untrained model does not know the new fact
    editor.edit(case)
    (pred,), (target,) = editor.predict([edit_sample(case)])
    assert torch.equal(pred, target)
    editor.restore()
    after = _weights(backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_ft_touches_only_the_last_layer_ffn(backbone, vqa_cases):
    before = _weights(backbone)
    editor = FineTune(backbone, {"steps": 3})
    editor.edit(vqa_cases[0])
    changed = {k for k, v in backbone.model.state_dict().items() if not torch.equal(v, before[k])}
    last = len(backbone.text) - 1
    assert changed and all(f"layers.{last}." in k and ("fc" in k or "mlp" in k) for k in changed)
    editor.restore()


def test_no_op_edit_leaves_every_input_untouched(backbone, vqa_cases):
    cases = vqa_cases[:3]
    rows = run_sequences(NoEdit(backbone), make_sequences({"e-vqa": cases}, "one-step", 0), _pre_edit(backbone, cases))
    assert [r["t_loc"] for r in rows] == [1.0] * 3 and [r["m_loc"] for r in rows] == [1.0] * 3


def test_sequential_run_scores_every_case_after_the_last_edit(backbone, vqa_cases):
    calls = []

    class Recorder(NoEdit):
        def edit(self, case):
            calls.append(("edit", case.case_id))

        def predict(self, samples):
            calls.append(("predict", samples[0].prompt))
            return super().predict(samples)

        def restore(self):
            calls.append(("restore",))

    cases = vqa_cases[:3]
    rows = run_sequences(Recorder(backbone), [cases], _pre_edit(backbone, cases))
    assert [c[0] for c in calls] == ["edit"] * 3 + ["predict"] * 3 + ["restore"]
    assert [r["case_id"] for r in rows] == [c.case_id for c in cases] and {r["sequence_id"] for r in rows} == {0}


def test_same_seed_same_numbers(world_config, vqa_cases):
    from tests.conftest import make_backbone

    def run():
        b = make_backbone(world_config, "opt", seed=7)
        torch.manual_seed(0)
        return run_sequences(FineTune(b, {"steps": 5}), make_sequences({"e-vqa": vqa_cases[:3]}, "one-step", 0),
                             _pre_edit(b, vqa_cases[:3]))

    strip = lambda rows: [{k: v for k, v in r.items() if k != "edit_s"} for r in rows]
    assert strip(run()) == strip(run())


def test_make_sequences_is_deterministic_and_mixes_tasks(vqa_cases, caption_cases):
    cases = {"e-vqa": vqa_cases * 4}
    assert make_sequences(cases, "seq-10", 3) == make_sequences(cases, "seq-10", 3)
    assert all(len(s) == 10 for s in make_sequences(cases, "seq-10", 3))
    cross = make_sequences({"e-vqa": vqa_cases * 2, "e-ic": caption_cases * 2}, "cross-10", 0)
    assert cross and all(sorted(c.task for c in s) == ["e-ic"] * 5 + ["e-vqa"] * 5 for s in cross)
    with pytest.raises(ValueError, match="unknown regime"):
        make_sequences(cases, "seq-7", 0)


def test_registry_finds_editors_by_import_path_and_rejects_bad_specs(backbone):
    assert resolve_editor("baselines.ft:FineTune") is FineTune
    editor = create_editor({"editor": "baselines.ft:FineTune", "hparams": {"steps": 2}}, backbone)
    assert editor.hparams.steps == 2
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        create_editor({"editor": "baselines.ft:FineTune", "hparams": {"stpes": 2}}, backbone)
    with pytest.raises(ValueError, match="cannot load editor"):
        resolve_editor("baselines.nope:Nope")
    with pytest.raises(ValueError, match="not an Editor"):
        resolve_editor("unike.data:EditCase")


def test_eval_batch_rows_are_in_rows_order(vqa_cases):
    samples = case_samples(vqa_cases[0])
    assert len(samples) == len(ROWS) and samples[3].image is None


def test_trained_editor_needs_its_prepared_folder(backbone, vqa_cases, tmp_path):
    from dataclasses import dataclass

    from unike.editing import Editor

    @dataclass(frozen=True)
    class Hp:
        scale: float = 1.0

    class Memorizer(NoEdit):
        needs_training = True
        Hparams = Hp

        @classmethod
        def prepare(cls, backbone, hparams, train_cases, out_dir, seed):
            (out_dir / "seen.txt").write_text("\n".join(c.case_id for c in train_cases))
            return {"n": len(train_cases), "scale": hparams.scale}

    with pytest.raises(ValueError, match="needs the folder written by its `prepare` step"):
        Memorizer(backbone)
    summary = Memorizer.prepare(backbone, Hp(2.0), vqa_cases, tmp_path, 0)
    assert summary == {"n": len(vqa_cases), "scale": 2.0}
    assert Memorizer(backbone, prepared=tmp_path).prepared == tmp_path
    with pytest.raises(NotImplementedError):
        Editor.prepare(backbone, None, [], tmp_path, 0)


def test_variants_that_agree_on_what_prepare_reads_share_one_prepared_folder():
    from unike.editing import prepare_owners

    methods = {
        "backbone": {"editor": "unike.editing:NoEdit"},  # needs no preparation: no owner
        "ft": {"editor": "baselines.ft:FineTune"},
        # T-Patcher's preparation reads every hyperparameter (the default prepare_key): a
        # different lr is a different preparation, the same values (defaults spelled out) are not.
        "tp": {"editor": "baselines.tpatcher:TPatcher", "hparams": {"lr": 0.01}},
        "tp-same": {"editor": "baselines.tpatcher:TPatcher", "hparams": {"lr": 0.01}},
        "tp-other": {"editor": "baselines.tpatcher:TPatcher", "hparams": {"lr": 0.5}},
    }
    assert prepare_owners(methods) == {"tp": "tp", "tp-same": "tp", "tp-other": "tp-other"}
