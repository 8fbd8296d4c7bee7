"""T-Patcher (Huang et al. 2023): extra FFN neurons in the last layer, trained per edit.

As the authors' code runs it: one neuron per wrongly predicted answer token (at most
`max_neurons`); only mistakes are edited; key k = q / |q|^2 (q = the FFN input at the
position that predicts the wrong token), bias 0, so the neuron starts with pre-activation 1
there. Each value is v_raw * a, a learned per element and starting at `value_scale` (the
authors' `amplify_v`, a = 10): under Adam the values move ten times as far per step as the
keys; without it no edit of the tiny world came right within 300 steps, the memory loss
pulling each key below its own input first. Loss = label-smoothed NLL of the edit +
activation loss (fire on your own token) + memory loss (stay silent on a memory of FFN
inputs cached from the train split; each edit's own inputs join the memory, so later
patches do not fire on earlier edits). Adam
with weight decay; training stops once the edit is right. Patches accumulate over
sequential edits; restore removes them all.

Where it departs from the authors' code: v_raw starts at zero (they draw it from N(0, 1));
the memory loss takes each neuron's top-k memory rows (theirs takes the top-k over all the
neurons' rows together); gradients are not clipped (theirs at norm 5).

`prepare` caches the memory: the patched layer's FFN inputs of every token of every
scored input of the train split (subsampled to `memory_size`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from unike.data import EditCase, edit_sample
from unike.editing import Editor
from unike.neurons import (FFNPatcher, KeyValueNeurons, activation_loss, ffn_input_memory, ffn_inputs, key_init,
                           memory_columns, memory_loss, own_activation)


@dataclass(frozen=True)
class TPatcherHparams:
    layer: int = -1  # patched LM layer; negative counts from the top
    max_neurons: int = 5
    lr: float = 1e-2
    weight_decay: float = 0.01
    max_steps: int = 1000  # the authors allow up to 2000; training stops once the edit is right
    label_smoothing: float = 0.1
    activation_weight: float = 1.0
    memory_weight: float = 5.0
    memory_top_k: int = 1000
    memory_size: int = 40000
    value_scale: float = 10.0  # the authors' amplify_con: values are v_raw * a, a starting here


class AmplifiedNeurons(KeyValueNeurons):
    """T-Patcher's neurons as the authors' code builds them: value = v_raw * a elementwise,
    both learned, a starting at `scale`. v_raw starts at zero (the authors draw it from
    N(0, 1), which writes a random vector of norm about 10 sqrt(d) at the edit token before
    the first step; at zero the patch starts silent and only the NLL shapes it)."""

    def __init__(self, keys: torch.Tensor, scale: float):
        super().__init__(keys)
        self.amplifier = nn.Parameter(torch.full_like(self.values, scale))

    def value_vectors(self) -> torch.Tensor:
        return self.values * self.amplifier


def _layer(backbone, hparams) -> int:
    return hparams.layer % len(backbone.text)


class TPatcher(Editor):
    needs_training = True
    Hparams = TPatcherHparams

    @classmethod
    def prepare(cls, backbone, hparams, train_cases, out_dir, seed):
        layer = _layer(backbone, hparams)
        memory = ffn_input_memory(backbone, train_cases, [layer], hparams.memory_size, seed)[layer]
        save_file({"memory": memory}, str(out_dir / "memory.safetensors"))
        return {"layer": layer, "memory_tokens": memory.shape[0]}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer = self.lowest_edited_layer = _layer(self.backbone, self.hparams)  # scoring starts here
        memory = load_file(str(self.prepared / "memory.safetensors"))["memory"].to(self.backbone.device)
        self.base_memory = memory_columns(memory)  # (d, M)
        self.memory = self.base_memory
        self.patcher = FFNPatcher(self.backbone)

    def edit(self, case: EditCase) -> None:
        h, backbone = self.hparams, self.backbone
        batch = backbone.encode([edit_sample(case)])
        prefix = backbone.prefix(batch, self.layer)
        target, mask = batch.input_ids[0, 1:], batch.answer_mask[0, 1:]
        # One pass from the prefix: the patched layer's FFN inputs and the tokens the model gets wrong.
        inputs, logits = ffn_inputs(backbone, batch, [self.layer], prefix)
        edit_inputs = inputs[self.layer][0]
        wrong = mask & (logits[0, :-1].argmax(-1) != target)
        positions = wrong.nonzero().flatten()[: h.max_neurons]
        if len(positions):  # only mistakes are edited
            own = edit_inputs[positions]
            neurons = AmplifiedNeurons(key_init(own), h.value_scale)
            self.patcher.add(self.layer, neurons)
            opt = torch.optim.Adam(neurons.parameters(), lr=h.lr, weight_decay=h.weight_decay)
            for _ in range(h.max_steps):
                logits = backbone.logits_from(prefix)[0, :-1]
                if bool((logits.argmax(-1)[mask] == target[mask]).all()):
                    break
                s_own = own_activation(neurons, own, one_per_token=True)
                loss = (torch.nn.functional.cross_entropy(logits[mask], target[mask], label_smoothing=h.label_smoothing)
                        + h.activation_weight * activation_loss(s_own)
                        + h.memory_weight * memory_loss(neurons, s_own, self.memory, h.memory_top_k))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for p in neurons.parameters():
                p.requires_grad_(False)
        # Later patches must stay silent on this edit's inputs too.
        self.memory = torch.cat([self.memory, edit_inputs[batch.attention_mask[0].bool()].T], dim=1)

    def restore(self) -> None:
        self.patcher.clear()
        self.memory = self.base_memory
