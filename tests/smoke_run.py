"""One finished smoke run, shared by the slow tests that continue from it.

The smoke DAG takes minutes on 2 cores; tests that resume or extend a run copy the folder
this builds once per pytest session (`results-smoke/` and Snakemake's `.snakemake/`
metadata, with timestamps) and go on from the copy.

The run is the smoke configuration on a fixed grid, `grid.yaml` in the run's folder: the
untrained methods (`backbone`, `ft`) on both backbones and both tasks. Methods that train
or need UniKE's knowledge steps cost minutes each and are covered by test_workflow.py;
here they would only slow down tests about resuming and extending a run. Every command
that continues the run passes `run_args(work)` (the smoke config, then that grid).

Use in a test module:

    from smoke_run import copy_smoke_run, smoke_run_fixture

    smoke_run_dir = smoke_run_fixture()

    def test_x(tmp_path, smoke_run_dir):
        work = copy_smoke_run(smoke_run_dir, tmp_path / "work")

The run is cached here at module level (this module is imported once), so it happens once
per session however many test modules declare the fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
OUT = "results-smoke"
GRID = {"grid": [{"methods": ["backbone", "ft"], "backbones": ["tiny-blip2-opt", "tiny-minigpt4"],
                  "tasks": ["e-vqa", "e-ic"], "regimes": ["one-step"]}]}

_cache: dict[str, Path] = {}


def snakemake_cmd(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", cores: int = 2) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
            "--cores", str(cores), *args]


def snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", env: dict | None = None,
              timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(workdir, *args, snakefile=snakefile), capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_args(work: Path) -> tuple[str, ...]:
    """The config files of the shared run: the smoke config, then its grid."""
    return ("--configfile", str(SMOKE), str(work / "grid.yaml"))


def build_smoke_run(base: Path) -> Path:
    import yaml

    work = base / "smoke"
    work.mkdir(parents=True)
    (work / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    t0 = time.time()
    result = snakemake(work, *run_args(work))
    if result.returncode != 0:
        raise RuntimeError(f"the shared smoke run failed:\n{result.stderr[-4000:]}")
    (base / "smoke_run_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    return work


def get_smoke_run(tmp_path_factory) -> Path:
    """The finished smoke run's working directory (built on first use). While working on
    these tests, UNIKE_TEST_SMOKE_RUN=<a finished smoke run's working directory> skips the
    build (tests only ever change copies of it)."""
    if "dir" not in _cache:
        given = os.environ.get("UNIKE_TEST_SMOKE_RUN")
        _cache["dir"] = Path(given) if given else build_smoke_run(tmp_path_factory.mktemp("shared_smoke_run"))
    return _cache["dir"]


def smoke_run_fixture():
    @pytest.fixture(scope="session", name="smoke_run_dir")
    def _fixture(tmp_path_factory) -> Path:
        return get_smoke_run(tmp_path_factory)

    return _fixture


def copy_smoke_run(src: Path, dst: Path) -> Path:
    """A private copy of the finished run (outputs and .snakemake metadata, mtimes kept)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def effective_config(workdir: Path) -> dict:
    import yaml

    return yaml.safe_load((workdir / OUT / "config.effective.yaml").read_text())


def grid(workdir: Path) -> set[tuple[str, str, str, str]]:
    """The (method, backbone, task, regime) cells of the run's config."""
    from unike.config import grid_cells

    return {(c.method, c.backbone, c.task, c.regime) for c in grid_cells(effective_config(workdir))}


def expected_rows(workdir: Path, backbone: str, task: str, regime: str) -> int:
    """Rows of one run: its edit cases (mined mistakes of the eval split, capped by n_eval),
    cut into the regime's full sequences, as `unike edit-eval` does."""
    import contextlib

    from unike.cli import _eval_cases
    from unike.grid import Layout, case_tasks
    from unike.harness import make_sequences

    config = effective_config(workdir)
    with contextlib.chdir(workdir):
        cases = {t: _eval_cases(config, Layout(config), backbone, t) for t in case_tasks(task)}
        return sum(len(s) for s in make_sequences(cases, regime, config["seed"]))


def check_db(workdir: Path, expected_runs: set[tuple[str, str, str, str]]) -> dict[str, int]:
    """The DuckDB holds exactly the expected runs, each with one row per edit case (no
    duplicate (run_id, case_id); n_edits == its rows == what its cases give). Returns rows
    per run_id."""
    import duckdb

    con = duckdb.connect(str(workdir / OUT / "metrics.duckdb"), read_only=True)
    try:
        runs = {(m, b, t, r): (run_id, n) for run_id, m, b, t, r, n in con.execute(
            "select run_id, method, backbone, task, regime, n_edits from runs").fetchall()}
        assert set(runs) == expected_runs
        dups = con.execute("select run_id, case_id, count(*) from edit_metrics group by all having count(*) > 1"
                           ).fetchall()
        assert dups == []
        rows = dict(con.execute("select run_id, count(*) from edit_metrics group by run_id").fetchall())
        assert set(rows) == {run_id for run_id, _ in runs.values()}
        for (m, b, t, r), (run_id, n_edits) in runs.items():
            want = expected_rows(workdir, b, t, r)
            assert want > 0
            assert rows[run_id] == n_edits == want, (run_id, rows[run_id], n_edits, want)
        return rows
    finally:
        con.close()
