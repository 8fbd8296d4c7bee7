"""FT: fine-tune the FFN of the last LM decoder layer on the edit input.

As in VLKEB's multimodal FT (AdamW, a few steps on the last layer's FFN). The edit input
is run through the frozen layers below once; each optimisation step then runs only the
edited layer and the head. Sequential edits keep fine-tuning the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unike.data import EditCase, edit_sample
from unike.editing import Editor, ParamSnapshot


@dataclass(frozen=True)
class FTHparams:
    steps: int = 15
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float = 0.0
    stop_when_correct: bool = False


class FineTune(Editor):
    Hparams = FTHparams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer = self.lowest_edited_layer = len(self.backbone.text) - 1  # scoring starts here
        self.params = self.backbone.text.ffn_parameters(self.layer)
        self.snapshot = ParamSnapshot(self.params)

    def _optimizer(self, params):
        h = self.hparams
        if h.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        if h.optimizer == "adam":
            return torch.optim.Adam(params, lr=h.lr, weight_decay=h.weight_decay)
        if h.optimizer == "sgd":
            return torch.optim.SGD(params, lr=h.lr, weight_decay=h.weight_decay)
        raise ValueError(f"FT: unknown optimizer {h.optimizer!r} (adamw, adam, sgd)")

    def edit(self, case: EditCase) -> None:
        backbone = self.backbone
        batch = backbone.encode([edit_sample(case)])
        prefix = backbone.prefix(batch, self.layer)
        target = batch.input_ids[:, 1:]
        mask = batch.answer_mask[:, 1:]
        params = list(self.params.values())
        opt = self._optimizer(params)
        for p in params:
            p.requires_grad_(True)
        try:
            for _ in range(self.hparams.steps):
                logits = backbone.logits_from(prefix)[:, :-1]
                if self.hparams.stop_when_correct and bool((logits.argmax(-1)[mask] == target[mask]).all()):
                    break
                loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def restore(self) -> None:
        self.snapshot.restore()
