"""Deterministic generator of a *tiny world*: a miniature MMEdit benchmark.

The world is a set of made-up creatures ("zorb", "blick", ...), each with a distinct
visual signature (body shape x pattern x colour x horns) and two facts, a ``diet`` and
a ``habitat``, whose values are two words ("small fish", "dark forest"). In the
*current* world most creatures have one or both facts changed (outdated knowledge, like
"Twitter is now X"). A tiny BLIP-2 style model is pretrained on the *old* world
(``pretrain.json``), taught to use stated facts in its prompt (``context.json``), and
then edited towards the current world with MMEdit-style edit records (``vqa_*.json``,
``caption_*_edit.json``).

Everything written is a pure function of :class:`WorldConfig`: all randomness comes
from ``numpy.random.Generator`` objects seeded by ``[cfg.seed, stream, purpose, a, b]``
(one generator per image, one per purpose for case-level choices, one for the world
itself), never from global random state. Same config -> byte-identical JSON and PNG
files. ``docs/tiny-world.md`` says which MMEdit property each choice below mirrors.

* **Many distinct facts.** An E-VQA fact is (creature, changed fact); an E-IC fact is a
  changed creature's caption. Every edit record carries its ``fact_id``; with the
  default counts each fact has one case, and the splits hold disjoint creatures, so the
  train split's facts never recur in the eval split (MMEdit: thousands of distinct
  facts, trained editors never see the eval facts).
* **Answers of several tokens.** Fact values are two words and a caption is
  "a {name} eating {diet} in the {habitat}" (9 tokens, 2-4 of which change with an
  edit), so success is not one token read off the creature's name.
* **Rephrasings that differ.** T-Generality templates are reworded questions, not the
  edit's question with a synonym; M-Generality images are another composition: mirrored,
  rotated further, resized, on another background, with other objects in the picture
  (MMEdit's generated rephrase images show the same content in another scene).
* **Rephrase templates are held out from edit prompts, not from pretraining.** A real
  language model understands a paraphrase before it is edited; T-Generality measures
  whether the *edit* transfers to a prompt the editor never saw. Likewise every edit
  record uses fresh renders never seen in pretraining.
* **No leakage.** Text-locality prompts of the train and eval splits ask about disjoint
  sets of unchanged creatures, scene images are rendered per split, and stated facts in
  the context corpus never state a current value of a changed fact.
* **Context use.** ``context.json`` holds IKE-format records ("New Fact: ... Prompt:
  ...", with text demonstrations) over the creatures outside the eval split, familiar
  and new: the answer follows a stated fact about the asked-about subject, and keeps
  the old world's answer when the stated fact is about another creature, another fact
  or the picture of a scene; every creature's name is also stated and asked back (no
  fact), so that every name is a word the backbone can say, as every word is for a
  real LLM. ``context_eval.json`` asks the same of the eval split's creatures on
  held-out renders: the held-out rate of following the context.
* ``vocabulary`` also contains the tokens ``question``, ``answer`` and ``:`` that a
  training-side prompt wrapper such as "question: ... answer:" adds.

Image layout under ``out_dir``: ``images/creatures`` holds normal-style creature
renders, ``images/rephrase`` re-composed ones (also used for M-Generality),
``images/scenes`` shape scenes. File names carry the creature index and a purpose tag
(``pt`` pretrain, ``pe`` pretrain_eval, ``vt``/``ve`` VQA train/eval, ``ct``/``ce``
caption train/eval), so images of different purposes never collide and each purpose's
images do not depend on how many images other purposes drew.
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

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")
PATTERNS = ("plain", "striped", "dotted", "checked")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown")
HORNS = (False, True)
# Two-word values; nouns recur across values, so a wrong answer can be half right, as
# an MMEdit answer can share words with the model's.
DIETS = ("red berries", "blue berries", "small fish", "big fish", "green leaves", "dry leaves",
         "tiny seeds", "wild seeds", "black insects", "hard nuts", "sweet honey", "tall grass")
HABITATS = ("dark forest", "pine forest", "cold river", "fast river", "hot desert", "deep cave",
            "green meadow", "muddy swamp", "high mountain", "calm lake", "sandy beach", "snowy hill")
FACTS = ("diet", "habitat")
VALUES = {"diet": DIETS, "habitat": HABITATS}

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
    "pink": (250, 130, 200),
    "brown": (130, 80, 40),
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
# Reworded, not a synonym swap of a source template (MMEdit's rephrases are paraphrases
# written by a model, with their own structure).
REPHRASE_TEMPLATES = {
    "diet": ("tell me the usual meal of the animal in this picture.",
             "the animal shown here survives on which food?"),
    "habitat": ("in which kind of place would you meet the animal in this picture?",
                "the animal shown here makes its home where?"),
}
NAME_TEMPLATES = ("what is this creature called?", "what is the name of this creature?")
TEXT_TEMPLATES = {
    "diet": ("what does the {name} eat?", "what is the diet of the {name}?"),
    "habitat": ("where does the {name} live?", "what is the home of the {name}?"),
}
CAPTION_TEMPLATE = "a {name} eating {diet} in the {habitat}"
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
_STREAM_CONTEXT = 4
_PURPOSES = {  # name -> (code, file-name tag)
    "pretrain": (1, "pt"),
    "pretrain_eval": (2, "pe"),
    "vqa_train": (3, "vt"),
    "vqa_eval": (4, "ve"),
    "caption_train": (5, "ct"),
    "caption_eval": (6, "ce"),
    "context_eval": (7, "xe"),
    "context": (8, "xt"),
}

_SUPERSAMPLE = 2          # draw at 2x and box-downsample: cheap anti-aliasing
_NOISE_SIGMA = 8.0        # additive pixel noise of re-composed images (0-255 scale)
_MAX_ROTATION = 20.0      # degrees; a diamond is narrower than a square, so it stays one
_PRETRAIN_EVAL_DIVISOR = 8  # pretrain_eval is about 1/8 of pretrain


def tokenize(text: str) -> list[str]:
    """Word-level tokens of ``text`` (lowercased), as the world's vocabulary uses them."""
    return TOKEN_RE.findall(text.lower())


