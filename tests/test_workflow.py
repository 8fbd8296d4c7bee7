"""The whole DAG, end to end, on the smoke configuration (a few minutes on 2 cores)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from unike.tiny import COLLAPSED_SPREAD

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def test_default_dry_run_lists_the_whole_grid(tmp_path):
    from unike.config import grid_cells, load_config
    import yaml

    result = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    n_cells = len(grid_cells(load_config(yaml.safe_load((REPO / "config.yaml").read_text()))))
    counts = dict(line.split() for line in (result.stdout + result.stderr).splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    assert int(counts["edit_eval"]) == n_cells
    assert int(counts["pretrain_backbone"]) == 2


def test_bad_config_fails_before_the_dag_is_built(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  - {methods: [rome], backbones: [tiny-minigpt4], tasks: [e-vqa], regimes: [one-step]}\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0 and "unknown method name(s) ['rome']" in result.stdout + result.stderr


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    result = snakemake(tmp_path, "--configfile", str(SMOKE))
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "results-smoke"

    con = duckdb.connect(str(out / "metrics.duckdb"), read_only=True)
    means = {(m, b, t): dict(rel=rel, rel_em=em, t_loc=tloc, m_loc=mloc) for m, b, t, rel, em, tloc, mloc in con.execute(
        "select r.method, r.backbone, r.task, avg(e.rel), avg(e.rel_em), avg(e.t_loc), avg(e.m_loc)"
        " from edit_metrics e join runs r using (run_id) group by all").fetchall()}
    for backbone in ("tiny-blip2-opt", "tiny-minigpt4"):
        for task in ("e-vqa", "e-ic"):
            ft, pre = means[("ft", backbone, task)], means[("backbone", backbone, task)]
            assert pre["rel_em"] == 0.0  # edit cases are the backbone's own mistakes
            assert ft["rel"] > pre["rel"] + 0.1 and ft["rel_em"] > 0.3
            assert pre["t_loc"] == pre["m_loc"] == 1.0  # the unedited model agrees with its cached predictions

    # Every table and figure of the default report, from the smaller grid.
    tables = [f"tables/table{n}.{ext}" for n in range(1, 6) for ext in ("md", "html", "tex")]
    figures = [f"figures/{f}.{ext}" for f in ("figure4", "figure5a", "gen-vs-loc") for ext in ("png", "pdf")]
    for name in ("index.html", *tables, *figures):
        assert (out / "report" / name).stat().st_size > 0, name
    index = (out / "report" / "index.html").read_text()
    assert all(f"tables/table{n}.md" in index for n in range(1, 6)) and "figures/figure5a.png" in index
    regimes = {r for (r,) in con.execute("select distinct regime from runs").fetchall()}
    assert regimes == {"one-step", "seq-10", "cross-10"}
    training = json.loads((out / "backbones" / "tiny-minigpt4" / "training.json").read_text())
    assert training["heldout"]["token_acc"] > 0.4  # smoke-sized backbones: well short of the default ones
    for name in ("tiny-blip2-opt", "tiny-minigpt4"):  # neither collapsed to image-blind outputs
        spread = json.loads((out / "backbones" / name / "training.json").read_text())["image_feature_spread"]
        assert spread > COLLAPSED_SPREAD, (name, spread)

    # Nothing left to do, and the same config and seed give the same numbers.
    again = snakemake(tmp_path, "--configfile", str(SMOKE), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    run = out / "runs" / "ft" / "tiny-blip2-opt" / "e-vqa" / "one-step" / "seed0.parquet"
    first = pl.read_parquet(run).drop("edit_s")
    shutil.copy(run, tmp_path / "first.parquet")
    rerun = subprocess.run([sys.executable, "-m", "unike", "edit-eval", "--config", str(out / "config.effective.yaml"),
                            "--method", "ft", "--backbone", "tiny-blip2-opt", "--task", "e-vqa", "--regime",
                            "one-step"], cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert pl.read_parquet(run).drop("edit_s").equals(first)
