"""UniKE's in-context knowledge: hallucination triplets and their hidden states (paper §3.3,
Appendix C).

A triplet is (image, prompt, a_pos, a_neg): a question the backbone answers wrongly, its
truthful answer a_pos and the backbone's own greedy answer a_neg. Triplets come from the
train split (disjoint from the eval split): every edit input the backbone gets wrong.

Hidden states, per edited layer l (h_l = the residual stream entering decoder layer l):
h_sem = h_l at the last prompt token (what a query looks like before any answer);
h_pos / h_neg = h_l at the last token of prompt + a_pos / a_neg.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unike.backbones import Backbone, Batch, Prefix
from unike.data import edit_sample, EditCase, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Triplet:
    image: str | None
    prompt: str
    a_pos: str
    a_neg: str


def collect_triplets(backbone: Backbone, cases: list[EditCase], limit: int, max_new_tokens: int = 10,
                     progress_every: int = 200) -> list[Triplet]:
    """The backbone's own mistakes on the edit inputs of `cases`, at most `limit`."""
    triplets = []
    for i, case in enumerate(cases):
        sample = edit_sample(case)
        (answer,) = backbone.greedy([sample], max_new_tokens)
        if answer and answer != case.alt:
            triplets.append(Triplet(str(sample.image) if sample.image else None, sample.prompt, case.alt, answer))
            if len(triplets) >= limit:
                break
        if (i + 1) % progress_every == 0:
            log.info("triplets: %d mistakes in %d inputs", len(triplets), i + 1)
    return triplets


def save_triplets(path: Path, triplets: list[Triplet]) -> None:
    path.write_text(json.dumps([asdict(t) for t in triplets], indent=1) + "\n")


def load_triplets(path: Path) -> list[Triplet]:
    return [Triplet(**t) for t in json.loads(Path(path).read_text(encoding="utf-8"))]


def triplet_groups(triplets: list[Triplet]) -> torch.Tensor:
    """Group id per triplet: the same prompt and answers (on other images) share one."""
    ids: dict[tuple[str, str, str], int] = {}
    return torch.tensor([ids.setdefault((t.prompt, t.a_pos, t.a_neg), len(ids)) for t in triplets])


@torch.no_grad()
def residual_streams(backbone: Backbone, batch: Batch, layers: list[int], prefix: Prefix | None = None
                     ) -> dict[int, torch.Tensor]:
    """h_l (B, T, d): the input of each decoder layer in `layers`, from one forward pass;
    with `prefix` (of that batch, at or below every layer asked for), only the layers from
    the prefix up run."""
    captured: dict[int, torch.Tensor] = {}
    handles = [backbone.text.layers[l].register_forward_pre_hook(
        lambda _m, args, kwargs, l=l: captured.__setitem__(l, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for l in layers]
    try:
        backbone.logits(batch) if prefix is None else backbone.logits_from(prefix)
    finally:
        for h in handles:
            h.remove()
    return captured


def last_prompt_positions(batch: Batch) -> torch.Tensor:
    """Index of the last prompt token of each row (the token just before the answer)."""
    return batch.answer_mask.int().argmax(-1) - 1


def last_token_positions(batch: Batch) -> torch.Tensor:
    return batch.attention_mask.sum(-1) - 1


def extract_hidden_states(backbone: Backbone, triplets: list[Triplet], layers: list[int],
                          batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{"sem.{l}", "pos.{l}", "neg.{l}"}: (N, d) tensors for each edited layer l."""
    out: dict[str, list[torch.Tensor]] = {f"{k}.{l}": [] for k in ("sem", "pos", "neg") for l in layers}
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start : start + batch_size]
        samples = [Sample(Path(t.image) if t.image else None, t.prompt, a) for t in chunk for a in (t.a_pos, t.a_neg)]
        batch = backbone.encode(samples)
        h = residual_streams(backbone, batch, layers)
        rows = torch.arange(len(samples))
        sem_at, last_at = last_prompt_positions(batch), last_token_positions(batch)
        for l in layers:
            out[f"sem.{l}"].append(h[l][rows[0::2], sem_at[0::2]])  # the prompt is shared by pos and neg
            out[f"pos.{l}"].append(h[l][rows[0::2], last_at[0::2]])
            out[f"neg.{l}"].append(h[l][rows[1::2], last_at[1::2]])
        if (start // batch_size) % 20 == 0:
            log.info("hidden states: %d/%d triplets", min(start + batch_size, len(triplets)), len(triplets))
    return {k: torch.cat(v).float().contiguous() for k, v in out.items()}


def save_hidden_states(path: Path, states: dict[str, torch.Tensor], layers: list[int]) -> None:
    from safetensors.torch import save_file

    save_file(states, str(path), metadata={"layers": json.dumps(layers)})
