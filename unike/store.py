"""Result storage: per-run Parquet + provenance JSON, aggregated into one DuckDB.

Each evaluation job calls :func:`write_run` once; the aggregate step calls
:func:`aggregate` over all finished jobs; reports open the result with
:func:`open_readonly`. This module must stay free of torch/model imports so
that the aggregate and report steps run on machines without a GPU stack.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from unike.grid import REGIMES, RUN_TASKS, TASKS, case_tasks

# Ordered schemas. Values are the logical types; the Parquet / DuckDB types are
# derived from them so the three never drift apart.
EDIT_METRIC_COLUMNS: dict[str, str] = {
    "run_id": "str",
    "case_id": "str",
    "fact_id": "str",  # cases sharing one are not independent (see reports.stats)
    "task": "str",
    "sequence_id": "int64",
    "rel": "float64",
    "t_gen": "float64",
    "m_gen": "float64",
    "t_loc": "float64",
    "m_loc": "float64",
    "rel_em": "float64",
    "t_gen_em": "float64",
    "m_gen_em": "float64",
    "edit_s": "float64",
}
RUN_COLUMNS: dict[str, str] = {
    "run_id": "str",
    "method": "str",
    "backbone": "str",
    "task": "str",
    "regime": "str",
    "seed": "int64",
    "n_edits": "int64",
    "config_hash": "str",
    "code_version": "str",
    "metric_version": "str",
    "device": "str",
    "dtype": "str",  # what the text model ran in, after any fallback (the CPU's float32)
    "dtype_requested": "str",  # what the config asked for
    "wall_s": "float64",
    "edit_s_mean": "float64",
    "peak_mem_mb": "float64",
}
# Metric columns are scores in [0, 1]; edit_s is a duration and only needs >= 0.
METRIC_COLUMNS: tuple[str, ...] = (
    "rel", "t_gen", "m_gen", "t_loc", "m_loc", "rel_em", "t_gen_em", "m_gen_em",
)

_ARROW_TYPES = {"str": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
_SQL_TYPES = {"str": "VARCHAR", "int64": "BIGINT", "float64": "DOUBLE"}
EDIT_METRICS_SCHEMA = pa.schema(
    [pa.field(name, _ARROW_TYPES[kind], nullable=False) for name, kind in EDIT_METRIC_COLUMNS.items()]
)


# --------------------------------------------------------------------------- validation

def _check_type(value: Any, kind: str) -> Any:
    """Return ``value`` coerced to ``kind`` or raise ``TypeError``/``ValueError``."""
    # bool is an int subclass; a True in a metric column is almost surely a bug.
    if isinstance(value, bool):
        raise TypeError(f"expected {kind}, got bool")
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise TypeError(f"expected a non-empty str, got {value!r}")
        return value
    # numbers.* rather than int/float so numpy scalars (np.int64, np.float32) from eval code pass.
    if kind == "int64":
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"expected int, got {type(value).__name__} {value!r}")
        return int(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _validate_record(
    record: Mapping[str, Any],
    columns: Mapping[str, str],
    where: str,
    allow_extra: bool,
    extra_checks: Callable[[str, Any], str | None],
) -> dict[str, Any]:
    """Check one record against a schema; return the coerced record (schema columns only)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
    missing = [c for c in columns if c not in record]
    if missing:
        raise ValueError(f"{where}: field {missing[0]!r} is missing")
    if not allow_extra:
        extra = sorted(set(record) - set(columns))
        if extra:
            raise ValueError(f"{where}: field {extra[0]!r} is not in the schema")
    out: dict[str, Any] = {}
    for name, kind in columns.items():
        try:
            value = _check_type(record[name], kind)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: field {name!r}: {exc}") from None
        problem = extra_checks(name, value)
        if problem:
            raise ValueError(f"{where}: field {name!r}: {problem}")
        out[name] = value
    return out


def _row_checks(name: str, value: Any) -> str | None:
    if name in METRIC_COLUMNS and not 0.0 <= value <= 1.0:
        return f"value {value!r} is not in [0, 1]"
    if name == "edit_s" and value < 0:
        return f"value {value!r} is negative"
    if name == "task" and value not in TASKS:
        return f"task {value!r} is not one of {list(TASKS)}"
    return None


def _run_checks(name: str, value: Any) -> str | None:
    if name == "task" and value not in RUN_TASKS:
        return f"task {value!r} is not one of {list(RUN_TASKS)}"
    if name == "regime" and value not in REGIMES:
        return f"regime {value!r} is not one of {list(REGIMES)}"
    if name in ("seed", "n_edits", "wall_s", "edit_s_mean", "peak_mem_mb") and value < 0:
        return f"value {value!r} is negative"
    return None


def validate_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a provenance dict; return a copy with RUN_COLUMNS coerced (extra keys kept)."""
    run_id = provenance.get("run_id", "?") if isinstance(provenance, Mapping) else "?"
    checked = _validate_record(provenance, RUN_COLUMNS, f"run {run_id!r}: provenance",
                               allow_extra=True, extra_checks=_run_checks)
    return {**provenance, **checked}


def validate_rows(rows: Iterable[Mapping[str, Any]], provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validate per-case rows of one (already validated) run; return coerced copies."""
    run_id, run_task = provenance["run_id"], provenance["task"]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"run {run_id!r}: row {i}"
        checked = _validate_record(row, EDIT_METRIC_COLUMNS, where, allow_extra=False, extra_checks=_row_checks)
        # Rows must belong to the run they are filed under, or aggregation would mix runs.
        if checked["run_id"] != run_id:
            raise ValueError(f"{where}: field 'run_id': {checked['run_id']!r} differs from the provenance")
        if checked["task"] not in case_tasks(run_task):
            raise ValueError(f"{where}: field 'task': {checked['task']!r} is not a task of the run's task {run_task!r}")
        # (run_id, case_id) is the primary key of edit_metrics.
        if checked["case_id"] in seen:
            raise ValueError(f"{where}: field 'case_id': duplicate case_id {checked['case_id']!r}")
        seen.add(checked["case_id"])
        out.append(checked)
    return out