# --------------------------------------------------------------------------
# Config and summary
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    n_creatures: int = 320
    n_familiar: int = 32          # creatures of the pretraining corpus; the rest are new to the backbone
    n_changed: int = 12           # familiar creatures with one or both facts changed in the current world
    n_eval_subjects: int = 60     # edit subjects (changed and new creatures) of the eval split
    pretrain_images_per_creature: int = 16
    n_pretrain_scenes: int = 600
    # Edit cases per split; up to the number of facts each case is a distinct fact, beyond
    # it the facts recur with other templates and renders.
    n_vqa_eval: int = 75
    n_caption_eval: int = 60
    n_vqa_train: int = 270
    n_caption_train: int = 210
    # Context-use records (IKE's "New Fact: ... Prompt: ..." format); context_eval.json
    # gets 1/8 as many, on the eval split's creatures.
    n_context: int = 4000
    seed: int = 0
    image_size: int = 64

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"WorldConfig.{f.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"WorldConfig.{f.name} must be >= 0, got {value}")
        n_signatures = len(SHAPES) * len(PATTERNS) * len(COLORS) * len(HORNS)
        if not 1 <= self.n_creatures <= n_signatures:
            raise ValueError(f"WorldConfig.n_creatures must be in 1..{n_signatures} (distinct visual "
                             f"signatures available), got {self.n_creatures}")
        if not 1 <= self.n_familiar <= self.n_creatures:
            raise ValueError(f"WorldConfig.n_familiar must be in 1..n_creatures ({self.n_creatures}), "
                             f"got {self.n_familiar}")
        if self.n_familiar - self.n_changed < 2:
            # Text locality asks about unchanged familiar creatures, each split about its own.
            raise ValueError(f"WorldConfig.n_changed ({self.n_changed}) must leave at least 2 unchanged "
                             f"creatures of the {self.n_familiar} familiar ones: each split's locality needs its own")
        n_subjects = self.n_changed + self.n_creatures - self.n_familiar
        if not 1 <= self.n_eval_subjects < n_subjects:
            raise ValueError(f"WorldConfig.n_eval_subjects must be in 1..{n_subjects - 1} (both splits need "
                             f"an edit subject), got {self.n_eval_subjects}")
        if self.image_size < 32:
            raise ValueError(f"WorldConfig.image_size must be >= 32, got {self.image_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig key(s): {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def of(cls, config: dict) -> "WorldConfig":
        """The world of a pipeline config: its `world:` entry, seeded by its `seed`."""
        return cls.from_dict({"seed": config["seed"], **config.get("world", {})})

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
    horns: bool
    diet: str                       # old-world value
    habitat: str                    # old-world value
    familiar: bool = True            # in the pretraining corpus
    new: tuple[tuple[str, str], ...] = ()  # current-world (fact, value) of its changed facts
    split: str | None = None         # "train" | "eval": edit subjects; "loc-train" | "loc-eval": locality

    @property
    def changed_facts(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.new)

    @property
    def fact_prefix(self) -> str:
        return f"c{self.index:03d}"

    def old(self, fact: str) -> str:
        return getattr(self, fact)

    def current(self, fact: str) -> str:
        return dict(self.new).get(fact, self.old(fact))

    def caption(self, current: bool = False) -> str:
        value = self.current if current else self.old
        return CAPTION_TEMPLATE.format(name=self.name, diet=value("diet"), habitat=value("habitat"))

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name,
            "signature": {"shape": self.shape, "pattern": self.pattern, "color": self.color,
                          "horns": self.horns},
            "old": {f: self.old(f) for f in FACTS},
            "current": {f: self.current(f) for f in FACTS},
            "familiar": self.familiar, "changed_facts": list(self.changed_facts), "split": self.split,
        }


