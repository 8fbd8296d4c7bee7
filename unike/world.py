"""Deterministic generator of a *tiny world*: a miniature MMEdit benchmark.

The world is a set of made-up creatures ("zorb", "blick", ...), each with a
distinct visual signature (body shape x pattern x colour) and two facts, a
``diet`` and a ``habitat``.  Some creatures have one fact changed in the
*current* world (outdated knowledge, like "Twitter is now X").  A tiny BLIP-2
style model is pretrained on the *old* world (``pretrain.json``) and then
edited towards the current world with the MMEdit-style edit records
(``vqa_*.json``, ``caption_*_edit.json``).

Everything written is a pure function of :class:`WorldConfig`: all randomness
comes from ``numpy.random.Generator`` objects seeded by
``[cfg.seed, stream, purpose, a, b]`` (one generator per image, one per
purpose for case-level choices, one for the world itself), never from global
random state.  Same config -> byte-identical JSON and PNG files.

Design choices worth knowing about:

* **Rephrase templates are held out from edit prompts, not from pretraining.**
  The rephrase (T-Generality) question templates and the caption rephrase
  prefix are never used as the ``src`` of an edit record, but they *do* appear
  in ``pretrain.json`` for every creature.  A real language model understands
  a paraphrase before it is edited; what T-Generality measures is whether the
  *edit* transfers to a prompt the editor never saw, not whether the model can
  parse an unseen sentence.  The same holds for images: re-rendered style
  images (rotation + pixel noise) are mixed into pretraining, but every edit
  record uses fresh renders never seen in pretraining.
* Captions are "a {name} in the {habitat}", so caption edits exist only for
  creatures whose *habitat* changed.
* Changed creatures are interleaved into the train/eval splits so that each
  split gets both diet and habitat changes (needs ``n_changed >= 4`` when
  caption train cases are requested).
* Shape scenes use distinct shapes *and* distinct colours, so that
  "what shape is {color}?" has a single answer.
* ``vocabulary`` also contains the tokens ``question``, ``answer`` and ``:``
  that a training-side prompt wrapper such as "question: ... answer:" adds.
* ``n_pretrain_incontext`` (default 0: off) appends records in IKE's
  "New Fact: ... Prompt: ..." format to ``pretrain.json`` (and 1/8 as many to
  ``pretrain_eval.json``), kind ``incontext``, topics ``incontext-new`` (the answer
  follows the stated, often counterfactual, fact) and ``incontext-keep`` (an unrelated
  question: the old world's answer), so that the tiny backbones learn in-context use as
  a real LLM does in pretraining (see :func:`incontext_records`).  They reuse images
  already rendered and draw from their own seed stream: every other file is unchanged.

Image layout under ``out_dir``: ``images/creatures`` holds normal-style
creature renders, ``images/rephrase`` re-rendered style ones (also used for
M-Generality), ``images/scenes`` shape scenes.  File names carry the creature
index and a purpose tag (``pt`` pretrain, ``pe`` pretrain_eval, ``vt``/``ve``
VQA train/eval, ``ct``/``ce`` caption train/eval), so images of different
purposes can never collide and each purpose's images do not depend on how
many images other purposes drew.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from unike.data import vqa_prompt

# --------------------------------------------------------------------------
# Attribute inventories
# --------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("plain", "striped", "dotted")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
DIETS = ("berries", "fish", "leaves", "seeds", "insects", "nuts", "grass", "honey")
HABITATS = ("forest", "river", "desert", "cave", "meadow", "swamp", "mountain", "lake")
FACTS = ("diet", "habitat")

SCENE_SHAPES = ("circle", "square", "triangle")
SCENE_COLORS = ("red", "green", "blue", "yellow")
COUNT_WORDS = ("one", "two", "three")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
}
PATTERN_INK = (30, 30, 30)  # dark, contrasts with every body colour

# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------

SRC_TEMPLATES = {
    "diet": (
        "what does this creature eat?",
        "what food does this creature like?",
        "what is the diet of this creature?",
    ),
    "habitat": (
        "where does this creature live?",
        "what is the home of this creature?",
        "where is this creature found?",
    ),
}
REPHRASE_TEMPLATES = {
    "diet": ("what does this animal feed on?", "which food does this animal eat?"),
    "habitat": ("where does this animal make its home?", "which place does this animal live in?"),
}
NAME_TEMPLATES = ("what is this creature called?", "what is the name of this creature?")
TEXT_TEMPLATES = {
    "diet": ("what does the {name} eat?", "what is the diet of the {name}?"),
    "habitat": ("where does the {name} live?", "what is the home of the {name}?"),
}
CAPTION_TEMPLATE = "a {name} in the {habitat}"
CAPTION_SRC_TEMPLATES = ("a photo of", "an image of")
CAPTION_REPHRASE_TEMPLATES = ("a picture showing",)
SCENE_COLOR_Q = "what color is the {shape}?"
SCENE_COUNT_Q = "how many shapes are there?"
SCENE_SHAPE_Q = "what shape is {color}?"

# Tokens a training-side wrapper ("question: ... answer:") adds to prompts.
WRAPPER_TOKENS = ("question", "answer", ":")

# Name syllables: unusual onsets/codas so names read as made-up words.
_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "j", "k", "kl",
           "kr", "m", "n", "p", "pl", "pr", "qu", "sk", "sn", "sp", "tr", "v", "z", "zw")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee")
_CODAS = ("b", "ck", "g", "k", "m", "mp", "nk", "p", "rb", "rk", "sh", "x", "zz", "lk", "ft")

TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # the `tokenizers` Whitespace pre-tokenizer rule

MMEDIT_FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase",
                 "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")

# Seed streams and purposes: every generator is seeded with
# [cfg.seed, stream, purpose, a, b] (fixed length, so no two streams alias).
_STREAM_WORLD, _STREAM_CREATURE_IMG, _STREAM_SCENE_IMG, _STREAM_CASES = 0, 1, 2, 3
_STREAM_INCONTEXT = 4
_PURPOSES = {  # name -> (code, file-name tag)
    "pretrain": (1, "pt"),
    "pretrain_eval": (2, "pe"),
    "vqa_train": (3, "vt"),
    "vqa_eval": (4, "ve"),
    "caption_train": (5, "ct"),
    "caption_eval": (6, "ce"),
}

_SUPERSAMPLE = 2          # draw at 2x and box-downsample: cheap anti-aliasing
_NOISE_SIGMA = 8.0        # additive pixel noise of re-rendered images (0-255 scale)
_MAX_ROTATION = 12.0      # degrees; small so a rotated square never looks like a diamond
_PRETRAIN_EVAL_DIVISOR = 8  # pretrain_eval is about 1/8 of pretrain


def tokenize(text: str) -> list[str]:
    """Word-level tokens of ``text`` (lowercased), as the world's vocabulary uses them."""
    return TOKEN_RE.findall(text.lower())


