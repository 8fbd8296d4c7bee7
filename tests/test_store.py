from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import pytest

from unike.store import (
    EDIT_METRIC_COLUMNS,
    RUN_COLUMNS,
    aggregate,
    open_readonly,
    write_run,
)


def make_row(rid: str, i: int, **over) -> dict:
    row = {
        "run_id": rid, "case_id": f"c{i:03d}", "fact_id": f"f{i // 2}", "task": "e-vqa", "sequence_id": i,
        "rel": 1.0, "t_gen": 0.5, "m_gen": 0.25, "t_loc": 0.75, "m_loc": 0.0,
        "rel_em": 1.0, "t_gen_em": 0.0, "m_gen_em": 1, "edit_s": 0.125,
    }
    row.update(over)
    return row


def make_prov(run_id: str, **over) -> dict:
    prov = {
        "run_id": run_id, "method": "ft", "backbone": "tiny-blip2-opt", "task": "e-vqa",
        "regime": "one-step", "seed": 0, "n_edits": 2, "config_hash": "abc123",
        "code_version": "deadbeef", "metric_version": "1", "device": "cpu",
        "dtype": "float32", "dtype_requested": "bfloat16",  # the CPU's float32 fallback
        "wall_s": 12.5, "edit_s_mean": 0.125, "peak_mem_mb": 512.0,
        "hparams": {"lr": 1e-4}, "versions": {"torch": "2.x"},
    }
    prov.update(over)
    return prov


def write(tmp: Path, run_id: str, rows=None, **prov_over) -> tuple[Path, Path]:
    pq, pj = tmp / f"{run_id}.parquet", tmp / f"{run_id}.json"
    rows = rows if rows is not None else [make_row(run_id, 1), make_row(run_id, 0, rel=0.5)]
    write_run(pq, pj, rows, make_prov(run_id, **prov_over))
    return pq, pj


def dump(db: Path) -> dict[str, list[tuple]]:
    with open_readonly(db) as con:
        return {t: con.execute(f"SELECT * FROM {t}").fetchall() for t in ("runs", "edit_metrics")}


@pytest.mark.parametrize(
    "field, value",
    [("rel", 1.5), ("m_loc", -0.1), ("t_gen", math.nan), ("rel_em", math.inf), ("task", "vqa"),
     ("edit_s", -1.0), ("sequence_id", "3"), ("rel", "0.5"), ("rel", True), ("run_id", "other"), ("fact_id", "")],
)
def test_bad_value_names_row_and_field(tmp_path: Path, field: str, value) -> None:
    rows = [make_row("r1", 0), make_row("r1", 1, **{field: value})]
    with pytest.raises(ValueError) as exc:
        write_run(tmp_path / "r1.parquet", tmp_path / "r1.json", rows, make_prov("r1"))
    msg = str(exc.value)
    assert "'r1'" in msg and "row 1" in msg and repr(field) in msg
    assert list(tmp_path.iterdir()) == []  # nothing (not even a temp file) written


def test_missing_and_extra_fields(tmp_path: Path) -> None:
    row = make_row("r1", 1)
    del row["m_loc"]
    with pytest.raises(ValueError, match=r"row 1: field 'm_loc' is missing"):
        write_run(tmp_path / "a.parquet", tmp_path / "a.json", [make_row("r1", 0), row], make_prov("r1"))
    with pytest.raises(ValueError, match=r"row 0: field 'bogus' is not in the schema"):
        write_run(tmp_path / "a.parquet", tmp_path / "a.json", [make_row("r1", 0, bogus=1)], make_prov("r1"))
    with pytest.raises(ValueError, match=r"row 1: field 'case_id': duplicate"):
        write_run(tmp_path / "a.parquet", tmp_path / "a.json", [make_row("r1", 0)] * 2, make_prov("r1"))


@pytest.mark.parametrize("field, value", [("regime", "seq-5"), ("task", "vqa"), ("seed", 1.5), ("wall_s", math.nan)])
def test_bad_provenance(tmp_path: Path, field: str, value) -> None:
    with pytest.raises(ValueError, match=rf"run 'r1': provenance: field '{field}'"):
        write_run(tmp_path / "a.parquet", tmp_path / "a.json", [make_row("r1", 0)], make_prov("r1", **{field: value}))
    prov = make_prov("r1")
    del prov["device"]
    with pytest.raises(ValueError, match=r"field 'device' is missing"):
        write_run(tmp_path / "a.parquet", tmp_path / "a.json", [make_row("r1", 0)], prov)


def test_round_trip(tmp_path: Path) -> None:
    files = [write(tmp_path, "r2", task="e-ic", rows=[make_row("r2", 0, task="e-ic")]), write(tmp_path, "r1")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.json", "r1.parquet", "r2.json", "r2.parquet"]
    db = tmp_path / "results.duckdb"
    aggregate(files, db)
    with open_readonly(db) as con:
        assert [d[0] for d in con.execute("SELECT * FROM edit_metrics").description] == list(EDIT_METRIC_COLUMNS)
        assert [d[0] for d in con.execute("SELECT * FROM runs").description] == [*RUN_COLUMNS, "provenance"]
        cases = con.execute("SELECT run_id, case_id, fact_id, rel, m_gen_em, sequence_id FROM edit_metrics").fetchall()
        assert cases == [("r1", "c000", "f0", 0.5, 1.0, 0), ("r1", "c001", "f0", 1.0, 1.0, 1),
                         ("r2", "c000", "f0", 1.0, 1.0, 0)]
        run = con.execute("SELECT method, seed, wall_s, dtype, dtype_requested, provenance FROM runs "
                          "WHERE run_id = 'r1'").fetchone()
        assert run[:5] == ("ft", 0, 12.5, "float32", "bfloat16")
        assert json.loads(run[5])["hparams"] == {"lr": 1e-4}
        with pytest.raises(duckdb.Error):  # read-only
            con.execute("DELETE FROM runs")


def test_aggregate_is_deterministic(tmp_path: Path) -> None:
    files = [write(tmp_path, f"r{i}") for i in range(3)]
    db = tmp_path / "out" / "results.duckdb"
    aggregate(files, db)
    first = dump(db)
    aggregate(list(reversed(files)), db)  # rebuild over the existing DB, other input order
    assert dump(db) == first
    assert sorted(p.name for p in db.parent.iterdir()) == ["results.duckdb"]  # no temp leftovers


def test_aggregate_rejects_duplicates_and_mismatches(tmp_path: Path) -> None:
    a = write(tmp_path, "r1")
    (tmp_path / "dup").mkdir()
    b = write(tmp_path / "dup", "r1")
    db = tmp_path / "results.duckdb"
    with pytest.raises(ValueError, match=r"run 'r1': duplicate run_id"):
        aggregate([a, b], db)
    assert not db.exists()
    c = write(tmp_path, "r2")
    with pytest.raises(ValueError, match=r"differ"):
        aggregate([(a[0], c[1])], db)  # r1's cases filed under r2's provenance
    assert not db.exists()