def _rng(cfg: WorldConfig, stream: int, purpose: int = 0, a: int = 0, b: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stream, purpose, a, b])


def _static_vocabulary() -> set[str]:
    """All tokens except creature names."""
    texts: list[str] = [CAPTION_TEMPLATE, SCENE_COLOR_Q, SCENE_COUNT_Q, SCENE_SHAPE_Q]
    texts += NAME_TEMPLATES + CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES + CONTEXT_WORDS
    for fact in FACTS:
        texts += SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact] + TEXT_TEMPLATES[fact] + VALUES[fact]
    words = set(WRAPPER_TOKENS) | set(tokenize(vqa_prompt("")))  # stated VQA facts are wrapped
    for t in texts:
        words.update(tokenize(re.sub(r"\{\w+\}", " ", t)))  # drop placeholders
    for group in (SHAPES, PATTERNS, COLORS, SCENE_SHAPES, SCENE_COLORS, COUNT_WORDS):
        words.update(group)
    return words


def _pick(rng: np.random.Generator, pool: tuple[str, ...]) -> str:
    return pool[int(rng.integers(len(pool)))]


def _make_names(n: int, rng: np.random.Generator, reserved: set[str]) -> list[str]:
    names: list[str] = []
    for _ in range(100_000):  # bounded: the syllable space is far larger than 320
        if len(names) == n:
            return names
        name = _pick(rng, _ONSETS) + _pick(rng, _VOWELS)
        if rng.random() < 0.35:  # some two-syllable names
            name += _pick(rng, _ONSETS) + _pick(rng, _VOWELS)
        name += _pick(rng, _CODAS)
        if name not in reserved and name not in names:
            names.append(name)
    raise RuntimeError("could not generate enough unique creature names")


