"""Machinery shared by the hypernetwork editors (`baselines.ke`, `baselines.mend`).

Both edit the FFN matrices of the last decoder layers by predicting a weight update from
the edit input's loss, and are trained in `prepare` one edit per step. What they share:

- which matrices are edited (`EditedLinear`, `edited_linears`);
- running the upper layers from a cache-free prefix, with substituted (differentiable)
  weights (`clean_prefix`, `upper_logits`, `PrefixCache`);
- losses over answer positions (`answer_nll`, `answer_kl`, `answer_correct`) and the
  capture of each edited Linear's inputs and output gradients (`capture_factors`);
- the training edits, optionally retargeted to model-proposed alternatives
  (`Counterfactuals`, `training_cases`), and the validation slice held out of them
  (`split_validation`);
- the figures `prepare` records of the trained network (`probe_updates`, `update_figures`):
  edit success and relative update size |dW| / |W| per edited matrix, on train cases (the
  range seen in training) and on the held-out validation slice;
- the optional bound on how far the edited matrices may drift from their unedited values,
  in one edit or in any sequence (`drift_limits`, `bound_updates`, `bound_drift`), a
  stability measure of ours;
- progress logging, and the prepared folder (`ProgressLog`, `Trained`, `save_prepared`,
  `load_prepared`);
- the editor around a trained network (`HypernetEditor`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from unike.backbones import Backbone, Batch, Prefix, answer_predictions
from unike.data import ROWS, EditCase, case_samples, edit_sample
from unike.editing import Editor, ParamSnapshot
from unike.metrics import score_case


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
    order = _case_order(cases, steps, seed)
    if counterfactual <= 0:
        return order
    cf, rng = Counterfactuals(backbone, top_k), random.Random(seed + 1)
    return [cf.sample(c, rng) if rng.random() < counterfactual else c for c in order]


def _case_order(cases: list[EditCase], steps: int, seed: int) -> list[EditCase]:
    """`steps` training cases: shuffled epochs over the train split, deterministic."""
    if not cases:
        raise ValueError("no training cases")
    rng, order = random.Random(seed), []
    while len(order) < steps:
        epoch = list(cases)
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:steps]


def split_validation(cases: list[EditCase], share: float, seed: int) -> tuple[list[EditCase], list[EditCase]]:
    """(fit, validation): a seeded slice of the train split, at least `share` of its cases,
    held out of training by fact (`fact_id`): no other image or phrasing of a held-out fact
    is trained on, so the validation edits are new to the network, as the eval split's are.
    At least one fact is always trained on; share 0 holds out nothing. (The rule of
    `benchmarks/tune.py`'s validation split, applied inside `prepare`.)"""
    if share <= 0:
        return list(cases), []
    sizes: dict[str, int] = {}
    for case in cases:
        sizes[case.fact_id] = sizes.get(case.fact_id, 0) + 1
    facts = sorted(sizes)
    random.Random(seed).shuffle(facts)
    held, n_held = set(), 0
    for fact in facts[:-1]:
        if n_held >= share * len(cases):
            break
        held.add(fact)
        n_held += sizes[fact]
    return [c for c in cases if c.fact_id not in held], [c for c in cases if c.fact_id in held]


# The range seen in training is measured on at most this many train cases: the whole train
# split of a tiny-world task, and a bounded cost (one forward and backward each) on MMEdit's
# thousands.
RANGE_CASES = 400


def range_sample(cases: list[EditCase], seed: int) -> list[EditCase]:
    """The train cases the range seen in training is measured on (a seeded sample)."""
    if len(cases) <= RANGE_CASES:
        return list(cases)
    return random.Random(seed).sample(cases, RANGE_CASES)


def bound_updates(updates: dict[str, torch.Tensor], limits: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """Each update scaled down to its limit on |dW| (Frobenius norm); one within it, or with
    no limits given, is unchanged."""
    if not limits:
        return updates
    return {name: d * (limits[name] / d.norm().clamp(min=1e-12)).clamp(max=1.0) for name, d in updates.items()}


def drift_limits(bound: float, linears: list[EditedLinear]) -> dict[str, float] | None:
    """The largest |W - W0| each edited matrix may reach: `bound` times its unedited norm
    |W0| (taken when called, on the unedited weights). bound 0: no limits."""
    if bound <= 0:
        return None
    return {lin.name: bound * float(lin.module.weight.float().norm()) for lin in linears}


@torch.no_grad()
def bound_drift(linears: list[EditedLinear], unedited: dict[str, torch.Tensor], limits: dict[str, float]) -> None:
    """Scale each matrix's total change W - W0 back onto its limit where it lies beyond:
    W = W0 + (W - W0) * limit / |W - W0|. The direction of the accumulated edits is kept;
    only their size is capped, so the bound holds after any number of edits."""
    for lin in linears:
        weight, w0 = lin.module.weight, unedited[lin.name]
        change = weight.float() - w0.float()
        norm = float(change.norm())
        if norm > limits[lin.name]:
            weight.copy_((w0.float() + change * (limits[lin.name] / norm)).to(weight.dtype))


def probe_updates(backbone: Backbone, linears: list[EditedLinear], cases: list[EditCase],
                  predict: Callable[[EditCase, dict], dict[str, torch.Tensor]],
                  limits: dict[str, float] | None = None) -> list[dict]:
    """Each case's update (`predict(case, factors)`, bounded by `limits`) applied alone to
    the current weights: the benchmark's scores of its five inputs (`unike.metrics`, locality
    against the same weights without the update) and |dW| / |W| of each edited matrix."""
    first = min(lin.layer for lin in linears)
    records = []
    for case in cases:
        batch = backbone.encode(case_samples(case))
        prefix = clean_prefix(backbone, batch, first)
        base_logits, _, factors = capture_factors(backbone, prefix, batch, linears, row=0)
        with torch.no_grad():
            updates = bound_updates(predict(case, factors), limits)
            weights = {lin.name: lin.module.weight + updates[lin.name].to(lin.module.weight.dtype) for lin in linears}
            logits = upper_logits(backbone, prefix, linears, weights)
        preds, pre = answer_predictions(logits, batch), answer_predictions(base_logits, batch)
        scores = score_case(dict(zip(ROWS, preds)), dict(zip(ROWS, batch.answer_targets())), dict(zip(ROWS, pre)))
        sizes = {lin.name: float(updates[lin.name].norm() / lin.module.weight.float().norm()) for lin in linears}
        records.append({**{row: scores[row] for row in ROWS}, "rel_update": sizes})
    return records


def update_figures(records: list[dict]) -> dict:
    """`probe_updates` records summarised: the mean of each score, and per edited matrix the
    mean and max of |dW| / |W|."""
    n = len(records)
    names = list(records[0]["rel_update"]) if records else []
    return {"n_cases": n, **{row: round(sum(r[row] for r in records) / max(n, 1), 4) for row in ROWS},
            "rel_update": {name: {"mean": round(sum(r["rel_update"][name] for r in records) / n, 6),
                                  "max": round(max(r["rel_update"][name] for r in records), 6)} for name in names}}


def figures_line(figures: dict) -> str:
    """One log line of `train_range` and `validation` figures."""
    def part(name: str, f: dict) -> str:
        largest = max(r["max"] for r in f["rel_update"].values())
        return (f"{name} ({f['n_cases']} cases): Rel {f['rel']:.2f}, T-Loc {f['t_loc']:.2f}, "
                f"M-Loc {f['m_loc']:.2f}, largest |dW|/|W| {largest:.3g}")
    return "; ".join(part(name, figures[name]) for name in ("train_range", "validation") if name in figures)


def _check_prepared(meta: dict, method: str, hparams, arch_fields: tuple[str, ...],
                    linears: list[EditedLinear]) -> None:
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
    """Training curve: the mean of each value over every `every` steps, logged under the
    trainer's own logger and kept in `history` (the prepared folder records it)."""

    def __init__(self, method: str, steps: int, every: int, logger: logging.Logger):
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
    meta = json.loads((prepared / f"{method}.json").read_text(encoding="utf-8"))
    _check_prepared(meta, method, hparams, arch_fields, linears)
    net.load_state_dict(load_file(prepared / f"{method}.safetensors"))
    return meta


class HypernetEditor(Editor):
    """An editor whose trained network maps the edit input's captured factors to an update
    of every edited matrix. Subclasses name the prepared files (`method`), list the
    hyperparameters the saved network must match (`arch_fields`) and define
    `build_network` and `updates`. Sequential edits accumulate, as EasyEdit's sequential
    MEND does: each update is predicted at the current weights and added in place;
    `restore` copies the saved weights back (bit-exact). With `drift_bound` > 0 each
    matrix's total change |W - W0| is kept within `drift_bound` times |W0| after every
    edit (`bound_drift`): a single update is capped at that size, and a sequence of them
    never moves a matrix further."""

    needs_training = True
    method: ClassVar[str]
    arch_fields: ClassVar[tuple[str, ...]]
    # Read when editing, not by `prepare`: variants that differ only in them share a folder.
    edit_fields: ClassVar[tuple[str, ...]] = ("drift_bound",)
    float32_parts = {"net": "the hypernetwork trains in float32 in prepare (as mixed-precision training keeps "
                            "float32 master weights) on float32 gradient factors (`capture_factors`); each "
                            "update it predicts is added to the edited weight in the weight's dtype"}

    def __init__(self, backbone, hparams=None, prepared=None):
        super().__init__(backbone, hparams, prepared)
        self.linears = edited_linears(backbone, self.hparams.n_layers, self.hparams.include_gate)
        self.net = self.build_network(backbone, self.linears, self.hparams)
        load_prepared(self.net, prepared, self.method, self.hparams, self.arch_fields, self.linears)
        self.net.eval().requires_grad_(False)
        self.net.to(backbone.device)
        self.lowest_edited_layer = min(lin.layer for lin in self.linears)
        self.snapshot = ParamSnapshot({lin.name: lin.module.weight for lin in self.linears})
        self.limits = drift_limits(self.hparams.drift_bound, self.linears)

    @classmethod
    def prepare_key(cls, hparams) -> tuple:
        return tuple(sorted((k, v) for k, v in dataclasses.asdict(hparams).items() if k not in cls.edit_fields))

    @staticmethod
    def build_network(backbone: Backbone, linears: list[EditedLinear], hparams) -> nn.Module:
        raise NotImplementedError

    def updates(self, case: EditCase, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        """The weight update (out, in) of every edited matrix for `case`."""
        raise NotImplementedError

    def edit(self, case: EditCase) -> None:
        batch = self.backbone.encode([edit_sample(case)])
        prefix = clean_prefix(self.backbone, batch, self.lowest_edited_layer)
        _, _, factors = capture_factors(self.backbone, prefix, batch, self.linears)
        with torch.no_grad():
            updates = self.updates(case, factors)
            for lin in self.linears:
                lin.module.weight.add_(updates[lin.name].to(lin.module.weight.dtype))
            if self.limits:
                bound_drift(self.linears, self.snapshot.saved, self.limits)

    def restore(self) -> None:
        self.snapshot.restore()
