"""KE, KnowledgeEditor (De Cao et al., EMNLP 2021): a hypernetwork conditioned on the edit
that predicts the weight update of the edited matrices.

- Condition: the text `"{pred} >> {alt} || {src}"` (pred: the model's own answer; on the
  tiny world the mined greedy answer, on MMEdit the dataset's `pred`) embedded with a copy
  of the edited model's token embeddings, a 1-layer BiLSTM and a tanh linear layer -> c.
  Text only, as VLKEB's multimodal KE conditions: the image reaches the update only
  through grad_W L (on E-VQA the condition does not say which creature is pictured).
  On the tiny world's closed word-level vocabulary ">>" and "||" are `<unk>` tokens; they
  still mark the boundaries, and the copied embedding table is trained.
- Per edited matrix W (out x in): a weight-normed MLP c -> tanh -> 2 (out + in) + 1 split
  into c_a (in), r_a (out), c_b (in), r_b (out), eta; A = softmax(r_a)^T (x) c_a,
  B = softmax(r_b)^T (x) c_b and

      dW = max_scale * sigmoid(eta) * (grad_W L (.) A + B)

  with grad_W L the gradient of the edit input's NLL at the current weights (a constant).
- Edited matrices: the FFNs of the last `n_layers` decoder layers (OPT fc1/fc2, LLaMA
  up_proj/down_proj), as VLKEB's multimodal KE.

`prepare` trains the hypernetwork with KE's constrained objective, one edit per step:

    NLL(edit | W + dW) + NLL(rephrase | W + dW) [+ NLL(image rephrase | W + dW)]
    + alpha * (divergence - margin)

alpha is learned by gradient ascent and clamped at >= 0 after every step (a Lagrange
multiplier). `divergence: kl` (the default, KE's own default) is KL(pre || post) on the
answer positions of the case's text and image locality inputs; `lp` is KE's alternative,
the mean over edited matrices of (mean |dW|^p)^(1/p) (VLKEB uses only this one); `both`
uses both with one multiplier each. The margin shrinks x0.8 (down to its minimum) after
each window of `margin_every` training edits in which more than `margin_success` of the
edits were right after the update (KE measures this on a validation split once per epoch;
we use the training window and keep the validation slice out of every training decision). Centred
RMSprop with linear warm-up and linear decay, as KE. Multimodal addition: the image
rephrase is a second view of the edit (`image_rephrase: true`). `counterfactual` gives a
share of the training edits a target the model itself proposes (KE trains on targets
from the model's beam search; see `unike.hypernet.Counterfactuals`): without it, on the
tiny world's train split (4 distinct VQA targets) KE learns to write those targets and
edits nothing else.

What keeps KE's update in range is max_scale (1 in KE's and VLKEB's training), the
sigmoid gate and the constraint: `lp` (VLKEB's only one) bounds the update's size, `kl`
only its effect on the locality inputs. On the tiny world with `kl` and max_scale 100 the
gradient-free term B carries the update (the gradient term's share of |dW| ~0.03), which
is then nearly the same matrix for every edit, 1.9-3.7 times |W|; `both` keeps it within
0.5 |W| (docs/baselines.md, KE). `drift_bound` keeps each matrix within a multiple of its
norm of the unedited weights, in one edit or in sequence, as for MEND
(`unike.hypernet.bound_drift`; 0, none, for KE).

Sequential edits accumulate (each edit is predicted at the current weights and added in
place): neither KE nor VLKEB edits in sequence, and this is how EasyEdit applies MEND.
`restore` copies the saved weights back (bit-exact).

`prepare` holds a validation slice of the train split out of training (`validation_share`,
whole facts: `unike.hypernet.split_validation`) and records the trained network's figures
(`measure_ke`): on train cases and on the validation slice the benchmark's scores of each
update applied alone and |dW| / |W| per edited matrix; on the validation slice also the
gradient term's share of the update and the update's cosine with the descent direction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from unike.data import EditCase
from unike.hypernet import (EditedLinear, HypernetEditor, PrefixCache, ProgressLog, Trained, answer_correct,
                           answer_kl, answer_nll, capture_factors, edited_linears, figures_line, probe_updates,
                           range_sample, save_prepared, split_validation, training_cases, update_figures,
                           drift_limits, upper_logits)

log = logging.getLogger(__name__)
DIVERGENCES = ("kl", "lp", "both")


@dataclass(frozen=True)
class KEHparams:
    n_layers: int = 3  # edit the FFNs of the last n_layers decoder layers
    include_gate: bool = False  # LLaMA: also edit gate_proj
    cond_template: str = "{pred} >> {alt} || {src}"
    lstm_hidden: int = 128  # per direction
    condition_dim: int = 1024
    hidden_dim: int = 128  # of each matrix's MLP
    max_scale: float = 1.0
    lr: float = 3e-4  # centred RMSprop lr of the hypernetwork
    lr_alpha: float = 0.1  # lr of the Lagrange multiplier(s) (gradient ascent)
    warmup: int = 100
    divergence: str = "kl"  # kl | lp | both
    margin_kl_max: float = 1e-3
    margin_kl_min: float = 1e-5
    margin_lp_max: float = 1e-3
    margin_lp_min: float = 1e-7
    p: float = 2.0  # of the Lp divergence
    margin_every: int = 100  # training edits per margin decision
    margin_success: float = 0.9  # shrink the margin when edit success in the window exceeds this
    image_rephrase: bool = True  # add NLL(rephrased image, src -> alt) to the edit objective
    steps: int = 1000  # training edits (batch 1)
    counterfactual: float = 0.0  # share of training edits retargeted to a model-proposed alternative
    counterfactual_k: int = 8  # alternatives per case: the model's top-k at the edited slot
    grad_clip: float = 0.0  # 0: no clipping (KE does not clip)
    validation_share: float = 0.1  # train cases held out of training for the validation figures (split_validation)
    drift_bound: float = 0.0  # editing: keep |W - W0| <= drift_bound * |W0| per matrix, in any sequence (0: none)
    log_every: int = 100

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"KE: divergence must be one of {DIVERGENCES}, got {self.divergence!r}")


ARCH_FIELDS = ("n_layers", "include_gate", "cond_template", "lstm_hidden", "condition_dim", "hidden_dim", "max_scale")


class Conditioner(nn.Module):
    """Token ids of the condition text -> c (1, condition_dim)."""

    def __init__(self, embeddings: torch.Tensor, lstm_hidden: int, condition_dim: int):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(embeddings.detach().clone().float(), freeze=False)
        self.lstm = nn.LSTM(embeddings.shape[1], lstm_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_hidden, condition_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embedding(ids))  # h: (2 directions, B, H), the final states
        return torch.tanh(self.out(torch.cat([h[0], h[1]], -1)))


class MatrixUpdate(nn.Module):
    """c and grad_W L -> the two terms of dW for one (out x in) matrix."""

    def __init__(self, out_features: int, in_features: int, condition_dim: int, hidden_dim: int, max_scale: float):
        super().__init__()
        self.out_features, self.in_features, self.max_scale = out_features, in_features, max_scale
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)), nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, 2 * (out_features + in_features) + 1)))

    def terms(self, condition: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms of dW: the scaled gradient term and the gradient-free term."""
        m, n = self.out_features, self.in_features
        c_a, r_a, c_b, r_b, eta = self.net(condition)[0].split([n, m, n, m, 1])
        a = r_a.softmax(-1)[:, None] * c_a[None, :]
        b = r_b.softmax(-1)[:, None] * c_b[None, :]
        scale = self.max_scale * eta.sigmoid()
        return scale * grad * a, scale * b