def make_creatures(cfg: WorldConfig) -> list[Creature]:
    """The creatures of the world, with old facts, changed facts and splits.

    Signatures are a seeded sample of every (shape, pattern, colour, horns) combination,
    so creatures often differ in one attribute only: the vision side must read all four.
    The first `n_familiar` creatures of a seeded order are in the pretraining corpus; of
    those, the first `n_changed` have changed facts and the others are unchanged and
    alternate between the two splits' locality pools. Every creature the backbone never
    saw also has changed facts (its facts are new to the backbone either way). The edit
    subjects (changed and new creatures) are split in a seeded order, so both kinds reach
    both splits. A subject changes its diet, its habitat or both (a third each).
    """
    rng = _rng(cfg, _STREAM_WORLD)
    names = _make_names(cfg.n_creatures, rng, _static_vocabulary())
    pool = list(itertools.product(SHAPES, PATTERNS, COLORS, HORNS))
    signatures = [pool[int(i)] for i in rng.permutation(len(pool))[: cfg.n_creatures]]
    old = {f: [VALUES[f][int(i)] for i in rng.integers(len(VALUES[f]), size=cfg.n_creatures)] for f in FACTS}

    order = [int(i) for i in rng.permutation(cfg.n_creatures)]
    familiar = set(order[: cfg.n_familiar])
    subjects = order[: cfg.n_changed] + order[cfg.n_familiar:]
    eval_subjects = {subjects[int(i)] for i in rng.permutation(len(subjects))[: cfg.n_eval_subjects]}
    locality = order[cfg.n_changed: cfg.n_familiar]
    creatures = []
    for i in range(cfg.n_creatures):
        new: tuple[tuple[str, str], ...] = ()
        if i in locality:
            split = "loc-train" if locality.index(i) % 2 == 0 else "loc-eval"
        else:
            split = "eval" if i in eval_subjects else "train"
            mode = int(rng.integers(3))
            for fact in (FACTS if mode == 2 else (FACTS[mode],)):
                options = [v for v in VALUES[fact] if v != old[fact][i]]
                new += ((fact, options[int(rng.integers(len(options)))]),)
        shape, pattern, color, horns = signatures[i]
        creatures.append(Creature(i, names[i], shape, pattern, color, horns, old["diet"][i],
                                  old["habitat"][i], i in familiar, new, split))
    return creatures


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every token the world can produce (plus wrapper tokens), sorted."""
    words = _static_vocabulary()
    words.update(c.name for c in make_creatures(cfg))
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
    elif shape == "hexagon":
        rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
        draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in np.arange(6) * np.pi / 3], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(size: int, rng: np.random.Generator, low: int = 232) -> Image.Image:
    tint = tuple(int(v) for v in rng.integers(low, 256, size=3))  # white-ish, slightly tinted
    return Image.new("RGB", (size, size), tint)


def _body_sprite(c: Creature, side: int, rng: np.random.Generator) -> Image.Image:
    """RGBA sprite of the creature: body colour + pattern (alpha = body shape), horns on top."""
    horn = side // 5  # the top fifth of the sprite holds the horns, if any
    body_side = side - horn
    body = Image.new("RGB", (body_side, body_side), RGB[c.color])
    draw = ImageDraw.Draw(body)
    if c.pattern == "striped":
        period = body_side / 5
        width = period * 0.45
        y = -period + rng.uniform(0, period)
        while y < body_side:
            draw.rectangle((0, y, body_side, y + width), fill=PATTERN_INK)
            y += period
    elif c.pattern == "dotted":
        spacing = body_side / 4
        radius = body_side * 0.07
        ox, oy = rng.uniform(0, spacing, size=2)
        for gx in np.arange(ox, body_side, spacing):
            for gy in np.arange(oy, body_side, spacing):
                draw.ellipse((gx - radius, gy - radius, gx + radius, gy + radius), fill=PATTERN_INK)
    elif c.pattern == "checked":
        cell = body_side / 4
        ox, oy = rng.uniform(0, cell, size=2)
        for gx, gy in itertools.product(range(-1, 5), range(-1, 5)):
            if (gx + gy) % 2 == 0:
                x0, y0 = ox + gx * cell, oy + gy * cell
                draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=PATTERN_INK)
    mask = Image.new("L", (body_side, body_side), 0)
    _draw_shape(ImageDraw.Draw(mask), c.shape, (0, 0, body_side - 1, body_side - 1), 255)
    body.putalpha(mask)  # pattern is clipped to the body by the alpha mask

    sprite = Image.new("RGBA", (side, side), (*RGB[c.color], 0))
    sprite.paste(body, (0, horn), body)
    if c.horns:
        draw = ImageDraw.Draw(sprite)
        for cx in (side * 0.3, side * 0.7):
            draw.polygon([(cx - horn * 0.45, horn * 1.4), (cx, 0), (cx + horn * 0.45, horn * 1.4)],
                         fill=(*PATTERN_INK, 255))
    return sprite


def _clutter(draw: ImageDraw.ImageDraw, s: int, rng: np.random.Generator, n: int) -> None:
    """`n` small coloured scene shapes: other objects in the picture."""
    for _ in range(n):
        side = s * rng.uniform(0.10, 0.16)
        x, y = rng.uniform(0, s - side, size=2)
        _draw_shape(draw, _pick(rng, SCENE_SHAPES), (x, y, x + side, y + side), RGB[_pick(rng, SCENE_COLORS)])


def render_creature(c: Creature, size: int, rng: np.random.Generator, rerender: bool = False) -> Image.Image:
    """One image of creature ``c``; ``rng`` fixes layout. ``rerender`` re-composes the
    picture (another background, other objects, mirrored, rotated, resized, noisy), as
    MMEdit's generated rephrase images show the same content in another scene."""
    s = size * _SUPERSAMPLE
    img = _background(s, rng, low=200 if rerender else 232)
    draw = ImageDraw.Draw(img)
    # Clutter goes first so it never covers (and fakes) the body's pattern.
    if rerender:
        _clutter(draw, s, rng, int(rng.integers(1, 4)))
    else:
        for _ in range(int(rng.integers(0, 3))):
            r = s * rng.uniform(0.025, 0.045)
            x, y = rng.uniform(r, s - r, size=2)
            grey = int(rng.integers(110, 180))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey, grey, grey))

    scale = rng.uniform(0.38, 0.62) if rerender else rng.uniform(0.45, 0.58)
    sprite = _body_sprite(c, int(round(s * scale)), rng)
    if rerender:
        if rng.random() < 0.5:
            sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
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


