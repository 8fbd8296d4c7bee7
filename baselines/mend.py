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
residual layers `x + act(s_l * (U V x + b) + t_l)` (U = 0 at init, s_l / t_l a per-matrix
scale and shift), so an untrained MEND is a standardised gradient step.

`prepare` trains the network and the step sizes on the train split, one edit per step,
with EasyEdit's multimodal objective: edit on (image, src -> alt) and minimise

    c_edit * (NLL(image, rephrase -> alt) + NLL(rephrased image, src -> alt))
    + c_loc * (KL(text loc: pre || post) + KL(image loc: pre || post))

(KL and NLL over answer positions; `c_rel` optionally adds the NLL of the edit input
itself, 0 by default as in EasyEdit). Deviation from the original code: the update is
applied with "-" (a descent step); MEND's code uses "+" and training has to learn to flip
the sign (mend issue 13).

Two options (off by default, i.e. MEND as published) for small train splits such as the
tiny world's, whose edits come from 6 creatures and share 4 targets:
- `std_floor`: MEND standardises every dimension of u and delta by its running std. A
  dimension that barely varies over the train split (a ReLU unit no train input fires)
  gets a tiny std, and an eval input that does use it gets a huge z-score and an update
  hundreds of times larger than any seen in training (measured: update norms 60-136 on
  eval cases vs 0.3-7 on train cases). The floor keeps each std at least `std_floor`
  times the median std of its part (u or delta).
- `counterfactual`: a share of the training edits gets a target the model itself
  proposes (`Counterfactuals`), as KE's (and MEND's zsRE) training data does, so the
  network cannot learn to write the train split's few targets.

Sequential edits accumulate: every `edit` computes a fresh update at the current weights
and adds it in place; `restore` copies the saved weights back (bit-exact).

The helpers below (which matrices are edited, a cache-free prefix, the upper layers run
with substituted weights, answer-position NLL / KL, capture of u and delta) are shared
with `baselines.ke`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from unike.backbones import Backbone, Batch, Prefix
from unike.data import EditCase, case_samples, edit_sample
from unike.editing import Editor, ParamSnapshot

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ shared helpers


@dataclass(frozen=True)
class EditedLinear:
    name: str  # stable key, e.g. "layers.3.fc1" or "layers.3.mlp.up_proj"
    layer: int  # decoder layer index
    path: str  # module path inside the decoder block, e.g. "fc1" or "mlp.up_proj"
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:
        """(in_features, out_features)."""
        return self.module.in_features, self.module.out_features


def edited_linears(backbone: Backbone, n_layers: int, include_gate: bool = False) -> list[EditedLinear]:
    """The FFN matrices of the last `n_layers` decoder layers: OPT fc1/fc2, LLaMA
    up_proj/down_proj (plus gate_proj when `include_gate`)."""
    total = len(backbone.text)
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers}: the text model has {total} layers")
    out = []
    for layer in range(total - n_layers, total):
        block = backbone.text.layers[layer]
        paths = {id(m): n for n, m in block.named_modules()}
        for key, module in backbone.text.ffn_linears(layer).items():
            if key == "in.gate_proj" and not include_gate:
                continue
            path = paths[id(module)]
            out.append(EditedLinear(f"layers.{layer}.{path}", layer, path, module))
    return out


def clean_prefix(backbone: Backbone, batch: Batch, layer: int) -> Prefix:
    """`Backbone.prefix` without the KV cache the decoder hands its layers: a prefix that
    is run many times must not append keys and values on every run."""
    from transformers.cache_utils import Cache

    prefix = backbone.prefix(batch, layer)
    kwargs = {k: v for k, v in prefix.layer_kwargs.items() if not isinstance(v, Cache)}
    kwargs["use_cache"] = False
    return Prefix(prefix.layer, prefix.hidden, kwargs)


