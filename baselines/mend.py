"""MEND (Mitchell et al., ICLR 2022): a hypernetwork that edits by transforming gradients.

The edited matrices are the FFN input and output projections of the last `n_layers` LM
decoder layers (OPT `fc1`/`fc2`, LLaMA `up_proj`/`down_proj`; the gate stays frozen, as
in EasyEdit's multimodal MEND). The gradient of a Linear's loss with respect to its weight
is a sum of rank-one terms `delta_t u_t^T` (u: the Linear's input at token t, delta: the
loss gradient at its output). MEND never forms that gradient: hooks capture u and delta,
a small network maps each pair (u_t, delta_t) to (u~_t, delta~_t), and the update is

    W' = W - eta_l * sum_t delta~_t u~_t^T

with eta_l a learned step size per edited matrix (initialised to `edit_lr`).

The network (`GradientTransform`) is one per distinct weight shape, shared by the layers
of that shape; it standardises u and delta with running mean/std statistics (updated in
training only) and runs concat(u, delta) through an identity-initialised MLP of low-rank
residual layers `x + relu(s_l * (U V x + b) + t_l)` (U = 0 at init, s_l / t_l a per-matrix
scale and shift; the ReLU in every layer, the output layer's too, as MEND's code clamps),
so an untrained MEND is a standardised gradient step. Nothing else in MEND keeps an update
in range: the small initial step size and the locality KL of training do.

`prepare` trains the network and the step sizes on the train split, one edit per step,
with EasyEdit's multimodal objective: edit on (image, src -> alt) and minimise

    c_edit * (NLL(image, rephrase -> alt) + NLL(rephrased image, src -> alt))
    + c_loc * (KL(text loc: pre || post) + KL(image loc: pre || post))

(KL and NLL over answer positions; `c_rel` optionally adds the NLL of the edit input
itself, 0 by default as in EasyEdit). Deviation from the original code: the update is
applied with "-" (a descent step); MEND's code uses "+" and training has to learn to flip
the sign (mend issue 13).

Three options (off by default, i.e. MEND as published) for small train splits such as the
tiny world's, whose eval edits bring inputs the train split never showed:
- `std_floor`: MEND standardises every dimension of u and delta by its running std. A
  dimension that barely varies over the train split (a ReLU unit no train input fires)
  gets a tiny std, and an eval input that does use it gets a huge z-score and an update
  hundreds of times larger than any seen in training (measured: update norms 60-136 on
  eval cases vs 0.3-7 on train cases). The floor keeps each std at least `std_floor`
  times the median std of its part (u or delta).
- `counterfactual`: a share of the training edits gets a target the model itself
  proposes (`unike.hypernet.Counterfactuals`), as KE's (and MEND's zsRE) training data
  does, so the network cannot learn to write the train split's few targets.
- `drift_bound`: after every edit, each edited matrix's total change |W - W0| is scaled
  back, if need be, to `drift_bound` times its unedited norm |W0|
  (`unike.hypernet.bound_drift`): one edit is capped at that size, and no sequence of
  edits moves a matrix further, whatever the network writes. The trained network's single
  updates reach 2-4.7 times |W0| on train cases of the tiny world (its 128 x 512 matrices
  are small beside a rank-few update), and twenty unbounded ones drifted the weights by
  15-19 times their norm (docs/baselines.md, MEND). The value is chosen on the validation
  split by `benchmarks/tune.py --sequential` (one-step and seq-10 scores alike).

Sequential edits accumulate, as EasyEdit's sequential editing applies MEND: every `edit`
computes a fresh update at the current weights and adds it in place; `restore` copies the
saved weights back (bit-exact).

`prepare` holds a validation slice of the train split out of training (`validation_share`,
whole facts: `unike.hypernet.split_validation`) and records in the prepared folder's
summary the trained network's figures (`measure_mend`): on train cases and on the
validation slice, the benchmark's scores of each update applied alone, |dW| / |W| per
edited matrix and the largest |z| of u and delta.

Which matrices are edited, the capture of u and delta, the answer-position losses, the
counterfactual targets and the prepared folder come from `unike.hypernet` (shared with KE).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from unike.backbones import Backbone
from unike.data import EditCase
from unike.hypernet import (EditedLinear, HypernetEditor, PrefixCache, ProgressLog, Trained, answer_correct,
                           answer_kl, answer_nll, capture_factors, edited_linears, figures_line, probe_updates,
                           range_sample, save_prepared, split_validation, training_cases, update_figures,
                           drift_limits, upper_logits)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the MEND network


@dataclass(frozen=True)
class MENDHparams:
    n_layers: int = 3  # edit the FFNs of the last n_layers decoder layers
    include_gate: bool = False  # LLaMA: also edit gate_proj
    rank: int = 64  # rank of the residual layers (1920 in the paper at 4096 + 11008 dims)
    n_hidden: int = 1  # hidden residual layers (+1 output layer)
    std_floor: float = 0.0  # normalisation: floor each dim's std at this share of the median std (0: MEND's)
    lr: float = 1e-3  # Adam lr of the network
    edit_lr: float = 1e-3  # initial per-matrix step size
    lr_lr: float = 1e-3  # Adam lr of the step sizes
    c_edit: float = 0.1  # weight of NLL(rephrase) and NLL(image rephrase)
    c_loc: float = 1.0  # weight of KL(text loc) + KL(image loc)
    c_rel: float = 0.0  # weight of NLL(edit input) (not in EasyEdit's objective)
    steps: int = 1000  # training edits (batch 1)
    counterfactual: float = 0.0  # share of training edits retargeted to a model-proposed alternative
    counterfactual_k: int = 8  # alternatives per case: the model's top-k at the edited slot
    grad_clip: float = 100.0
    validation_share: float = 0.1  # train cases held out of training for the validation figures (split_validation)
    drift_bound: float = 0.0  # editing: keep |W - W0| <= drift_bound * |W0| per matrix, in any sequence (0: none)
    log_every: int = 100


ARCH_FIELDS = ("n_layers", "include_gate", "rank", "n_hidden", "std_floor")


class LowRankResidual(nn.Module):
    """x + max(0, s_m * (U V x + b) + t_m): identity at init (U = 0), scale/shift per mode.
    The output layer clamps too: MEND's `LRLinear` (and EasyEdit's copy) takes a `relu`
    flag but clamps at 0 in every layer.

    It must be `clamp(min=0)`, as MEND writes it, not `relu`: at init every pre-activation
    is exactly 0, where relu's gradient is 0 and clamp's is 1. With relu no parameter of
    the network ever received a gradient, so MEND trained only its step sizes and edited
    with the standardised raw gradient (every learning rate gave the same run to the last
    digit; tests/test_mend.py checks that the network now learns)."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.v)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        return x + (pre * self.scale[mode] + self.shift[mode]).clamp(min=0)