# --------------------------------------------------------------------------
# Config and summary
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    n_creatures: int = 24
    n_changed: int = 12
    pretrain_images_per_creature: int = 24
    n_pretrain_scenes: int = 600
    n_vqa_eval: int = 60
    n_caption_eval: int = 40
    n_vqa_train: int = 200
    n_caption_train: int = 120
    seed: int = 0
    image_size: int = 64
    # In-context records ("New Fact: ... Prompt: ..." demonstrations, IKE's format) in the
    # pretraining corpus; pretrain_eval gets 1/8 as many. 0: none (the corpus is unchanged).
    n_pretrain_incontext: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"WorldConfig.{f.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"WorldConfig.{f.name} must be >= 0, got {value}")
        n_signatures = len(SHAPES) * len(PATTERNS) * len(COLORS)
        if not 1 <= self.n_creatures <= n_signatures:
            raise ValueError(f"n_creatures must be in 1..{n_signatures} (distinct visual "
                             f"signatures available), got {self.n_creatures}")
        if self.n_changed % 2:
            raise ValueError(f"n_changed must be even (half diet, half habitat), got {self.n_changed}")
        if self.n_changed < 2:
            raise ValueError("n_changed must be >= 2: each split needs a changed creature")
        if self.n_changed >= self.n_creatures:
            # loc questions are about unchanged creatures, so at least one must exist.
            raise ValueError(f"n_changed ({self.n_changed}) must be < n_creatures "
                             f"({self.n_creatures}): locality needs an unchanged creature")
        if self.n_changed < 4 and self.n_caption_train > 0:
            raise ValueError("n_changed must be >= 4 for caption train cases: with 2 changed "
                             "creatures the train split has no habitat change")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig key(s): {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WorldSummary:
    out_dir: Path
    n_creatures: int
    n_changed: int
    n_images: int
    counts: dict[str, int]        # number of records per JSON output file
    files: dict[str, Path]        # output name -> absolute path


# --------------------------------------------------------------------------
# Creatures
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Creature:
    index: int
    name: str
    shape: str
    pattern: str
    color: str
    diet: str                       # old-world value
    habitat: str                    # old-world value
    changed_fact: str | None = None  # "diet" | "habitat" | None
    new_value: str | None = None     # current-world value of changed_fact
    split: str | None = None         # "train" | "eval" | None (unchanged)

    def old(self, fact: str) -> str:
        return getattr(self, fact)

    def current(self, fact: str) -> str:
        return self.new_value if fact == self.changed_fact else self.old(fact)

    def caption(self, current: bool = False) -> str:
        habitat = self.current("habitat") if current else self.habitat
        return CAPTION_TEMPLATE.format(name=self.name, habitat=habitat)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name,
            "signature": {"shape": self.shape, "pattern": self.pattern, "color": self.color},
            "old": {f: self.old(f) for f in FACTS},
            "current": {f: self.current(f) for f in FACTS},
            "changed_fact": self.changed_fact, "split": self.split,
        }