def upper_logits(backbone: Backbone, prefix: Prefix, linears: list[EditedLinear],
                 weights: dict[str, torch.Tensor] | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the layers from `prefix.layer` up, with the weights of some edited
    Linears replaced by `weights[name]` (differentiable tensors)."""
    weights = weights or {}
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for lin in linears:
        if lin.name in weights:
            by_layer.setdefault(lin.layer, {})[lin.path + ".weight"] = weights[lin.name]
    hidden = prefix.hidden if hidden is None else hidden
    for i, block in enumerate(backbone.text.layers[prefix.layer:], start=prefix.layer):
        if i in by_layer:
            hidden = torch.func.functional_call(block, by_layer[i], (hidden,), prefix.layer_kwargs)
        else:
            hidden = block(hidden, **prefix.layer_kwargs)
    return backbone.text.head(hidden)


def answer_nll(logits: torch.Tensor, batch: Batch, row: int) -> torch.Tensor:
    """Mean NLL over the answer tokens of one row (teacher forcing)."""
    mask = batch.answer_mask[row, 1:]
    return F.cross_entropy(logits[row, :-1][mask], batch.input_ids[row, 1:][mask])


def answer_correct(logits: torch.Tensor, batch: Batch, row: int) -> bool:
    mask = batch.answer_mask[row, 1:]
    return bool((logits[row, :-1][mask].argmax(-1) == batch.input_ids[row, 1:][mask]).all())


def answer_kl(base_logits: torch.Tensor, logits: torch.Tensor, batch: Batch, row: int) -> torch.Tensor:
    """KL(pre || post) averaged over the answer positions of one row."""
    mask = batch.answer_mask[row, 1:]
    pre = base_logits[row, :-1][mask].log_softmax(-1)
    post = logits[row, :-1][mask].log_softmax(-1)
    return (pre.exp() * (pre - post)).sum(-1).mean()


def capture_factors(backbone: Backbone, prefix: Prefix, batch: Batch, linears: list[EditedLinear], row: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Run the upper layers with the current weights; return the (detached) logits, the
    edit loss (NLL of `row`) and, per edited Linear, its inputs u (N, in) and the loss
    gradients at its outputs delta (N, out), flattened over rows x tokens with the
    all-zero rows dropped (tokens that do not influence the loss, other rows, padding).
    The weight gradient of the loss is `delta.T @ u`."""
    inputs, outputs, handles = {}, {}, []
    for lin in linears:
        def hook(_module, args, output, name=lin.name):
            inputs[name] = args[0]
            outputs[name] = output
        handles.append(lin.module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            hidden = prefix.hidden.detach().requires_grad_(True)
            logits = upper_logits(backbone, prefix, linears, hidden=hidden)
            loss = answer_nll(logits, batch, row)
            deltas = torch.autograd.grad(loss, [outputs[lin.name] for lin in linears])
    finally:
        for h in handles:
            h.remove()
    factors = {}
    for lin, delta in zip(linears, deltas):
        u = inputs[lin.name].detach().reshape(-1, lin.module.in_features).float()
        d = delta.detach().reshape(-1, lin.module.out_features).float()
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        factors[lin.name] = (u[keep], d[keep])
    return logits.detach(), loss.detach(), factors


class PrefixCache:
    """Per training case: the encoded batch of its five scored inputs and the cache-free
    prefix at the first edited layer (the layers below are never edited)."""

    def __init__(self, backbone: Backbone, layer: int):
        self.backbone, self.layer, self.items = backbone, layer, {}

    def __call__(self, case: EditCase) -> tuple[Batch, Prefix]:
        key = (case.case_id, case.alt)
        if key not in self.items:
            batch = self.backbone.encode(case_samples(case))
            self.items[key] = (batch, clean_prefix(self.backbone, batch, self.layer))
        return self.items[key]


class Counterfactuals:
    """Training edits with targets the model itself proposes, as KE trains (its targets are
    alternatives from the model's beam search; MEND trains on KE's data for zsRE).

    A train split whose edits share a handful of targets (the tiny world's: 4 VQA answers,
    3 captions) teaches a hypernetwork to write those targets rather than to edit. For a
    case, the slot where `alt` departs from `pred` is found; the model's top-k tokens at
    that slot (teacher-forced on alt's prefix, excluding alt's and pred's token and special
    tokens) give alternative targets `alt[:slot] + [token] + alt[slot+1:]`. Only the
    train case itself is used; alternatives that do not re-tokenize cleanly are dropped.
    """

    def __init__(self, backbone: Backbone, top_k: int):
        self.backbone, self.top_k, self.alts = backbone, top_k, {}

    def _answer_ids(self, case: EditCase, answer: str) -> list[int]:
        sample = edit_sample(case)
        ids, start = self.backbone.sample_ids(type(sample)(sample.image, sample.prompt, answer))
        return ids[start:]

    @torch.no_grad()
    def alternatives(self, case: EditCase) -> list[str]:
        if case.case_id in self.alts:
            return self.alts[case.case_id]
        tok = self.backbone.tokenizer
        alt_ids = self._answer_ids(case, case.alt)
        try:
            pred_ids = self._answer_ids(case, case.pred) if case.pred.strip() else []
        except ValueError:
            pred_ids = []
        slot = next((i for i, t in enumerate(alt_ids) if i >= len(pred_ids) or pred_ids[i] != t), 0)
        batch = self.backbone.encode([edit_sample(case)])
        start = int(batch.answer_mask[0].nonzero()[0])
        logits = self.backbone.logits(batch)[0, start + slot - 1]
        banned = set(tok.all_special_ids) | {alt_ids[slot]} | ({pred_ids[slot]} if slot < len(pred_ids) else set())
        out = []
        for t in logits.argsort(descending=True).tolist():
            if len(out) == self.top_k:
                break
            if t in banned:
                continue
            ids = alt_ids[:slot] + [t] + alt_ids[slot + 1:]
            text = tok.decode(ids, skip_special_tokens=True).strip()
            try:
                if text and text != case.alt and self._answer_ids(case, text) == ids:
                    out.append(text)
            except ValueError:
                continue
        self.alts[case.case_id] = out
        return out

    def sample(self, case: EditCase, rng: random.Random) -> EditCase:
        options = self.alternatives(case)
        if not options:
            return case
        return dataclasses.replace(case, alt=rng.choice(options), case_id=case.case_id + "#cf")


def training_cases(backbone: Backbone, cases: list[EditCase], steps: int, seed: int, counterfactual: float,
                   top_k: int) -> list[EditCase]:
    """The `steps` training edits: shuffled epochs over the train split; a share
    `counterfactual` of them gets a model-proposed alternative target."""
    order = case_order(cases, steps, seed)
    if counterfactual <= 0:
        return order
    cf, rng = Counterfactuals(backbone, top_k), random.Random(seed + 1)
    return [cf.sample(c, rng) if rng.random() < counterfactual else c for c in order]


def case_order(cases: list[EditCase], steps: int, seed: int) -> list[EditCase]:
    """`steps` training cases: shuffled epochs over the train split, deterministic."""
    if not cases:
        raise ValueError("no training cases")
    rng, order = random.Random(seed), []
    while len(order) < steps:
        epoch = list(cases)
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:steps]


def check_prepared(meta: dict, method: str, hparams, arch_fields: tuple[str, ...], linears: list[EditedLinear]) -> None:
    """The prepared folder must match the editor's hyperparameters and backbone."""
    saved = meta["hparams"]
    stale = [f for f in arch_fields if saved.get(f) != getattr(hparams, f)]
    if stale:
        raise ValueError(f"{method}: prepared network was trained with {({f: saved.get(f) for f in stale})}, "
                         f"the config now says {({f: getattr(hparams, f) for f in stale})}: re-run prepare-editor")
    names = [lin.name for lin in linears]
    if meta["linears"] != names:
        raise ValueError(f"{method}: prepared for matrices {meta['linears']}, this backbone edits {names}")


class ProgressLog:
    def __init__(self, method: str, steps: int, every: int, logger: logging.Logger = log):
        self.method, self.steps, self.every, self.t0, self.log = method, steps, every, time.time(), logger
        self.window: dict[str, list[float]] = {}
        self.history: list[dict] = []

    def add(self, step: int, **values: float) -> None:
        for k, v in values.items():
            self.window.setdefault(k, []).append(float(v))
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            means = {k: sum(v) / len(v) for k, v in self.window.items()}
            elapsed = time.time() - self.t0
            self.history.append({"step": step + 1, "elapsed_s": round(elapsed, 2), **means})
            self.log.info("%s step %d/%d (%.0f s, ETA %.0f s): %s", self.method, step + 1, self.steps, elapsed,
                     elapsed / (step + 1) * (self.steps - step - 1),
                     " ".join(f"{k}={v:.4g}" for k, v in means.items()))
            self.window = {}


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
    log_every: int = 100


ARCH_FIELDS = ("n_layers", "include_gate", "rank", "n_hidden", "std_floor")


class LowRankResidual(nn.Module):
    """x + act(s_m * (U V x + b) + t_m): identity at init (U = 0), scale/shift per mode."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.v)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.scale[mode] + self.shift[mode]
        return x + (F.relu(pre) if self.relu else pre)


class GradientTransform(nn.Module):
    """Maps each (u, delta) row pair to (u~, delta~) for the matrices of one shape."""

    def __init__(self, in_dim: int, out_dim: int, n_modes: int, rank: int, n_hidden: int, std_floor: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.std_floor = in_dim, out_dim, std_floor
        dim = in_dim + out_dim
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes, relu=i < n_hidden)
                                    for i in range(n_hidden + 1))
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

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, delta], -1)
        if self.training:
            self._update_stats(x)
        if self.count < 2:
            raise RuntimeError("MEND normalisation needs statistics of at least 2 rows (train first)")
        std = (self.m2 / (self.count - 1)).sqrt()
        if self.std_floor > 0:  # per part (u, delta): no dimension's std below a share of the median
            std = torch.cat([part.clamp(min=float(self.std_floor * part.median()))
                             for part in std.split([self.in_dim, self.out_dim])])
        x = (x - self.mean) / (std + 1e-7)
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


# ------------------------------------------------------------------ the editor

class MEND(Editor):
    needs_training = True
    supports_sequential = True
    Hparams = MENDHparams

    def __init__(self, backbone, hparams=None, prepared=None):
        super().__init__(backbone, hparams, prepared)
        self.linears = edited_linears(backbone, self.hparams.n_layers, self.hparams.include_gate)
        self.net = MENDNetwork(self.linears, self.hparams)
        load_prepared(self.net, prepared, "mend", self.hparams, ARCH_FIELDS, self.linears)
        self.net.eval().requires_grad_(False)
        self.net.to(backbone.device)
        self.first_layer = min(lin.layer for lin in self.linears)
        self.snapshot = ParamSnapshot({lin.name: lin.module.weight for lin in self.linears})

    def edit(self, case: EditCase) -> None:
        batch = self.backbone.encode([edit_sample(case)])
        prefix = clean_prefix(self.backbone, batch, self.first_layer)
        _, _, factors = capture_factors(self.backbone, prefix, batch, self.linears)
        with torch.no_grad():
            updates = self.net.updates(factors)
            for lin in self.linears:
                lin.module.weight.add_(updates[lin.name].to(lin.module.weight.dtype))

    def restore(self) -> None:
        self.snapshot.restore()

    @classmethod
    def prepare(cls, backbone, hparams, train_cases, out_dir, seed):
        return save_prepared(train_mend(backbone, hparams, train_cases, seed), out_dir)


@dataclass
class Trained:
    """A trained hypernetwork with what its prepared folder records."""

    method: str
    net: nn.Module
    hparams: object
    linears: list[EditedLinear]
    history: list[dict]
    train_s: float
    extra: dict = dataclasses.field(default_factory=dict)


def train_mend(backbone: Backbone, hp: MENDHparams, train_cases: list[EditCase], seed: int) -> Trained:
    torch.manual_seed(seed)
    linears = edited_linears(backbone, hp.n_layers, hp.include_gate)
    net = MENDNetwork(linears, hp).to(backbone.device).train()
    opt = torch.optim.Adam([{"params": list(net.transforms.parameters()), "lr": hp.lr},
                            {"params": [net.edit_lrs], "lr": hp.lr_lr}], foreach=True)
    prefixes = PrefixCache(backbone, min(lin.layer for lin in linears))
    progress = ProgressLog("MEND", hp.steps, hp.log_every)
    log.info("MEND: training on %d cases for %d steps; edited matrices %s", len(train_cases), hp.steps,
             [lin.name for lin in linears])
    t0 = time.time()
    for step, case in enumerate(training_cases(backbone, train_cases, hp.steps, seed, hp.counterfactual,
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
    net.eval()
    return Trained("mend", net, hp, linears, progress.history, time.time() - t0,
                   {"edit_lrs": [round(float(x), 6) for x in net.edit_lrs.detach()]})


def save_prepared(trained: Trained, out_dir: Path) -> dict:
    """Write `<method>.safetensors` (the network's state) and `<method>.json` (hparams,
    edited matrices, training curve); return the summary `prepare` records."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in trained.net.state_dict().items()}
    save_file(state, out_dir / f"{trained.method}.safetensors")
    summary = {"train_s": round(trained.train_s, 2), "steps": trained.hparams.steps,
               "final": trained.history[-1] if trained.history else {},
               "n_parameters": sum(p.numel() for p in trained.net.parameters()), **trained.extra}
    meta = {"method": trained.method, "hparams": asdict(trained.hparams),
            "linears": [lin.name for lin in trained.linears], "summary": summary, "history": trained.history}
    (out_dir / f"{trained.method}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return summary


def load_prepared(net: nn.Module, prepared: Path, method: str, hparams, arch_fields: tuple[str, ...],
                  linears: list[EditedLinear]) -> dict:
    """Load a network written by `save_prepared` after checking it fits the config."""
    from safetensors.torch import load_file

    prepared = Path(prepared)
    meta = json.loads((prepared / f"{method}.json").read_text())
    check_prepared(meta, method, hparams, arch_fields, linears)
    net.load_state_dict(load_file(prepared / f"{method}.safetensors"))
    return meta
