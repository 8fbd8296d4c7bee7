"""Behaviours shared by the hypernetwork editors (KE, MEND; machinery in `unike.hypernet`),
checked on untrained tiny backbones (OPT and LLaMA): a briefly trained network really
edits, its checkpoint reloads exactly, restore is bit-exact, runs are reproducible, sequential
edits accumulate, a stale prepared folder is refused, `prepare` records the update range
and validation figures, sequential runs record the weight drift, and `drift_bound` keeps
every matrix within its bound of the unedited weights, after one edit or ten.

A test module subclasses `HypernetEditorTests` as `Test<Method>` and sets `spec`."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from unike.data import edit_sample
from unike.editing import parse_hparams
from unike.harness import make_sequences, pre_edit_predictions, run_sequences, weight_drift
from unike.hypernet import Trained, answer_nll, edited_linears, save_prepared, split_validation

# An untrained backbone's head has small init weights (row norms ~0.15 after a unit-scale
# norm), which keeps every logit within about +-0.85: no edit can take the target's NLL much
# below 3 nats from ~4.6 (log of the 98-word vocabulary). A drop of this much is clear.
MIN_NLL_DROP = 0.25


@dataclass(frozen=True)
class Spec:
    editor: type  # the Editor subclass
    train: Callable[..., Trained]  # (backbone, hparams, train_cases, seed) -> Trained
    method: str  # its name in file names and messages
    label: str  # its name in the progress log lines
    hp: dict  # small and strong enough to flip an untrained model's answer in one edit
    stale: dict  # an architecture change a prepared folder must refuse


def weights(backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def edited_weights(editor) -> dict[str, torch.Tensor]:
    return {lin.name: lin.module.weight.clone() for lin in editor.linears}


def accuracy(editor, case) -> float:
    (pred,), (target,) = editor.predict([edit_sample(case)])
    return float((pred == target).float().mean())


def target_nll(backbone, case) -> float:
    batch = backbone.encode([edit_sample(case)])
    return float(answer_nll(backbone.logits(batch), batch, 0))


def relative_change(editor, name: str) -> float:
    """|W - W0| / |W0| of one edited matrix."""
    lin = next(lin for lin in editor.linears if lin.name == name)
    w0 = editor.snapshot.saved[name]
    return float((lin.module.weight - w0).norm() / w0.norm())


def pre_edit(backbone, cases) -> dict:
    """The harness's pre-edit predictions, as `run_sequences` takes them."""
    preds = pre_edit_predictions(backbone, cases)
    return {cid: {r: torch.tensor(v) for r, v in rows.items()} for cid, rows in preds.items()}


