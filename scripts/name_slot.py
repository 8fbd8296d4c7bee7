"""Where a tiny backbone fails to write a stated caption (docs/tiny-world.md, "Stop 32
probe"): for each held-out context record that states a caption (context_eval.json), the
first answer token it gets wrong (teacher forced, as `training.json`'s following is
scored); when that token is the creature's name, the name it writes instead, that name's
split, and the rank of the right name among the vocabulary's logits. Also how often each
split's names are mentioned in the context phase's records (context.json): the eval
split's names occur only in their name records; and how many of the same records it
follows with a blank grey picture in place of the creature's (the same prompt and
positions, nothing for the picture to suggest).

    python scripts/name_slot.py results tiny-blip2-opt
    python scripts/name_slot.py results tiny-blip2-opt --backbone-dir some/other/backbone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from unike.backbones import load_backbone
from unike.tiny import answer_predictions_of, corpus_samples

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "context_probe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a run's out_dir (holds world/ and backbones/)")
    parser.add_argument("backbone", help="a tiny backbone of that run")
    parser.add_argument("--backbone-dir", type=Path, help="the backbone's folder (default: the run's backbones/<name>)")
    parser.add_argument("--label", default="", help="a suffix for the output file's name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = args.results / "world"
    backbone = load_backbone(args.backbone, args.backbone_dir or args.results / "backbones" / args.backbone)
    split = {c["name"]: c["split"] for c in json.loads((world / "world.json").read_text(encoding="utf-8"))["creatures"]}
    mentions = Counter(word for r in json.loads((world / "context.json").read_text(encoding="utf-8"))
                       for word in re.findall(r"\w+", f"{r['prompt']} {r['answer']}".lower()) if word in split)
    records = [r for r in json.loads((world / "context_eval.json").read_text(encoding="utf-8"))
               if r["topic"] == "context-follow" and r["statement"] == "caption"]
    failures = []
    samples = corpus_samples(records, world)
    for sample in samples:
        batch = backbone.encode([sample], with_eos=True)
        with torch.no_grad():
            logits = backbone.logits(batch)[0, :-1]
        target, mask = batch.input_ids[0, 1:], batch.answer_mask[0, 1:]
        wrong = (mask & (logits.argmax(-1) != target)).nonzero().flatten()
        if not len(wrong):
            continue
        at = int(wrong[0])
        right, written = (backbone.tokenizer.convert_ids_to_tokens(int(t)) for t in (target[at], logits[at].argmax()))
        failures.append({"right": right, "written": written, "at_name": right in split,
                         "written_split": split.get(written, "not a name"),
                         "rank_of_right": int((logits[at] > logits[at, target[at]]).sum())})
    at_name = [f for f in failures if f["at_name"]]
    with tempfile.TemporaryDirectory() as tmp:
        blank = Path(tmp) / "blank.png"
        with Image.open(samples[0].image) as im:
            Image.new(im.mode, im.size, (128,) * len(im.getbands())).save(blank)
        blind = answer_predictions_of(backbone, [dataclasses.replace(s, image=blank) for s in samples], batch_size=32)
    by_split = {part: statistics.mean(mentions[n] for n, k in split.items() if k == part)
                for part in sorted(set(split.values()))}
    figures = {"backbone": args.backbone, "backbone_dir": str(args.backbone_dir or ""), "captions": len(records),
               "wrong": len(failures), "wrong_at_name": len(at_name),
               "follows_with_a_blank_picture": sum(bool((p == t).all()) for p, t in blind) / len(blind),
               "written_name_split": dict(Counter(f["written_split"] for f in at_name)),
               "median_rank_of_right_name": statistics.median(f["rank_of_right"] for f in at_name) if at_name else None,
               "mean_mentions_in_context_records": by_split, "failures": failures}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.backbone}-name-slot{args.label}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in figures.items() if k != "failures"}), "->", path)


if __name__ == "__main__":
    main()
