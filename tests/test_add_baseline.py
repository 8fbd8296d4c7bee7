"""docs/adding-a-baseline.md, done as written: a new editor module (taken from the page),
one `methods:` entry and its name in the grid, in a copy of the workflow that continues a
finished smoke run. Only the new cells run; their rows reach the DuckDB and Table 1."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from smoke_run import OUT, REPO, check_db, copy_smoke_run, grid, smoke_run_fixture, snakemake

DOC = REPO / "docs" / "adding-a-baseline.md"
smoke_run_dir = smoke_run_fixture()


def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def copy_workflow(dst: Path) -> Path:
    """Snakefile, rules, default and smoke configs, and the schema Snakefile validates with."""
    dst.mkdir()
    shutil.copy2(REPO / "Snakefile", dst / "Snakefile")
    shutil.copy2(REPO / "config.yaml", dst / "config.yaml")
    shutil.copytree(REPO / "workflow", dst / "workflow")
    shutil.copytree(REPO / "configs", dst / "configs")
    (dst / "unike" / "schemas").mkdir(parents=True)
    shutil.copy2(REPO / "unike" / "schemas" / "config.schema.json", dst / "unike" / "schemas")
    return dst


def test_the_walkthrough_module_and_config_are_valid():
    """Fast check of the page itself: its module defines an Editor with the flags and its
    config entry names that class."""
    from unike.editing import Editor

    (module,) = [b for b in doc_blocks("python") if "class " in b]
    namespace: dict = {}
    exec(compile(module, str(DOC), "exec"), namespace)
    cls = namespace["LayerFT"]
    assert issubclass(cls, Editor) and not cls.needs_training and cls.supports_sequential(cls.Hparams())
    entry = yaml.safe_load([b for b in doc_blocks("yaml") if "methods:" in b and "editor:" in b][0])
    assert entry["methods"]["newbase"]["editor"] == "baselines.newbase:LayerFT"
    from unike.editing import parse_hparams

    parse_hparams(cls.Hparams, entry["methods"]["newbase"]["hparams"], "newbase")


def _scheduled_edit_evals(output: str) -> list[tuple[str, str, str, str]]:
    jobs = re.findall(r"rule edit_eval:\n(?:\s+\S.*\n)*?\s+wildcards: seed_dir=[^,]*, method=([^,]+), backbone=([^,]+), "
                      r"task=([^,]+), regime=([^,]+), seed=\d+", output)
    return sorted(jobs)


def _job_stats(output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: {rule: count}."""
    table = output.split("Job stats:\n", 1)[1].split("\n\n", 1)[0]
    return {name: int(n) for name, n in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


@pytest.mark.slow
def test_add_a_baseline_to_a_finished_run(tmp_path, smoke_run_dir):
    work = copy_smoke_run(smoke_run_dir, tmp_path / "work")
    old_cells = grid(work)
    wf = copy_workflow(tmp_path / "wf")

    # 1. the module, from the page, importable by the subprocess (and its Slurm jobs alike)
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (module,) = [b for b in doc_blocks("python") if "class " in b]
    (pkgs / "newbase.py").write_text(module)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkgs), os.environ.get("PYTHONPATH", "")])}

    # 2. the config entry (the page's, with the module's import path here) in config.yaml
    entry = yaml.safe_load([b for b in doc_blocks("yaml") if "methods:" in b and "editor:" in b][0])
    method = entry["methods"]["newbase"]
    method["editor"] = "newbase:LayerFT"
    config = yaml.safe_load((wf / "config.yaml").read_text())
    config["methods"]["newbase"] = method
    (wf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # 3. its name in the grid the run uses (smoke_run.py: the run's grid.yaml)
    run_grid = yaml.safe_load((work / "grid.yaml").read_text())
    run_grid["grid"][0]["methods"].append("newbase")
    (work / "grid.yaml").write_text(yaml.safe_dump(run_grid, sort_keys=False))
    block = run_grid["grid"][0]
    new_cells = sorted(("newbase", b, t, r) for b in block["backbones"] for t in block["tasks"]
                       for r in block["regimes"])
    assert len(new_cells) == 4

    cfg = ("--configfile", str(wf / "configs" / "smoke.yaml"), str(work / "grid.yaml"))
    dry = snakemake(work, "-n", *cfg, snakefile=wf / "Snakefile", env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    # exactly the new cells: one edit_eval per backbone x task x regime of the grid, nothing old
    assert _scheduled_edit_evals(dry.stdout + dry.stderr) == new_cells
    counts = _job_stats(dry.stdout + dry.stderr)
    for name in ("all", "total"):
        counts.pop(name, None)
    assert counts == {"edit_eval": 4, "aggregate": 1, "report": 1}, counts

    result = snakemake(work, *cfg, snakefile=wf / "Snakefile", env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    rows = check_db(work, old_cells | set(new_cells))
    assert sum(n for run_id, n in rows.items() if run_id.startswith("newbase/")) > 0
    con = duckdb.connect(str(work / OUT / "metrics.duckdb"), read_only=True)
    rel = dict(con.execute("select r.method, avg(e.rel) from edit_metrics e join runs r using (run_id)"
                           " group by r.method").fetchall())
    con.close()
    assert rel["newbase"] > rel["backbone"] + 0.1  # it really edits
    table = (work / OUT / "report" / "tables" / "table1.md").read_text()
    assert re.search(r"^\| newbase \|", table, flags=re.M), table
