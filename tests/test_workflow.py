"""The whole DAG, end to end, on the smoke configuration (a few minutes on 2 cores)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml

from smoke_run import grid
from unike.tiny import COLLAPSED_SPREAD

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
SEEDS = REPO / "configs" / "seeds.yaml"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def dry_run_jobs(workdir: Path, *args: str) -> list[tuple[str, dict[str, str], dict[str, list[str]]]]:
    """(rule, wildcards, {"input"/"output"/"shell": [...]}) of every job a dry run with `args` plans."""
    result = snakemake(workdir, "-n", "-p", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout + result.stderr):
        head = re.match(r"(?:local)?rule (\w+):", block.strip())
        if head:
            wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
            files = {key: [f for line in re.findall(rf"^\s+{key}: (.*)$", block, flags=re.M) for f in line.split(", ")]
                     for key in ("input", "output")}
            files["shell"] = re.findall(r"^Shell command: (?!None$)(.*)$", block, flags=re.M)  # rule all: None
            jobs.append((head.group(1), dict(kv.split("=", 1) for kv in wildcards.group(1).split(", "))
                         if wildcards else {}, files))
    return jobs


def default_cells():
    from unike.config import grid_cells, load_config

    return grid_cells(load_config(yaml.safe_load((REPO / "config.yaml").read_text())))


def test_default_dry_run_lists_the_whole_grid_for_one_seed_at_its_paths(tmp_path):
    """The default plans `seed` alone, its chain directly under out_dir (the paths the docs
    name): no seed<n>/ folder."""
    jobs = dry_run_jobs(tmp_path)
    rules = [rule for rule, _, _ in jobs]
    cells = default_cells()
    assert rules.count("edit_eval") == len(cells)
    assert rules.count("make_world") == 1 and rules.count("pretrain_backbone") == 2
    assert {w["seed_dir"] for _, w, _ in jobs if w} == {""}
    outputs = {f for _, _, files in jobs for f in files["output"]}
    runs = {f"results/runs/{c.method}/{c.backbone}/{c.task}/{c.regime}/seed0.parquet" for c in cells}
    assert {f for f in outputs if f.endswith(".parquet") and "/runs/" in f} == runs
    assert {"results/world/world.json", "results/backbones/tiny-minigpt4/training.json",
            "results/data/tiny-minigpt4/vqa_eval.json", "results/knowledge/tiny-minigpt4/encoders.json",
            "results/metrics.duckdb", "results/report/index.html"} <= outputs
    assert not any(re.match(r"results/seed\d+/", f) for f in outputs)
    assert all(" --config results/config.effective.yaml " in c for _, _, files in jobs for c in files["shell"])


def test_seeds_overlay_runs_every_chain_per_seed_into_one_db(tmp_path):
    """configs/seeds.yaml: seed 0's chain where the default puts it, seeds 1 and 2 each with
    its own world, backbones, mined edits, knowledge, editors and runs under seed<n>/, run
    with its own config; aggregate and report once, over all the runs."""
    from unike.config import load_config

    jobs = dry_run_jobs(tmp_path, "--configfile", str(SEEDS))
    cells = default_cells()
    counts = {}
    for seed_dir, seed in (("", 0), ("seed1/", 1), ("seed2/", 2)):
        chain = [(rule, files) for rule, w, files in jobs if w.get("seed_dir") == seed_dir]
        counts[seed_dir] = Counter(rule for rule, _ in chain if rule != "embed_spaces")  # Figure 5a: `seed`'s
        assert counts[seed_dir]["make_world"] == 1 and counts[seed_dir]["pretrain_backbone"] == 2
        assert counts[seed_dir]["edit_eval"] == len(cells)
        runs = {f for r, files in chain if r == "edit_eval" for f in files["output"] if f.endswith(".parquet")}
        assert runs == {f"results/{seed_dir}runs/{c.method}/{c.backbone}/{c.task}/{c.regime}/seed{seed}.parquet"
                        for c in cells}
        assert f"results/{seed_dir}world/world.json" in {f for r, files in chain for f in files["output"]}
        effective = tmp_path / "results" / seed_dir / "config.effective.yaml"
        assert all(f" --config {effective.relative_to(tmp_path)} " in c for _, files in chain for c in files["shell"])
        chain_config = load_config(yaml.safe_load(effective.read_text()))
        assert chain_config["seed"] == seed and chain_config["out_dir"] == f"results/{seed_dir}".rstrip("/")
    assert counts[""] == counts["seed1/"] == counts["seed2/"]
    assert set(counts[""]) == {"make_world", "pretrain_backbone", "mine_edits", "cache_pre_edit", "collect_triplets",
                               "extract_hidden_states", "pretrain_encoders", "prepare_editor", "edit_eval"}
    (aggregate,) = [files for rule, _, files in jobs if rule == "aggregate"]
    assert len(aggregate["input"]) == 3 * len(cells) and aggregate["output"] == ["results/metrics.duckdb"]
    assert [rule for rule, _, _ in jobs].count("report") == 1


def test_aggregate_checks_each_run_against_its_own_seeds_settings(tmp_path):
    """aggregate takes runs of every seed into one DB (runs.seed), each checked against its
    seed's settings hash; a run of a seed the config does not list is refused, named."""
    import duckdb

    from unike.cli import main
    from unike.config import cell_config_hash, load_config, seed_config
    from unike.grid import Cell, Layout
    from unike.store import write_run

    config = {**yaml.safe_load((REPO / "config.yaml").read_text()), "out_dir": str(tmp_path / "results"),
              "extra_seeds": [1, 2]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    config = load_config(config)
    cell = Cell("ft", "tiny-minigpt4", "e-vqa", "one-step")
    row = {"case_id": "c0", "fact_id": "f0", "task": "e-vqa", "sequence_id": 0, "rel": 1.0, "t_gen": 1.0,
           "m_gen": 1.0, "t_loc": 1.0, "m_loc": 1.0, "rel_em": 1.0, "t_gen_em": 1.0, "m_gen_em": 1.0, "edit_s": 0.1}

    def run(seed, settings_seed):
        """A one-row run of `seed` that recorded the settings hash of `settings_seed`'s chain."""
        stem = tmp_path / "runs" / f"seed{seed}-as-{settings_seed}"
        run_id = f"ft/tiny-minigpt4/e-vqa/one-step/seed{seed}"
        write_run(stem.with_suffix(".parquet"), stem.with_suffix(".json"), [{"run_id": run_id, **row}],
                  {"run_id": run_id, **cell.__dict__, "seed": seed, "n_edits": 1,
                   "config_hash": cell_config_hash(seed_config(config, settings_seed), cell), "code_version": "v",
                   "metric_version": "1", "device": "cpu", "dtype": "float32", "dtype_requested": "float32",
                   "wall_s": 1.0, "edit_s_mean": 0.1, "peak_mem_mb": 1.0, "hparams": {}, "versions": {}})
        return str(stem.with_suffix(".parquet"))

    runs = [run(seed, seed) for seed in (0, 1, 2)]
    main(["aggregate", "--config", str(tmp_path / "config.yaml"), *runs])
    con = duckdb.connect(str(Layout(config).db), read_only=True)
    assert sorted(seed for (seed,) in con.execute("select seed from runs").fetchall()) == [0, 1, 2]
    con.close()
    for bad in (run(1, 0), run(5, 2)):  # seed 0's settings for seed 1; a seed the config does not list
        with pytest.raises(SystemExit, match=r"1 run\(s\) were made under other settings .*" + re.escape(
                bad.removesuffix(".parquet"))):
            main(["aggregate", "--config", str(tmp_path / "config.yaml"), *runs[:1], bad])



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
    return [(rule, wildcards) for rule, wildcards, _ in dry_run_jobs(workdir, "--configfile", str(SMOKE),
                                                                      *map(str, overlays))]


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