def _rng(cfg: WorldConfig, stream: int, purpose: int = 0, a: int = 0, b: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stream, purpose, a, b])


def _static_vocabulary() -> set[str]:
    """All tokens except creature names."""
    texts: list[str] = [CAPTION_TEMPLATE, SCENE_COLOR_Q, SCENE_COUNT_Q, SCENE_SHAPE_Q]
    texts += NAME_TEMPLATES + CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES
    for fact in FACTS:
        texts += SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact] + TEXT_TEMPLATES[fact]
    words = set(WRAPPER_TOKENS)
    for t in texts:
        words.update(tokenize(re.sub(r"\{\w+\}", " ", t)))  # drop placeholders
    for group in (SHAPES, PATTERNS, COLORS, DIETS, HABITATS, SCENE_SHAPES, SCENE_COLORS, COUNT_WORDS):
        words.update(group)
    return words


def _pick(rng: np.random.Generator, pool: tuple[str, ...]) -> str:
    return pool[int(rng.integers(len(pool)))]


def _make_names(n: int, rng: np.random.Generator, reserved: set[str]) -> list[str]:
    names: list[str] = []
    for _ in range(100_000):  # bounded: the syllable space is far larger than 72
        if len(names) == n:
            return names
        name = _pick(rng, _ONSETS) + _pick(rng, _VOWELS)
        if rng.random() < 0.35:  # some two-syllable names
            name += _pick(rng, _ONSETS) + _pick(rng, _VOWELS)
        name += _pick(rng, _CODAS)
        if name not in reserved and name not in names:
            names.append(name)
    raise RuntimeError("could not generate enough unique creature names")


