"""Training cost of the trained methods: what each `prepare_editor` step recorded.

Reads every `<out_dir>/editors/<method>/<backbone>/<task>/prepared.json` (written by
`python -m unike prepare-editor`, i.e. the DAG's `prepare_editor` rule), writes
benchmarks/results/training_cost.json and prints the Markdown table that
`benchmarks/summary.py` puts into RESULTS.md.

    python benchmarks/training_cost.py results      # after `snakemake --cores 2`
    python benchmarks/summary.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def collect(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(out_dir).glob("editors/*/*/*/prepared.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        summary = record.get("summary", {})
        # steps / train_s / n_parameters: only the hypernetworks (KE, MEND) have a training loop.
        rows.append({"method": record["method"], "backbone": record["backbone"], "task": record["task"],
                     "n_train_cases": record["n_train_cases"], "prepare_s": round(record["prepare_s"], 1),
                     **{k: summary[k] for k in ("steps", "train_s", "n_parameters") if k in summary}})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | backbone | task | train cases | prepare_editor | training steps | training loop | parameters |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        loop = f"{r['train_s']:.1f} s" if "train_s" in r else "-"
        params = f"{r['n_parameters']:,}" if "n_parameters" in r else "-"
        lines.append(f"| {r['method']} | {r['backbone']} | {r['task']} | {r['n_train_cases']} | {r['prepare_s']:.1f} s "
                     f"| {r.get('steps', '-')} | {loop} | {params} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("results"), help="the DAG's out_dir")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "training_cost.json")
    args = parser.parse_args()
    rows = collect(args.out_dir)
    if not rows:
        raise SystemExit(f"no {args.out_dir}/editors/*/*/*/prepared.json: run the DAG (prepare_editor) first")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"out_dir": str(args.out_dir), "rows": rows}, indent=2, sort_keys=True) + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