class HypernetEditorTests:
    spec: Spec

    @pytest.fixture(autouse=True)
    def one_thread(self):
        """These models are tiny: one thread is faster than two on a busy machine."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    def prepare(self, backbone, cases, folder, seed=0, **overrides) -> Trained:
        hp = parse_hparams(self.spec.editor.Hparams, {**self.spec.hp, **overrides}, self.spec.method)
        trained = self.spec.train(backbone, hp, cases, seed)
        save_prepared(trained, folder)
        return trained

    def test_trained_editor_edits_and_restores_bit_exactly(self, backbone, vqa_cases, tmp_path):
        spec, case = self.spec, vqa_cases[0]
        before = weights(backbone)
        # Trained on the very edit it then makes: what is checked is that training teaches the
        # network an update that writes its case, not how it generalises from a few steps.
        summary = spec.editor.prepare(backbone, parse_hparams(spec.editor.Hparams, spec.hp, spec.method), [case],
                                      tmp_path, 0)
        assert summary["steps"] == spec.hp["steps"] and (tmp_path / f"{spec.method}.safetensors").is_file()
        assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())  # training edits nothing
        editor = spec.editor(backbone, spec.hp, tmp_path)
        pre, pre_nll = accuracy(editor, case), target_nll(backbone, case)
        assert pre < 1.0  # an untrained model does not know the new fact
        editor.edit(case)
        assert accuracy(editor, case) > pre  # the argmax flips to the target on some answer token
        assert target_nll(backbone, case) < pre_nll - MIN_NLL_DROP
        changed = {k for k, v in backbone.model.state_dict().items() if not torch.equal(v, before[k])}
        prefix = "model.decoder." if backbone.text.kind == "opt" else "model."
        expected = {f"language_model.{prefix}{lin.name}.weight" for lin in edited_linears(backbone, spec.hp["n_layers"])}
        assert changed == expected  # only the FFN weights of the edited layers (no LLaMA gate)
        editor.restore()
        assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
        assert not any(p.requires_grad for p in backbone.model.parameters())

    def test_checkpoint_reloads_to_identical_outputs(self, backbone, vqa_cases, tmp_path):
        trained = self.prepare(backbone, vqa_cases[:4], tmp_path, steps=8)
        editor = self.spec.editor(backbone, self.spec.hp, tmp_path)
        loaded, saved = editor.net.state_dict(), trained.net.state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        # The in-memory network and the reloaded one predict the same update.
        case = vqa_cases[1]
        editor.edit(case)
        after_reloaded = edited_weights(editor)
        editor.restore()
        editor.net = trained.net
        editor.edit(case)
        assert all(torch.equal(after_reloaded[lin.name], lin.module.weight) for lin in editor.linears)
        editor.restore()

    def test_same_seed_same_numbers(self, world_config, vqa_cases, tmp_path):
        from tests.conftest import make_backbone

        cases = vqa_cases[:3]

        def run(folder):
            folder.mkdir()
            b = make_backbone(world_config, "opt", seed=3)
            self.prepare(b, cases, folder, seed=5, steps=8)
            editor = self.spec.editor(b, self.spec.hp, folder)
            rows = run_sequences(editor, make_sequences({"e-vqa": cases}, "one-step", 0), pre_edit(b, cases))
            return ((folder / f"{self.spec.method}.safetensors").read_bytes(),
                    [{k: v for k, v in r.items() if k != "edit_s"} for r in rows])

        assert run(tmp_path / "a") == run(tmp_path / "b")

    def test_sequential_edits_accumulate(self, backbone, vqa_cases, tmp_path):
        self.prepare(backbone, vqa_cases[:4], tmp_path, steps=8)
        first, second = vqa_cases[0], vqa_cases[1]
        editor = self.spec.editor(backbone, self.spec.hp, tmp_path)
        w0 = edited_weights(editor)
        editor.edit(second)
        alone = edited_weights(editor)
        editor.restore()
        editor.edit(first)
        w1 = edited_weights(editor)
        editor.edit(second)
        w2 = edited_weights(editor)

        # The second edit is predicted at the once-edited weights and added to them: a copy of
        # the backbone holding W1 and edited with `second` alone ends at the same weights.
        twin = self.spec.editor(copy.deepcopy(backbone), self.spec.hp, tmp_path)
        with torch.no_grad():
            for lin in twin.linears:
                lin.module.weight.copy_(w1[lin.name])
        twin.edit(second)
        assert all(torch.equal(lin.module.weight, w2[lin.name]) for lin in twin.linears)
        assert any(not torch.equal(w2[n], alone[n]) for n in w2)  # the first edit is kept
        assert any(not torch.equal(w2[n], w1[n]) for n in w2)
        editor.restore()
        assert all(torch.equal(lin.module.weight, w0[lin.name]) for lin in editor.linears)

        rows = run_sequences(editor, [[first, second]], pre_edit(backbone, [first, second]))
        assert [r["case_id"] for r in rows] == [first.case_id, second.case_id]

    def test_stale_prepared_folder_is_refused(self, backbone, vqa_cases, tmp_path):
        self.prepare(backbone, vqa_cases[:2], tmp_path, steps=2)
        with pytest.raises(ValueError, match="re-run prepare-editor"):
            self.spec.editor(backbone, {**self.spec.hp, "steps": 2, **self.spec.stale}, tmp_path)
        with pytest.raises(ValueError, match="needs the folder"):
            self.spec.editor(backbone, self.spec.hp)

    def test_training_logs_progress(self, backbone, vqa_cases, caplog):
        hp = parse_hparams(self.spec.editor.Hparams, {**self.spec.hp, "steps": 4, "log_every": 2}, self.spec.method)
        # Each trainer logs under its own module's logger.
        with caplog.at_level(logging.INFO, logger=self.spec.editor.__module__):
            trained = self.spec.train(backbone, hp, vqa_cases[:2], 0)
        assert [h["step"] for h in trained.history] == [2, 4]
        assert sum(f"{self.spec.label} step" in r.message for r in caplog.records) == 2

    def test_prepare_records_update_range_and_validation_figures(self, backbone, vqa_cases, tmp_path):
        hp = parse_hparams(self.spec.editor.Hparams, {**self.spec.hp, "steps": 8, "validation_share": 0.3},
                           self.spec.method)
        fit, held = split_validation(vqa_cases, 0.3, 0)
        assert held and fit and len(held) >= 0.3 * len(vqa_cases)
        # Whole facts are held out: no fact of the validation slice is trained on.
        assert not {c.fact_id for c in held} & {c.fact_id for c in fit}
        summary = save_prepared(self.spec.train(backbone, hp, vqa_cases, 0), tmp_path)
        names = [lin.name for lin in edited_linears(backbone, hp.n_layers)]
        for figures, n in ((summary["train_range"], len(fit)), (summary["validation"], len(held))):
            assert figures["n_cases"] == n
            assert all(0 <= figures[row] <= 1 for row in ("rel", "t_gen", "m_gen", "t_loc", "m_loc"))
            assert list(figures["rel_update"]) == names
            assert all(0 < r["mean"] <= r["max"] for r in figures["rel_update"].values())

    def test_sequential_runs_record_weight_drift(self, backbone, vqa_cases, tmp_path):
        self.prepare(backbone, vqa_cases[:4], tmp_path, steps=8)
        editor = self.spec.editor(backbone, self.spec.hp, tmp_path)
        cases = vqa_cases[:3]
        drift = []
        run_sequences(editor, [cases], pre_edit(backbone, cases), drift=drift)
        assert len(drift) == 1 and len(drift[0]) == 3 and all(d > 0 for d in drift[0])
        assert weight_drift(editor) == 0.0  # restored after the sequence
        editor.edit(cases[0])  # the first step of the sequence is the first edit alone
        assert weight_drift(editor) == pytest.approx(drift[0][0])
        editor.restore()
        run_sequences(editor, [[c] for c in cases], pre_edit(backbone, cases), drift=drift)
        assert len(drift) == 1  # one-step runs have no drift to follow

    def test_drift_bound_holds_for_one_edit_and_for_a_sequence(self, backbone, vqa_cases, caption_cases, tmp_path):
        self.prepare(backbone, vqa_cases[:4], tmp_path, steps=8, validation_share=0.0)
        free = self.spec.editor(backbone, self.spec.hp, tmp_path)
        bound = 0.5 * max(self._changes(free, vqa_cases[:1]).values())  # half the first unbounded edit: it binds
        free.close()
        editor = self.spec.editor(backbone, {**self.spec.hp, "drift_bound": bound}, tmp_path)
        # Ten edits in a row, of both tasks (the network saw only VQA edits): after every
        # one, no matrix lies further than drift_bound x |W0| from its unedited weights.
        for k, case in enumerate(vqa_cases + caption_cases, start=1):
            editor.edit(case)
            assert all(relative_change(editor, lin.name) <= bound * 1.001 for lin in editor.linears)
        assert k == 10
        assert max(relative_change(editor, lin.name) for lin in editor.linears) == pytest.approx(bound, rel=1e-3)
        editor.restore()
        assert all(relative_change(editor, lin.name) == 0 for lin in editor.linears)  # restore is exact

    @staticmethod
    def _changes(editor, cases) -> dict[str, float]:
        for case in cases:
            editor.edit(case)
        changes = {lin.name: relative_change(editor, lin.name) for lin in editor.linears}
        editor.restore()
        return changes

