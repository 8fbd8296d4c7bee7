"""The editor protocol and the registry that finds editors by name.

An editor is prepared once per (backbone, task) run, then applies edits one after the
other (a sequence; one-step editing is a sequence of one), predicts on scored inputs, and
restores the unedited backbone bit-exactly before the next sequence. Capability flags
(`needs_training`, `needs_knowledge`, an instance's `lowest_edited_layer`) and capability
classmethods of the parsed hyperparameters (`supports_sequential`, `prepare_key`) let
config validation, the workflow and the harness decide what to run without knowing
method names.

A config entry names its editor class by import path ("baselines.ft:FineTune"); the
module is imported only when that method runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import ClassVar

import torch

from unike.backbones import Backbone, Stream, answer_predictions
from unike.data import EditCase, Sample


@dataclasses.dataclass(frozen=True)
class NoHparams:
    pass


class Editor:
    needs_training: ClassVar[bool] = False  # True: `prepare` runs once per (backbone, task) before editing
    needs_knowledge: ClassVar[bool] = False  # True: gets UniKE's per-backbone knowledge folder (`knowledge=`)
    Hparams: ClassVar[type] = NoHparams
    # Attributes kept in float32 whatever the backbone's dtype, each with the reason.
    # Everything else an editor holds or adds to the model is in the model's dtype
    # (`Backbone.dtype`; tests/test_bf16.py checks both).
    float32_parts: ClassVar[dict[str, str]] = {}
    # The unedited values of the weights the editor changes in place (FT, KE, MEND), which
    # `restore` puts back and sequential runs measure the drift against; None for editors
    # that add parameters or change none.
    snapshot: "ParamSnapshot | None" = None
    # The lowest decoder layer this editor's edits change, for an editor whose `predict`
    # runs the backbone on the samples as given (`predict`'s `stream`); None where
    # `predict` adds to the input or answers from another model (IKE, SERAC), or where
    # the editor makes no such promise: scoring then runs the whole model.
    lowest_edited_layer: int | None = None

    @classmethod
    def supports_sequential(cls, hparams) -> bool:
        """Whether edits stack (seq-10, seq-20, cross-10) with these parsed hyperparameters;
        config validation refuses sequential grid cells of a method that answers False."""
        return True

    @classmethod
    def prepare_key(cls, hparams) -> tuple:
        """What `prepare` reads of the parsed hyperparameters. Methods of one editor class
        with equal keys share one prepared folder (UniKE's variants use the same FFN
        memory); by default every hyperparameter counts."""
        return tuple(sorted(dataclasses.asdict(hparams).items()))

    @classmethod
    def unread_hparams(cls, hparams) -> frozenset[str]:
        """The hyperparameters that editing with these parsed values never reads (a UniKE
        variant without neurons reads none of theirs). A grid cell's settings hash leaves
        them out, so changing one reruns only the cells that read it; by default every
        hyperparameter is read."""
        return frozenset()

    @classmethod
    def local_paths(cls, hparams) -> dict[str, Path]:
        """Files or folders from outside the DAG that these hyperparameters name (an auxiliary
        model, an embedder), by hyperparameter: a real run checks they exist before any job."""
        return {}

    def __init__(self, backbone: Backbone, hparams: dict | None = None, prepared: Path | None = None,
                 knowledge: Path | None = None):
        self.backbone = backbone
        self.hparams = parse_hparams(self.Hparams, hparams or {}, type(self).__name__)
        if self.needs_training and prepared is None:
            raise ValueError(f"{type(self).__name__} needs the folder written by its `prepare` step")
        if self.needs_knowledge and knowledge is None:
            raise ValueError(f"{type(self).__name__} needs the knowledge folder (triplet states and encoders)")
        self.prepared = prepared
        self.knowledge = knowledge

    @classmethod
    def prepare(cls, backbone: Backbone, hparams, train_cases: list[EditCase], out_dir: Path, seed: int,
                **knowledge) -> dict:
        """Train what the method needs (hypernetwork, classifier, demo bank) on the train
        split, write it under `out_dir`, and return a summary (losses, timings) to record.
        `hparams` is the parsed `Hparams` instance; editors with `needs_knowledge` also get
        `knowledge=` the knowledge folder."""
        raise NotImplementedError(f"{cls.__name__} needs no preparation")

    def edit(self, case: EditCase) -> None:
        """Apply one edit on top of the edits already applied."""
        raise NotImplementedError

    def restore(self) -> None:
        """Undo every edit: the backbone's weights must be bit-identical afterwards."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the editor installed on the backbone for its whole life (hooks,
        patches), after the last `restore`. The caller calls it once, also after a failure."""

    @torch.no_grad()
    def predict(self, samples: list[Sample], stream: Stream | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Argmax predictions and targets at the answer positions of each sample, batched.
        `stream`: the samples' residual stream entering a layer at or below
        `lowest_edited_layer`, cached before any edit; the layers from there up run.
        Editors that change the input (in-context methods) or route between models
        override this (and take no stream)."""
        batch = self.backbone.encode(samples)
        return answer_predictions(self.backbone.logits(batch, stream), batch), batch.answer_targets()


class NoEdit(Editor):
    """The unedited backbone: the reference row of every table."""

    def edit(self, case: EditCase) -> None:
        pass

    def restore(self) -> None:
        pass


class ParamSnapshot:
    """Copies of the parameters an editor changes, for a bit-exact restore."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.saved = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.saved[name])


def parse_hparams(cls: type, values: dict, owner: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{owner}: unknown hyperparameter(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def resolve_editor(spec: str) -> type[Editor]:
    """Import "package.module:ClassName" and check it is an Editor."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"editor spec {spec!r} must look like 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load editor {spec!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise ValueError(f"{spec!r} is not an Editor subclass")
    return cls


def preparation(entry: dict, owner: str) -> tuple[str, str]:
    """What a method entry's `prepare` depends on of its entry: its editor and `prepare_key`.
    Entries with equal preparations share one prepared folder."""
    cls = resolve_editor(entry["editor"])
    return entry["editor"], repr(cls.prepare_key(parse_hparams(cls.Hparams, entry.get("hparams", {}), owner)))


def prepare_owners(methods: dict[str, dict]) -> dict[str, str]:
    """For each method that needs training, the method whose prepared folder it uses: the
    first method, in the config's order, with the same editor class and the same
    `prepare_key` (a base method before its variants)."""
    owners, first = {}, {}
    for name in methods:
        cls = resolve_editor(methods[name]["editor"])
        if not cls.needs_training:
            continue
        owners[name] = first.setdefault(preparation(methods[name], name), name)
    return owners


def create_editor(method_cfg: dict, backbone: Backbone, prepared: Path | None = None,
                  knowledge: Path | None = None) -> Editor:
    cls = resolve_editor(method_cfg["editor"])
    extra = {"knowledge": knowledge} if cls.needs_knowledge else {}
    return cls(backbone, method_cfg.get("hparams", {}), prepared, **extra)
