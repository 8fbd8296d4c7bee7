"""Probe: continue a finished run's tiny backbone with a second context phase and measure
held-out context use as `training.json` reports it (docs/tiny-world.md, "Stop 31 probe").

The backbone is loaded from the run's backbones/<name>/ and trained further by
`unike.tiny.context_phase` (its own warm-up and cosine decay, the world's context records,
batch and mix of PretrainConfig's defaults) for `--steps` at `--lr`; plain held-out exact
match is measured before and after, and the figures go to
benchmarks/results/context_probe/<name>-<steps>-<lr>.json. Nothing is saved of the
weights: a probe points at a schedule, which a world change then pretrains from scratch.

    python scripts/context_probe.py results tiny-minigpt4 --steps 1000 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unike.backbones import load_backbone
from unike.tiny import PretrainConfig, _summary, answer_token_accuracy, context_phase, corpus_samples

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "context_probe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a finished run's out_dir (holds world/ and backbones/)")
    parser.add_argument("backbone", help="a tiny backbone of that run")
    parser.add_argument("--steps", type=int, required=True, help="steps of the second context phase")
    parser.add_argument("--lr", type=float, required=True, help="its peak learning rate")
    parser.add_argument("--seed", type=int, default=7, help="its record-sampling seed")
    args = parser.parse_args()
    world = args.results / "world"
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, args.results / "backbones" / args.backbone)
    plain = corpus_samples(json.loads((world / "pretrain.json").read_text(encoding="utf-8")), world)
    records = json.loads((world / "pretrain_eval.json").read_text(encoding="utf-8"))
    heldout, topics = corpus_samples(records, world), [r["topic"] for r in records]
    before = _summary(answer_token_accuracy(backbone, heldout, topics))
    use = context_phase(backbone, world, plain, PretrainConfig(context_steps=args.steps, context_lr=args.lr,
                                                               seed=args.seed))
    backbone.clear_image_cache()
    after = _summary(answer_token_accuracy(backbone, heldout, topics))
    figures = {"backbone": args.backbone, "steps": args.steps, "lr": args.lr, "seed": args.seed,
               "heldout": use["heldout"], "follow_by_statement": use["follow_by_statement"],
               "plain_exact_match": {"before": before["exact_match"], "after": after["exact_match"]},
               "exact_match_by_topic_after": {k: v["exact_match"] for k, v in after["by_topic"].items()},
               "train_s": use["train_s"]}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.backbone}-{args.steps}-{args.lr:g}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(figures["heldout"]), "->", path)


if __name__ == "__main__":
    main()
