"""The UniKE editor: intrinsic key-value neurons (assimilation) and latent in-context
knowledge (accommodation) in the same edited layers, collaborating through the
truthfulness direction zeta (Eq. 6) and the adaptive inclusion weight alpha (Eq. 7).

Prepared once per backbone and task (`prepare`): the FFN-input memory of the memory loss,
and per edited layer zeta' = W_zeta zeta for each zeta variant, W_zeta learned once as the
linear decoder from the encoder's space back to the hidden states (`regulation_directions`).

Per edit:
1. Latent IKE: the edit's own (h_sem, h_pos) pair joins the knowledge memory of every
   edited layer (sequential edits accumulate); retrieval and feature shifting run on every
   forward pass (unike.method.latent_ike).
2. Intrinsic editing, only if the edit is still wrong with the latent knowledge in place:
   `n_neurons` key-value neurons per edited layer (unike.neurons), keys initialised on the
   FFN inputs of the answer-predicting positions and spread apart (`distinct_keys`), trained
   on the edit's NLL with T-Patcher's activation and memory losses while the latent
   knowledge is in place; their values are v + beta * zeta' with zeta' fixed. Neurons
   accumulate over sequential edits. The layers below the first edited one are run once
   per edit (`Backbone.prefix`); each training step runs only the edited layers and the
   head, and of the first edited layer only its neurons (the rest of it reads nothing a
   step changes).

Variants (Table 4, Figure 4) are hyperparameters: `intrinsic`, `external` ("latent",
"ike" or "none"), `alpha` (None = adaptive, or fixed), `zeta` ("truthfulness", "semantic",
"random", "none"), `top_k` (latent knowledge states), `ike_k` (text demonstrations).
docs/unike.md, "Variants", defines each Table 4 row by them.

`external: ike` is Table 4's Intrin+IKE: the neurons combined with vanilla IKE
(unike.incontext), no latent knowledge. The edit retrieves `ike_k` demonstrations for the
edit input and `predict` puts them before every scored input exactly as the IKE baseline
does; the neurons are trained on the bare edit input, as they are in every other variant:
"simply combined" (paper §4.5) reads as the two editors applied side by side, IKE's prompt
being an inference-time addition: the neurons are trained as they would be without IKE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from unike.data import EditCase, edit_sample
from unike.editing import Editor
from unike.incontext import BUNDLED, DEMONSTRATIONS_FLOAT32, Demonstrations, build_bank
from unike.method.encoders import load_layer_encoders
from unike.method.knowledge import last_prompt_positions, last_token_positions, residual_streams
from unike.method.latent_ike import LatentIKE
from unike.neurons import (FFNPatcher, KeyValueNeurons, activation_loss, ffn_input_memory, ffn_inputs, memory_columns,
                           memory_loss, own_activation)


@dataclass(frozen=True)
class UniKEHparams:
    intrinsic: bool = True
    external: str = "latent"  # latent | ike | none
    alpha: float | None = None  # None: adaptive (Eq. 7); external latent only
    zeta: str = "truthfulness"  # truthfulness | semantic | random | none
    top_k: int = 40  # latent knowledge states retrieved (Figure 4a: 8..40)
    # external ike: the IKE baseline's k, embedder and context limit (baselines/ike.py)
    ike_k: int = 32
    ike_embedder: str = BUNDLED
    ike_context_limit: int = 0
    n_neurons: int = 10
    key_spread: float = 1.0  # neuron keys on one query start at cosine 1 / (1 + key_spread^2): distinct_keys
    beta: float = 0.1
    lr: float = 1e-2
    max_steps: int = 100
    activation_weight: float = 1.0
    memory_weight: float = 5.0
    memory_top_k: int = 1000
    memory_size: int = 20000


def _edited_layers(knowledge) -> list[int]:
    """The layers the knowledge pipeline extracted states for (config knowledge.edited_layers)."""
    with safe_open(str(knowledge / "hidden_states.safetensors"), "pt") as f:
        return json.loads(f.metadata()["layers"])


ZETA_KINDS = ("truthfulness", "semantic", "random")  # and "none": no regulation


def fit_decoder(codes: torch.Tensor, states: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """The linear map (d, c) from encodings back to the hidden states they encode: ridge
    least squares on centred data in float64 (ridge relative to the mean code variance),
    and the share of the states' variance it explains."""
    x = codes.double() - codes.double().mean(0)
    y = states.double() - states.double().mean(0)
    gram = x.T @ x
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram, x.T @ y).T
    explained = 1 - float((y - x @ w.T).pow(2).sum() / y.pow(2).sum())
    return w.float(), explained