# --------------------------------------------------------------------------- writing

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` into a temp file next to ``path``, then rename over it.

    Same directory so that ``os.replace`` is an atomic rename on one filesystem;
    a killed job leaves at most a stray ``.tmp`` file, never a half-written result.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _provenance_json(provenance: Mapping[str, Any]) -> str:
    # sort_keys makes the text (and the DB column built from it) deterministic.
    return json.dumps(provenance, sort_keys=True, indent=2, allow_nan=False) + "\n"


def write_run(parquet_path: Path, provenance_path: Path, rows: list[dict], provenance: dict) -> None:
    """Validate and atomically write one run's per-case Parquet and provenance JSON.

    Raises ``ValueError`` naming the run, row index and field on any violation;
    nothing is written in that case. The provenance is written last so that its
    presence marks a complete run.
    """
    prov = validate_provenance(provenance)
    table = pa.Table.from_pylist(validate_rows(rows, prov), schema=EDIT_METRICS_SCHEMA)
    text = _provenance_json(prov)
    atomic_write(Path(parquet_path), lambda tmp: pq.write_table(table, tmp))
    atomic_write(Path(provenance_path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- aggregation

def _create_tables(con: duckdb.DuckDBPyConnection) -> None:
    run_cols = ",\n  ".join(f"{n} {_SQL_TYPES[k]} NOT NULL" for n, k in RUN_COLUMNS.items())
    case_cols = ",\n  ".join(f"{n} {_SQL_TYPES[k]} NOT NULL" for n, k in EDIT_METRIC_COLUMNS.items())
    con.execute(f"CREATE TABLE runs (\n  {run_cols},\n  provenance VARCHAR NOT NULL,\n  PRIMARY KEY (run_id)\n)")
    con.execute(
        f"CREATE TABLE edit_metrics (\n  {case_cols},\n  PRIMARY KEY (run_id, case_id),\n"
        "  FOREIGN KEY (run_id) REFERENCES runs (run_id)\n)"
    )


def _load_run(parquet_path: Path, provenance_path: Path) -> tuple[dict[str, Any], pa.Table]:
    """Read and re-validate one run (files may come from older code or by hand)."""
    prov = validate_provenance(json.loads(Path(provenance_path).read_text(encoding="utf-8")))
    table = pq.read_table(parquet_path)
    if table.column_names != list(EDIT_METRIC_COLUMNS):
        raise ValueError(f"run {prov['run_id']!r}: {parquet_path}: columns {table.column_names} "
                         f"differ from the schema {list(EDIT_METRIC_COLUMNS)}")
    file_ids = set(table.column("run_id").to_pylist())
    if file_ids - {prov["run_id"]}:
        raise ValueError(f"run {prov['run_id']!r}: {parquet_path} holds run_id(s) "
                         f"{sorted(file_ids - {prov['run_id']})} that differ from {provenance_path}")
    rows = validate_rows(table.to_pylist(), prov)
    return prov, pa.Table.from_pylist(rows, schema=EDIT_METRICS_SCHEMA)


def aggregate(run_files: list[tuple[Path, Path]], db_path: Path) -> None:
    """Build the DuckDB at ``db_path`` from scratch out of (parquet, provenance) pairs.

    The database is written to a temp file and renamed into place, so readers
    never see a partial DB and a failed aggregate leaves the old one intact.
    Rows are inserted in (run_id, case_id) order so the result does not depend
    on the order of ``run_files``.
    """
    db_path = Path(db_path)
    runs: dict[str, tuple[dict[str, Any], pa.Table, Path]] = {}
    for parquet_path, provenance_path in run_files:
        prov, table = _load_run(Path(parquet_path), Path(provenance_path))
        if prov["run_id"] in runs:
            raise ValueError(f"run {prov['run_id']!r}: duplicate run_id in {provenance_path} "
                             f"(already read from {runs[prov['run_id']][2]})")
        runs[prov["run_id"]] = (prov, table, Path(provenance_path))

    run_ids = sorted(runs)
    run_rows = [
        tuple(runs[r][0][c] for c in RUN_COLUMNS) + (_provenance_json(runs[r][0]),) for r in run_ids
    ]
    cases = pa.concat_tables([runs[r][1] for r in run_ids]) if run_ids else EDIT_METRICS_SCHEMA.empty_table()
    cases = cases.sort_by([("run_id", "ascending"), ("case_id", "ascending")])

    db_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{db_path.name}.", suffix=".tmp", dir=db_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # DuckDB refuses to open an empty non-DuckDB file; we only wanted a unique name.
    try:
        with duckdb.connect(str(tmp)) as con:
            _create_tables(con)
            if run_rows:
                placeholders = ", ".join("?" * (len(RUN_COLUMNS) + 1))
                con.executemany(f"INSERT INTO runs VALUES ({placeholders})", run_rows)
            con.register("cases_in", cases)
            con.execute("INSERT INTO edit_metrics SELECT * FROM cases_in ORDER BY run_id, case_id")
            con.unregister("cases_in")
            con.execute("CHECKPOINT")
        os.replace(tmp, db_path)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)


def open_readonly(db_path: Path) -> duckdb.DuckDBPyConnection:
    """Open the aggregated DB read-only (reports must never modify results)."""
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"no DuckDB at {db_path}")
    return duckdb.connect(str(db_path), read_only=True)