def _pick_signatures(n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Greedily pick n distinct signatures, preferring ones that differ in >= 2 attributes.

    Candidates are visited in a seeded random order; each step takes the candidate
    with the largest minimum Hamming distance to those chosen, then the fewest
    near-duplicates (distance 1).  At most 12 signatures can be pairwise >= 2
    apart (4 x 3 after dropping colour), so larger worlds fall back to distance 1.
    """
    pool = list(itertools.product(SHAPES, PATTERNS, COLORS))
    pool = [pool[i] for i in rng.permutation(len(pool))]
    chosen: list[tuple[str, str, str]] = []
    for _ in range(n):
        best, best_key = None, None
        for cand in pool:
            dists = [sum(x != y for x, y in zip(cand, c)) for c in chosen]
            key = (min(dists, default=3), -dists.count(1))
            if best_key is None or key > best_key:
                best, best_key = cand, key
        chosen.append(best)
        pool.remove(best)
    return chosen


def make_creatures(cfg: WorldConfig) -> list[Creature]:
    """The creatures of the world, with old facts, changed facts and splits."""
    rng = _rng(cfg, _STREAM_WORLD)
    names = _make_names(cfg.n_creatures, rng, _static_vocabulary())
    signatures = _pick_signatures(cfg.n_creatures, rng)
    diets = [DIETS[int(i)] for i in rng.integers(len(DIETS), size=cfg.n_creatures)]
    habitats = [HABITATS[int(i)] for i in rng.integers(len(HABITATS), size=cfg.n_creatures)]

    # First half of the chosen creatures change diet, second half habitat.  Splits
    # alternate over that list so both splits get diet and habitat changes.
    changed = [int(i) for i in rng.permutation(cfg.n_creatures)[: cfg.n_changed]]
    change: dict[int, tuple[str, str, str]] = {}
    for pos, idx in enumerate(changed):
        fact = "diet" if pos < cfg.n_changed // 2 else "habitat"
        old = diets[idx] if fact == "diet" else habitats[idx]
        options = [v for v in (DIETS if fact == "diet" else HABITATS) if v != old]
        new = options[int(rng.integers(len(options)))]
        change[idx] = (fact, new, "train" if pos % 2 == 0 else "eval")

    creatures = []
    for i in range(cfg.n_creatures):
        fact, new, split = change.get(i, (None, None, None))
        shape, pattern, color = signatures[i]
        creatures.append(Creature(i, names[i], shape, pattern, color, diets[i], habitats[i],
                                  fact, new, split))
    return creatures


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every token the world can produce (plus wrapper tokens), sorted."""
    words = _static_vocabulary()
    words.update(c.name for c in make_creatures(cfg))
    if cfg.n_pretrain_incontext:
        words.update(t for text in INCONTEXT_WORDS for t in tokenize(text))
    return sorted(words)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: Any) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        # A rhombus narrower than tall, so it cannot pass for a rotated square.
        half_w = (x1 - x0) * 0.38
        draw.polygon([(cx, y0), (cx + half_w, cy), (cx, y1), (cx - half_w, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    tint = tuple(int(v) for v in rng.integers(232, 256, size=3))  # white-ish, slightly tinted
    return Image.new("RGB", (size, size), tint)


def _body_sprite(c: Creature, side: int, rng: np.random.Generator) -> Image.Image:
    """RGBA sprite of the creature body: colour + pattern, alpha = body shape."""
    body = Image.new("RGB", (side, side), RGB[c.color])
    draw = ImageDraw.Draw(body)
    if c.pattern == "striped":
        period = side / 5
        width = period * 0.45
        y = -period + rng.uniform(0, period)
        while y < side:
            draw.rectangle((0, y, side, y + width), fill=PATTERN_INK)
            y += period
    elif c.pattern == "dotted":
        spacing = side / 4
        radius = side * 0.07
        ox, oy = rng.uniform(0, spacing, size=2)
        for gx in np.arange(ox, side, spacing):
            for gy in np.arange(oy, side, spacing):
                draw.ellipse((gx - radius, gy - radius, gx + radius, gy + radius), fill=PATTERN_INK)
    mask = Image.new("L", (side, side), 0)
    _draw_shape(ImageDraw.Draw(mask), c.shape, (0, 0, side - 1, side - 1), 255)
    body.putalpha(mask)  # pattern is clipped to the body by the alpha mask
    return body


def render_creature(c: Creature, size: int, rng: np.random.Generator, rerender: bool = False) -> Image.Image:
    """One image of creature ``c``; ``rng`` fixes layout.  ``rerender`` adds rotation and noise."""
    s = size * _SUPERSAMPLE
    img = _background(s, rng)
    draw = ImageDraw.Draw(img)
    # Distractor dots go first so they never cover (and fake) the body's pattern.
    for _ in range(int(rng.integers(0, 3))):
        r = s * rng.uniform(0.025, 0.045)
        x, y = rng.uniform(r, s - r, size=2)
        grey = int(rng.integers(110, 180))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey, grey, grey))

    sprite = _body_sprite(c, int(round(s * rng.uniform(0.40, 0.55))), rng)
    if rerender:
        angle = float(rng.uniform(4.0, _MAX_ROTATION) * rng.choice([-1.0, 1.0]))
        # Transparent fill in the body colour avoids a dark fringe from interpolation.
        sprite = sprite.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True,
                               fillcolor=(*RGB[c.color], 0))
    w, h = sprite.size
    margin = int(s * 0.03)
    x = int(rng.integers(margin, max(margin, s - w - margin) + 1))
    y = int(rng.integers(margin, max(margin, s - h - margin) + 1))
    img.paste(sprite, (x, y), sprite)
    img = img.resize((size, size), Image.Resampling.BOX)

    if rerender:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, _NOISE_SIGMA, size=(size, size, 3))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    row: int
    col: int

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "row": self.row, "col": self.col,
                "cell": f"{ROWS[self.row]} {COLS[self.col]}"}


