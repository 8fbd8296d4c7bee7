"""Release the tiny backbones of a finished run: copy each one's directory into
released/<key>/ (unike/releases.py), where pretrain_backbone installs it from, and drop the
earlier release of the same backbone and seed. Run it from the run's folder, on the run's
effective config (a seed's chain has its own: results/seed1/config.effective.yaml), with the
code the run was made with; commit released/ afterwards.

    python scripts/release_backbones.py results/config.effective.yaml
    python scripts/release_backbones.py results/config.effective.yaml --backbone tiny-minigpt4
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from unike.config import load_config
from unike.grid import Layout
from unike.releases import RELEASES, make_release, pretraining_spec, release_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the run's config.effective.yaml (its out_dir is read from the current folder)")
    parser.add_argument("--backbone", action="append", help="release only these (default: every tiny backbone)")
    args = parser.parse_args()
    config = load_config(args.config)
    layout = Layout(config)
    tiny = [name for name, entry in config["backbones"].items() if entry["source"] == "tiny"]
    unknown = sorted(set(args.backbone or []) - set(tiny))
    if unknown:
        raise SystemExit(f"not a tiny backbone of {args.config}: {', '.join(unknown)} (tiny: {', '.join(tiny)})")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RELEASES.parent, capture_output=True, text=True,
                            check=True).stdout.strip()
    for name in args.backbone or tiny:
        key, inputs = release_key(layout.world, *pretraining_spec(config, name))
        folder = make_release(layout.backbone_dir(name), name, key, inputs, commit)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"{name}: released as {folder.relative_to(RELEASES.parent)} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