class KENetwork(nn.Module):
    def __init__(self, embeddings: torch.Tensor, linears: list[EditedLinear], hp: KEHparams):
        super().__init__()
        self.names = [lin.name for lin in linears]
        self.conditioner = Conditioner(embeddings, hp.lstm_hidden, hp.condition_dim)
        self.updaters = nn.ModuleDict({
            lin.name.replace(".", "_"): MatrixUpdate(lin.module.out_features, lin.module.in_features,
                                                     hp.condition_dim, hp.hidden_dim, hp.max_scale)
            for lin in linears})

    def updates(self, cond_ids: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: with_grad + free for name, (with_grad, free) in self.terms(cond_ids, grads).items()}

    def terms(self, cond_ids: torch.Tensor, grads: dict[str, torch.Tensor]
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited matrix, the two terms of its dW (`MatrixUpdate.terms`)."""
        c = self.conditioner(cond_ids)
        return {name: self.updaters[name.replace(".", "_")].terms(c, grads[name]) for name in self.names}


def condition_ids(backbone, template: str, case: EditCase) -> torch.Tensor:
    text = template.format(pred=case.pred, alt=case.alt, src=case.src)
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long, device=backbone.device)


def weight_grads(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """grad_W L = sum_t delta_t u_t^T from the captured factors."""
    return {name: delta.T @ u for name, (u, delta) in factors.items()}


def lp_divergence(updates: dict[str, torch.Tensor], p: float) -> torch.Tensor:
    return sum((d.abs() ** p).mean() ** (1 / p) for d in updates.values()) / len(updates)


class KnowledgeEditor(HypernetEditor):
    Hparams = KEHparams
    method = "ke"
    arch_fields = ARCH_FIELDS

    @staticmethod
    def build_network(backbone, linears, hparams):
        return KENetwork(backbone.model.get_input_embeddings().weight, linears, hparams)

    def updates(self, case, factors):
        return self.net.updates(condition_ids(self.backbone, self.hparams.cond_template, case), weight_grads(factors))

    @classmethod
    def prepare(cls, backbone, hparams, train_cases, out_dir, seed):
        return save_prepared(train_ke(backbone, hparams, train_cases, seed), out_dir)


def train_ke(backbone, hp: KEHparams, train_cases: list[EditCase], seed: int) -> Trained:
    torch.manual_seed(seed)
    fit, validation = split_validation(train_cases, hp.validation_share, seed)
    linears = edited_linears(backbone, hp.n_layers, hp.include_gate)
    net = KENetwork(backbone.model.get_input_embeddings().weight, linears, hp).to(backbone.device).train()
    use_kl, use_lp = hp.divergence in ("kl", "both"), hp.divergence in ("lp", "both")
    alpha = nn.Parameter(torch.ones(2, device=backbone.device))  # multipliers of the KL and Lp constraints
    opt = torch.optim.RMSprop([{"params": list(net.parameters()), "lr": hp.lr},
                               {"params": [alpha], "lr": hp.lr_alpha}], centered=True, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(hp.warmup, 1), max(0.0, (hp.steps - s) / max(hp.steps - hp.warmup, 1))))
    margin = {"kl": hp.margin_kl_max, "lp": hp.margin_lp_max}
    margin_min = {"kl": hp.margin_kl_min, "lp": hp.margin_lp_min}
    prefixes = PrefixCache(backbone, min(lin.layer for lin in linears))
    progress = ProgressLog("KE", hp.steps, hp.log_every, log)
    window, margins = [], []
    log.info("KE: training on %d cases (%d held out for validation) for %d steps (divergence %s); edited matrices %s",
             len(fit), len(validation), hp.steps, hp.divergence, [lin.name for lin in linears])
    t0 = time.time()
    for step, case in enumerate(training_cases(backbone, fit, hp.steps, seed, hp.counterfactual,
                                               hp.counterfactual_k)):
        batch, prefix = prefixes(case)
        base_logits, edit_loss, factors = capture_factors(backbone, prefix, batch, linears, row=0)
        updates = net.updates(condition_ids(backbone, hp.cond_template, case), weight_grads(factors))
        weights = {lin.name: lin.module.weight + updates[lin.name].to(lin.module.weight.dtype) for lin in linears}
        logits = upper_logits(backbone, prefix, linears, weights)
        views = [0, 1, 2] if hp.image_rephrase else [0, 1]
        nll = sum(answer_nll(logits, batch, r) for r in views) / len(views)
        kl = (answer_kl(base_logits, logits, batch, 3) + answer_kl(base_logits, logits, batch, 4)) / 2
        lp = lp_divergence(updates, hp.p)
        loss = nll
        if use_kl:
            loss = loss + alpha[0] * (kl - margin["kl"])
        if use_lp:
            loss = loss + alpha[1] * (lp - margin["lp"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if alpha.grad is not None:
            alpha.grad.neg_()  # gradient ascent on the multipliers
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), hp.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            alpha.clamp_(min=0.0)
        ok = answer_correct(logits, batch, 0)
        window.append(ok)
        if len(window) == hp.margin_every:
            success = sum(window) / len(window)
            if success > hp.margin_success:
                for k in margin:
                    margin[k] = max(margin[k] * 0.8, margin_min[k])
            margins.append({"step": step + 1, "success": success, **margin})
            window = []
        with torch.no_grad():
            progress.add(step, loss=loss, pre_nll=edit_loss, nll=nll, kl=kl, lp=lp, rel_ok=ok,
                         gen_ok=(answer_correct(logits, batch, 1) + answer_correct(logits, batch, 2)) / 2,
                         alpha_kl=alpha[0], alpha_lp=alpha[1])
    train_s = time.time() - t0
    net.eval()
    figures = measure_ke(backbone, net, linears, hp, fit, validation, seed)
    log.info("KE: %s", figures_line(figures))
    return Trained("ke", net, hp, linears, progress.history, train_s,
                   {"alpha": {"kl": round(float(alpha[0].detach()), 6), "lp": round(float(alpha[1].detach()), 6)},
                    "margin": dict(margin), "margins": margins, **figures})


def measure_ke(backbone, net: KENetwork, linears: list[EditedLinear], hp: KEHparams, fit: list[EditCase],
               validation: list[EditCase], seed: int) -> dict:
    """The trained network's figures for prepared.json (`unike.hypernet.update_figures`):
    the range of update sizes on train cases; on the validation slice the scores and update
    sizes under `drift_bound`, and what the update is made of: the mean share of the
    gradient term in |dW| (|grad (.) A| / (|grad (.) A| + |B|)) and the mean cosine of dW
    with the descent direction -grad."""
    terms: list[dict[str, float]] = []

    def predict(case, factors):
        grads = weight_grads(factors)
        parts = net.terms(condition_ids(backbone, hp.cond_template, case), grads)
        updates = {name: with_grad + free for name, (with_grad, free) in parts.items()}
        for name, (with_grad, free) in parts.items():
            terms.append({"grad_share": float(with_grad.norm() / (with_grad.norm() + free.norm()).clamp(min=1e-12)),
                          "cos_descent": float(F.cosine_similarity(updates[name].flatten(), -grads[name].flatten(),
                                                                   dim=0))})
        return updates

    train_range = update_figures(probe_updates(backbone, linears, range_sample(fit, seed), predict))
    if not validation:
        return {"train_range": train_range}
    terms.clear()
    figures = update_figures(probe_updates(backbone, linears, validation, predict,
                                           drift_limits(hp.drift_bound, linears)))
    for key in ("grad_share", "cos_descent"):
        figures[key] = round(sum(t[key] for t in terms) / len(terms), 4)
    return {"train_range": train_range, "validation": figures}