def sample_scene(rng: np.random.Generator) -> list[SceneObject]:
    """1-3 shapes, distinct shapes, distinct colours, distinct cells of a 3x3 grid."""
    n = int(rng.integers(1, 4))
    shapes = rng.permutation(len(SCENE_SHAPES))[:n]
    colors = rng.permutation(len(SCENE_COLORS))[:n]
    cells = rng.permutation(9)[:n]
    return [SceneObject(SCENE_SHAPES[int(s)], SCENE_COLORS[int(c)], int(k) // 3, int(k) % 3)
            for s, c, k in zip(shapes, colors, cells)]


def scene_questions(objects: list[SceneObject]) -> list[tuple[str, str, str]]:
    """Every answerable (topic, question, answer) triple about a scene."""
    qa = [("scene-count", SCENE_COUNT_Q, COUNT_WORDS[len(objects) - 1])]
    for o in objects:
        qa.append(("scene-color", SCENE_COLOR_Q.format(shape=o.shape), o.color))
        qa.append(("scene-shape", SCENE_SHAPE_Q.format(color=o.color), o.shape))
    return qa


def render_scene(objects: list[SceneObject], size: int, rng: np.random.Generator) -> Image.Image:
    s = size * _SUPERSAMPLE
    img = _background(s, rng)
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for o in objects:
        side = cell * rng.uniform(0.55, 0.8)
        slack = (cell - side) / 2  # jitter keeps the shape inside its own cell
        cx = (o.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (o.row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, o.shape, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), RGB[o.color])
    return img.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


@dataclass
class _ImageWriter:
    """Renders and saves images with per-purpose counters (-> stable names and seeds)."""

    out_dir: Path
    cfg: WorldConfig
    creature_counters: dict[tuple[str, int], int] = field(default_factory=dict)
    scene_counters: dict[str, int] = field(default_factory=dict)
    scenes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    n_images: int = 0

    def _save(self, img: Image.Image, rel: str) -> str:
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
        self.n_images += 1
        return rel

    def creature(self, c: Creature, purpose: str, rerender: bool) -> str:
        code, tag = _PURPOSES[purpose]
        k = self.creature_counters.get((purpose, c.index), 0)
        self.creature_counters[(purpose, c.index)] = k + 1
        rng = _rng(self.cfg, _STREAM_CREATURE_IMG, code, c.index, k)
        folder = "rephrase" if rerender else "creatures"
        img = render_creature(c, self.cfg.image_size, rng, rerender=rerender)
        return self._save(img, f"images/{folder}/c{c.index:03d}_{tag}_{k:04d}.png")

    def scene(self, purpose: str) -> tuple[str, list[SceneObject], np.random.Generator]:
        """Returns the scene's path, objects and its generator (for question picks)."""
        code, tag = _PURPOSES[purpose]
        k = self.scene_counters.get(purpose, 0)
        self.scene_counters[purpose] = k + 1
        rng = _rng(self.cfg, _STREAM_SCENE_IMG, code, k)
        objects = sample_scene(rng)
        rel = self._save(render_scene(objects, self.cfg.image_size, rng), f"images/scenes/s_{tag}_{k:05d}.png")
        self.scenes[rel] = [o.to_json() for o in objects]
        return rel, objects, rng


def _record(kind: str, topic: str, image: str | None, prompt: str, answer: str) -> dict[str, Any]:
    """`topic` (name, diet, habitat, caption, scene-count, ...) lets training report what it learned."""
    return {"kind": kind, "topic": topic, "image": image, "prompt": prompt, "answer": answer}


def _pretrain_corpus(creatures: list[Creature], writer: _ImageWriter, purpose: str,
                     images_per_creature: int, n_scenes: int) -> list[dict[str, Any]]:
    """Old-world corpus: every template (src and rephrase) for every creature."""
    records = []
    for c in creatures:
        for j in range(images_per_creature):
            image = writer.creature(c, purpose, rerender=j % 2 == 1)  # mix both styles
            records += [_record("vqa", "name", image, t, c.name) for t in NAME_TEMPLATES]
            for fact in FACTS:
                for t in SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact]:
                    records.append(_record("vqa", fact, image, t, c.old(fact)))
            for t in CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES:
                records.append(_record("caption", "caption", image, t, c.caption()))
    for c in creatures:
        for fact in FACTS:
            for t in TEXT_TEMPLATES[fact]:
                records.append(_record("text", f"text-{fact}", None, t.format(name=c.name), c.old(fact)))
    for _ in range(n_scenes):
        image, objects, rng = writer.scene(purpose)
        qa = scene_questions(objects)
        n_q = min(len(qa), int(rng.integers(2, 4)))
        for i in sorted(int(i) for i in rng.permutation(len(qa))[:n_q]):
            records.append(_record("vqa", qa[i][0], image, *qa[i][1:]))
    return records