class GradientTransform(nn.Module):
    """Maps each (u, delta) row pair to (u~, delta~) for the matrices of one shape."""

    def __init__(self, in_dim: int, out_dim: int, n_modes: int, rank: int, n_hidden: int, std_floor: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.std_floor = in_dim, out_dim, std_floor
        dim = in_dim + out_dim
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes) for _ in range(n_hidden + 1))
        # Running statistics of u and delta (Welford): count, means, sums of squared deviations.
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def _update_stats(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * (n / total)
        self.m2 += batch_m2 + diff**2 * (self.count * n / total)
        self.count.fill_(total)

    def standardise(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """concat(u, delta) standardised by the running statistics (updated in training)."""
        x = torch.cat([u, delta], -1)
        if self.training:
            self._update_stats(x)
        if self.count < 2:
            raise RuntimeError("MEND normalisation needs statistics of at least 2 rows (train first)")
        std = (self.m2 / (self.count - 1)).sqrt()
        if self.std_floor > 0:  # per part (u, delta): no dimension's std below a share of the median
            std = torch.cat([part.clamp(min=float(self.std_floor * part.median()))
                             for part in std.split([self.in_dim, self.out_dim])])
        return (x - self.mean) / (std + 1e-7)

    def z_extent(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The largest |z| of u and of delta (2,) over the rows."""
        z_u, z_delta = self.standardise(u, delta).abs().split([self.in_dim, self.out_dim], -1)
        return torch.stack([z_u.max(), z_delta.max()])

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.standardise(u, delta)
        for layer in self.layers:
            x = layer(x, mode)
        return x.split([self.in_dim, self.out_dim], -1)


class MENDNetwork(nn.Module):
    def __init__(self, linears: list[EditedLinear], hp: MENDHparams):
        super().__init__()
        self.shape_key, self.mode = {}, {}
        groups: dict[str, list[str]] = {}
        for lin in linears:
            key = f"{lin.shape[0]}x{lin.shape[1]}"
            self.shape_key[lin.name] = key
            self.mode[lin.name] = len(groups.setdefault(key, []))
            groups[key].append(lin.name)
        self.transforms = nn.ModuleDict({
            key: GradientTransform(*map(int, key.split("x")), len(names), hp.rank, hp.n_hidden, hp.std_floor)
            for key, names in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(linears),), float(hp.edit_lr)))
        self.names = [lin.name for lin in linears]

    def updates(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Weight updates (out, in) of every edited matrix from its captured factors."""
        out = {}
        for i, name in enumerate(self.names):
            u, delta = factors[name]
            u_t, delta_t = self.transforms[self.shape_key[name]](u, delta, self.mode[name])
            out[name] = -self.edit_lrs[i] * (delta_t.T @ u_t)
        return out

    def z_extent(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per transform, the largest |z| of u and of delta (2,) over its matrices' rows."""
        out = {}
        for name in self.names:
            key = self.shape_key[name]
            z = self.transforms[key].z_extent(*factors[name])
            out[key] = torch.maximum(out[key], z) if key in out else z
        return out


# ------------------------------------------------------------------ the editor

class MEND(HypernetEditor):
    Hparams = MENDHparams
    method = "mend"
    arch_fields = ARCH_FIELDS

    @staticmethod
    def build_network(backbone, linears, hparams):
        return MENDNetwork(linears, hparams)

    def updates(self, case, factors):
        return self.net.updates(factors)

    @classmethod
    def prepare(cls, backbone, hparams, train_cases, out_dir, seed):
        return save_prepared(train_mend(backbone, hparams, train_cases, seed), out_dir)


def train_mend(backbone: Backbone, hp: MENDHparams, train_cases: list[EditCase], seed: int) -> Trained:
    torch.manual_seed(seed)
    fit, validation = split_validation(train_cases, hp.validation_share, seed)
    linears = edited_linears(backbone, hp.n_layers, hp.include_gate)
    net = MENDNetwork(linears, hp).to(backbone.device).train()
    opt = torch.optim.Adam([{"params": list(net.transforms.parameters()), "lr": hp.lr},
                            {"params": [net.edit_lrs], "lr": hp.lr_lr}], foreach=True)
    prefixes = PrefixCache(backbone, min(lin.layer for lin in linears))
    progress = ProgressLog("MEND", hp.steps, hp.log_every, log)
    log.info("MEND: training on %d cases (%d held out for validation) for %d steps; edited matrices %s", len(fit),
             len(validation), hp.steps, [lin.name for lin in linears])
    t0 = time.time()
    for step, case in enumerate(training_cases(backbone, fit, hp.steps, seed, hp.counterfactual,
                                               hp.counterfactual_k)):
        batch, prefix = prefixes(case)
        base_logits, edit_loss, factors = capture_factors(backbone, prefix, batch, linears, row=0)
        updates = net.updates(factors)
        weights = {lin.name: lin.module.weight + updates[lin.name].to(lin.module.weight.dtype) for lin in linears}
        logits = upper_logits(backbone, prefix, linears, weights)
        l_gen = answer_nll(logits, batch, 1) + answer_nll(logits, batch, 2)
        l_loc = answer_kl(base_logits, logits, batch, 3) + answer_kl(base_logits, logits, batch, 4)
        l_rel = answer_nll(logits, batch, 0)
        loss = hp.c_edit * l_gen + hp.c_loc * l_loc + hp.c_rel * l_rel
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), hp.grad_clip)
        opt.step()
        with torch.no_grad():
            progress.add(step, loss=loss, pre_nll=edit_loss, rel_nll=l_rel, gen_nll=l_gen / 2, loc_kl=l_loc / 2,
                         rel_ok=answer_correct(logits, batch, 0),
                         gen_ok=(answer_correct(logits, batch, 1) + answer_correct(logits, batch, 2)) / 2,
                         edit_lr=net.edit_lrs.abs().mean())
    train_s = time.time() - t0
    net.eval()
    figures = measure_mend(backbone, net, linears, hp, fit, validation, seed)
    log.info("MEND: %s", figures_line(figures))
    return Trained("mend", net, hp, linears, progress.history, train_s,
                   {"edit_lrs": [round(float(x), 6) for x in net.edit_lrs.detach()], **figures})


def measure_mend(backbone: Backbone, net: MENDNetwork, linears: list[EditedLinear], hp: MENDHparams,
                 fit: list[EditCase], validation: list[EditCase], seed: int) -> dict:
    """The trained network's figures for prepared.json (`unike.hypernet.update_figures`):
    on train cases the range seen in training, on the validation slice the scores and update
    sizes under `drift_bound`; for both, the largest |z| of u and of delta per transform
    (an input far outside the train range of z is what drives an update out of range)."""
    z_seen: list[dict[str, torch.Tensor]] = []

    def predict(case, factors):
        z_seen.append(net.z_extent(factors))
        return net.updates(factors)

    def with_z(figures: dict) -> dict:
        z_max = {key: torch.stack([z[key] for z in z_seen]).amax(0) for key in net.transforms}
        z_seen.clear()
        return {**figures, "z_max": {key: [round(float(x), 3) for x in z] for key, z in z_max.items()}}

    train_range = with_z(update_figures(probe_updates(backbone, linears, range_sample(fit, seed), predict)))
    if not validation:
        return {"train_range": train_range}
    limits = drift_limits(hp.drift_bound, linears)
    return {"train_range": train_range,
            "validation": with_z(update_figures(probe_updates(backbone, linears, validation, predict, limits)))}
