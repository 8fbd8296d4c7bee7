"""How closely the six baselines' one-step landscape on the tiny world follows the paper's.

The check that the miniature is faithful (issue 15): for each (backbone, task) cell of
Table 1 and each metric column (Rel, T-Gen, M-Gen, T-Loc, M-Loc), Kendall's tau-b between
our six baselines' means and the paper's printed values for the same six (FT, KE, MEND,
T-Patcher, IKE, SERAC). tau > 0: the orderings agree more than they disagree. UniKE is
not part of the check: its standing stays an out-of-sample result. Reads a finished
run's `metrics.duckdb` (a seeds overlay's: each mean over its seeds); writes
benchmarks/results/landscape.json, or `--out` (summary.py renders every
benchmarks/results/landscape*.json).

    python benchmarks/landscape.py --config config.yaml
    python benchmarks/landscape.py --config results/config.effective.yaml --out benchmarks/results/landscape-seeds.json
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np

from reports.paper import paper_tables
from reports.results import METRICS, Results
from reports.tables import seeds_note
from unike.config import load_config, paper_names
from unike.grid import ONE_STEP, TASKS, Layout
from unike.store import open_readonly

RESULTS = Path(__file__).resolve().parent / "results" / "landscape.json"
BASELINES = ("ft", "ke", "mend", "tpatcher", "ike", "serac")  # the paper's row ids


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either ordering count as neither agreement nor disagreement)."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    denom = np.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return float((concordant - discordant) / denom) if denom else 0.0


def landscape(results: Results, paper_backbone: dict[str, str]) -> dict:
    paper = paper_tables()
    cells = []
    for backbone, paper_name in sorted(paper_backbone.items()):
        for task in TASKS:
            ours, theirs = {}, {}
            for method in BASELINES:
                sample = results.get(backbone, method, task, ONE_STEP.name)
                printed = paper.get(("table1", paper_name, task, ONE_STEP.name, method))
                if sample is not None and printed is not None:
                    ours[method] = dict(zip(METRICS, (float(v) for v in sample.means[: len(METRICS)])))
                    theirs[method] = printed
            if len(ours) < 3:
                continue
            methods = sorted(ours)
            taus = {m: kendall_tau_b([ours[x][m] for x in methods], [theirs[x][m] for x in methods]) for m in METRICS}
            cells.append({"backbone": backbone, "task": task, "methods": methods, "tau": taus,
                          "ours": ours, "paper": {x: theirs[x] for x in methods}})
    taus = [c["tau"][m] for c in cells for m in METRICS]
    return {"statistic": "Kendall tau-b over the six baselines, per (backbone, task) cell and metric",
            "cells": cells, "agree": sum(t > 0 for t in taus), "disagree": sum(t < 0 for t in taus),
            "neither": sum(t == 0 for t in taus),
            "mean_tau_by_metric": {m: float(np.mean([c["tau"][m] for c in cells])) if cells else None for m in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where to write the figures (summary.py renders benchmarks/results/landscape*.json)")
    args = parser.parse_args()
    config = load_config(args.config)
    layout = Layout(config)
    paper_backbone, method_map = paper_names(config)
    with open_readonly(layout.db) as con:
        results = Results.load(con).with_paper_names(method_map, set())
    figures = landscape(results, paper_backbone) | {"db": str(layout.db.resolve()),
                                                    "seeds_note": seeds_note(results.cells.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"agree {figures['agree']}, disagree {figures['disagree']}, neither {figures['neither']}; "
          f"mean tau by metric {figures['mean_tau_by_metric']}")


if __name__ == "__main__":
    main()
