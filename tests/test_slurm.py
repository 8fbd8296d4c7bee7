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
    """`snakemake --profile slurm` from the repo root uses workflow/profiles/slurm, and the
    memory it asks for on the first attempt is each rule's own; retries double it."""
    plain = _dry_run([], tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    with_profile = _dry_run(["--profile", "slurm"], tmp_path / "slurm")
    assert with_profile.returncode == 0, with_profile.stderr[-3000:]
    assert "Using profile slurm for setting default command line arguments" in with_profile.stderr
    assert (REPO / "slurm").resolve() == PROFILE.resolve()

    rules = _rule_resources(plain.stdout + plain.stderr)
    profiled = _rule_resources(with_profile.stdout + with_profile.stderr)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    for rule, res in profile["set-resources"].items():
        expr = res["mem_mb"]
        if rule in rules:  # rules the smoke DAG schedules
            assert int(rules[rule]["mem_mb"]) == eval(expr, {"attempt": 1}) == int(profiled[rule]["mem_mb"]), rule
        assert eval(expr, {"attempt": 2}) == 2 * eval(expr, {"attempt": 1})
    remote = {r for r in rules if r not in ("aggregate", "report", "all")}
    assert remote <= set(profile["set-resources"]), "a rule submitted to Slurm lacks its retry memory"


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
        profile["set-resources"].setdefault(rule, {})["gpu"] = 1
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
    cmd = ["timeout", "-s", "INT", "-k", "30", "1500", sys.executable, "-m", "snakemake",
           "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--profile", str(profile),
           "--configfile", str(SMOKE), str(tmp_path / "grid.yaml")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1600)
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
