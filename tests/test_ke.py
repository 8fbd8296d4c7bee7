"""KE on untrained tiny backbones: the hypernetwork behaviours of `tests.hypernet_helpers`,
plus KE's condition text, Lp divergence and margin schedule."""

import pytest

from baselines.ke import KnowledgeEditor, condition_ids, train_ke
from tests.hypernet_helpers import HypernetEditorTests, Spec
from unike.editing import parse_hparams

# A small hypernetwork trained for a few dozen steps, with a scale large enough that its
# update can flip an untrained model's answer in one edit.
HP = {"n_layers": 2, "lstm_hidden": 16, "condition_dim": 32, "hidden_dim": 16, "max_scale": 30.0, "lr": 1e-2,
      "warmup": 5, "steps": 60, "margin_every": 10, "log_every": 20}


class TestKE(HypernetEditorTests):
    spec = Spec(KnowledgeEditor, train_ke, "ke", "KE", HP, stale={"hidden_dim": 8})

    def test_condition_is_pred_alt_src(self, backbone, vqa_cases):
        case = vqa_cases[0]
        ids = condition_ids(backbone, "{pred} >> {alt} || {src}", case)[0].tolist()
        words = backbone.tokenizer.convert_ids_to_tokens(ids)
        pred, alt = case.pred.lower().split(), case.alt.lower().split()
        assert words[: len(pred)] == pred
        assert any(words[i : i + len(alt)] == alt for i in range(len(pred), len(words)))

    def test_lp_divergence_and_margin_schedule(self, backbone, vqa_cases):
        hp = parse_hparams(KnowledgeEditor.Hparams, {**HP, "divergence": "both", "steps": 6, "margin_every": 2,
                                                     "margin_success": -1.0}, "ke")
        trained = train_ke(backbone, hp, vqa_cases[:2], 0)
        margins = trained.extra["margins"]
        assert [m["step"] for m in margins] == [2, 4, 6]
        assert margins[-1]["kl"] == pytest.approx(hp.margin_kl_max * 0.8**3)  # shrinks after each successful window
        assert trained.extra["alpha"]["kl"] >= 0 and trained.extra["alpha"]["lp"] >= 0
        with pytest.raises(ValueError, match="divergence"):
            parse_hparams(KnowledgeEditor.Hparams, {"divergence": "l2"}, "ke")
