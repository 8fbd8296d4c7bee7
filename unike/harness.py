"""The editing harness: pre-edit predictions, edit sequences, scoring.

Every regime is a list of sequences: one-step editing is sequences of one case; seq-K
edits K cases one after another and scores all of them after the K-th edit (paper
Appendix B.2); cross-task sequences mix tasks. The model is loaded once per job; each
case's five scored inputs go through the model as one batch; pre-edit predictions are
computed once per (backbone, dataset) and read back from a file.

Each case's batch is exactly the same before and after editing, so a no-op edit gives
bit-identical logits and a locality of exactly 1.

The pre-edit pass also keeps each case's residual stream entering one layer (the first of
UniKE's edited layers, the lowest any built-in intrinsic editor edits), written to a
safetensors file as it goes (`pre_edit_predictions`, `PreEditStreams`). Scoring after an
edit starts from it for an editor that changes nothing below that layer
(`Editor.lowest_edited_layer`): the layers below would compute the same tensor again,
bit for bit, for every method and regime that scores the case.

In multi-edit sequences the harness can also follow how far the edits move the weights
(`weight_drift`): |W - W0| / |W0| over the parameters an editor changes in place, after
each edit, for editors that keep those parameters' unedited values in `Editor.snapshot`
(FT, KE, MEND). Editors that add parameters (T-Patcher, UniKE) or edit
none (IKE, SERAC) have no drift to report.
"""

from __future__ import annotations

import json
import logging
import math
import random
import struct
import time
from pathlib import Path

import torch
from safetensors import safe_open

from unike.backbones import Backbone, Stream, answer_predictions
from unike.data import ROWS, EditCase, case_samples
from unike.editing import Editor
from unike.grid import regime as regime_named
from unike.metrics import score_case
from unike.store import atomic_write

log = logging.getLogger(__name__)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@torch.no_grad()
def pre_edit_predictions(backbone: Backbone, cases: list[EditCase], streams: tuple[Path, int] | None = None
                         ) -> dict[str, dict[str, list[int]]]:
    """The unedited model's predictions on every scored input of `cases`. With `streams`
    = (path, layer): each case's residual stream entering decoder `layer` (B, T, d), from
    the same forward pass, written to the safetensors file `path` one case at a time (a
    real backbone's eval split holds gigabytes of them: they never sit in memory together;
    the header, written first, takes the shapes from the tokenised batches)."""
    batches = [backbone.encode(case_samples(case)) for case in cases]
    out: dict[str, dict[str, list[int]]] = {}
    captured: dict[str, torch.Tensor] = {}  # the stream of the pass that runs
    header: dict = {}  # the streams file's: every case's shape and place, then the layer

    def run(write=None) -> None:
        for i, (case, batch) in enumerate(zip(cases, batches)):
            logits = backbone.logits(batch)
            out[case.case_id] = {row: p.tolist() for row, p in zip(ROWS, answer_predictions(logits, batch))}
            if write is not None:
                hidden = captured.pop("hidden")
                if list(hidden.shape) != header[case.case_id]["shape"] or hidden.dtype != dtype:
                    raise ValueError(f"pre-edit streams: {case.case_id}'s stream is {hidden.dtype} "
                                     f"{list(hidden.shape)}, the file's header says {dtype} "
                                     f"{header[case.case_id]['shape']}")
                write(hidden)
            if (i + 1) % 50 == 0:
                log.info("pre-edit predictions: %d/%d cases", i + 1, len(cases))

    if streams is None:
        run()
        return out
    path, layer = streams
    handle = backbone.text.layers[layer].register_forward_pre_hook(
        lambda _m, args, kwargs: captured.__setitem__("hidden", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)
    dtype, width = backbone.dtype, backbone.model.get_input_embeddings().embedding_dim
    offset = 0
    for case, batch in zip(cases, batches):
        shape = [len(batch), batch.input_ids.shape[1], width]
        size = math.prod(shape) * dtype.itemsize
        header[case.case_id] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape,
                                "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"layer": str(layer)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            run(lambda hidden: fh.write(hidden.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))

    try:
        atomic_write(path, write_file)
    finally:
        handle.remove()
    return out


class PreEditStreams:
    """The streams `pre_edit_predictions` wrote (one file per task, all at one layer),
    read one case at a time from the memory-mapped files."""

    def __init__(self, paths: list[Path]):
        self._owner, layers = {}, set()
        for path in paths:
            f = safe_open(str(path), "pt")
            layers.add(int(f.metadata()["layer"]))
            self._owner.update(dict.fromkeys(f.keys(), f))
        if len(layers) != 1:
            raise ValueError(f"pre-edit streams: expected one layer in {[str(p) for p in paths]}, got {sorted(layers)}")
        self.layer = layers.pop()

    def for_editor(self, editor: Editor, case: EditCase) -> Stream | None:
        """`case`'s stream if scoring may start from it for `editor` (it changes nothing
        below the stream's layer), else None: the whole model runs."""
        lowest = editor.lowest_edited_layer
        if lowest is None or lowest < self.layer:
            return None
        if case.case_id not in self._owner:
            raise KeyError(f"pre-edit streams: none for case {case.case_id} (re-run cache_pre_edit)")
        return Stream(self.layer, self._owner[case.case_id].get_tensor(case.case_id))


def save_pre_edit(path: Path, preds: dict, backbone_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"backbone": backbone_name, "cases": preds}, sort_keys=True) + "\n")


