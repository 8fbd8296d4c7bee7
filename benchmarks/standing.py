"""Every method's one-step standing per backbone, with intervals: UniKE's place among the
baselines and its ablations, computed from a finished run's per-edit rows.

Per backbone and method: reliability, generality and locality as Table 5 weighs them
(each task's cell once; generality the mean of T-Gen and M-Gen, locality of T-Loc and
M-Loc), their mean, and reliability's exact match, each with the report's 95% bootstrap
interval (reports.stats: facts resampled within a seed, and seeds first where the DB holds
several). A method is ranked on a backbone only where it has a one-step cell of every task
that backbone was edited on, so every row averages the same cells; the others (Figure 4's
sweeps, which run one task) are named under `partial`. The paper gives no per-backbone
Table 5, so there is no paper column: its per-cell values are in the landscape
(`landscape.py`) and the report's Tables 1 and 4. UniKE's rows are an out-of-sample
result: nothing here is used to choose anything. Reads `metrics.duckdb` of
the config's run; writes benchmarks/results/standing.json (summary.py renders it).

    python benchmarks/standing.py --config config.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reports.results import EM_SCORES, SCORES, Results
from reports.stats import estimate
from reports.tables import ABLATION_LABELS, PAPER_METHOD_ORDER, method_sort_key, seeds_note
from unike.config import load_config, paper_names
from unike.grid import ONE_STEP, TASKS, Layout
from unike.store import open_readonly

RESULTS = Path(__file__).resolve().parent / "results" / "standing.json"
# Row order: the baselines in the paper's order, Table 4's ablations and UniKE, the unedited
# backbone, then any other method by name.
ORDER = tuple(m for m in PAPER_METHOD_ORDER if m not in ("backbone", "unike")) + tuple(ABLATION_LABELS)
MEAN = {"mean": (SCORES["reliability"] + SCORES["generality"] + SCORES["locality"]) / 3}


def standing(results: Results, paper_method: dict[str, str]) -> dict:
    """{backbone: [{method, paper_name, scores: {score: [mean, lo, hi]}}]}, one-step."""
    table: dict[str, list[dict]] = {}
    partial: dict[str, list[str]] = {}
    for backbone in results.backbones():
        one_step = {(m, t) for (b, m, t, r) in results.cells if b == backbone and r == ONE_STEP.name and t in TASKS}
        tasks = sorted({t for _, t in one_step})
        methods = sorted({m for m, _ in one_step},
                         key=lambda m: method_sort_key(paper_method.get(m, m), ORDER + ("backbone",)))
        rows = []
        for method in methods:
            if any((method, t) not in one_step for t in tasks):
                partial.setdefault(backbone, []).append(method)
                continue
            samples = [results.get(backbone, method, t, ONE_STEP.name) for t in tasks]
            scores = {}
            for name, w in {**SCORES, **MEAN, **EM_SCORES}.items():
                e = estimate(samples, w)
                scores[name] = [round(e.mean, 2), round(e.lo, 2), round(e.hi, 2)]
            rows.append({"method": method, "paper_name": paper_method.get(method, method), "scores": scores})
        table[backbone] = rows
    return {"regime": ONE_STEP.name, "seeds_note": seeds_note(results.cells.values()), "by_backbone": table,
            "partial": partial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    args = parser.parse_args()
    config = load_config(args.config)
    _, method_map = paper_names(config)
    db = Layout(config).db
    with open_readonly(db) as con:
        results = Results.load(con)
    figures = standing(results, method_map) | {"db": str(db.resolve())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for backbone, rows in figures["by_backbone"].items():
        print(backbone)
        for r in rows:
            mean = r["scores"]["mean"]
            print(f"  {r['method']:28s} {mean[0]:5.1f} [{mean[1]:5.1f}, {mean[2]:5.1f}]")


if __name__ == "__main__":
    main()