_CREATURE_IMAGE = re.compile(r"images/(?:creatures|rephrase)/c(\d+)_")


def creature_index(image: str | None) -> int | None:
    """The index of the creature an image shows (from its file name), None for a scene."""
    m = _CREATURE_IMAGE.match(image or "")
    return int(m.group(1)) if m else None


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
# Context records: teach the tiny backbones to use a stated fact, as IKE states it
# --------------------------------------------------------------------------
#
# A real LLM follows a fact stated in its prompt because pretraining taught it to; the
# tiny backbones learn it from these records, in IKE's exact prompt format (unike/incontext.py
# renders its scored inputs with the same functions):
#
#   "{demo}\n\n" x d + "New Fact: {fp} {fa}\nPrompt: {p}"  -> answer
#
# The stated fact (fp -> fa) is about the pictured creature (a VQA question or a caption
# prefix, as an MMEdit edit states it) or about a named creature (text), the three kinds
# in equal shares. A followed caption in training calls the pictured creature by another
# train creature's name, so only copying can fill its name slot (docs/tiny-world.md,
# world v3); held out it keeps the creature's own name, as an edit's caption does. Its value is
# drawn at random, so it mostly contradicts what the backbone learned, and it is never
# the *current* value of a changed fact, so no edit target leaks into pretraining. The
# query is one of (topic):
#   context-follow     the stated fact, in another phrasing or picture: the stated value;
#   context-other      another creature's fact (a named creature, for a text statement
#                      the same fact type: the subject must be checked), or a shape
#                      scene's question: the old world's answer;
#   context-otherfact  the same creature's other fact: the old world's answer.
# Following alone can be met by a blind copier, so the last two take half the records
# (docs/tiny-world.md, context use; the probe behind it found that subject checking needs
# many distractors). Demonstrations are IKE's three text-only kinds (copy, update = another
# phrasing, retain = another creature's fact) about random creatures; half the records
# repeat the stated fact as the last demonstration, as IKE appends the edit's own fact.
# Half the records carry no demonstration and most others 1-3, as training cost grows with
# length; a tail of 4-8, up to
# `_CONTEXT_MAX_TOKENS` word tokens trains every position IKE's longer contexts use.

CONTEXT_WORDS = ("New Fact:", "Prompt:")
DEMO_SEPARATOR = "\n\n"
_CONTEXT_MAX_TOKENS = 200
_CONTEXT_PURPOSES = {"context": 1, "context_eval": 2}
_CONTEXT_PICTURES = 4  # pictures of each new creature the context records show (2 re-composed)
CONTEXT_TOPICS = ("context-follow", "context-other", "context-otherfact", "context-name")


def stated_fact(fact_prompt: str, fact_answer: str, prompt: str) -> str:
    """A stated fact followed by the prompt it should inform (IKE's query format)."""
    return f"New Fact: {fact_prompt} {fact_answer}\nPrompt: {prompt}"


def stated_query(prompt: str) -> str:
    """The prompt a context record (or IKE input) asks, without the stated facts before it."""
    return prompt.rsplit("\nPrompt: ", 1)[-1]


def demonstration(fact_prompt: str, fact_answer: str, prompt: str, answer: str) -> str:
    """One complete demonstration: a stated fact, a prompt and its answer."""
    return f"{stated_fact(fact_prompt, fact_answer, prompt)} {answer}"