# --------------------------------------------------------------------------
# In-context records: teach the tiny backbones to use "New Fact" demonstrations
# --------------------------------------------------------------------------
#
# A real LLM can follow a fact stated in its prompt because pretraining taught it
# in-context use; the tiny backbones never saw such text, so IKE cannot work on them.
# These records give the old-world corpus that skill, in IKE's exact prompt format
# (baselines/ike.py renders its scored inputs the same way; tests/test_ike.py checks):
#
#   "New Fact: {fp} {fa}\nPrompt: {p} {a}\n\n" x d    (text-only demonstrations)
#   "New Fact: {fp} {fa}\nPrompt: {p}"  -> answer        (the record's own query)
#
# The stated fact (fp -> fa) is about the pictured creature (a VQA question or a caption
# prefix, as an MMEdit edit), or about a named creature (text). Its value is drawn at
# random, so it is often counterfactual; it is never the *current* value of a changed
# fact, so no edit target leaks into pretraining. The query either matches the stated
# fact (another phrasing, another picture of the same creature: topic "incontext-new",
# answer = the stated value) or is unrelated (another fact of the pictured creature, a
# named creature's text fact, a shape scene: topic "incontext-keep", answer = the old
# world). The demonstrations are IKE's three kinds (copy, update = another phrasing,
# retain = a named creature's fact) about random creatures, and they are text only, as
# IKE's are; with probability 1/2 the stated fact is also repeated as the last
# demonstration, as IKE appends the edit's own fact. Records stay within
# `_INCONTEXT_MAX_TOKENS` word tokens so the longest fits the tiny backbones' 256
# positions with the image queries and the prompt wrapper; their lengths spread over the
# whole range, so every position is trained.

INCONTEXT_WORDS = ("New Fact:", "Prompt:")
INCONTEXT_SEPARATOR = "\n\n"
_INCONTEXT_MAX_TOKENS = 224
_INCONTEXT_MAX_DEMOS = 8
_INCONTEXT_PURPOSES = {"pretrain": 1, "pretrain_eval": 2}


def incontext_fact(fact_prompt: str, fact_answer: str, prompt: str) -> str:
    """A stated fact followed by the prompt it should inform (IKE's query format)."""
    return f"New Fact: {fact_prompt} {fact_answer}\nPrompt: {prompt}"


def incontext_demo(fact_prompt: str, fact_answer: str, prompt: str, answer: str) -> str:
    """One complete demonstration: a stated fact, a prompt and its answer."""
    return f"{incontext_fact(fact_prompt, fact_answer, prompt)} {answer}"


def _values(fact: str, c: Creature) -> tuple[str, ...]:
    """Values a stated fact may give creature `c`: any but its current (edit) value."""
    pool = DIETS if fact == "diet" else HABITATS
    if c.changed_fact != fact:
        return pool
    return tuple(v for v in pool if v != c.current(fact))


def _statement(rng: np.random.Generator, c: Creature, kind: str, fact: str) -> tuple[str, str, str]:
    """(fact prompt, fact answer, value) of a stated fact about creature `c`."""
    value = _pick(rng, _values(fact, c))
    if kind == "vqa":
        return vqa_prompt(_pick(rng, SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact])), value, value
    if kind == "caption":
        prefix = _pick(rng, CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES)
        return prefix, CAPTION_TEMPLATE.format(name=c.name, habitat=value), value
    return _pick(rng, TEXT_TEMPLATES[fact]).format(name=c.name), value, value


def _text_fact(rng: np.random.Generator, others: list[Creature]) -> tuple[str, str]:
    """An old-world text question about a random creature of `others`, and its answer."""
    o = others[int(rng.integers(len(others)))]
    fact = _pick(rng, FACTS)
    return _pick(rng, TEXT_TEMPLATES[fact]).format(name=o.name), o.old(fact)


def _demo(rng: np.random.Generator, creatures: list[Creature]) -> str:
    """A text-only demonstration like IKE's (copy, update or retain) about a random creature."""
    c = creatures[int(rng.integers(len(creatures)))]
    kind = "vqa" if rng.random() < 0.6 else "caption"
    fact = _pick(rng, FACTS) if kind == "vqa" else "habitat"
    fp, fa, _ = _statement(rng, c, kind, fact)
    mode = int(rng.integers(3))
    if mode == 0:  # copy
        return incontext_demo(fp, fa, fp, fa)
    if mode == 1:  # update: another phrasing of the same fact
        if kind == "vqa":
            prompt = vqa_prompt(_pick(rng, SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact]))
        else:
            prompt = _pick(rng, CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES)
        return incontext_demo(fp, fa, prompt, fa)
    prompt, answer = _text_fact(rng, [o for o in creatures if o is not c])  # retain
    return incontext_demo(fp, fa, prompt, answer)


