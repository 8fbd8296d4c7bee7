"""Wall time and peak memory of a whole DAG run (default or smoke), from scratch.

Runs `snakemake --cores 2` in a fresh temporary directory and samples the resident memory
of the whole process tree (snakemake and every job it starts) twice a second. Writes
benchmarks/results/pipeline-<name>.json.

    python benchmarks/pipeline.py default
    python benchmarks/pipeline.py smoke
    python benchmarks/pipeline.py default --keep .   # run in (and keep) this folder instead
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"default": [], "smoke": ["--configfile", str(REPO / "configs" / "smoke.yaml")]}


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(CONFIGS))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep its results (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = str(args.keep.resolve()) if args.keep else scratch
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", workdir,
               "--cores", str(args.cores), "--quiet", *CONFIGS[args.name]]
        t0 = time.time()
        proc = subprocess.Popen(cmd)
        watched, peak, done = psutil.Process(proc.pid), 0, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(watched))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
        wall = time.time() - t0
        if rc != 0:
            raise SystemExit(f"snakemake failed with exit code {rc}")
        backbones = {}
        for training in sorted(Path(workdir).glob("results*/backbones/*/training.json")):
            report = json.loads(training.read_text(encoding="utf-8"))
            backbones[training.parent.name] = {**{k: report["heldout"][k] for k in ("token_acc", "exact_match", "by_topic")},
                                               "image_feature_spread": report["image_feature_spread"],
                                               "train_s": report["train_s"], "context": report.get("context")}
    figures = {"config": args.name, "cores": args.cores, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20),
               "machine": f"{platform.machine()} {psutil.cpu_count()} cpus, {round(psutil.virtual_memory().total / 2**30)} GiB",
               "date": time.strftime("%Y-%m-%d")}
    out = Path(__file__).resolve().parent / "results" / f"pipeline-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    if args.name == "default":
        (out.parent / "tiny-backbones.json").write_text(json.dumps(backbones, indent=2, sort_keys=True) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
