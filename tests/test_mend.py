"""MEND on untrained tiny backbones: the hypernetwork behaviours of `tests.hypernet_helpers`,
plus the shared gradient capture and counterfactual targets (`unike.hypernet`) and MEND's
std floor."""

import random

import torch

from baselines.mend import MEND, GradientTransform, train_mend
from tests.hypernet_helpers import HypernetEditorTests, Spec
from unike.data import edit_sample
from unike.hypernet import Counterfactuals, answer_nll, capture_factors, clean_prefix, edited_linears, training_cases

# Strong enough to flip an untrained model's answer in one edit: a large initial step size,
# and the edit input's own NLL in the objective so a few training steps teach the network
# to write the target.
HP = {"n_layers": 2, "rank": 8, "steps": 24, "edit_lr": 0.05, "lr": 1e-3, "lr_lr": 1e-2, "c_edit": 1.0,
      "c_rel": 1.0, "c_loc": 0.1, "log_every": 4}


class TestMEND(HypernetEditorTests):
    spec = Spec(MEND, train_mend, "mend", "MEND", HP, stale={"rank": 4})

    def test_captured_factors_give_the_true_weight_gradient(self, backbone, vqa_cases):
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

    def test_counterfactual_targets_change_only_the_edited_slot(self, backbone, vqa_cases, caption_cases):
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

    def test_std_floor_bounds_the_z_score_of_a_dimension_training_never_moved(self):
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

    def test_the_transform_network_learns_from_its_identity_init(self):
        """Every pre-activation of a fresh transform is exactly 0 (U = 0): the clamp must
        pass the gradient there, as MEND's does, or no parameter but the step sizes ever
        trains (the bug relu had: every learning rate gave the same run)."""
        torch.manual_seed(0)
        u, delta = torch.randn(8, 3), torch.randn(8, 2)
        gt = GradientTransform(3, 2, n_modes=1, rank=2, n_hidden=1)
        gt.train()(u, delta, 0)  # the running statistics
        u_t, delta_t = gt.eval()(u, delta, 0)
        assert torch.equal(torch.cat([u_t, delta_t], -1), gt.standardise(u, delta))  # identity at init
        (delta_t.T @ u_t).square().sum().backward()
        for layer in gt.layers:
            for name in ("u", "bias", "shift"):
                grad = getattr(layer, name).grad
                assert grad is not None and grad.abs().sum() > 0, name