def incontext_records(creatures: list[Creature], corpus: list[dict[str, Any]], cfg: WorldConfig,
                      purpose: str, n: int) -> list[dict[str, Any]]:
    """`n` in-context records over the images of `corpus` (the ordinary records of the
    same purpose: creature pictures by their name record, scenes with their questions)."""
    rng = _rng(cfg, _STREAM_INCONTEXT, _INCONTEXT_PURPOSES[purpose])
    by_name = {c.name: c for c in creatures}
    pictures: dict[int, list[str]] = {}
    scenes: list[tuple[str, str, str]] = []
    for r in corpus:
        if r["topic"] == "name":
            pictures.setdefault(by_name[r["answer"]].index, [])
            if r["image"] not in pictures[by_name[r["answer"]].index]:
                pictures[by_name[r["answer"]].index].append(r["image"])
        elif r["topic"].startswith("scene-"):
            scenes.append((r["image"], r["prompt"], r["answer"]))
    if not pictures:
        raise ValueError(f"{purpose}: in-context records need creature pictures in the corpus")

    records = []
    for _ in range(n):
        c = creatures[int(rng.integers(len(creatures)))]
        others = [o for o in creatures if o is not c]
        u = rng.random()
        kind = "vqa" if u < 0.55 else "caption" if u < 0.9 else "text"
        fact = "habitat" if kind == "caption" else _pick(rng, FACTS)
        fp, fa, value = _statement(rng, c, kind, fact)
        picture = _pick(rng, tuple(pictures[c.index]))
        if rng.random() < 0.5:
            topic = "incontext-new"
            if kind == "vqa":
                image, prompt = picture, vqa_prompt(_pick(rng, SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact]))
            elif kind == "caption":
                image, prompt = picture, _pick(rng, CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES)
            else:
                image, prompt = None, _pick(rng, TEXT_TEMPLATES[fact]).format(name=c.name)
            answer = fa
        else:
            topic = "incontext-keep"
            v = rng.random()
            if v < 0.4 and kind != "text":
                # The pictured creature's other fact (a caption states the habitat) or its name.
                other_fact = "diet" if kind == "caption" else [f for f in FACTS if f != fact][0]
                if rng.random() < 0.3:
                    prompt, answer = vqa_prompt(_pick(rng, NAME_TEMPLATES)), c.name
                else:
                    templates = SRC_TEMPLATES[other_fact] + REPHRASE_TEMPLATES[other_fact]
                    prompt, answer = vqa_prompt(_pick(rng, templates)), c.old(other_fact)
                image = picture
            elif v < 0.65 or not scenes:
                # A named creature's text fact (T-Loc); for a text statement, possibly the
                # same creature's other fact.
                if kind == "text" and rng.random() < 0.5:
                    other_fact = [f for f in FACTS if f != fact][0]
                    prompt, answer = _pick(rng, TEXT_TEMPLATES[other_fact]).format(name=c.name), c.old(other_fact)
                else:
                    prompt, answer = _text_fact(rng, others)
                image = None
            else:  # a shape scene and one of its questions (M-Loc)
                image, q, answer = scenes[int(rng.integers(len(scenes)))]
                prompt = vqa_prompt(q)
        query = incontext_fact(fp, fa, prompt)
        budget = _INCONTEXT_MAX_TOKENS - len(tokenize(query)) - len(tokenize(answer))
        demos = []
        if rng.random() < 0.5:  # IKE appends the edit's own fact as the last demonstration
            own = incontext_demo(fp, fa, fp, fa)
            if len(tokenize(own)) <= budget:
                demos.append(own)
                budget -= len(tokenize(own))
        for _ in range(int(rng.integers(_INCONTEXT_MAX_DEMOS + 1))):
            demo = _demo(rng, creatures)
            if len(tokenize(demo)) > budget:
                break
            demos.insert(0, demo)
            budget -= len(tokenize(demo))
        prompt = "".join(d + INCONTEXT_SEPARATOR for d in demos) + query
        records.append(_record("incontext", topic, image, prompt, answer))
    return records


def _locality(rng: np.random.Generator, unchanged: list[Creature], writer: _ImageWriter,
              purpose: str) -> dict[str, str]:
    """Text locality (fact about an unchanged creature) and multimodal locality (scene)."""
    other = unchanged[int(rng.integers(len(unchanged)))]
    fact = FACTS[int(rng.integers(len(FACTS)))]
    templates = TEXT_TEMPLATES[fact]
    loc = templates[int(rng.integers(len(templates)))].format(name=other.name)
    scene, objects, _ = writer.scene(purpose)
    qa = scene_questions(objects)
    _, m_q, m_a = qa[int(rng.integers(len(qa)))]
    return {"loc": loc, "loc_ans": other.old(fact), "m_loc": scene, "m_loc_q": m_q, "m_loc_a": m_a}