@torch.no_grad()
def regulation_directions(knowledge, layers: list[int]) -> tuple[dict[str, torch.Tensor], dict]:
    """Eq. 6's zeta' = W_zeta zeta per edited layer, for every zeta variant ("{kind}.{layer}").

    W_zeta maps zeta "from the truthfulness space back to the representation space": it is
    learned once, as the linear decoder of the truthfulness encoder on the triplet states
    (EncTru(h) -> h, h the positive and negative states), and frozen while editing. A map
    drawn or trained per edit would make W_zeta zeta a vector whose direction does not
    depend on zeta's (drawn: a random vector; trained toward an editing goal: any zeta maps
    to the same optimum), and Figure 4c would compare nothing. A decoder fitted to undo the
    encoder is independent of zeta, so zeta's direction decides zeta'.

    - truthfulness: zeta = mean EncTru(h_pos) - mean EncTru(h_neg) (the knowledge step's),
      through the truthfulness decoder;
    - random: a random direction of zeta's norm, through the same decoder;
    - semantic: the same construction in the semantic space (mean EncSem(h_pos) - mean
      EncSem(h_neg), through the decoder of EncSem).
    The report: per layer, the variance each decoder explains, and each zeta' 's norm and
    cosine with mean h_pos - mean h_neg (the truthful direction in the hidden space)."""
    states = load_file(str(knowledge / "hidden_states.safetensors"))
    stored_zeta = load_file(str(knowledge / "encoders.safetensors"))
    directions, report = {}, {}
    for l in layers:
        enc = load_layer_encoders(knowledge, l)
        pos, neg = states[f"pos.{l}"].float(), states[f"neg.{l}"].float()
        h = torch.cat([pos, neg])
        tru, sem = enc.tru(h), enc.sem(h)
        w_tru, explained_tru = fit_decoder(tru, h)
        w_sem, explained_sem = fit_decoder(sem, h)
        zeta = stored_zeta[f"{l}.zeta"].float()
        n = len(pos)
        g = torch.Generator().manual_seed(l)
        r = torch.randn(zeta.shape, generator=g)
        zetas = {"truthfulness": w_tru @ zeta, "random": w_tru @ (r * zeta.norm() / r.norm()),
                 "semantic": w_sem @ (sem[:n].mean(0) - sem[n:].mean(0))}
        truthful = pos.mean(0) - neg.mean(0)
        directions.update({f"{kind}.{l}": z.contiguous() for kind, z in zetas.items()})
        report[str(l)] = {"explained_variance": {"truthfulness": explained_tru, "semantic": explained_sem},
                          **{kind: {"norm": float(z.norm()), "cos_pos_minus_neg": float(
                              F.cosine_similarity(z, truthful, dim=0))} for kind, z in zetas.items()}}
    return directions, report


def distinct_keys(queries: torch.Tensor, spread: float) -> torch.Tensor:
    """Keys of neurons initialised on the FFN inputs `queries` (n, d), several of them the
    same input when the answer has fewer tokens than there are neurons (one answer token:
    all of them). T-Patcher's k = q / |q|^2 plus spread / |q| times a unit vector
    orthogonal to q, a fixed (seeded) one per neuron: each key still has pre-activation
    exactly 1 on its own input, and keys on one input start at cosine about
    1 / (1 + spread^2). Identical neurons would get identical gradients and stay identical:
    n of them would be one neuron with an n-times step."""
    q = queries.double()
    u = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q_hat = q / q.norm(dim=-1, keepdim=True)
    u = u - (u * q_hat).sum(-1, keepdim=True) * q_hat
    u = u / u.norm(dim=-1, keepdim=True)
    keys = (q + spread * q.norm(dim=-1, keepdim=True) * u) / q.pow(2).sum(-1, keepdim=True)
    return keys.to(queries.dtype)


class RegulatedNeurons(KeyValueNeurons):
    """Eq. 6: values v + beta * zeta', zeta' fixed (`regulation` = beta * zeta', or None)."""

    def __init__(self, keys: torch.Tensor, regulation: torch.Tensor | None):
        super().__init__(keys)
        self.register_buffer("regulation", regulation)

    def value_vectors(self) -> torch.Tensor:
        return self.values if self.regulation is None else self.values + self.regulation


