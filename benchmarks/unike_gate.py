"""Does UniKE's adaptive inclusion weight tell relevant inputs from unrelated ones?

The paper (§3.3) says alpha = cos(EncSem(h_know), h_input[-1]) "adaptively takes a small
value" when the in-context knowledge is unrelated to the input, which is what preserves
locality. This measures it on a validation split of the train data (the split, the
knowledge rebuilt without the held-out cases and the prepared folders are those of
`tune.py`; the eval split is never used): per backbone and edited layer, the mean
alpha on each scored row of a case, before its edit and after it, and the AUC of alpha
between the rows the edit should reach (Rel, T-Gen, M-Gen) and each locality row (T-Loc,
M-Loc): 1.0 means every related input gets a larger weight than every unrelated one,
0.5 means alpha cannot tell them apart. Writes benchmarks/results/unike_gate.json; needs a
finished default run.

    python benchmarks/unike_gate.py --config config.yaml
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tune import validation_split  # this script's folder is on sys.path
from unike.cli import _torch_setup
from unike.config import load_config, method_entry
from unike.data import ROWS, case_samples
from unike.grid import Layout
from unike.method.editor import UniKEHparams

RESULTS = Path(__file__).resolve().parent / "results" / "unike_gate.json"
RELATED, UNRELATED = ("rel", "t_gen", "m_gen"), ("t_loc", "m_loc")


def auc(high: list[float], low: list[float]) -> float:
    """P(a related input's alpha > an unrelated one's), ties counting half."""
    wins = sum((h > l) + 0.5 * (h == l) for h in high for l in low)
    return wins / (len(high) * len(low))


def gate_figures(alphas: dict[str, dict[str, list[float]]]) -> dict:
    """alphas[phase][row] -> per-case values at one layer."""
    out = {}
    for phase, rows in alphas.items():
        related = [v for r in RELATED for v in rows[r]]
        out[phase] = {"mean_alpha": {r: sum(v) / len(v) for r, v in rows.items()},
                      "auc": {r: auc(related, rows[r]) for r in UNRELATED}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--method", default="unike", help="a config entry with adaptive alpha and latent knowledge")
    args = parser.parse_args()
    config = load_config(args.config)
    layout = Layout(config)
    _torch_setup(config)
    report = {"method": args.method, "hparams": config["methods"][args.method].get("hparams", {}), "backbones": {}}
    for name in config["backbones"]:
        t0 = time.time()
        entry = method_entry(config, args.method, name)
        hp = UniKEHparams(**entry["hparams"])
        if hp.external != "latent" or hp.alpha is not None:
            raise SystemExit(f"{args.method} on {name}: needs latent knowledge with the adaptive alpha "
                             "(external: latent, no alpha)")
        alphas: dict[int, dict[str, dict[str, list[float]]]] = {}  # layer -> phase -> row -> per-case values

        def record(editor, phase: str) -> None:
            for layer, a in editor.latent.last_alpha.items():
                rows = alphas.setdefault(layer, {p: {r: [] for r in ROWS} for p in ("before_edit", "after_edit")})
                for row, value in zip(ROWS, a.tolist()):
                    rows[phase][row].append(value)

        n_cases = 0
        with tempfile.TemporaryDirectory() as tmp:
            split = validation_split(config, layout, name, Path(tmp))
            for task, cases in split.validation.items():  # one editor per task, prepared on its fit cases
                editor = split.editor(entry, task, f"methods.{args.method}")
                try:
                    for case in cases:
                        samples = case_samples(case)
                        editor.predict(samples)
                        record(editor, "before_edit")
                        editor.edit(case)
                        editor.predict(samples)
                        record(editor, "after_edit")
                        editor.restore()
                        n_cases += 1
                finally:
                    editor.close()
        report["backbones"][name] = {"validation_cases": n_cases, "seconds": round(time.time() - t0, 1),
                                     "layers": {str(l): gate_figures(a) for l, a in alphas.items()}}
        for layer, figures in report["backbones"][name]["layers"].items():
            after = figures["after_edit"]
            print(name, "layer", layer, {r: round(v, 3) for r, v in after["mean_alpha"].items()},
                  "AUC", {r: round(v, 3) for r, v in after["auc"].items()}, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
