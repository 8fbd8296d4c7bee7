"""Cluster execution: the Slurm profile, and the smoke DAG through a real single-node Slurm
(scripts/local_slurm.sh: munged, slurmctld, slurmd on this machine, one fake GPU)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from smoke_run import OUT, REPO, SMOKE, check_db, grid

PROFILE = REPO / "workflow" / "profiles" / "slurm"
SCRIPT = REPO / "scripts" / "local_slurm.sh"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def _dry_run(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    # cwd is the repo root: that is where `--profile slurm` has to resolve
    cmd = [sys.executable, "-m", "snakemake", "-n", "--directory", str(workdir), "--configfile", str(SMOKE), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _rule_resources(output: str) -> dict[str, dict[str, str]]:
    """{rule: {resource: value}} from a dry run's job listing."""
    out = {}
    for rule, res in re.findall(r"^(?:local)?rule (\w+):\n(?:\s+.*\n)*?\s+resources: (.*)$", output, flags=re.M):
        out[rule] = dict(kv.split("=", 1) for kv in res.split(", "))
    return out


def test_setup_makes_every_step_offline(monkeypatch, tmp_path):
    from unike import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "config.yaml").read_text())
    cli._setup(cli.build_parser().parse_args(["make-world", "--config", str(config)]))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_profile_slurm_resolves_from_the_repo_root(tmp_path):
    """`snakemake --profile slurm` from the repo root uses workflow/profiles/slurm, and every
    job asks for the memory its rule declares: the profile holds no per-rule resources."""
    plain = _dry_run([], tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    with_profile = _dry_run(["--profile", "slurm"], tmp_path / "slurm")
    assert with_profile.returncode == 0, with_profile.stderr[-3000:]
    assert "Using profile slurm for setting default command line arguments" in with_profile.stderr
    assert (REPO / "slurm").resolve() == PROFILE.resolve()

    rules = _rule_resources(plain.stdout + plain.stderr)
    profiled = _rule_resources(with_profile.stdout + with_profile.stderr)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and "set-resources" not in profile
    remote = {r for r in rules if r not in ("aggregate", "report", "all")}
    assert remote and all(int(profiled[r]["mem_mb"]) == int(rules[r]["mem_mb"]) > 2000 for r in remote if
                          r != "make_world")


def test_tiny_world_requests_stay_as_small_as_before(tmp_path):
    """The tiny backbones' jobs ask for what they asked before real backbones were sized
    (issue 17's list), and no GPU memory on the CPU."""
    dry = _dry_run(["--profile", "slurm"], tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    before = {"make_world": (1000, 10), "pretrain_backbone": (4000, 60), "mine_edits": (3000, 30),
              "cache_pre_edit": (3000, 30), "prepare_editor": (6000, 240), "edit_eval": (4000, 120),
              "collect_triplets": (4000, 120), "extract_hidden_states": (8000, 60), "pretrain_encoders": (4000, 60),
              "embed_spaces": (4000, 30)}
    jobs = [(rule, res) for rule, res in _job_resources(dry.stdout + dry.stderr)
            if rule not in ("aggregate", "report", "all")]  # run on the submit host
    assert {rule for rule, _ in jobs} == set(before)
    for rule, res in jobs:
        assert (int(res["mem_mb"]), int(res["runtime"])) == before[rule], (rule, res)
        assert "gpu_mem_gb" not in res and "constraint" not in res


def _paper_dry_run(workdir: Path, *args: str, overlay: dict | None = None) -> list[tuple[str, dict[str, str]]]:
    configs = [str(REPO / "configs" / "paper.yaml")]
    if overlay:
        workdir.mkdir(parents=True)
        (workdir / "overlay.yaml").write_text(yaml.safe_dump(overlay))
        configs.append(str(workdir / "overlay.yaml"))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "slurm", "--directory", str(workdir),
           "--configfile", *configs, *args]
    dry = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    return _job_resources(dry.stdout + dry.stderr)


def _job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """[(rule, {resource: value, wildcard: value})] of every job of a dry run."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:\n)", output):
        head = re.match(r"rule (\w+):\n", block)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if not head or not res:
            continue
        values = dict(kv.split("=", 1) for kv in res.group(1).split(", "))
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        if wildcards:
            values.update(kv.split("=", 1) for kv in wildcards.group(1).split(", "))
        jobs.append((head.group(1), values))
    return jobs


def test_paper_jobs_are_sized_for_the_real_backbones(tmp_path):
    """configs/paper.yaml under the Slurm profile (weights absent: published sizes): every
    job that loads MiniGPT-4 asks for at least 24 GB of host memory, SERAC on MiniGPT-4
    gets the large GPU once the profile names it, and edit_eval's time limit grows with
    the number of eval cases."""
    large = ["--default-resources", "mem_mb=2000", "runtime=30", "gpu_large_above_gb=40",
             "gpu_large_constraint='gpu80'"]
    full = _paper_dry_run(tmp_path / "full", *large)
    loading = [r for r in full if r[1].get("backbone") == "minigpt4-7b" and r[0] != "pretrain_encoders"
               and r[0] != "embed_spaces"]
    assert {rule for rule, _ in loading} == {"cache_pre_edit", "prepare_editor", "edit_eval", "collect_triplets",
                                             "extract_hidden_states"}
    assert all(int(res["mem_mb"]) >= 24_000 for _, res in loading)
    large_jobs = {(rule, res["method"]) for rule, res in full if res.get("constraint") == "gpu80"}
    assert large_jobs == {("prepare_editor", "serac"), ("edit_eval", "serac")}
    assert all(res["backbone"] == "minigpt4-7b" and int(res["gpu_mem_gb"]) > 40
               for _, res in full if res.get("constraint") == "gpu80")
    assert all(0 < int(res["gpu_mem_gb"]) <= 40 for _, res in full if "gpu_mem_gb" in res and "constraint" not in res)

    def edit_minutes(jobs):
        return {(r["method"], r["backbone"], r["task"], r["regime"]): int(r["runtime"]) for rule, r in jobs
                if rule == "edit_eval"}

    small = edit_minutes(_paper_dry_run(tmp_path / "small", overlay={"data": {"n_eval": {"e-vqa": 200, "e-ic": 100}}}))
    full_minutes = edit_minutes(full)
    assert small.keys() == full_minutes.keys()
    assert all(full_minutes[cell] > small[cell] for cell in small)
    # one-step IKE on E-VQA: 10 min start-up + 200 cases x 2.5 s x 2 (safety) = 26.7 -> 27 min
    assert small[("ike", "minigpt4-7b", "e-vqa", "one-step")] == 10 + 17


# --------------------------------------------------------------------------- real Slurm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_slurm():
    """A single-node Slurm with one fake GPU, in its own state folder and ports; stopped by
    PID afterwards."""
    if not _which("slurmctld"):
        pytest.skip("slurmctld is not installed (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting munged/slurmctld/slurmd needs root")
    state = Path(tempfile.mkdtemp(prefix="unike-slurm-", dir="/tmp"))  # munge must reach it: not under pytest's 0700 tmp
    env = {**os.environ, "UNIKE_SLURM_STATE": str(state), "FAKE_GPU": "1",
           "UNIKE_SLURMCTLD_PORT": str(_free_port()), "UNIKE_SLURMD_PORT": str(_free_port()),
           "PATH": os.environ["PATH"] + ":/usr/sbin:/usr/local/sbin"}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        env.pop("SLURM_CONF", None)  # clients use /etc/slurm/slurm.conf, as the jobs' nested srun must
        yield env, state
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def gpu_rules(tmp: Path) -> list[str]:
    """The rules that ask for a GPU when the config's device is cuda."""
    dry = _dry_run(["--config", "device=cuda"], tmp)
    assert dry.returncode == 0, dry.stderr[-3000:]
    rules = sorted(r for r, res in _rule_resources(dry.stdout + dry.stderr).items() if res.get("gpu") == "1")
    assert "edit_eval" in rules
    return rules


def local_cluster_profile(dst: Path, gpu_rules: list[str]) -> Path:
    """The repo's Slurm profile, with what this test cluster needs on top: squeue for status
    (no slurmdbd, so no sacct), a short first status check, and the GPU rules asking for a
    GPU although the smoke config runs on the CPU (the fake GPU in gres.conf takes them)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    profile["slurm-status-command"] = "squeue"
    profile["slurm-init-seconds-before-status-checks"] = 2
    profile["retries"] = 0  # fail fast here
    for rule in gpu_rules:
        profile.setdefault("set-resources", {}).setdefault(rule, {})["gpu"] = 1
    dst.mkdir(parents=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dst


# The smoke DAG from scratch, on a grid that keeps every kind of step of the core chain
# (world, pretraining, mining, pre-edit cache, edit_eval of an untrained and a fine-tuning
# method, aggregate, report) but one backbone: each Slurm job adds seconds of start-up, and
# trained methods are covered by test_workflow.py.
SLURM_GRID = {"grid": [{"methods": ["backbone", "ft"], "backbones": ["tiny-blip2-opt"], "tasks": ["e-vqa", "e-ic"],
                        "regimes": ["one-step"]}]}


@pytest.mark.slow
def test_smoke_dag_through_slurm(tmp_path, local_slurm):
    env, state = local_slurm
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(SLURM_GRID))
    profile = local_cluster_profile(tmp_path / "profile", gpu_rules(tmp_path / "dry"))
    # As from a venv that is not activated: the first `python` on the jobs' PATH is another
    # interpreter (here one that always fails), so only jobs that run Snakemake's own succeed.
    decoy = tmp_path / "decoy-bin"
    decoy.mkdir()
    (decoy / "python").write_text("#!/bin/sh\necho 'not the interpreter running snakemake' >&2\nexit 97\n")
    (decoy / "python").chmod(0o755)
    cmd = ["timeout", "-s", "INT", "-k", "30", "1500", sys.executable, "-m", "snakemake",
           "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--profile", str(profile),
           "--configfile", str(SMOKE), str(tmp_path / "grid.yaml")]
    result = subprocess.run(cmd, cwd=tmp_path, env={**env, "PATH": f"{decoy}:{env['PATH']}"}, capture_output=True,
                            text=True, timeout=1600)
    out = result.stdout + result.stderr
    ctld_log = (state / "log" / "slurmctld.log").read_text(errors="replace")
    assert result.returncode == 0, out[-5000:] + "\n--- slurmctld.log ---\n" + ctld_log[-3000:]

    # The DAG ran and its results are complete.
    db, table = work / OUT / "metrics.duckdb", work / OUT / "report" / "tables" / "table1.md"
    assert db.stat().st_size > 0 and table.stat().st_size > 0 and (work / OUT / "report" / "index.html").exists()
    check_db(work, grid(work))

    # Every job but the localrules went through Slurm, each as its own Slurm job.
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))
    local = re.findall(r"^localrule (\w+):", out, flags=re.M)
    assert sorted(set(local)) == ["aggregate", "all", "report"] or sorted(set(local)) == ["aggregate", "report"]
    stats = dict((m.group(1), int(m.group(2))) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    n_remote = stats["total"] - sum(stats.get(r, 0) for r in ("aggregate", "report", "all"))
    assert len(submitted) == len(set(submitted.values())) == n_remote > 0
    # Each ran under slurmctld: "_job_complete: JobId=N done" is logged at the default level
    # whichever scheduler started it (the main one logs "sched: Allocate", backfill may not log).
    completed = set(re.findall(r"_job_complete: JobId=(\d+) done", ctld_log))
    assert set(submitted.values()) <= completed
    # The GPU rules' jobs asked Slurm for a GPU (the fake one) and got it.
    jobs = subprocess.run(["scontrol", "show", "job", "--oneliner"], env=env, capture_output=True, text=True).stdout
    gpu_jobs = [line for line in jobs.splitlines() if re.search(r"gres[/:]gpu[:=]1", line)
                and re.search(r"Comment=rule_edit_eval_", line)]
    assert gpu_jobs, jobs[-3000:]
    assert all("JobState=COMPLETED" in line for line in gpu_jobs)