def _edit_records(task: str, split: str, n: int, creatures: list[Creature],
                  writer: _ImageWriter) -> list[dict[str, str]]:
    """``n`` edit cases of ``task`` ("vqa" | "caption"), cycling over the split's creatures."""
    purpose = f"{task}_{split}"
    targets = [c for c in creatures if c.split == split and (task == "vqa" or c.changed_fact == "habitat")]
    unchanged = [c for c in creatures if c.changed_fact is None]
    if n and not targets:
        raise ValueError(f"no changed creatures for {purpose}")
    rng = _rng(writer.cfg, _STREAM_CASES, _PURPOSES[purpose][0])
    records = []
    for i in range(n):
        c = targets[i % len(targets)]
        rnd = i // len(targets)  # cycle templates so each creature sees all of them
        if task == "vqa":
            fact = c.changed_fact
            src_t, reph_t = SRC_TEMPLATES[fact], REPHRASE_TEMPLATES[fact]
            pred, alt = c.old(fact), c.current(fact)
        else:
            src_t, reph_t = CAPTION_SRC_TEMPLATES, CAPTION_REPHRASE_TEMPLATES
            pred, alt = c.caption(), c.caption(current=True)
        rec = {
            "src": src_t[rnd % len(src_t)],
            "pred": pred,  # placeholder: replaced later by the model's greedy answer
            "alt": alt,
            "rephrase": reph_t[rnd % len(reph_t)],
            "image": writer.creature(c, purpose, rerender=False),
            "image_rephrase": writer.creature(c, purpose, rerender=True),
        }
        rec.update(_locality(rng, unchanged, writer, purpose))
        rec = {k: rec[k] for k in MMEDIT_FIELDS}
        rec["case_id"] = f"{task}-{split}-{i:04d}"
        records.append(rec)
    return records


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=True) + "\n", encoding="utf-8", newline="\n")


def generate_world(out_dir: Path, cfg: WorldConfig) -> WorldSummary:
    """Write the whole world under ``out_dir`` and return a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    creatures = make_creatures(cfg)
    writer = _ImageWriter(out_dir, cfg)

    div = _PRETRAIN_EVAL_DIVISOR
    pretrain = _pretrain_corpus(creatures, writer, "pretrain", cfg.pretrain_images_per_creature,
                                cfg.n_pretrain_scenes)
    pretrain_eval = _pretrain_corpus(
        creatures, writer, "pretrain_eval",
        max(1, round(cfg.pretrain_images_per_creature / div)),
        max(1, round(cfg.n_pretrain_scenes / div)) if cfg.n_pretrain_scenes else 0)
    if cfg.n_pretrain_incontext:
        # Appended after the ordinary records, drawn from their own seed stream and reusing
        # the images already rendered: every other output stays byte-identical.
        pretrain += incontext_records(creatures, pretrain, cfg, "pretrain", cfg.n_pretrain_incontext)
        pretrain_eval += incontext_records(creatures, pretrain_eval, cfg, "pretrain_eval",
                                           max(1, round(cfg.n_pretrain_incontext / div)))
    outputs: dict[str, list[dict[str, Any]]] = {
        "pretrain.json": pretrain,
        "pretrain_eval.json": pretrain_eval,
        "vqa_train.json": _edit_records("vqa", "train", cfg.n_vqa_train, creatures, writer),
        "vqa_eval.json": _edit_records("vqa", "eval", cfg.n_vqa_eval, creatures, writer),
        "caption_train_edit.json": _edit_records("caption", "train", cfg.n_caption_train, creatures, writer),
        "caption_eval_edit.json": _edit_records("caption", "eval", cfg.n_caption_eval, creatures, writer),
    }
    for name, records in outputs.items():
        _write_json(out_dir / name, records)

    counts = {name: len(records) for name, records in outputs.items()}
    world = {
        "config": cfg.to_dict(),
        "creatures": [c.to_json() for c in creatures],
        "counts": {**counts, "images": writer.n_images},
        "templates": {
            "src": SRC_TEMPLATES, "rephrase": REPHRASE_TEMPLATES, "name": NAME_TEMPLATES,
            "text": TEXT_TEMPLATES, "caption": CAPTION_TEMPLATE,
            "caption_src": CAPTION_SRC_TEMPLATES, "caption_rephrase": CAPTION_REPHRASE_TEMPLATES,
            "scene": [SCENE_COLOR_Q, SCENE_COUNT_Q, SCENE_SHAPE_Q],
        },
        "scenes": writer.scenes,  # image relpath -> objects with grid cells
    }
    _write_json(out_dir / "world.json", world)

    files = {name: out_dir / name for name in [*outputs, "world.json"]}
    return WorldSummary(out_dir=out_dir, n_creatures=cfg.n_creatures, n_changed=cfg.n_changed,
                        n_images=writer.n_images, counts=counts, files=files)