def name_records(creatures: list[Creature]) -> list[dict[str, Any]]:
    """Every creature's name stated and asked back, with no picture and no fact: a real
    LLM can say any word of its vocabulary, while a word-level tiny backbone never trained
    on a name cannot produce it, and so could never copy a stated caption of a new creature
    (its name in it; docs/tiny-world.md). They say nothing about a creature, so the eval
    split's names may occur here and nowhere else in training."""
    a, b = NAME_TEMPLATES
    return [_record("context", "context-name", None, stated_fact(x, c.name, y), c.name) | {"statement": "name"}
            for c in creatures for x, y in ((a, b), (b, a))]


def _values(fact: str, c: Creature) -> tuple[str, ...]:
    """Values a stated fact may give creature `c`: any but its current (edit) value."""
    if fact not in c.changed_facts:
        return VALUES[fact]
    return tuple(v for v in VALUES[fact] if v != c.current(fact))


def _vqa_question(rng: np.random.Generator, fact: str) -> str:
    return vqa_prompt(_pick(rng, SRC_TEMPLATES[fact] + REPHRASE_TEMPLATES[fact]))


def _caption_prefix(rng: np.random.Generator) -> str:
    return _pick(rng, CAPTION_SRC_TEMPLATES + CAPTION_REPHRASE_TEMPLATES)


def _text_question(rng: np.random.Generator, c: Creature, fact: str) -> str:
    return _pick(rng, TEXT_TEMPLATES[fact]).format(name=c.name)


def _statement(rng: np.random.Generator, c: Creature, kind: str, fact: str, name: str | None = None
               ) -> tuple[str, str]:
    """(fact prompt, fact answer) of a stated fact about creature `c`; a caption calls it
    `name`, by default its own."""
    value = _pick(rng, _values(fact, c))
    if kind == "vqa":
        return _vqa_question(rng, fact), value
    if kind == "caption":
        facts = {f: c.old(f) for f in FACTS} | {fact: value}
        return _caption_prefix(rng), CAPTION_TEMPLATE.format(name=name or c.name, **facts)
    return _text_question(rng, c, fact), value


def _demo(rng: np.random.Generator, creatures: list[Creature]) -> str:
    """A text-only demonstration like IKE's (copy, update or retain) about a random creature."""
    c, o = (creatures[int(i)] for i in rng.choice(len(creatures), size=2, replace=False))
    kind = _pick(rng, ("vqa", "caption", "text"))
    fact = _pick(rng, FACTS)
    fp, fa = _statement(rng, c, kind, fact)
    mode = _pick(rng, ("copy", "update", "retain"))
    if mode == "copy":
        return demonstration(fp, fa, fp, fa)
    if mode == "update":
        prompt = {"vqa": lambda: _vqa_question(rng, fact), "caption": lambda: _caption_prefix(rng),
                  "text": lambda: _text_question(rng, c, fact)}[kind]()
        return demonstration(fp, fa, prompt, fa)
    other_fact = _pick(rng, FACTS)
    return demonstration(fp, fa, _text_question(rng, o, other_fact), o.old(other_fact))


