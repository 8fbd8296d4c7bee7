"""Probe: continue a finished run's tiny backbone with a second context phase and measure
held-out context use as `training.json` reports it (docs/tiny-world.md, "Stop 31 probe").

The backbone is loaded from the run's backbones/<name>/ and trained further by
`unike.tiny.context_phase` (its own warm-up and cosine decay, the world's context records,
batch and mix of PretrainConfig's defaults) for `--steps` at `--lr`; plain held-out exact
match is measured before and after, and the figures go to
benchmarks/results/context_probe/<name>-<steps>-<lr>.json. Nothing is saved of the
weights: a probe points at a schedule, which a world change then pretrains from scratch.

`--name-copies N` (stop 32) adds N more copies of each eval-split creature's name records
(`world.name_records`) to the phase's records, in a temporary world folder beside the
run's: the eval names are otherwise stated in 2 of ~4,600 records (train names: ~32
mentions), and the probe asks whether a backbone that cannot write a stated caption's name
learns to when the name is seen more often.

    python scripts/context_probe.py results tiny-minigpt4 --steps 1000 --lr 1e-3
    python scripts/context_probe.py results tiny-blip2-opt --steps 600 --lr 1e-3 --name-copies 7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unike.backbones import cpu_device, load_backbone
from unike.tiny import PretrainConfig, _summary, answer_token_accuracy, context_phase, corpus_samples

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "context_probe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a finished run's out_dir (holds world/ and backbones/)")
    parser.add_argument("backbone", help="a tiny backbone of that run")
    parser.add_argument("--steps", type=int, required=True, help="steps of the second context phase")
    parser.add_argument("--lr", type=float, required=True, help="its peak learning rate")
    parser.add_argument("--seed", type=int, default=7, help="its record-sampling seed")
    parser.add_argument("--name-copies", type=int, default=0,
                        help="more copies of each eval-split creature's name records in the phase's records")
    parser.add_argument("--backbone-dir", type=Path, help="the backbone's folder (default: the run's backbones/<name>)")
    args = parser.parse_args()
    world = args.results / "world"
    phase_world = world if not args.name_copies else _with_name_copies(world, args.name_copies)
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, args.backbone_dir or args.results / "backbones" / args.backbone)
    plain = corpus_samples(json.loads((world / "pretrain.json").read_text(encoding="utf-8")), world)
    records = json.loads((world / "pretrain_eval.json").read_text(encoding="utf-8"))
    heldout, topics = corpus_samples(records, world), [r["topic"] for r in records]
    before = _summary(answer_token_accuracy(backbone, heldout, topics))
    use = context_phase(backbone, phase_world, plain, PretrainConfig(context_steps=args.steps, context_lr=args.lr,
                                                               seed=args.seed))
    backbone.clear_image_cache()
    after = _summary(answer_token_accuracy(backbone, heldout, topics))
    figures = {"backbone": args.backbone, "steps": args.steps, "lr": args.lr, "seed": args.seed,
               "name_copies": args.name_copies, "device": cpu_device(1),
               "heldout": use["heldout"], "follow_by_statement": use["follow_by_statement"],
               "plain_exact_match": {"before": before["exact_match"], "after": after["exact_match"]},
               "exact_match_by_topic_after": {k: v["exact_match"] for k, v in after["by_topic"].items()},
               "train_s": use["train_s"]}
    OUT.mkdir(parents=True, exist_ok=True)
    copies = f"-names{args.name_copies}" if args.name_copies else ""
    path = OUT / f"{args.backbone}-{args.steps}-{args.lr:g}{copies}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(figures["heldout"]), "->", path)


def _with_name_copies(world: Path, copies: int) -> Path:
    """A folder beside `world` that is the same world (its files linked) but for
    context.json, which holds `copies` more of each eval-split creature's name records."""
    creatures = json.loads((world / "world.json").read_text(encoding="utf-8"))["creatures"]
    eval_names = {c["name"] for c in creatures if c["split"] == "eval"}
    records = json.loads((world / "context.json").read_text(encoding="utf-8"))
    extra = [r for r in records if r["topic"] == "context-name" and r["answer"] in eval_names] * copies
    out = world.parent / f"world-names{copies}"
    out.mkdir(exist_ok=True)
    for path in world.iterdir():
        if path.name != "context.json" and not (out / path.name).exists():
            (out / path.name).symlink_to(path.resolve())
    (out / "context.json").write_text(json.dumps(records + extra), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
