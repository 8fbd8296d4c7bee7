"""Resuming after a crash: SIGKILL the running Snakemake (and the job it runs) mid-way,
then `--unlock` (the lock survives a kill -9) and rerun with `--rerun-incomplete`: the run
completes, only the unfinished work is redone, and the DuckDB holds each edit case once."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from smoke_run import OUT, check_db, copy_smoke_run, grid, run_args, smoke_run_fixture, snakemake, snakemake_cmd

smoke_run_dir = smoke_run_fixture()


def _parquets(work: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in (work / OUT / "runs").rglob("*.parquet")}


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_incomplete(tmp_path, smoke_run_dir):
    work = copy_smoke_run(smoke_run_dir, tmp_path / "work")
    cells = grid(work)
    before = _parquets(work)
    assert len(before) == len(cells) >= 2
    incomplete = work / ".snakemake" / "incomplete"

    # Redo every edit_eval (and what follows) and crash once some have been rewritten and
    # another is running. The whole process group gets SIGKILL, Snakemake and its job alike,
    # as when the node dies: killing only Snakemake's PID would leave its job running on as
    # an orphan that races the rerun.
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(snakemake_cmd(work, *run_args(work), "--forcerun", "edit_eval"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t_start = time.time()
    deadline = t_start + 900
    killed_with = None
    try:
        while time.time() < deadline and proc.poll() is None:
            rewritten = [p for p, t in _parquets(work).items() if t > before.get(p, 0)]
            running = list(incomplete.iterdir()) if incomplete.exists() else []
            if rewritten and running:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_with = (len(rewritten), running)
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None and killed_with is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed_with, "the run ended before it could be killed mid-way:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert 0 < killed_with[0] < len(cells)  # killed mid-way: some cells redone, some not

    # After the crash the lock stays, and the job that was running is marked incomplete.
    assert list((work / ".snakemake" / "locks").iterdir())
    marked = {work / base64.b64decode(m.name).decode() for m in incomplete.iterdir()}
    assert marked
    at_kill = _parquets(work)
    # A plain rerun refuses: the interrupted job's outputs are marked incomplete (when they
    # exist) or the directory is locked. With --rerun-incomplete it still needs --unlock.
    plain = snakemake(work, *run_args(work))
    assert plain.returncode != 0
    assert "IncompleteFilesException" in plain.stderr or "cannot be locked" in plain.stderr, plain.stderr[-2000:]
    locked = snakemake(work, *run_args(work), "--rerun-incomplete")
    assert locked.returncode != 0 and "cannot be locked" in locked.stderr, locked.stderr[-2000:]
    assert snakemake(work, *run_args(work), "--unlock").returncode == 0

    result = snakemake(work, *run_args(work), "--rerun-incomplete")
    assert result.returncode == 0, result.stderr[-4000:]
    assert not incomplete.exists() or not list(incomplete.iterdir())
    again = snakemake(work, *run_args(work), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr

    # Only the unfinished work was redone: what was complete at the kill is untouched.
    after = _parquets(work)
    assert set(after) == set(before)
    assert all(after[p] == t for p, t in at_kill.items() if p not in marked)

    rows = check_db(work, cells)  # every run once, n_edits == its rows, no duplicate case
    assert len(rows) == len(cells)
    assert (work / OUT / "report" / "tables" / "table1.md").stat().st_size > 0
