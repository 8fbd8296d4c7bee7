"""Per-case editing metrics (teacher-forced, no generation), paper Appendix B.

Rel / T-Gen / M-Gen: token accuracy of the argmax over the answer tokens (plus exact
match: every answer token right). T-Loc / M-Loc: fraction of answer positions whose
post-edit argmax equals the pre-edit argmax. Only answer positions count: scoring prompt
or image-query positions as well inflates locality (a later EasyEdit change we do not
follow).
"""

from __future__ import annotations

import torch

# Versions the per-edit rows (definition and columns); it enters every cell's settings hash,
# so rows of an older version are re-run and refused by aggregate. /2: rows carry fact_id.
METRIC_VERSION = "tf-answer-tokens/2"
ACCURACY_ROWS = ("rel", "t_gen", "m_gen")
LOCALITY_ROWS = ("t_loc", "m_loc")


def token_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    if target.numel() == 0:
        raise ValueError("no answer tokens to score")
    return float((pred == target).float().mean())


def exact_match(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(bool((pred == target).all()))


def agreement(pred: torch.Tensor, pre_edit_pred: torch.Tensor) -> float:
    if pred.shape != pre_edit_pred.shape:
        raise ValueError(f"locality input changed length: {tuple(pred.shape)} vs pre-edit {tuple(pre_edit_pred.shape)}")
    return token_accuracy(pred, pre_edit_pred)


def score_case(preds: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
               pre_edit: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scores of one case from the answer-position predictions of its five rows."""
    scores = {}
    for row in ACCURACY_ROWS:
        scores[row] = token_accuracy(preds[row], targets[row])
        scores[f"{row}_em"] = exact_match(preds[row], targets[row])
    for row in LOCALITY_ROWS:
        scores[row] = agreement(preds[row], pre_edit[row])
    return scores