def pre_edit_tensors(preds: dict[str, dict[str, list[int]]], cases: list[EditCase],
                     source: str = "pre-edit predictions") -> dict[str, dict[str, torch.Tensor]]:
    """`pre_edit_predictions` output (or its cached JSON) as the tensors scoring compares with."""
    missing = [c.case_id for c in cases if c.case_id not in preds]
    if missing:
        raise KeyError(f"{source}: no pre-edit predictions for cases {missing[:5]} (re-run cache_pre_edit)")
    return {c.case_id: {row: torch.tensor(v, dtype=torch.long) for row, v in preds[c.case_id].items()} for c in cases}


def load_pre_edit(path: Path, cases: list[EditCase]) -> dict[str, dict[str, torch.Tensor]]:
    return pre_edit_tensors(json.loads(Path(path).read_text(encoding="utf-8"))["cases"], cases, str(path))


def make_sequences(cases_by_task: dict[str, list[EditCase]], regime: str, seed: int) -> list[list[EditCase]]:
    """Deterministic edit sequences for a regime. Multi-edit regimes keep only full
    sequences; a task-mixing regime's sequences hold length/2 cases of each of two tasks."""
    spec = regime_named(regime)
    k = spec.length
    rng = random.Random(seed)
    if spec.mixes_tasks:
        if len(cases_by_task) != 2:
            raise ValueError(f"{regime} needs cases of exactly two tasks, got {sorted(cases_by_task)}")
        halves = []
        for task in sorted(cases_by_task):
            pool = list(cases_by_task[task])
            rng.shuffle(pool)
            halves.append([pool[i : i + k // 2] for i in range(0, len(pool) - k // 2 + 1, k // 2)])
        return [a + b for a, b in zip(*halves)]
    if len(cases_by_task) != 1:
        raise ValueError(f"{regime} takes one task, got {sorted(cases_by_task)}")
    pool = list(next(iter(cases_by_task.values())))
    if k == 1:
        return [[c] for c in pool]
    rng.shuffle(pool)
    return [pool[i : i + k] for i in range(0, len(pool) - k + 1, k)]


@torch.no_grad()
def weight_drift(editor: Editor) -> float | None:
    """|W - W0| / |W0| of the parameters the editor changes in place, taken together as one
    vector; None for an editor without a snapshot."""
    snapshot = editor.snapshot
    if snapshot is None:
        return None
    moved = sum(float((p.float() - snapshot.saved[n].float()).norm() ** 2) for n, p in snapshot.params.items())
    size = sum(float(w.float().norm() ** 2) for w in snapshot.saved.values())
    return math.sqrt(moved / size)


def drift_summary(drift: list[list[float]]) -> dict:
    """Per edit position k, the mean and max over sequences of the drift after the k-th edit
    (non-finite values, of weights that blew up, as None: provenance JSON has no NaN)."""
    def finite(x: float) -> float | None:
        return round(x, 6) if math.isfinite(x) else None

    steps = list(zip(*drift))
    return {"definition": "|W - W0| / |W0| of the edited parameters after the k-th edit of a sequence",
            "n_sequences": len(drift), "after_edit_mean": [finite(sum(s) / len(s)) for s in steps],
            "after_edit_max": [finite(max(s)) for s in steps]}


def run_sequences(editor: Editor, sequences: list[list[EditCase]], pre_edit: dict[str, dict[str, torch.Tensor]],
                  progress_every: int = 10, drift: list[list[float]] | None = None,
                  streams: PreEditStreams | None = None) -> list[dict]:
    """Edit each sequence, score every case of it after its last edit, restore. Given a
    `drift` list, each multi-edit sequence of an editor with a drift (`weight_drift`)
    appends its drift after each of its edits. Given `streams`, scoring starts from each
    case's cached stream where the editor allows it (`PreEditStreams.for_editor`)."""
    if any(len(s) > 1 for s in sequences) and not type(editor).supports_sequential(editor.hparams):
        raise ValueError(f"{type(editor).__name__} does not support sequential editing")
    rows, t_start, n_done = [], time.time(), 0
    total = sum(len(s) for s in sequences)
    follow = drift is not None and editor.snapshot is not None
    for seq_id, sequence in enumerate(sequences):
        edit_times, steps = [], []
        for case in sequence:
            t0 = time.perf_counter()
            editor.edit(case)
            edit_times.append(time.perf_counter() - t0)
            if follow and len(sequence) > 1:
                steps.append(weight_drift(editor))
        if steps:
            drift.append(steps)
        for case, edit_s in zip(sequence, edit_times):
            stream = streams.for_editor(editor, case) if streams is not None else None
            samples = case_samples(case)
            preds, targets = editor.predict(samples) if stream is None else editor.predict(samples, stream)
            scores = score_case(dict(zip(ROWS, preds)), dict(zip(ROWS, targets)), pre_edit[case.case_id])
            rows.append({"case_id": case.case_id, "fact_id": case.fact_id, "task": case.task, "sequence_id": seq_id,
                         **scores, "edit_s": edit_s})
        editor.restore()
        n_done += len(sequence)
        if n_done % progress_every < len(sequence) or n_done == total:
            elapsed = time.time() - t_start
            log.info("edited %d/%d cases (%.1f s, ETA %.0f s)", n_done, total, elapsed,
                     elapsed / n_done * (total - n_done))
    return rows