def context_records(subjects: list[Creature], pool: list[Creature], picture, scenes: list[tuple[str, str, str]],
                    cfg: WorldConfig, purpose: str, n: int) -> list[dict[str, Any]]:
    """`n` context records about `subjects`; `picture(c, rng)` gives a picture of `c`,
    `scenes` are (image, question, answer) of shape scenes; demonstrations and
    other-creature questions draw from `pool` (familiar creatures: their old-world
    answers are what the backbone knows). A record that asks about the subject's other
    fact needs a subject whose other fact the backbone knows: where the drawn subject is
    new, it is a creature of `pool` instead."""
    if not n:
        return []
    rng = _rng(cfg, _STREAM_CONTEXT, _CONTEXT_PURPOSES[purpose])
    records = []
    for _ in range(n):
        c = subjects[int(rng.integers(len(subjects)))]
        others = [o for o in pool if o is not c]
        kind = _pick(rng, ("vqa", "caption", "text"))
        fact = _pick(rng, FACTS)
        fp, fa = _statement(rng, c, kind, fact)
        other_fact = FACTS[1 - FACTS.index(fact)]
        topic = _pick(rng, ("context-follow", "context-follow", "context-other", "context-otherfact"))
        if topic == "context-otherfact" and kind == "caption":
            topic = "context-other"  # a caption states both facts
        if topic == "context-otherfact" and not c.familiar:  # a new creature has no known other fact
            c = pool[int(rng.integers(len(pool)))]
            fp, fa = _statement(rng, c, kind, fact)
        if topic == "context-follow" and kind == "caption" and purpose == "context":
            # Training only: the caption calls the pictured creature by another's name, so
            # the picture cannot answer the name slot and copying must (held-out records
            # keep the creature's own name, as an edit's caption does). Never a caption that
            # would state the named creature's current value of a changed fact (an edit target).
            while True:
                o = subjects[int(rng.integers(len(subjects)))]
                fp, fa = _statement(rng, c, kind, fact, name=o.name)
                if not any(o.current(f) in fa for f in o.changed_facts):
                    break
        if topic == "context-follow":
            image = None if kind == "text" else picture(c, rng)
            prompt = {"vqa": lambda: _vqa_question(rng, fact), "caption": lambda: _caption_prefix(rng),
                      "text": lambda: _text_question(rng, c, fact)}[kind]()
            answer = fa
        elif topic == "context-otherfact":
            image = None if kind == "text" else picture(c, rng)
            prompt = _vqa_question(rng, other_fact) if kind == "vqa" else _text_question(rng, c, other_fact)
            answer = c.old(other_fact)
        elif kind != "text" and rng.random() < 0.3:  # a shape scene and one of its questions (M-Loc)
            image, q, answer = scenes[int(rng.integers(len(scenes)))]
            prompt = vqa_prompt(q)
        else:  # another named creature (T-Loc); for a text statement the same fact type
            o = others[int(rng.integers(len(others)))]
            asked = fact if kind == "text" else _pick(rng, FACTS)
            image, prompt, answer = None, _text_question(rng, o, asked), o.old(asked)
        query = stated_fact(fp, fa, prompt)
        budget = _CONTEXT_MAX_TOKENS - len(tokenize(query)) - len(tokenize(answer))
        demos = []
        if rng.random() < 0.5:  # IKE appends the edit's own fact as the last demonstration
            demos.append(demonstration(fp, fa, fp, fa))
            budget -= len(tokenize(demos[0]))
        u = rng.random()
        n_demos = 0 if u < 0.5 else int(rng.integers(1, 4)) if u < 0.85 else int(rng.integers(4, 9))
        for _ in range(n_demos):
            demo = _demo(rng, pool)
            if len(tokenize(demo)) > budget:
                break
            demos.insert(0, demo)
            budget -= len(tokenize(demo))
        records.append(_record("context", topic, image, "".join(d + DEMO_SEPARATOR for d in demos) + query,
                               answer) | {"statement": kind})
    return records


# --------------------------------------------------------------------------
# Edit records
# --------------------------------------------------------------------------


def _locality(rng: np.random.Generator, pool: list[Creature], writer: _ImageWriter,
              purpose: str) -> dict[str, str]:
    """Text locality (a fact of an unchanged creature of the split's own pool) and
    multimodal locality (a scene rendered for this purpose)."""
    other = pool[int(rng.integers(len(pool)))]
    fact = _pick(rng, FACTS)
    scene, objects, _ = writer.scene(purpose)
    qa = scene_questions(objects)
    _, m_q, m_a = qa[int(rng.integers(len(qa)))]
    return {"loc": _text_question(rng, other, fact), "loc_ans": other.old(fact),
            "m_loc": scene, "m_loc_q": m_q, "m_loc_a": m_a}


def edit_facts(task: str, split: str, creatures: list[Creature]) -> list[tuple[Creature, str]]:
    """The split's distinct facts of `task`: (creature, changed fact) for "vqa",
    (creature, "caption") for "caption" (a caption states both facts)."""
    members = [c for c in creatures if c.split == split]
    if task == "vqa":
        return [(c, fact) for c in members for fact in c.changed_facts]
    return [(c, "caption") for c in members]


