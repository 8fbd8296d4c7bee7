"""Extra key-value neurons in a decoder layer's FFN, and their training losses.

Used by T-Patcher (a baseline) and by UniKE's intrinsic knowledge editing. A neuron set adds
`relu(x . k_i + b_i) * v_i` to the FFN output of its layer, where x is the FFN input (the
residual stream after the layer's FFN norm). The original weights are never touched:
neurons live in hooks, so removing them restores the model bit-exactly.

The extra neurons use ReLU on both architectures. For LLaMA this deviates from appending
rows to gate/up and columns to down: SiLU is not zero for negative inputs (silu(-3) =
-0.14), so T-Patcher's memory loss, which pushes pre-activations on unrelated inputs
below -3, would not silence a SwiGLU neuron; with ReLU it does, exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from unike.backbones import Backbone, Batch, Prefix


class KeyValueNeurons(nn.Module):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        n, d = keys.shape
        self.keys = nn.Parameter(keys.clone())
        self.bias = nn.Parameter(torch.zeros(n, dtype=keys.dtype, device=keys.device))
        self.values = nn.Parameter(torch.zeros(n, d, dtype=keys.dtype, device=keys.device) if values is None
                                   else values.clone())

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.keys.T + self.bias

    def value_vectors(self) -> torch.Tensor:
        """The vectors written into the residual stream; UniKE regulates them."""
        return self.values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x)) @ self.value_vectors()


def key_init(ffn_inputs: torch.Tensor) -> torch.Tensor:
    """T-Patcher's key initialisation: k = q / |q|^2, so the pre-activation on q is 1."""
    return ffn_inputs / ffn_inputs.pow(2).sum(-1, keepdim=True)


class FFNPatcher:
    """Attaches neuron sets to FFNs of a backbone through hooks; `clear` removes them all."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.neurons: dict[int, list[KeyValueNeurons]] = {}
        self._handles: list = []
        self._stash: dict[int, torch.Tensor] = {}

    def add(self, layer: int, neurons: KeyValueNeurons) -> None:
        if layer not in self.neurons:
            self.neurons[layer] = []
            first, last = self.backbone.text.ffn_io(layer)

            def stash(_module, args, layer=layer):
                self._stash[layer] = args[0]

            def add_patch(_module, _args, output, layer=layer):
                return self.patched(layer, self._stash.pop(layer), output)

            self._handles += [first.register_forward_pre_hook(stash), last.register_forward_hook(add_patch)]
        self.neurons[layer].append(neurons)

    def patched(self, layer: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The FFN output `output` of `layer` for the FFN input `x` with every neuron set of
        the layer added, in the order they were added."""
        return output + sum(n(x) for n in self.neurons[layer])

    def clear(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.neurons, self._stash = [], {}, {}

    def parameters(self) -> list[nn.Parameter]:
        return [p for ns in self.neurons.values() for n in ns for p in n.parameters()]


@torch.no_grad()
def ffn_inputs(backbone: Backbone, batch: Batch, layers: list[int], prefix: Prefix | None = None
               ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """FFN inputs (B, T, d) of the given layers for one batch, and the logits of the same
    pass (editors check on them whether the edit is already right); with `prefix` (of that
    batch, below every layer asked for), only the layers from the prefix up run."""
    captured = {}
    handles = []
    for layer in layers:
        module, _ = backbone.text.ffn_io(layer)
        handles.append(module.register_forward_pre_hook(
            lambda _m, args, layer=layer: captured.__setitem__(layer, args[0])))
    try:
        logits = backbone.logits(batch) if prefix is None else backbone.logits_from(prefix)
    finally:
        for h in handles:
            h.remove()
    b, t = batch.input_ids.shape
    return {layer: x.reshape(b, t, -1) for layer, x in captured.items()}, logits


def ffn_input_memory(backbone: Backbone, cases, layers: list[int], size: int, seed: int) -> dict[int, torch.Tensor]:
    """FFN inputs of every real token of every scored input of `cases`, per layer,
    subsampled to `size` rows: the memory T-Patcher's memory loss keeps neurons silent on."""
    from unike.data import case_samples

    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for case in cases:
        batch = backbone.encode(case_samples(case))
        real = batch.attention_mask.bool()
        inputs, _ = ffn_inputs(backbone, batch, layers)
        for layer, x in inputs.items():
            rows[layer].append(x[real])
    memory = {}
    for layer, parts in rows.items():
        m = torch.cat(parts)
        if m.shape[0] > size:
            keep = torch.randperm(m.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
            m = m[keep.sort().values]
        memory[layer] = m.contiguous()
    return memory


def own_activation(neurons: KeyValueNeurons, own_inputs: torch.Tensor, one_per_token: bool) -> torch.Tensor:
    """Each neuron's pre-activation on the edit: on its own token (T-Patcher: one neuron per
    wrong token, `own_inputs` row i belongs to neuron i), or its weakest over all the edit's
    tokens (a neuron set that serves the whole edit)."""
    s = neurons.pre_activation(own_inputs)  # (n_tokens, n_neurons)
    return s.diagonal() if one_per_token else s.min(0).values


def activation_loss(s_own: torch.Tensor) -> torch.Tensor:
    """T-Patcher's activation loss: fire on the edit (push its pre-activation up)."""
    return torch.exp(-s_own).mean()


def memory_columns(memory: torch.Tensor) -> torch.Tensor:
    """A memory of FFN inputs (M, d) as `memory_loss` reads it: (d, M), contiguous. A
    (neurons x d) @ (d x M) product and a top-k along the last dimension are about twice
    as fast on a CPU as the row layout's (M x d) @ (d x neurons) and top-k down columns."""
    return memory.T.contiguous()


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row of `x`, in no order. On a CPU,
    numpy's introselect finds them 4-5 times faster than `torch.topk` does for the memory
    loss's shape (10 rows of 5,000, k = 256: 75 against 330 us), which a training step of
    T-Patcher or UniKE pays once per edited layer."""
    k = min(k, x.shape[1])
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16
        return x.topk(k, dim=1, sorted=False).indices
    picked = np.argpartition(x.detach().numpy(), x.shape[1] - k, axis=1)[:, x.shape[1] - k:]
    return torch.from_numpy(np.ascontiguousarray(picked))


def memory_loss(neurons: KeyValueNeurons, s_own: torch.Tensor, memory: torch.Tensor, top_k: int = 1000,
                margin: float = 3.0) -> torch.Tensor:
    """T-Patcher's memory loss: on unrelated FFN inputs the neurons stay `margin` below
    their activation on the edit, and below -`margin` outright (top-k hardest inputs).
    `memory` holds the inputs as columns (`memory_columns`). The loss is a mean over the
    top-k, so their order does not matter."""
    if memory.numel() == 0:
        return s_own.new_zeros(())
    a_mem = torch.addmm(neurons.bias[:, None], neurons.keys, memory)  # (n_neurons, n_memory)
    top = a_mem.gather(1, top_k_indices(a_mem, top_k))
    return torch.exp(top - s_own[:, None] + margin).mean() + torch.exp(top + margin).mean()
