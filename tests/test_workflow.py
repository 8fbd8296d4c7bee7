"""The whole DAG, end to end, on the smoke configuration (a few minutes on 2 cores)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from smoke_run import grid
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
    check_reruns(tmp_path, out)
    check_bad_steps(tmp_path, out)
    run = out / "runs" / "ft" / "tiny-blip2-opt" / "e-vqa" / "one-step" / "seed0.parquet"
    first = pl.read_parquet(run).drop("edit_s")
    shutil.copy(run, tmp_path / "first.parquet")
    rerun = subprocess.run([sys.executable, "-m", "unike", "edit-eval", "--config", str(out / "config.effective.yaml"),
                            "--method", "ft", "--backbone", "tiny-blip2-opt", "--task", "e-vqa", "--regime",
                            "one-step"], cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert pl.read_parquet(run).drop("edit_s").equals(first)


def planned_jobs(workdir: Path, *overlays: Path) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run with the smoke config and `overlays` plans."""
    result = snakemake(workdir, "-n", "--configfile", str(SMOKE), *map(str, overlays))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout + result.stderr):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if head:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
            jobs.append((head.group(1), dict(kv.split("=", 1) for kv in wildcards.group(1).split(", "))
                         if wildcards else {}))
    return jobs


def check_reruns(workdir: Path, out: Path) -> None:
    """A changed setting reruns exactly the jobs whose output it decides (the rules' params
    carry the hash of their settings); a changed setting also makes stale runs refused."""
    from unike.config import load_config
    from unike.editing import resolve_editor

    config = load_config(out / "config.effective.yaml")
    ft_lr = workdir / "ft-lr.yaml"
    ft_lr.write_text(yaml.safe_dump({"methods": {"ft": {"hparams": {"lr": 7.0e-3}}}}))
    jobs = planned_jobs(workdir, ft_lr)
    ft_cells = {cell for cell in grid(workdir) if cell[0] == "ft"}
    assert {r for r, _ in jobs} <= {"edit_eval", "aggregate", "report", "all"}
    assert {(w["method"], w["backbone"], w["task"], w["regime"]) for r, w in jobs if r == "edit_eval"} == ft_cells
    assert [r for r, _ in jobs].count("edit_eval") == len(ft_cells) and ("aggregate", {}) in jobs

    # The runs on disk were made with the old lr: aggregate refuses to mix them in, naming them.
    stale = workdir / "stale.yaml"
    changed = {**config, "methods": {**config["methods"], "ft": {**config["methods"]["ft"],
                                                                    "hparams": {**config["methods"]["ft"]["hparams"],
                                                                                "lr": 7.0e-3}}}}
    stale.write_text(yaml.safe_dump(changed, sort_keys=False))
    runs = sorted(str(p) for p in (out / "runs").rglob("*.parquet"))
    refused = subprocess.run([sys.executable, "-m", "unike", "aggregate", "--config", str(stale), *runs], cwd=workdir,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "other settings than the config's" in refused.stderr and "runs/ft/tiny-blip2-opt/e-vqa" in refused.stderr
    assert "runs/backbone/" not in refused.stderr

    # UniKE's encoders: the encoders, their spaces and the UniKE family's jobs, nothing else.
    steps = workdir / "encoder-steps.yaml"
    steps.write_text(yaml.safe_dump({"knowledge": {"encoders": {"steps": 61}}}))
    jobs = planned_jobs(workdir, steps)
    family = {method for method, *_ in grid(workdir)
              if resolve_editor(config["methods"][method]["editor"]).needs_knowledge}
    assert {r for r, _ in jobs} == {"pretrain_encoders", "embed_spaces", "prepare_editor", "edit_eval", "aggregate",
                                    "report", "all"}
    assert {w["method"] for r, w in jobs if r in ("edit_eval", "prepare_editor")} <= family
    assert {w["method"] for r, w in jobs if r == "edit_eval"} == family

    # Changing nothing lists nothing (and rewrites the effective config back).
    assert planned_jobs(workdir) == []


def check_bad_steps(workdir: Path, out: Path) -> None:
    """A cell without a single full sequence is an error naming it and why, not an empty run."""
    result = subprocess.run([sys.executable, "-m", "unike", "edit-eval", "--config", str(out / "config.effective.yaml"),
                             "--method", "ft", "--backbone", "tiny-minigpt4", "--task", "e-ic", "--regime", "seq-20"],
                            cwd=workdir, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "Cell(method='ft', backbone='tiny-minigpt4', task='e-ic', regime='seq-20'): no edit sequence: seq-20 " \
           "needs 20 cases a sequence and the eval split has 6 e-ic" in result.stderr


def test_paths_with_spaces_are_quoted_in_every_command(tmp_path):
    """out_dir with a space (and a shell metacharacter) reaches every step as one argument."""
    overlay = tmp_path / "space.yaml"
    overlay.write_text(yaml.safe_dump({"out_dir": "my results; (smoke)"}))
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(SMOKE), str(overlay))
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line.strip() for line in (result.stdout + result.stderr).splitlines() if " -m unike " in line]
    assert len(commands) > 20
    for command in commands:
        words = shlex.split(command)
        assert words[words.index("--config") + 1] == "my results; (smoke)/config.effective.yaml", command
        assert words[-1] == "2>&1" and words[-2].startswith("my results; (smoke)/logs/"), command
