"""MMEdit records: loading, validation and the five scored inputs of an edit case.

One code path reads the tiny world and the real MMEdit files. Prompt conventions follow
EasyEdit's stable (2024) version: the space between prompt and answer sits on the answer
side, so the prompt's tokens are a clean prefix of prompt + answer (Backbone asserts it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from unike.grid import E_VQA, TASKS

log = logging.getLogger(__name__)

FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
# The five inputs scored after an edit, in the order they are batched.
ROWS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


class DataError(ValueError):
    """A malformed MMEdit file or record; the message names the file, record and field."""


@dataclass(frozen=True)
class Sample:
    """One teacher-forced input: the answer's tokens are scored given image + prompt."""

    image: Path | None
    prompt: str
    answer: str


@dataclass(frozen=True)
class EditCase:
    case_id: str
    # Cases that edit one fact (several images or phrasings of it) share a fact_id; the
    # report resamples facts, not cases, since such cases are not independent.
    fact_id: str
    task: str
    src: str
    pred: str
    alt: str
    rephrase: str
    image: Path
    image_rephrase: Path
    loc: str
    loc_ans: str
    m_loc: Path
    m_loc_q: str
    m_loc_a: str


def vqa_prompt(question: str) -> str:
    return f"Question: {question} Short answer:"


def edit_prompt(task: str, text: str) -> str:
    return vqa_prompt(text) if task == E_VQA else text


def edit_sample(case: EditCase) -> Sample:
    """The input the edit is made on: (image, src -> alt)."""
    return Sample(case.image, edit_prompt(case.task, case.src), case.alt)


def case_samples(case: EditCase) -> list[Sample]:
    """The scored inputs of a case, in `ROWS` order. M-Loc always uses the VQA wrapping."""
    return [
        edit_sample(case),
        Sample(case.image, edit_prompt(case.task, case.rephrase), case.alt),
        Sample(case.image_rephrase, edit_prompt(case.task, case.src), case.alt),
        Sample(None, case.loc, case.loc_ans),
        Sample(case.m_loc, vqa_prompt(case.m_loc_q), case.m_loc_a),
    ]


def _check_record(record, path: Path, index: int, image_root: Path) -> None:
    def fail(field: str, why: str):
        raise DataError(f"{path}: record {index}: field {field!r}: {why}")

    if not isinstance(record, dict):
        fail("<record>", f"expected a JSON object, got {type(record).__name__}")
    for f in FIELDS:
        if f not in record:
            fail(f, "missing")
        if not isinstance(record[f], str):
            fail(f, f"expected a string, got {type(record[f]).__name__}")
    for f in ("src", "alt", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a"):
        if not record[f].strip():
            fail(f, "empty")
    if "fact_id" in record and not (isinstance(record["fact_id"], str) and record["fact_id"].strip()):
        fail("fact_id", f"expected a non-empty string, got {record['fact_id']!r}")
    for f in IMAGE_FIELDS:
        if not (image_root / record[f]).is_file():
            fail(f, f"image not found: {image_root / record[f]}")


def load_cases(path: Path, task: str, image_root: Path, skip_bad: bool = False, limit: int | None = None) -> list[EditCase]:
    """Read one MMEdit split. Bad records raise `DataError`, or are skipped and logged
    when `skip_bad` is set. `limit` keeps the first valid cases."""
    path, image_root = Path(path), Path(image_root)
    if task not in TASKS:
        raise DataError(f"{path}: unknown task {task!r} (expected one of {TASKS})")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")

    cases, skipped = [], []
    for i, r in enumerate(records):
        try:
            _check_record(r, path, i, image_root)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        fields = {f: (image_root / r[f] if f in IMAGE_FIELDS else r[f]) for f in FIELDS}
        case_id = str(r.get("case_id") or f"{path.stem}-{i:05d}")
        # Real MMEdit records carry no fact_id: each case is its own fact.
        cases.append(EditCase(case_id=case_id, fact_id=r.get("fact_id", case_id), task=task, **fields))
        if limit is not None and len(cases) >= limit:
            break
    if skipped:
        log.warning("%s: skipped %d bad records:\n  %s", path, len(skipped), "\n  ".join(skipped))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate case_id values")
    return cases
