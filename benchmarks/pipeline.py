"""Wall time, peak memory and where the time goes, for a whole DAG run (default, default
with the tiny backbones pretrained too, or smoke), from an empty folder.

Runs `snakemake --cores 2` in a fresh temporary directory and samples the resident memory
of the whole process tree (snakemake and every job it starts) twice a second. Snakemake's
log (kept as `pipeline-snakemake.log` in the run folder) stamps every job's start and
finish: from it, each rule's jobs and job-minutes, the budget's breakdown. Writes
benchmarks/results/pipeline-<name>.json.

    python benchmarks/pipeline.py default
    python benchmarks/pipeline.py default-scratch   # use_released_backbones off: pretraining included
    python benchmarks/pipeline.py smoke
    python benchmarks/pipeline.py default --keep .   # run in (and keep) this folder instead
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import psutil

from unike.backbones import cpu_name

REPO = Path(__file__).resolve().parent.parent
# default: the tiny backbones installed from released/ where their key matches (as the README's
# command runs it); default-scratch: pretrained here as well (use_released_backbones off).
CONFIGS = {"default": [], "default-scratch": ["--config", "use_released_backbones=False"],
           "smoke": ["--configfile", str(REPO / "configs" / "smoke.yaml")]}


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


STAMP = re.compile(r"\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")
STARTED = re.compile(r"(?:local)?rule (\S+):")
JOBID = re.compile(r"jobid: (\d+)")
FINISHED = re.compile(r"Finished jobid: (\d+)")


def job_minutes(log_lines: list[str]) -> dict[str, dict]:
    """Per rule, its jobs and their summed minutes, from snakemake's log: a job starts at
    the stamp above its `rule <name>:` block and ends at the stamp above `Finished jobid`
    (stamps are to the second)."""
    started, stamp, rule = {}, None, None
    by_rule = defaultdict(lambda: {"jobs": 0, "minutes": 0.0})
    for line in map(str.strip, log_lines):
        if m := STAMP.fullmatch(line):
            stamp = datetime.strptime(m[1], "%a %b %d %H:%M:%S %Y")
        elif m := STARTED.fullmatch(line):
            rule = m[1]
        elif (m := JOBID.fullmatch(line)) and rule:
            started[m[1]], rule = (rule, stamp), None
        elif (m := FINISHED.match(line)) and m[1] in started:
            name, t0 = started.pop(m[1])
            by_rule[name]["jobs"] += 1
            by_rule[name]["minutes"] += (stamp - t0).total_seconds() / 60
    return {name: {"jobs": r["jobs"], "minutes": round(r["minutes"], 1)}
            for name, r in sorted(by_rule.items(), key=lambda kv: -kv[1]["minutes"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(CONFIGS))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep its results (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = str(args.keep.resolve()) if args.keep else scratch
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", workdir,
               "--cores", str(args.cores), *CONFIGS[args.name]]
        t0 = time.time()
        Path(workdir).mkdir(parents=True, exist_ok=True)
        log_path = Path(workdir) / "pipeline-snakemake.log"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watched, peak, done = psutil.Process(proc.pid), 0, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(watched))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        with log_path.open("w", encoding="utf-8") as log:
            for line in proc.stdout:  # the whole log to the file; progress and errors to the console
                log.write(line)
                if "steps (" in line or "error" in line.lower():
                    print(line, end="", flush=True)
        rc = proc.wait()
        done.set()
        sampler.join()
        wall = time.time() - t0
        if rc != 0:
            raise SystemExit(f"snakemake failed with exit code {rc}: {log_path}")
        minutes = job_minutes(log_path.read_text(encoding="utf-8").splitlines())  # before the scratch folder goes
        backbones = {}
        for training in sorted(Path(workdir).glob("results*/backbones/*/training.json")):
            report = json.loads(training.read_text(encoding="utf-8"))
            backbones[training.parent.name] = {**{k: report["heldout"][k] for k in ("token_acc", "exact_match", "by_topic")},
                                               "image_feature_spread": report["image_feature_spread"],
                                               "train_s": report["train_s"], "context": report.get("context"),
                                               "released": report.get("released")}
    figures = {"config": args.name, "cores": args.cores, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20),
               "machine": f"{cpu_name()}, {psutil.cpu_count()} cpus, {round(psutil.virtual_memory().total / 2**30)} GiB",
               "date": time.strftime("%Y-%m-%d"), "job_minutes": minutes}
    out = Path(__file__).resolve().parent / "results" / f"pipeline-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    if args.name.startswith("default"):
        (out.parent / "tiny-backbones.json").write_text(json.dumps(backbones, indent=2, sort_keys=True) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
