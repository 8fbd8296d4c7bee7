"""Released tiny backbones: pretrained tiny backbones shipped in the repository under
`released/`, installed by `pretrain_backbone` instead of pretraining them again.

Real backbones are released checkpoints: everyone who edits BLIP-2 OPT edits the same
weights, and no benchmark pretrains them. The tiny backbones mirror that. Pretraining one
of the default's takes 24-27 minutes on two cores, and the same seed gives other weights
on another CPU model (float sums differ and pretraining amplifies them: docs/tiny-world.md,
"Machines"), so without a release every machine would edit its own draw. A release is a
run's own pretraining output (the default run's for seed 0, the seeds overlay's for seeds
1 and 2), kept with the key of everything that decided it:

- the world it was trained on: every JSON file's bytes and every image's pixels (decoded,
  so that another PNG encoder's bytes do not count as another world);
- the architecture and the pretraining schedule (`TinyArch`, `PretrainConfig`, seed
  included), the prompt style and the vocabulary;
- the pretraining recipe: the source of `unike/tiny.py`, where pretraining is written.

`pretrain_backbone` computes the key of what it is asked to pretrain and installs the
release of that key if there is one (config `use_released_backbones`, default true);
anything else (another seed, world, schedule, or a changed tiny.py) pretrains from
scratch, as before. `scripts/release_backbones.py` makes a release from a finished run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from unike.tiny import PretrainConfig, TinyArch

RELEASES = Path(__file__).resolve().parent.parent / "released"
RELEASE_META = "release.json"
TRAINING = "training.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def world_digest(world_dir: Path) -> str:
    """The world's content: each JSON file's bytes, each image's size, mode and pixels,
    in path order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(world_dir).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(world_dir)).encode() + b"\0")
        if path.suffix == ".png":
            with Image.open(path) as im:
                h.update(f"{im.size} {im.mode}".encode() + np.asarray(im).tobytes())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


def pretraining_spec(config: dict, backbone: str) -> tuple[TinyArch, PretrainConfig, str, list[str]]:
    """What `tiny.pretrain` gets for a tiny backbone of the config: its architecture, its
    schedule (the config's seed), its prompt style and the world's vocabulary."""
    from unike.tiny import PretrainConfig, TinyArch
    from unike.world import WorldConfig, vocabulary

    entry = config["backbones"][backbone]
    return (TinyArch(**entry.get("arch", {})), PretrainConfig(**{"seed": config["seed"], **entry.get("pretrain", {})}),
            entry["prompt_style"], vocabulary(WorldConfig.of(config)))


def release_key(world_dir: Path, arch: TinyArch, train: PretrainConfig, prompt_style: str,
                vocabulary: list[str]) -> tuple[str, dict]:
    """The key of a tiny backbone's pretraining (16 hex digits) and what it hashes. The
    recipe is read from unike/tiny.py's file, without importing torch for it."""
    inputs = {"arch": asdict(arch), "pretrain": asdict(train), "prompt_style": prompt_style,
              "vocabulary": _sha(json.dumps(vocabulary).encode()), "world": world_digest(world_dir),
              "recipe": _sha(Path(find_spec("unike.tiny").origin).read_bytes())}
    return _sha(json.dumps(inputs, sort_keys=True).encode())[:16], inputs


def find_release(key: str) -> Path | None:
    folder = RELEASES / key
    return folder if (folder / RELEASE_META).is_file() else None


def install_release(release: Path, out_dir: Path) -> dict:
    """Copy a release's backbone files into `out_dir`; its training.json gains `released`
    (the release's key, backbone name and where it was made). Returns the release's meta."""
    meta = json.loads((release / RELEASE_META).read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in release.iterdir():
        if path.name not in (RELEASE_META, TRAINING):
            shutil.copy(path, out_dir / path.name)  # written now: newer than the world it was checked against
    training = json.loads((release / TRAINING).read_text(encoding="utf-8"))
    training["released"] = {k: meta[k] for k in ("key", "backbone", "made_on", "commit")}
    (out_dir / TRAINING).write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    return meta


def make_release(backbone_dir: Path, backbone: str, key: str, inputs: dict, commit: str) -> Path:
    """Release a pretrained backbone directory under its key; an earlier release of the same
    backbone name and seed is removed (git keeps it; other seeds' releases stay, for the
    seeds overlay). The directory must be what `pretrain` wrote, not an installed release."""
    training = json.loads((backbone_dir / TRAINING).read_text(encoding="utf-8"))
    if "released" in training:
        raise ValueError(f"{backbone_dir} holds an installed release ({training['released']['key']}), "
                         "not a backbone pretrained here")
    recorded = training.get("release_key")
    if recorded is not None and recorded != key:
        raise ValueError(f"{backbone_dir} was pretrained under key {recorded}, but its world and settings give "
                         f"{key} now: release it from a run of this code")
    seed = inputs["pretrain"]["seed"]
    for old in RELEASES.glob(f"*/{RELEASE_META}"):
        earlier = json.loads(old.read_text(encoding="utf-8"))
        if (earlier["backbone"], earlier["inputs"]["pretrain"]["seed"]) == (backbone, seed) and old.parent.name != key:
            shutil.rmtree(old.parent)
    folder = RELEASES / key
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(backbone_dir, folder)
    meta = {"key": key, "backbone": backbone, "inputs": inputs, "made_on": training["device"], "commit": commit}
    (folder / RELEASE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder
