"""Figures 4, 5a and the generality-vs-locality scatter; the report config section.

``synthetic_report_inputs`` (also used by tests/test_report_browser.py) builds a DuckDB
with rows for every table and figure, a knowledge-spaces parquet and a Figure 4 section.
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest
import yaml

from reports.figures import figure4, figure4_methods, read_spaces, renamed_methods, tradeoff
from reports.outputs import report_files
from reports.paper import paper_method_ids
from reports.render import render_report
from reports.results import Results
from unike.config import load_config, validate
from unike.store import aggregate, open_readonly, write_run

REPO = Path(__file__).resolve().parents[1]
BACKBONE_MAP = {"tiny-blip2-opt": "blip2-opt", "tiny-minigpt4": "minigpt4"}
# The points the report step gets (unike.config.figure4_points: each method keyed by its
# own K, alpha or zeta), as YAML: integer / float keys.
FIGURE4_YAML = """
report:
  figure4:
    backbone: tiny-minigpt4
    task: e-vqa
    a:
      latent-ike: {8: fig4a-latent-k8, 16: fig4a-latent-k16, 24: fig4a-latent-k24, 32: fig4a-latent-k32, 40: unike-intrin+latent-ike}
      ike: {8: fig4a-ike-k8, 16: fig4a-ike-k16, 24: fig4a-ike-k24, 32: unike-intrin+ike, 40: fig4a-ike-k40}
    b:
      fixed: {0.0: fig4b-alpha0.0, 0.2: fig4b-alpha0.2, 0.4: fig4b-alpha0.4, 0.6: fig4b-alpha0.6, 0.8: fig4b-alpha0.8}
      adaptive: unike
    c: {none: fig4c-zeta-none, random: fig4c-zeta-random, semantic: fig4c-zeta-semantic, truthfulness: unike}
"""
REPORT_SECTION = yaml.safe_load(FIGURE4_YAML)["report"]
FIGURE4 = REPORT_SECTION["figure4"]
MISSING_METHOD = "fig4a-ike-k40"  # configured, but the synthetic DB has no run of it

TABLE1_METHODS = ("backbone", "ft", "ke", "tpatcher", "mend", "ike", "serac", "unike")
ABLATIONS = ("unike-only-intrin", "unike-only-latent-ike", "unike-intrin+ike", "unike-intrin+latent-ike")
METHOD_MAP = {m: m for m in (*TABLE1_METHODS, *ABLATIONS)}  # config paper_name: here each method's own name
SEQUENTIAL = ("ft", "ke", "tpatcher", "mend", "serac", "unike")


def write_synthetic_run(out: Path, run_id: str, method: str, backbone: str, task: str, regime: str,
                        rows: list[dict]) -> tuple[Path, Path]:
    """One run file pair; ``rows`` give case_id, task, sequence_id and the five metrics (each
    case its own fact unless a row gives fact_id)."""
    prov = {
        "run_id": run_id, "method": method, "backbone": backbone, "task": task, "regime": regime,
        "seed": 0, "n_edits": len(rows), "config_hash": "cfg", "code_version": "v1", "metric_version": "1",
        "device": "cpu", "dtype": "float32", "dtype_requested": "float32", "wall_s": 1.0, "edit_s_mean": 0.01,
        "peak_mem_mb": 10.0,
    }
    full = [{"run_id": run_id, "fact_id": r["case_id"], "rel_em": r["rel"], "t_gen_em": r["t_gen"],
             "m_gen_em": r["m_gen"], "edit_s": 0.01, **r} for r in rows]
    files = out / f"{run_id}.parquet", out / f"{run_id}.json"
    write_run(*files, full, prov)
    return files


def _random_rows(rng: random.Random, tasks: list[str], seq_len: int, n_seq: int) -> list[dict]:
    rows = []
    for s in range(n_seq):
        for i in range(seq_len):
            task = tasks[i * len(tasks) // seq_len]
            scores = {m: rng.choice((0.0, 0.25, 0.5, 0.75, 1.0)) for m in ("rel", "t_gen", "m_gen", "t_loc", "m_loc")}
            rows.append({"case_id": f"{task}-{s}-{i}", "task": task, "sequence_id": s, **scores})
    return rows


def synthetic_report_inputs(out: Path) -> tuple[Path, dict[str, Path]]:
    """A DuckDB with runs for Tables 1-5 and Figure 4 (all but MISSING_METHOD), and spaces."""
    rng = random.Random(0)
    files = []

    def run(method: str, backbone: str, task: str, regime: str, rows: list[dict]) -> None:
        files.append(write_synthetic_run(out, f"{method}-{backbone}-{task}-{regime}", method, backbone, task,
                                         regime, rows))

    for backbone in BACKBONE_MAP:
        for task in ("e-vqa", "e-ic"):
            for method in TABLE1_METHODS:
                run(method, backbone, task, "one-step", _random_rows(rng, [task], 1, 6))
    for task in ("e-vqa", "e-ic"):
        for method in ABLATIONS:
            run(method, "tiny-minigpt4", task, "one-step", _random_rows(rng, [task], 1, 6))
        for method in SEQUENTIAL:
            for regime, k in (("seq-10", 10), ("seq-20", 20)):
                run(method, "tiny-minigpt4", task, regime, _random_rows(rng, [task], k, 2))
    for method in SEQUENTIAL:
        run(method, "tiny-minigpt4", "cross-task", "cross-10", _random_rows(rng, ["e-ic", "e-vqa"], 10, 2))
    for method in sorted(figure4_methods(FIGURE4) - set(TABLE1_METHODS) - set(ABLATIONS) - {MISSING_METHOD}):
        run(method, "tiny-minigpt4", "e-vqa", "one-step", _random_rows(rng, ["e-vqa"], 1, 6))
    db = out / "metrics.duckdb"
    aggregate(files, db)

    spaces = {}
    for backbone in BACKBONE_MAP:
        n = 20
        path = out / "knowledge" / backbone / "spaces.parquet"
        path.parent.mkdir(parents=True)
        pl.DataFrame({
            "space": ["semantic"] * 2 * n + ["truthfulness"] * 2 * n,
            "polarity": (["positive"] * n + ["negative"] * n) * 2,
            "triplet": list(range(n)) * 4,
            "x": [rng.gauss(0, 1) + (3 if i >= 3 * n else 0) for i in range(4 * n)],
            "y": [rng.gauss(0, 1) for _ in range(4 * n)],
        }, schema={"space": pl.String, "polarity": pl.String, "triplet": pl.Int64, "x": pl.Float64,
                   "y": pl.Float64}).write_parquet(path)
        spaces[backbone] = path
    return db, spaces


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return synthetic_report_inputs(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def results(inputs: tuple[Path, dict[str, Path]]) -> Results:
    with open_readonly(inputs[0]) as con:
        return Results.load(con)


def test_figure4_picks_the_configured_methods(results: Results) -> None:
    data = figure4(results, FIGURE4)
    assert (data.backbone, data.task) == ("tiny-minigpt4", "e-vqa")
    assert [(p.x, p.method) for p in data.a["latent-ike"]] == [
        (8, "fig4a-latent-k8"), (16, "fig4a-latent-k16"), (24, "fig4a-latent-k24"), (32, "fig4a-latent-k32"),
        (40, "unike-intrin+latent-ike")]
    # K = 40 of vanilla IKE has no runs: left out and reported, the rest stays in K order.
    assert [p.method for p in data.a["ike"]] == ["fig4a-ike-k8", "fig4a-ike-k16", "fig4a-ike-k24", "unike-intrin+ike"]
    assert [str(m) for m in data.missing] == ["(a) IKE, K = 40: fig4a-ike-k40"]
    assert [p.x for p in data.b_fixed] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert data.b_adaptive is not None and data.b_adaptive.method == "unike"
    assert [(b.treatment, b.method) for b in data.c] == [
        ("none", "fig4c-zeta-none"), ("random", "fig4c-zeta-random"), ("semantic", "fig4c-zeta-semantic"),
        ("truthfulness", "unike")]
    # The paper's printed bars come along; our truthfulness bar is UniKE's E-VQA cell.
    assert data.c[3].paper == (95.1, 93.8) and data.c[0].paper == (91.6, 91.7)
    sample = results.get("tiny-minigpt4", "unike", "e-vqa", "one-step")
    expected = (sample.means[1] + sample.means[2]) / 2
    assert data.c[3].ours.generality.mean == pytest.approx(expected)
    gen = data.c[3].ours.generality
    assert gen.lo <= gen.mean <= gen.hi


def test_figure4_generality_and_locality_are_means_of_the_sub_metrics(tmp_path: Path) -> None:
    scores = [(1.0, 0.5, 1.0, 0.0), (0.0, 0.5, 1.0, 1.0)]  # (t_gen, m_gen, t_loc, m_loc) per case
    rows = [{"case_id": f"c{i}", "task": "e-vqa", "sequence_id": i, "rel": 1.0, "t_gen": tg, "m_gen": mg,
             "t_loc": tl, "m_loc": ml} for i, (tg, mg, tl, ml) in enumerate(scores)]
    files = [write_synthetic_run(tmp_path, "u", "unike", "tiny-minigpt4", "e-vqa", "one-step", rows)]
    aggregate(files, tmp_path / "db.duckdb")
    with open_readonly(tmp_path / "db.duckdb") as con:
        data = figure4(Results.load(con), {"backbone": "tiny-minigpt4", "task": "e-vqa", "b": {"adaptive": "unike"}})
    assert data.b_adaptive.generality.mean == pytest.approx(50.0)  # mean of 1, .5, 0, .5
    assert data.b_adaptive.locality.mean == pytest.approx(75.0)  # mean of 1, 0, 1, 1
    assert data.a == {} and data.b_fixed == ()
    # Unconfigured treatments keep the paper's bars and name no method (so nothing is "missing").
    assert [b.method for b in data.c] == [None] * 4 and data.missing == ()


def test_tradeoff_leaves_out_sweeps_and_no_edit(results: Results) -> None:
    sweeps = figure4_methods(FIGURE4) - set(TABLE1_METHODS) - set(ABLATIONS)
    points = tradeoff(results, sweeps)
    assert sorted(points) == ["tiny-blip2-opt", "tiny-minigpt4"]
    assert [p.method for p in points["tiny-blip2-opt"]] == list(TABLE1_METHODS[1:])
    minigpt = [p.label for p in points["tiny-minigpt4"]]
    assert "only Intrin" in minigpt and "fig4a-latent-k8" not in minigpt and "Backbone model" not in minigpt
    # Both tasks' cells count once each.
    ft = next(p for p in points["tiny-blip2-opt"] if p.method == "ft")
    cells = [results.get("tiny-blip2-opt", "ft", t, "one-step") for t in ("e-vqa", "e-ic")]
    assert ft.locality.mean == pytest.approx(sum((c.means[3] + c.means[4]) / 2 for c in cells) / 2)


def test_read_spaces_checks_its_input(inputs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    df = read_spaces(inputs[1]["tiny-minigpt4"])
    assert df.height == 80 and df["space"].to_list()[0] == "semantic"
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"space": ["semantic"], "polarity": ["neutral"], "triplet": [0], "x": [0.0],
                  "y": [0.0]}).write_parquet(bad)
    with pytest.raises(ValueError, match="polarity.*neutral"):
        read_spaces(bad)
    pl.DataFrame({"space": ["semantic"]}).write_parquet(bad)
    with pytest.raises(ValueError, match="missing"):
        read_spaces(bad)


def test_render_writes_exactly_the_rule_outputs_deterministically(inputs: tuple[Path, dict[str, Path]],
                                                                  tmp_path: Path) -> None:
    db, spaces = inputs
    first = render_report(db, tmp_path / "a", BACKBONE_MAP, METHOD_MAP, FIGURE4, spaces)
    render_report(db, tmp_path / "b", BACKBONE_MAP, METHOD_MAP, FIGURE4, spaces)
    rel = sorted(str(p.relative_to(tmp_path / "a")) for p in first)
    assert rel == sorted(report_files(figure4=True, figure5a=True))
    assert {"figures/figure4.png", "figures/figure4.pdf", "figures/figure5a.png", "figures/gen-vs-loc.pdf"} <= set(rel)
    for name in rel:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    png = (tmp_path / "a/figures/figure4.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"Software" not in png
    pdf = (tmp_path / "a/figures/figure4.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"CreationDate" not in pdf
    index = (tmp_path / "a/index.html").read_text(encoding="utf-8")
    assert "Missing (no runs): (a) IKE, K = 40: fig4a-ike-k40" in index
    for name in ("figure4", "figure5a", "gen-vs-loc"):
        assert f'<img src="figures/{name}.png"' in index and f'href="figures/{name}.pdf"' in index
    # Figure 4's points as numbers: the estimates the PNG draws, and what has no runs.
    numbers = (tmp_path / "a/figures/figure4.md").read_text(encoding="utf-8")
    assert 'href="figures/figure4.md"' in index
    with open_readonly(db) as con:
        data = figure4(Results.load(con).with_paper_names(METHOD_MAP, paper_method_ids()),
                       renamed_methods(FIGURE4, METHOD_MAP))
    ours = data.c[3].ours
    assert (f"| ζ (ours) | unike | {ours.generality.mean:.1f} [{ours.generality.lo:.1f}, {ours.generality.hi:.1f}] | "
            f"{ours.locality.mean:.1f} [{ours.locality.lo:.1f}, {ours.locality.hi:.1f}] | 95.1, 93.8 |") in numbers
    k8 = data.a["latent-ike"][0]
    assert f"| Latent-IKE | 8 | fig4a-latent-k8 | {k8.generality.mean:.1f} [" in numbers
    assert "Missing (no runs): (a) IKE, K = 40: fig4a-ike-k40" in numbers
    assert "Seeds per cell of ours: 1 (seed 0)." in numbers
    # Figure 4's sweep methods stay out of Table 1 (they are one-step runs too).
    table1 = (tmp_path / "a/tables/table1.md").read_text(encoding="utf-8")
    assert "fig4a-latent-k8" not in table1 and "only Intrin" not in table1


def test_render_without_figure4_section_or_spaces(inputs: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    written = render_report(inputs[0], tmp_path, BACKBONE_MAP, METHOD_MAP)
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == sorted(report_files(False, False))
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Not drawn: the config has no report.figure4 section." in index
    assert "Not drawn: no knowledge spaces were given" in index
    assert 'src="figures/figure4.png"' not in index


def test_figure4_points_come_from_the_methods_hyperparameters() -> None:
    """config.yaml names each curve's methods; K, alpha and the zeta treatment are read from
    their effective hyperparameters, so the figure cannot disagree with what ran."""
    from unike.config import figure4_points, method_entry

    config = load_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    points = figure4_points(config)
    backbone = config["report"]["figure4"]["backbone"]
    assert points["a"]["latent-ike"][8] == "fig4a-latent-k8" and points["a"]["ike"][40] == "fig4a-ike-k40"
    assert points["b"]["fixed"][0.4] == "fig4b-alpha0.4" and points["b"]["adaptive"] == "unike"
    assert points["c"]["none"] == "fig4c-zeta-none" and points["c"]["truthfulness"] == "unike"
    from unike.method.editor import UniKEHparams

    assert all(UniKEHparams(**method_entry(config, m, backbone)["hparams"]).top_k == k
               for k, m in points["a"]["latent-ike"].items())
    # Another K for one method moves its point: nothing else declares it.
    config["methods"]["fig4a-latent-k8"]["hparams"]["top_k"] = 12
    assert figure4_points(config)["a"]["latent-ike"][12] == "fig4a-latent-k8"


@pytest.mark.parametrize("change, where", [
    (lambda f: f["a"].update({"vanilla": ["unike"]}), "report/figure4/a"),
    (lambda f: f["b"].update(fixed={0.9: "fig4b-alpha0.0"}), "report/figure4/b/fixed"),
    (lambda f: f.update(c={"other": "x"}), "report/figure4/c"),
    (lambda f: f.pop("task"), "report/figure4"),
])
def test_bad_report_section_is_rejected(change, where: str) -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    change(config["report"]["figure4"])
    with pytest.raises(ValueError, match=f"invalid at {where}"):
        validate(config)