class UniKE(Editor):
    needs_training = True  # prepare: the FFN-input memory of the train split (memory loss); IKE's bank
    needs_knowledge = True  # triplet hidden states and encoders of the backbone
    Hparams = UniKEHparams
    float32_parts = {"demonstrations": DEMONSTRATIONS_FLOAT32}  # external: ike

    @classmethod
    def supports_sequential(cls, hparams) -> bool:
        return hparams.external != "ike"  # IKE's prompt holds one edit (the paper has no sequential IKE)

    @classmethod
    def unread_hparams(cls, hparams) -> frozenset[str]:
        # What `edit` and `predict` skip with these values: a variant without neurons reads
        # none of the intrinsic knobs (beta only through zeta'), latent knowledge's only with
        # `external: latent`, IKE's only with `external: ike`. `memory_size` stays: it
        # decides the prepared folder (`prepare_key`) every variant loads.
        unread = set()
        if not hparams.intrinsic:
            unread |= {"n_neurons", "key_spread", "beta", "zeta", "lr", "max_steps", "activation_weight",
                       "memory_weight", "memory_top_k"}
        elif hparams.zeta == "none":
            unread.add("beta")
        if hparams.external != "latent":
            unread |= {"top_k", "alpha"}
        if hparams.external != "ike":
            unread |= {"ike_k", "ike_embedder", "ike_context_limit"}
        return frozenset(unread)

    @classmethod
    def local_paths(cls, hparams) -> dict[str, Path]:
        used = hparams.external == "ike" and hparams.ike_embedder != BUNDLED
        return {"ike_embedder": Path(hparams.ike_embedder)} if used else {}

    @classmethod
    def prepare_key(cls, hparams) -> tuple:
        # The FFN memory's size, and whether (with which embedder) IKE's bank is built:
        # every other variant shares the folder; Intrin+IKE never shares one without a bank.
        return hparams.memory_size, hparams.ike_embedder if hparams.external == "ike" else None

    @classmethod
    def prepare(cls, backbone, hparams, train_cases, out_dir, seed, knowledge):
        layers = _edited_layers(knowledge)
        memory = ffn_input_memory(backbone, train_cases, layers, hparams.memory_size, seed)
        save_file({str(l): m for l, m in memory.items()}, str(out_dir / "ffn_memory.safetensors"))
        directions, zeta_report = regulation_directions(knowledge, layers)
        save_file(directions, str(out_dir / "zeta.safetensors"))
        summary = {"memory_tokens": {l: int(m.shape[0]) for l, m in memory.items()}, "zeta": zeta_report}
        if hparams.external == "ike":
            summary["demo_bank"] = build_bank(train_cases, out_dir, hparams.ike_embedder, backbone.device)
        return summary

    def __init__(self, backbone, hparams=None, prepared=None, knowledge=None):
        super().__init__(backbone, hparams, prepared, knowledge)
        h = self.hparams
        if h.external not in ("latent", "ike", "none") or h.zeta not in (*ZETA_KINDS, "none"):
            raise ValueError(f"UniKE: unknown variant external={h.external!r} zeta={h.zeta!r}")
        if h.alpha is not None and h.external != "latent":
            raise ValueError(f"UniKE: alpha weighs latent knowledge; external={h.external!r} has none")
        device = backbone.device
        self.layers = _edited_layers(knowledge)
        # The knowledge folder is float32 (the encoders train on it); retrieval, feature
        # shifting and the adaptive alpha run inside the backbone's forward, in its dtype.
        dtype = backbone.dtype
        states = {k: v.to(device, dtype) for k, v in load_file(str(knowledge / "hidden_states.safetensors")).items()}
        self.enc_sem = {l: load_layer_encoders(knowledge, l).sem.to(device, dtype) for l in self.layers}
        zeta = load_file(str(prepared / "zeta.safetensors"))
        self.regulation = {l: None if h.zeta == "none" else (h.beta * zeta[f"{h.zeta}.{l}"]).to(device, backbone.dtype)
                           for l in self.layers}  # beta * zeta', the same for every edit
        memory = load_file(str(prepared / "ffn_memory.safetensors"))
        self.ffn_memory = {l: memory_columns(memory[str(l)].to(device)) for l in self.layers}  # (d, M)
        self.base_ffn_memory = dict(self.ffn_memory)
        self.patcher = FFNPatcher(backbone)
        self.latent = None
        if h.external == "latent":
            self.latent = LatentIKE(backbone, {l: states[f"sem.{l}"] for l in self.layers},
                                    {l: states[f"pos.{l}"] for l in self.layers}, h.top_k, h.alpha, self.enc_sem)
            self.latent.attach()
        self.demonstrations = None
        if h.external == "ike":
            self.demonstrations = Demonstrations(backbone, prepared, h.ike_k, h.ike_embedder, h.ike_context_limit,
                                                 "UniKE")
        else:  # nothing of UniKE acts below its first edited layer, and the input is the sample's own
            self.lowest_edited_layer = self.layers[0]

    # ------------------------------------------------------------------ editing
    def _forward(self, batch, stream=None):
        if self.latent is not None:
            self.latent.set_batch(batch)
        return self.backbone.logits(batch, stream)

    def edit(self, case: EditCase) -> None:
        h, backbone = self.hparams, self.backbone
        if self.demonstrations is not None:
            self.demonstrations.edit(case)
        if self.latent is None and not h.intrinsic:
            return
        batch = backbone.encode([edit_sample(case)])  # bare: IKE's demonstrations apply at inference
        if self.latent is not None:
            self.latent.detach()  # the edit's own knowledge pair, as the model itself encodes it
        # Nothing of UniKE acts below the first edited layer: those layers run once per edit,
        # and every pass of the edit (knowledge pair, FFN inputs, training steps) starts here.
        prefix = backbone.prefix(batch, self.layers[0])
        if self.latent is not None:
            streams = residual_streams(backbone, batch, self.layers, prefix)
            sem_at, last_at = int(last_prompt_positions(batch)[0]), int(last_token_positions(batch)[0])
            for l in self.layers:
                self.latent.add_entry(l, streams[l][0, sem_at], streams[l][0, last_at])
            self.latent.attach()
            self.latent.set_batch(batch)
        if not h.intrinsic:
            return
        target, mask = batch.input_ids[0, 1:], batch.answer_mask[0, 1:]
        # One pass with the latent knowledge in place: the edit's FFN inputs, and whether it
        # is already right. It also keeps what the training steps never change in the first
        # edited layer: its attention output (with the latent shift) and its FFN's own
        # output, both computed from the prefix alone; a step adds the neurons to that FFN
        # output and runs the layers above (`Backbone.logits_above`), bit for bit what the
        # whole layer would give.
        first = self.layers[0]
        fixed = {}
        _, ffn_out = backbone.text.ffn_io(first)
        handles = [
            backbone.text.ffn_residual_module(first).register_forward_pre_hook(
                lambda _m, args: fixed.__setitem__("residual", args[0])),
            ffn_out.register_forward_hook(lambda _m, _args, out: fixed.__setitem__("ffn_out", out), prepend=True)]
        try:
            edit_inputs, logits = ffn_inputs(backbone, batch, self.layers, prefix)
        finally:
            for handle in handles:
                handle.remove()
        # The first layer's FFN input as its FFN saw it (OPT's FFN runs on rows x tokens flattened).
        first_ffn_in = edit_inputs[first].reshape(*fixed["ffn_out"].shape[:-1], -1)
        layer_shape = (*batch.input_ids.shape, fixed["residual"].shape[-1])
        if not bool((logits[0, :-1].argmax(-1)[mask] == target[mask]).all()):
            # The neurons learn what the latent knowledge does not supply; none if it does.
            positions = mask.nonzero().flatten()  # the positions that predict answer tokens
            picks = positions[torch.arange(h.n_neurons) % len(positions)]
            own_inputs = {l: edit_inputs[l][0, positions] for l in self.layers}
            sets = {}
            for l in self.layers:
                sets[l] = RegulatedNeurons(distinct_keys(edit_inputs[l][0, picks], h.key_spread), self.regulation[l])
                self.patcher.add(l, sets[l])
            params = [p for n in sets.values() for p in n.parameters()]
            opt = torch.optim.Adam(params, lr=h.lr, foreach=True)  # one kernel per op for all neurons: 0.3 ms a step
            for step in range(h.max_steps):
                first_output = backbone.text.finish_layer(
                    first, fixed["residual"], self.patcher.patched(first, first_ffn_in, fixed["ffn_out"]),
                    layer_shape)
                logits = backbone.logits_above(prefix, first_output)[0, :-1]  # the edited layers above and the head
                # At least one step: the initial neurons (beta * zeta' in their values) may
                # happen to right the edit, and must not stay untrained by the memory loss.
                if step and bool((logits.argmax(-1)[mask] == target[mask]).all()):
                    break
                loss = F.cross_entropy(logits[mask], target[mask])
                for l, n in sets.items():
                    s_own = own_activation(n, own_inputs[l], one_per_token=False)
                    loss = loss + h.activation_weight * activation_loss(s_own) / len(sets)
                    loss = loss + h.memory_weight * memory_loss(n, s_own, self.ffn_memory[l], h.memory_top_k) / len(sets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for p in params:
                p.requires_grad_(False)
        real = batch.attention_mask[0].bool()
        for l in self.layers:  # later neurons must stay silent on this edit's inputs too
            self.ffn_memory[l] = torch.cat([self.ffn_memory[l], edit_inputs[l][0][real].T], dim=1)

    @torch.no_grad()
    def predict(self, samples, stream=None):
        from unike.backbones import answer_predictions

        if self.demonstrations is not None and self.demonstrations.case is not None:
            batch = self.demonstrations.encode(samples)
        else:
            batch = self.backbone.encode(samples)
        return answer_predictions(self._forward(batch, stream), batch), batch.answer_targets()

    def restore(self) -> None:
        self.patcher.clear()
        self.ffn_memory = dict(self.base_ffn_memory)
        if self.latent is not None:
            self.latent.reset()
        if self.demonstrations is not None:
            self.demonstrations.clear()

    def close(self) -> None:
        if self.latent is not None:
            self.latent.detach()