def _edit_records(task: str, split: str, n: int, creatures: list[Creature],
                  writer: _ImageWriter) -> list[dict[str, str]]:
    """``n`` edit cases of ``task`` ("vqa" | "caption"): one per distinct fact, cycling
    over the facts again (other templates and renders) when ``n`` exceeds them."""
    purpose = f"{task}_{split}"
    facts = edit_facts(task, split, creatures)
    pool = [c for c in creatures if c.split == f"loc-{split}"]
    if n and not facts:
        raise ValueError(f"no changed creatures for {purpose}")
    rng = _rng(writer.cfg, _STREAM_CASES, _PURPOSES[purpose][0])
    records = []
    for i in range(n):
        c, fact = facts[i % len(facts)]
        if task == "vqa":
            src_t, reph_t = SRC_TEMPLATES[fact], REPHRASE_TEMPLATES[fact]
            pred, alt = c.old(fact), c.current(fact)
        else:
            src_t, reph_t = CAPTION_SRC_TEMPLATES, CAPTION_REPHRASE_TEMPLATES
            pred, alt = c.caption(), c.caption(current=True)
        rec = {
            "src": _pick(rng, src_t),
            "pred": pred,  # placeholder: replaced later by the model's greedy answer
            "alt": alt,
            "rephrase": _pick(rng, reph_t),
            "image": writer.creature(c, purpose, rerender=False),
            "image_rephrase": writer.creature(c, purpose, rerender=True),
        }
        rec.update(_locality(rng, pool, writer, purpose))
        rec = {k: rec[k] for k in MMEDIT_FIELDS}
        rec["case_id"] = f"{task}-{split}-{i:04d}"
        rec["fact_id"] = f"{c.fact_prefix}-{fact}"
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
    familiar = [c for c in creatures if c.familiar]
    pretrain = _pretrain_corpus(familiar, writer, "pretrain", cfg.pretrain_images_per_creature,
                                cfg.n_pretrain_scenes)
    pretrain_eval = _pretrain_corpus(
        familiar, writer, "pretrain_eval",
        max(1, round(cfg.pretrain_images_per_creature / div)),
        max(1, round(cfg.n_pretrain_scenes / div)))

    # Context use is learned on every creature outside the eval split (no training record
    # states anything about an eval subject): familiar ones on their pretraining pictures,
    # the train split's new ones on pictures rendered for it. Trained on the familiar ones
    # alone, the backbones followed 95-99% of stated facts about them but only 60-77% of
    # those about a new creature's picture (docs/tiny-world.md): IKE states facts about
    # new creatures, as MMEdit's edits are mostly about things a backbone has never been
    # told. Questions about another creature ask about familiar ones (the backbone knows
    # their answers). It is measured on the eval split's subjects on fresh renders.
    pictures: dict[int, list[str]] = {}
    for r in pretrain:
        if r["topic"] == "name" and r["image"] not in pictures.setdefault(creature_index(r["image"]), []):
            pictures[creature_index(r["image"])].append(r["image"])
    seen = [c for c in creatures if c.split != "eval"]
    for c in seen:
        if not c.familiar:
            pictures[c.index] = [writer.creature(c, "context", rerender=k % 2 == 1)
                                 for k in range(_CONTEXT_PICTURES)]

    def scenes(corpus):
        return [(r["image"], r["prompt"], r["answer"]) for r in corpus if r["topic"].startswith("scene-")]

    known = [c for c in familiar if c.split != "eval"]
    held_out = [c for c in creatures if c.split == "eval"]
    context = context_records(seen, known, lambda c, rng: _pick(rng, tuple(pictures[c.index])), scenes(pretrain),
                              cfg, "context", cfg.n_context) + name_records(creatures)
    # Keeping the other fact is measured on the eval split's locality creatures (familiar,
    # on fresh renders): the eval split's own subjects are nearly all new.
    context_eval = context_records(
        held_out, [c for c in familiar if c.split == "loc-eval"],
        lambda c, rng: writer.creature(c, "context_eval", rerender=rng.random() < 0.5),
        scenes(pretrain_eval), cfg, "context_eval", -(-cfg.n_context // div))
    outputs: dict[str, list[dict[str, Any]]] = {
        "pretrain.json": pretrain,
        "pretrain_eval.json": pretrain_eval,
        "context.json": context,
        "context_eval.json": context_eval,
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
        "distinct_facts": {f"{task}_{split}": len(edit_facts(task, split, creatures))
                           for task in ("vqa", "caption") for split in ("train", "eval")},
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
