"""The UniKE editor: intrinsic key-value neurons (assimilation) and latent in-context
knowledge (accommodation) in the same edited layers, collaborating through the
truthfulness direction zeta (Eq. 6) and the adaptive inclusion weight alpha (Eq. 7).

Per edit:
1. Latent IKE: the edit's own (h_sem, h_pos) pair joins the knowledge memory of every
   edited layer (sequential edits accumulate); retrieval and feature shifting run on every
   forward pass (unike.method.latent_ike).
2. Intrinsic editing: `n_neurons` key-value neurons per edited layer (unike.neurons), keys
   initialised on the FFN inputs of the answer-predicting positions, trained on the edit's
   NLL with T-Patcher's activation and memory losses while the latent knowledge is in
   place; their values are v + beta * W_zeta zeta_l with W_zeta learnable (a fresh one per
   edit, as in the authors' code). Neurons accumulate over sequential edits.

Variants (Table 4, Figure 4) are hyperparameters: `intrinsic`, `external` ("latent",
"ike" or "none"), `alpha` (None = adaptive, or fixed), `zeta` ("truthfulness", "semantic",
"random", "none"), `top_k` (latent knowledge states), `ike_k` (text demonstrations).

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

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from unike.data import EditCase, edit_sample
from unike.editing import Editor
from unike.incontext import BUNDLED, Demonstrations, build_bank
from unike.method.encoders import load_layer_encoders
from unike.method.knowledge import last_prompt_positions, last_token_positions, residual_streams
from unike.method.latent_ike import LatentIKE
from unike.neurons import (FFNPatcher, KeyValueNeurons, activation_loss, ffn_input_memory, ffn_inputs, key_init,
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


class RegulatedNeurons(KeyValueNeurons):
    """Eq. 6: values v + beta * W_zeta zeta."""

    def __init__(self, keys: torch.Tensor, zeta: torch.Tensor | None, beta: float):
        super().__init__(keys)
        self.beta = beta
        self.register_buffer("zeta", zeta)
        self.w_zeta = None if zeta is None else nn.Linear(zeta.shape[0], keys.shape[1], bias=False)
        if self.w_zeta is not None:
            nn.init.normal_(self.w_zeta.weight, std=zeta.shape[0] ** -0.5)

    def value_vectors(self) -> torch.Tensor:
        if self.w_zeta is None:
            return self.values
        return self.values + self.beta * self.w_zeta(self.zeta)


class UniKE(Editor):
    needs_training = True  # prepare: the FFN-input memory of the train split (memory loss); IKE's bank
    needs_knowledge = True  # triplet hidden states and encoders of the backbone
    Hparams = UniKEHparams

    @classmethod
    def supports_sequential(cls, hparams) -> bool:
        return hparams.external != "ike"  # IKE's prompt holds one edit (the paper has no sequential IKE)

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
        summary = {"memory_tokens": {l: int(m.shape[0]) for l, m in memory.items()}}
        if hparams.external == "ike":
            summary["demo_bank"] = build_bank(train_cases, out_dir, hparams.ike_embedder, backbone.device)
        return summary

    def __init__(self, backbone, hparams=None, prepared=None, knowledge=None):
        super().__init__(backbone, hparams, prepared, knowledge)
        h = self.hparams
        if h.external not in ("latent", "ike", "none") or h.zeta not in ("truthfulness", "semantic", "random", "none"):
            raise ValueError(f"UniKE: unknown variant external={h.external!r} zeta={h.zeta!r}")
        if h.alpha is not None and h.external != "latent":
            raise ValueError(f"UniKE: alpha weighs latent knowledge; external={h.external!r} has none")
        device = backbone.device
        self.layers = _edited_layers(knowledge)
        states = {k: v.to(device) for k, v in load_file(str(knowledge / "hidden_states.safetensors")).items()}
        encoders = load_file(str(knowledge / "encoders.safetensors"))
        self.enc_sem = {l: load_layer_encoders(knowledge, l).sem.to(device) for l in self.layers}
        self.zeta = {l: self._zeta(l, encoders, states) for l in self.layers}
        memory = load_file(str(prepared / "ffn_memory.safetensors"))
        self.ffn_memory = {l: memory[str(l)].to(device) for l in self.layers}
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

    def _zeta(self, layer, encoders, states) -> torch.Tensor | None:
        kind = self.hparams.zeta
        if kind == "none":
            return None
        truth = encoders[f"{layer}.zeta"].to(self.backbone.device)
        if kind == "truthfulness":
            return truth
        if kind == "random":  # same size and norm as the real zeta, no direction
            g = torch.Generator().manual_seed(layer)
            r = torch.randn(truth.shape, generator=g).to(truth)
            return r * truth.norm() / r.norm()
        with torch.no_grad():  # semantic: the same difference of means, in the semantic space
            enc = self.enc_sem[layer]
            return enc(states[f"pos.{layer}"]).mean(0) - enc(states[f"neg.{layer}"]).mean(0)

    # ------------------------------------------------------------------ editing
    def _forward(self, batch):
        if self.latent is not None:
            self.latent.set_batch(batch)
        return self.backbone.logits(batch)

    def edit(self, case: EditCase) -> None:
        h, backbone = self.hparams, self.backbone
        if self.demonstrations is not None:
            self.demonstrations.edit(case)
        batch = backbone.encode([edit_sample(case)])  # bare: IKE's demonstrations apply at inference
        if self.latent is not None:
            self.latent.detach()  # the edit's own knowledge pair, as the model itself encodes it
            streams = residual_streams(backbone, batch, self.layers)
            sem_at, last_at = int(last_prompt_positions(batch)[0]), int(last_token_positions(batch)[0])
            for l in self.layers:
                self.latent.add_entry(l, streams[l][0, sem_at], streams[l][0, last_at])
            self.latent.attach()
        target, mask = batch.input_ids[0, 1:], batch.answer_mask[0, 1:]
        if self.latent is not None:
            self.latent.set_batch(batch)
        edit_inputs = ffn_inputs(backbone, batch, self.layers)
        if h.intrinsic:
            positions = mask.nonzero().flatten()  # the positions that predict answer tokens
            picks = positions[torch.arange(h.n_neurons) % len(positions)]
            sets = {}
            for l in self.layers:
                sets[l] = RegulatedNeurons(key_init(edit_inputs[l][0, picks]), self.zeta[l], h.beta)
                self.patcher.add(l, sets[l])
            params = [p for n in sets.values() for p in n.parameters()]
            opt = torch.optim.Adam(params, lr=h.lr)
            for _ in range(h.max_steps):
                logits = self._forward(batch)[0, :-1]
                if bool((logits.argmax(-1)[mask] == target[mask]).all()):
                    break
                loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
                for l, n in sets.items():
                    s_own = own_activation(n, edit_inputs[l][0, positions], one_per_token=False)
                    loss = loss + h.activation_weight * activation_loss(s_own) / len(sets)
                    loss = loss + h.memory_weight * memory_loss(n, s_own, self.ffn_memory[l], h.memory_top_k) / len(sets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for p in params:
                p.requires_grad_(False)
        real = batch.attention_mask[0].bool()
        for l in self.layers:  # later neurons must stay silent on this edit's inputs too
            self.ffn_memory[l] = torch.cat([self.ffn_memory[l], edit_inputs[l][0][real]])

    @torch.no_grad()
    def predict(self, samples):
        from unike.backbones import answer_predictions

        if self.demonstrations is not None and self.demonstrations.case is not None:
            batch = self.demonstrations.encode(samples)
        else:
            batch = self.backbone.encode(samples)
        return answer_predictions(self._forward(batch), batch), batch.answer_targets()

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
