"""Latent in-context knowledge editing (UniKE §3.2, Eq. 2 and Eq. 7): feature shifting of
the self-attention output of each edited layer with retrieved knowledge states.

Per edited layer l and input row: the query is h_l (the residual stream entering l) at the
row's last prompt token, never an answer token. The top-K memory entries by cosine between
the query and their h_sem are retrieved; their h_pos pass through the layer's own attention
norm and K/V projections as if they were extra context tokens (they have no positions, so
rotary embeddings are left out on both sides); every position of the row attends to them
only, giving h_know; the attention output becomes (1 - a) * h_attn + a * h_know. `a` is the
inclusion weight of the knowledge: fixed, or adaptive (Eq. 7) = cos(EncSem(m), query)
clipped to [0, 1], where m is the attention-weighted mean of the retrieved h_pos seen from
the last prompt token. EncSem was trained to map h_pos next to its h_sem, so both sides of
that cosine live in the space the encoder was trained for.

The authors' public code applies its (disabled) external branch at the FFN input and uses
one tensor as both key and value; we follow the paper's description instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from unike.backbones import Backbone, Batch
from unike.method.knowledge import last_prompt_positions


def _attention_parts(backbone: Backbone, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    block = backbone.text.layers[layer]
    if backbone.text.kind == "opt":
        return block.self_attn, block.self_attn_layer_norm, block.self_attn.out_proj
    return block.self_attn, block.input_layernorm, block.self_attn.o_proj


class LatentIKE:
    def __init__(self, backbone: Backbone, memory_sem: dict[int, torch.Tensor], memory_pos: dict[int, torch.Tensor],
                 top_k: int, alpha: float | None, enc_sem: dict[int, nn.Module] | None = None):
        """alpha=None: adaptive (needs `enc_sem`)."""
        if alpha is None and enc_sem is None:
            raise ValueError("adaptive alpha needs the semantic encoders")
        self.backbone = backbone
        self.layers = sorted(memory_sem)
        self.base_sem, self.base_pos = memory_sem, memory_pos
        # Retrieval compares queries with unit h_sem: normalised when the memory changes,
        # not on every forward pass.
        self.base_unit = {l: F.normalize(m, dim=-1) for l, m in memory_sem.items()}
        self.memory_sem, self.memory_pos, self.unit_sem = dict(memory_sem), dict(memory_pos), dict(self.base_unit)
        self.top_k, self.alpha, self.enc_sem = top_k, alpha, enc_sem
        self.query_positions: torch.Tensor | None = None
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: query, retrieved indices
        self._kv: dict[int, tuple[torch.Tensor, ...]] = {}  # per layer: the last retrieval's indices, h_pos, K, V
        self._handles: list = []
        self.last_alpha: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ memory
    def add_entry(self, layer: int, h_sem: torch.Tensor, h_pos: torch.Tensor) -> None:
        self.memory_sem[layer] = torch.cat([self.memory_sem[layer], h_sem[None]])
        self.memory_pos[layer] = torch.cat([self.memory_pos[layer], h_pos[None]])
        self.unit_sem[layer] = F.normalize(self.memory_sem[layer], dim=-1)
        self._kv.pop(layer, None)

    def reset(self) -> None:
        self.memory_sem, self.memory_pos, self.unit_sem = dict(self.base_sem), dict(self.base_pos), dict(self.base_unit)
        self._kv = {}  # an index may name another edit's entry next time

    def retrieve(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """Indices (B, K) of the memory entries whose h_sem is closest (cosine) to each query."""
        sim = F.normalize(queries, dim=-1) @ self.unit_sem[layer].T
        return sim.topk(min(self.top_k, sim.shape[1]), dim=-1).indices

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        for layer in self.layers:
            attn, _, _ = _attention_parts(self.backbone, layer)
            self._handles.append(self.backbone.text.layers[layer].register_forward_pre_hook(
                lambda _m, args, kwargs, layer=layer: self._retrieve_hook(layer, args, kwargs), with_kwargs=True))
            self._handles.append(attn.register_forward_hook(
                lambda _m, args, kwargs, out, layer=layer: self._shift_hook(layer, args, kwargs, out), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_batch(self, batch: Batch) -> None:
        """Where each row's query token is: its last prompt token."""
        self.query_positions = last_prompt_positions(batch).to(self.backbone.device)

    def _knowledge_kv(self, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The retrieved h_pos (B, K, d) and their keys and values (B, H, K, dh) in the
        layer's attention. They depend only on which entries were retrieved (the attention's
        weights are frozen), and a training step of UniKE usually retrieves what the step
        before did: then the last ones are reused, bit for bit."""
        cached = self._kv.get(layer)
        if cached is not None and torch.equal(cached[0], indices):
            return cached[1:]
        attn, norm, _ = _attention_parts(self.backbone, layer)
        retrieved = self.memory_pos[layer][indices]
        b, n_k, _ = retrieved.shape
        kn = norm(retrieved)
        k = attn.k_proj(kn).view(b, n_k, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, K, dh)
        v = attn.v_proj(kn).view(b, n_k, -1, attn.head_dim).transpose(1, 2)
        self._kv[layer] = (indices, retrieved, k, v)
        return retrieved, k, v

    def _retrieve_hook(self, layer, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        rows = torch.arange(h.shape[0], device=h.device)
        query = h[rows, self.query_positions]
        self._state[layer] = (query, self.retrieve(layer, query))

    def _shift_hook(self, layer, args, kwargs, output):
        query, indices = self._state.pop(layer)
        attn, _, o_proj = _attention_parts(self.backbone, layer)
        x = args[0] if args else kwargs["hidden_states"]  # the normed input of self-attention
        b, t, _ = x.shape
        head_dim = attn.head_dim
        q = attn.q_proj(x).view(b, t, -1, head_dim).transpose(1, 2)  # (B, H, T, dh)
        retrieved, k, v = self._knowledge_kv(layer, indices)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped KV heads: each serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        weights = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)  # (B, H, T, K)
        h_know = o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1))
        if self.alpha is None:
            rows = torch.arange(b, device=x.device)
            seen = weights[rows, :, self.query_positions].mean(1)  # (B, K) from the last prompt token
            m = (seen.unsqueeze(-1) * retrieved).sum(1)
            a = F.cosine_similarity(self.enc_sem[layer](m), query, dim=-1).clamp(0, 1)[:, None, None]
        else:
            a = torch.full((b, 1, 1), self.alpha, dtype=x.dtype, device=x.device)
        self.last_alpha[layer] = a.detach().flatten()
        h_attn = output[0] if isinstance(output, tuple) else output
        shifted = (1 - a) * h_attn + a * h_know
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted
