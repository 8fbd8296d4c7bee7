from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from reports.paper import paper_table5, paper_tables
from reports.render import render_report, tex_escape
from reports.results import COLUMNS, SCORES, Results
from reports.stats import RESAMPLES, SEED, Sample, components, estimate
from reports.summary import table5
from reports.tables import table1, table2, table3, table4
from unike.store import aggregate, open_readonly, write_run

# Our backbone names -> the paper backbone they are compared against (config: paper_name).
BACKBONE_MAP = {"tiny-blip2-opt": "blip2-opt", "tiny-minigpt4": "minigpt4"}
METHOD_MAP = {m: m for m in ("backbone", "ft", "ke", "tpatcher", "mend", "ike", "serac", "unike", "unike-only-intrin",
                             "unike-only-latent-ike", "unike-intrin+ike", "unike-intrin+latent-ike")}
REPO = Path(__file__).resolve().parents[1]
OUTPUTS = [f"tables/table{n}.{fmt}" for n in range(1, 6) for fmt in ("md", "html", "tex")] + ["index.html"]


def _row(run_id: str, i: int, task: str, rel: float, seq: int | None = None, gen: float = 0.5,
         loc: float = 1.0, fact: str | None = None) -> dict:
    """A per-edit row; exact match is 1 where the token accuracy is."""
    return {
        "run_id": run_id, "case_id": f"c{i}", "fact_id": fact or f"c{i}", "task": task,
        "sequence_id": i if seq is None else seq, "rel": rel, "t_gen": gen, "m_gen": gen, "t_loc": loc, "m_loc": loc,
        "rel_em": float(rel == 1.0), "t_gen_em": float(gen == 1.0), "m_gen_em": float(gen == 1.0), "edit_s": 0.01,
    }


def _run(tmp: Path, run_id: str, method: str, task: str, rows: list[dict] | list[float], regime: str = "one-step",
         device: str = "cpu", backbone: str = "tiny-blip2-opt", dtype_requested: str = "float32", seed: int = 0
         ) -> tuple[Path, Path]:
    """A run file pair; ``rows`` are per-edit rows, or just their rel values (one-step)."""
    if rows and not isinstance(rows[0], dict):
        rows = [_row(run_id, i, task, r) for i, r in enumerate(rows)]
    rows = [{**r, "run_id": run_id} for r in rows]
    prov = {
        "run_id": run_id, "method": method, "backbone": backbone, "task": task, "regime": regime,
        "seed": seed, "n_edits": len(rows), "config_hash": "cfg" + run_id, "code_version": "v1",
        "metric_version": "1", "device": device, "dtype": "float32", "dtype_requested": dtype_requested,
        "wall_s": 3.0, "edit_s_mean": 0.01, "peak_mem_mb": 100.0,
    }
    files = tmp / f"{run_id}.parquet", tmp / f"{run_id}.json"
    write_run(*files, rows, prov)
    return files


def _seq_rows(task: str, sequences: list[list[float]]) -> list[dict]:
    rows, i = [], 0
    for s, rels in enumerate(sequences):
        for rel in rels:
            rows.append(_row("", i, task, rel, seq=s))
            i += 1
    return rows


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    mg = "tiny-minigpt4"
    files = [
        _run(tmp, "ft-vqa", "ft", "e-vqa", [1.0, 0.5]),
        # A sequential run must not leak into Table 1 (it would pull the mean to 50.0).
        _run(tmp, "ft-vqa-seq", "ft", "e-vqa", [0.0, 0.0], regime="seq-10"),
        _run(tmp, "new-vqa", "newbaseline", "e-vqa", [0.25, 0.25, 0.25], device="<gpu & co>",
             dtype_requested="bfloat16"),  # ran in float32: the CPU's fallback
        # Table 2: seed 0 has two sequences of whole-sequence scores 100 and 0 (mean 50), seed 1
        # one of 100: the mean over seeds is 75.
        _run(tmp, "mend-seq10-s0", "mend", "e-ic", _seq_rows("e-ic", [[1.0, 1.0], [0.0, 0.0]]), "seq-10", backbone=mg),
        _run(tmp, "mend-seq10-s1", "mend", "e-ic", _seq_rows("e-ic", [[1.0, 1.0]]), "seq-10", backbone=mg, seed=1),
        # Table 3: one mixed score set over E-VQA and E-IC cases of the cross-task run.
        _run(tmp, "unike-cross", "unike", "cross-task",
             [_row("", 0, "e-vqa", 1.0, 0), _row("", 1, "e-ic", 0.0, 0), _row("", 2, "e-ic", 0.5, 0)],
             "cross-10", backbone=mg),
        # Table 4: an ablation; Table 5 weighting: UniKE's two one-step cells of unequal size.
        _run(tmp, "only-intrin-vqa", "unike-only-intrin", "e-vqa", [0.5, 0.0], backbone=mg),
        _run(tmp, "unike-vqa", "unike", "e-vqa",
             [_row("", i, "e-vqa", 1.0, gen=g, loc=1.0) for i, g in enumerate([1.0, 0.0])], backbone=mg),
        _run(tmp, "unike-ic", "unike", "e-ic",
             [_row("", i, "e-ic", 0.0, gen=0.5, loc=0.5) for i in range(4)], backbone=mg),
    ]
    path = tmp / "results.duckdb"
    aggregate(files, path)
    return path


@pytest.fixture(scope="module")
def results(db: Path) -> Results:
    with open_readonly(db) as con:
        return Results.load(con)


@pytest.fixture(scope="module")
def out(db: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    render_report(db, out, BACKBONE_MAP, METHOD_MAP)
    return out


def test_table1_values(results: Results) -> None:
    t = table1(results, BACKBONE_MAP)
    c = t.cell("tiny-blip2-opt", "ft", "e-vqa", "rel")
    assert c.ours.mean == pytest.approx(75.0) and c.paper == 58.7 and c.diff == pytest.approx(16.3)
    # Two cases (100, 50): a resample mean is 100, 75 or 50, each extreme with probability 1/4.
    assert (c.ours.lo, c.ours.hi) == (50.0, 100.0)
    assert t.row("tiny-blip2-opt", "ft").n == {"e-vqa": 2, "e-ic": 0}
    # Exact match beside it: only the first case is exact.
    assert t.em("tiny-blip2-opt", "ft", "e-vqa", "rel_em").mean == pytest.approx(50.0)
    assert t.em("tiny-blip2-opt", "ft", "e-ic", "rel_em") is None
    assert t.cell("tiny-blip2-opt", "ft", "e-ic", "rel").ours is None
    assert t.cell("tiny-blip2-opt", "newbaseline", "e-vqa", "rel").paper is None
    # Paper-order rows first, the new baseline last; the ablation belongs to Table 4 only.
    group = t.groups[0]
    assert [r.method for r in group.rows] == ["backbone", "ft", "ke", "tpatcher", "mend", "ike", "serac",
                                              "unike", "newbaseline"]
    assert [g.label for g in t.groups] == ["tiny-blip2-opt (paper: BLIP-2 OPT)", "tiny-minigpt4 (paper: MiniGPT-4)"]
    assert "unike-only-intrin" not in [r.method for r in t.groups[1].rows]
    assert t.cell("tiny-minigpt4", "unike", "e-ic", "m_loc").paper == 87.3
    assert t.cell("tiny-minigpt4", "unike", "e-ic", "m_loc").ours.mean == pytest.approx(50.0)


def test_table2_resamples_whole_sequences(results: Results) -> None:
    t = table2(results, BACKBONE_MAP)
    # The paper has no sequential BLIP-2 OPT: that group of ours comes after the paper's backbones.
    assert [g.label for g in t.groups] == ["tiny-minigpt4 (paper: MiniGPT-4)", "tiny-blip2-opt (not in paper)"]
    assert [r.method for r in t.groups[0].rows] == ["ft", "ke", "tpatcher", "mend", "serac", "unike"]
    c = t.cell("tiny-minigpt4", "mend", "e-ic/seq-10", "rel")
    # Seeds weigh equally: rows 100, 100, 0, 0 (seed 0, mean 50) and 100, 100 (seed 1) give 75;
    # pooling the six rows would give 66.7.
    assert c.ours.mean == pytest.approx(75.0) and c.paper == 90.2
    assert t.row("tiny-minigpt4", "mend").n == {"e-vqa/seq-10": 0, "e-vqa/seq-20": 0, "e-ic/seq-10": 6,
                                                 "e-ic/seq-20": 0}
    sample = results.get("tiny-minigpt4", "mend", "e-ic", "seq-10")
    assert (sample.n_units, sample.n_seeds) == (3, 2)
    # A resample averages two drawn seeds, each a resample of its sequences (seed 0: 100 or 0 each,
    # so 0, 50 or 100; seed 1: 100), so it is a multiple of 25; resampling cases would give odd
    # multiples of 12.5 too. Below 50 only when seed 0 fills both draws: seeds are resampled.
    reps = set(np.round(sample.replicates[:, 0], 6))
    assert reps <= {25.0 * k for k in range(5)} and min(reps) < 50
    assert "Seeds per cell of ours: 1-2 (seeds 0, 1)." in t.caption
    assert t.cell("tiny-blip2-opt", "ft", "e-vqa/seq-10", "rel").ours.mean == 0.0
    assert t.cell("tiny-blip2-opt", "ft", "e-vqa/seq-10", "rel").paper is None


def test_table3_is_one_mixed_score_set(results: Results) -> None:
    t = table3(results, BACKBONE_MAP)
    c = t.cell("tiny-minigpt4", "unike", "cross-task", "rel")
    assert c.ours.mean == pytest.approx(50.0) and c.paper == 90.7  # (100 + 0 + 50) / 3
    assert t.row("tiny-minigpt4", "unike").n == {"cross-task": 3}
    # One sequence: nothing to resample, the interval collapses onto the mean.
    assert (c.ours.lo, c.ours.hi) == pytest.approx((50.0, 50.0))


def test_table4_rows_and_labels(results: Results) -> None:
    t = table4(results, BACKBONE_MAP)
    assert [g.label for g in t.groups] == ["tiny-minigpt4 (paper: MiniGPT-4)"]  # blip2-opt has no ablation runs
    assert [r.label for r in t.groups[0].rows] == ["only Intrin", "only Latent-IKE", "Intrin+IKE",
                                                   "Intrin+Latent-IKE", "UniKE (Ours)"]
    assert t.cell("tiny-minigpt4", "unike-only-intrin", "e-vqa", "rel").ours.mean == pytest.approx(25.0)
    assert t.cell("tiny-minigpt4", "unike-only-intrin", "e-vqa", "rel").paper == 83.5
    assert t.cell("tiny-minigpt4", "unike-intrin+ike", "e-ic", "m_loc").ours is None


def test_table5_weights_cells_equally(results: Results) -> None:
    t = table5(results)
    unike = t.row("unike")
    # Cells: E-VQA (2 cases, rel 100) and E-IC (4 cases, rel 0). Equal cell weights give 50,
    # pooling the six cases would give 33.3.
    rel = t.cell("unike", "one-step", "reliability")
    assert rel.ours.mean == pytest.approx(50.0) and unike.k["one-step"] == 2
    assert t.cell("unike", "one-step", "generality").ours.mean == pytest.approx((50.0 + 50.0) / 2)
    assert t.cell("unike", "one-step", "locality").ours.mean == pytest.approx((100.0 + 50.0) / 2)
    assert rel.printed == 98.0 and rel.recomputed == pytest.approx(97.975)
    # Exact match, ours only: E-VQA cases are exact on Rel. (100) and on one of two generality
    # rows (50), E-IC cases on neither (0); the cells average to 50 and 25.
    assert [e.mean for e in unike.em["one-step"]] == [pytest.approx(50.0), pytest.approx(25.0)]
    assert t.em_scores == ("reliability_em", "generality_em")
    # Sequential: only one cell of ours (two seeds); the paper has no sequential IKE.
    assert t.cell("mend", "sequential", "reliability").ours.mean == pytest.approx(75.0)
    assert t.row("mend").k == {"one-step": 0, "sequential": 1}
    assert t.cell("ike", "sequential", "reliability").printed is None
    assert [r.method for r in t.rows] == ["ft", "ke", "tpatcher", "mend", "ike", "serac", "unike", "newbaseline"]


def test_table5_recomputes_and_flags_the_paper() -> None:
    t = table5(Results({}))
    ft = t.cell("ft", "one-step", "reliability")
    assert ft.printed == 64.3 and ft.recomputed == pytest.approx((58.7 + 61.1 + 70.1 + 67.4) / 4) and not ft.flagged
    ke = t.cell("ke", "one-step", "locality")
    expected = np.mean([(93.8 + 66.4) / 2, (95.0 + 64.3) / 2, (96.9 + 67.8) / 2, (97.3 + 64.4) / 2])
    assert ke.printed == 72.4 and ke.recomputed == pytest.approx(expected) and ke.flagged
    assert t.cell("mend", "one-step", "reliability").flagged
    assert not any(c.flagged for r in t.rows for c in r.cells["sequential"])
    assert any(n.startswith("KE, one-step editing, locality: the paper prints 72.4") for n in t.notes)
    assert len(t.notes) == 3
    assert t.cell("ft", "one-step", "reliability").ours is None


def test_bootstrap_is_deterministic_and_contains_the_mean() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 100, size=(50, len(COLUMNS)))
    units, seeds = np.arange(50), np.zeros(50, dtype=np.int64)
    a = estimate([Sample("k", values, units, seeds)], SCORES["generality"])
    b = estimate([Sample("k", values.copy(), units.copy(), seeds.copy())], SCORES["generality"])
    assert a == b and a.lo < a.mean < a.hi
    assert a.mean == pytest.approx(values[:, 1:3].mean())
    # The key seeds the resampling: another cell with the same data draws other resamples.
    assert estimate([Sample("other", values, units, seeds)], SCORES["generality"]) != a


def _sample(key: str, rel: list[float], seeds: list[int], facts: list[str], sequences: list[int] | None = None
            ) -> Sample:
    """A cell whose rows score ``rel`` (percent) and 0 elsewhere; one run per seed."""
    values = np.zeros((len(rel), len(COLUMNS)))
    values[:, 0] = rel
    sequences = list(range(len(rel))) if sequences is None else sequences
    return Sample.of_rows(key, values, seeds, facts, [(f"run{s}", q) for s, q in zip(seeds, sequences)])


def test_components_join_rows_through_shared_keys() -> None:
    # Rows 0 and 2 share "a", rows 2 and 4 share "c": one component; 1 and 3 stand alone.
    assert components([("a",), ("b",), ("a", "c"), ("d",), ("c",)]).tolist() == [0, 1, 0, 2, 0]
    assert components([]).tolist() == []


def test_units_are_facts_and_sequences() -> None:
    # One-step: the two cases of fact f1 are one unit.
    one_step = _sample("k", [100, 100, 0, 0], [0] * 4, ["f1", "f1", "f2", "f3"])
    assert one_step.units.tolist() == [0, 0, 1, 2] and one_step.n_units == 3
    # Sequences 0 and 1 share fact g: one unit; sequence 2 is another.
    seq = _sample("k", [100, 0, 100, 0, 50], [0] * 5, ["x", "g", "g", "y", "z"], sequences=[0, 0, 1, 1, 2])
    assert seq.units.tolist() == [0, 0, 0, 0, 1] and seq.n_units == 2
    # The same fact_id under another seed is another world's fact.
    seeds = _sample("k", [100, 0], [0, 1], ["f", "f"])
    assert seeds.n_units == 2 and (seeds.n_seeds, seeds.seed_values) == (2, (0, 1))
    with pytest.raises(ValueError, match="spans several seeds"):
        Sample("k", np.zeros((2, len(COLUMNS))), np.array([0, 0]), np.array([0, 1]))


def test_shared_facts_resample_together() -> None:
    # Fact A has two rows of 100, fact B one of 0. A resample draws two facts and pools their
    # rows: {A, A} 100, {A, B} 200 / 3, {B, B} 0. Cases drawn one by one would give 100/3 too.
    sample = _sample("k", [100, 100, 0], [0] * 3, ["A", "A", "B"])
    assert set(np.round(sample.replicates[:, 0], 6)) == {0.0, round(200 / 3, 6), 100.0}
    # Interval width: 20 facts of 5 identical cases each. Resampling facts is about sqrt(5) times
    # wider than treating the 100 cases as independent.
    rel = [100.0 * (f % 2) for f in range(20) for _ in range(5)]
    facts = [f"f{f}" for f in range(20) for _ in range(5)]
    by_fact = estimate([_sample("k", rel, [0] * 100, facts)], SCORES["reliability"])
    by_case = estimate([_sample("k", rel, [0] * 100, [str(i) for i in range(100)])], SCORES["reliability"])
    assert by_fact.mean == by_case.mean == 50.0
    assert by_fact.hi - by_fact.lo > 1.8 * (by_case.hi - by_case.lo)


def test_one_seed_resamples_units_as_before() -> None:
    """One seed: the estimate is the mean over rows and the resamples are draws of U units."""
    sample = _sample("cell", [100, 0, 50, 100], [3] * 4, ["a", "b", "a", "c"])
    assert sample.means[0] == pytest.approx(62.5)
    unit_sums, unit_rows = np.array([150.0, 0.0, 100.0]), np.array([2.0, 1.0, 1.0])
    rng = np.random.default_rng([SEED, zlib.crc32(b"cell")])
    draws = rng.multinomial(3, np.full(3, 1 / 3), size=RESAMPLES)
    np.testing.assert_allclose(sample.replicates[:, 0], (draws @ unit_sums) / (draws @ unit_rows))


def test_units_in_the_db_follow_facts_and_sequences(tmp_path: Path) -> None:
    # One-step: cases c0 and c1 are two images of fact f; c2 is its own fact.
    one_step = [_row("", 0, "e-vqa", 1.0, fact="f"), _row("", 1, "e-vqa", 1.0, fact="f"), _row("", 2, "e-vqa", 0.0)]
    # seq-10: sequences 0 and 1 share fact g and merge; sequence 2 stands alone.
    seq = [_row("", 0, "e-vqa", 1.0, 0, fact="g"), _row("", 1, "e-vqa", 1.0, 1, fact="g"), _row("", 2, "e-vqa", 0.0, 1),
           _row("", 3, "e-vqa", 0.0, 2)]
    files = [_run(tmp_path, "one", "ft", "e-vqa", one_step), _run(tmp_path, "seq", "ft", "e-vqa", seq, "seq-10")]
    aggregate(files, tmp_path / "db.duckdb")
    with open_readonly(tmp_path / "db.duckdb") as con:
        results = Results.load(con)
    assert results.get("tiny-blip2-opt", "ft", "e-vqa", "one-step").units.tolist() == [0, 0, 1]
    assert results.get("tiny-blip2-opt", "ft", "e-vqa", "seq-10").units.tolist() == [0, 0, 0, 1]


def test_several_seeds_mean_over_seeds_and_resample_them() -> None:
    # Seed 0: four rows of 0; seed 1: one row of 100. Seeds weigh equally: 50 (pooled rows: 20).
    sample = _sample("k", [0, 0, 0, 0, 100], [0, 0, 0, 0, 1], ["a", "b", "c", "d", "a"])
    assert sample.means[0] == pytest.approx(50.0)
    # No variance within a seed, so resampling units alone would give [50, 50]; drawing the two
    # seeds gives 0 (both seed 0), 50 or 100 (both seed 1), with 0 and 100 a quarter each.
    reps = sample.replicates[:, 0]
    assert set(reps) == {0.0, 50.0, 100.0}
    assert np.mean(reps == 0.0) == pytest.approx(0.25, abs=0.05)
    e = estimate([sample], SCORES["reliability"])
    assert (e.mean, e.lo, e.hi) == (50.0, 0.0, 100.0)


def test_reference_is_packaged() -> None:
    tables = paper_tables()
    assert sum(k[0] == "table1" for k in tables) == 32  # 2 backbones x 8 methods x 2 tasks
    assert sum(k[0] == "table2" for k in tables) == 24 and sum(k[0] == "table3" for k in tables) == 6
    assert sum(k[0] == "table4" for k in tables) == 10 and len(paper_table5()) == 13


def test_rendered_files(out: Path) -> None:
    md = (out / "tables/table1.md").read_text(encoding="utf-8")
    html = (out / "tables/table1.html").read_text(encoding="utf-8")
    tex = (out / "tables/table1.tex").read_text(encoding="utf-8")
    index = (out / "index.html").read_text(encoding="utf-8")

    assert "| FT (last layer) | 75.0 [50.0, 100.0] (58.7, +16.3) |" in md
    assert re.search(r"^\| newbaseline \| 25\.0 \[25\.0, 25\.0\] \(–\) \|.* 3 \|", md, re.M)
    assert "– (85.3)" in md  # paper-only cell (KE, E-VQA Rel.)
    for text in (html, index):
        assert '75.0 <span class="ci">[50.0, 100.0]</span><br><small>(58.7, +16.3)</small>' in text
        assert 'title="paper 58.7; ours − paper +16.3"' in text
        assert "<td class=\"method\">newbaseline</td>" in text
    assert r"75.0\,{\tiny[50.0, 100.0]}\,{\tiny(58.7)}" in tex and "\nnewbaseline & 25.0" in tex
    assert tex.startswith("\\begin{table*}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\cmidrule(lr){2-10}\cmidrule(lr){11-19}" in tex
    # Exact match beside token accuracy, ours only: after FT's M-Loc. cell (paper 63.1), Rel. EM of
    # cases 100 and 0 with no paper value; then T-Gen. EM, M-Gen. EM and n.
    assert "(63.1, +36.9) | 50.0 [0.0, 100.0] | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] | 2 |" in md
    assert "| E-VQA M-Loc. | E-VQA Rel. EM | E-VQA T-Gen. EM | E-VQA M-Gen. EM | E-VQA n |" in md
    assert '<th class="em">Rel. EM</th>' in html
    assert '(63.1, +36.9)</small></td><td class="num em">50.0 <span class="ci">[0.0, 100.0]</span></td>' in html
    assert r"{\tiny(63.1)} & 50.0\,{\tiny[0.0, 100.0]} & 0.0" in tex
    assert "The paper reports no exact match." in md and "Seeds per cell of ours: 1 (seed 0)." in md
    assert "95% percentile-bootstrap CI" in md and r"95\% CI" in tex

    t5 = (out / "tables/table5.md").read_text(encoding="utf-8")
    assert "| UniKE | 50.0 [" in t5 and "(98.0 / 98.0, -48.0)" in t5
    assert "(93.8 / 93.8, -18.8) | 50.0 [50.0, 50.0] | 25.0 [" in t5 and "One-step editing Reliability EM" in t5
    assert "Seeds per cell of ours: 1-2 (seeds 0, 1)." in t5
    assert "(72.4† / 80.7" in t5 and "† KE, one-step editing, locality: the paper prints 72.4" in t5
    assert "$^\\dagger$" in (out / "tables/table5.tex").read_text(encoding="utf-8")
    assert '<td class="num flag">' in (out / "tables/table5.html").read_text(encoding="utf-8")
    t3 = (out / "tables/table3.md").read_text(encoding="utf-8")
    assert "| UniKE | 50.0 [50.0, 50.0] (90.7, -40.7) |" in t3

    # Offline page: no external resources, links to the other formats, provenance, autoescape.
    assert "http" not in index and "<script" not in index
    for n in range(1, 6):
        assert f'href="tables/table{n}.md"' in index and f'href="tables/table{n}.tex"' in index
        assert f'id="table{n}"' in index
    assert "NeurIPS 2024" in index and "per-edit rows" in index
    assert "<td>ft-vqa-seq</td><td>ft</td>" in index and "<td>cfgft-vqa</td>" in index
    assert "&lt;gpu &amp; co&gt;" in index and "<gpu" not in index
    assert "<th>dtype</th><th>dtype_requested</th>" in index
    assert "<td>&lt;gpu &amp; co&gt;</td><td>float32</td><td>bfloat16</td>" in index


def test_render_is_deterministic_and_read_only(db: Path, out: Path, tmp_path: Path) -> None:
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    render_report(db, tmp_path, BACKBONE_MAP, METHOD_MAP)
    for rel in OUTPUTS + ["figures/gen-vs-loc.png", "figures/gen-vs-loc.pdf"]:
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_empty_db_shows_the_paper(tmp_path: Path) -> None:
    """A smoke DB may lack whole regimes; an empty one must still render every table."""
    aggregate([], tmp_path / "empty.duckdb")
    render_report(tmp_path / "empty.duckdb", tmp_path / "report", BACKBONE_MAP, METHOD_MAP)
    t2 = (tmp_path / "report/tables/table2.md").read_text(encoding="utf-8")
    assert "| **MiniGPT-4 (paper only)** |" in t2 and "| UniKE | – (91.5) |" in t2
    t5 = (tmp_path / "report/tables/table5.md").read_text(encoding="utf-8")
    assert "| FT (last layer) | – (64.3 / 64.3) |" in t5
    assert "no one-step runs" not in t5  # the figure says so, not the table
    assert (tmp_path / "report/figures/gen-vs-loc.png").stat().st_size > 0


def test_tex_escape() -> None:
    assert tex_escape("a_b & 50% #1 {x} $y$ ~^\\") == (
        r"a\_b \& 50\% \#1 \{x\} \$y\$ \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_reports_do_not_import_model_code() -> None:
    code = (
        "import sys, reports.render, reports.tables, reports.figures, reports.summary\n"
        "import matplotlib\n"
        # unike.grid, the grid's vocabulary, is the one module of the unike package they read
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'unike')\n"
        "             and m not in ('unike', 'unike.grid'))\n"
        "assert not bad, bad\n"
        "assert 'matplotlib.pyplot' not in sys.modules  # the Agg canvas only, no GUI backend\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cli_passes_the_report_section_and_spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from unike import cli

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["out_dir"] = str(tmp_path / "out")
    config["report"] = {"figure4": {"backbone": "tiny-minigpt4", "task": "e-vqa", "b": {"adaptive": "unike"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    calls = []
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the CLI sets these; keep them out of other tests
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr("reports.render.render_report", lambda *a: calls.append(a))
    spaces = str(tmp_path / "out/knowledge/tiny-minigpt4/spaces.parquet")
    cli.main(["report", "--config", str(tmp_path / "config.yaml"), "--spaces", spaces])
    db, report, backbone_map, method_map, figure4, given = calls[0]
    assert backbone_map == BACKBONE_MAP and method_map == METHOD_MAP
    assert figure4 == {"backbone": "tiny-minigpt4", "task": "e-vqa", "b": {"adaptive": "unike"}}
    assert given == {"tiny-minigpt4": Path(spaces)} and report == tmp_path / "out/report"


def test_paper_rows_are_matched_by_paper_name_only(results: Results) -> None:
    """A renamed method keeps its comparison with the paper through `paper_name`; a method
    without one that is named like a paper row is refused instead of silently matched."""
    from reports.paper import paper_method_ids
    from reports.tables import table1

    renamed = Results({(b, "my-ft" if m == "ft" else m, t, r): s for (b, m, t, r), s in results.cells.items()})
    mapping = {**{m: m for m in METHOD_MAP if m != "ft"}, "my-ft": "ft"}
    ours = table1(renamed.with_paper_names(mapping, paper_method_ids()), BACKBONE_MAP)
    reference = table1(results.with_paper_names(METHOD_MAP, paper_method_ids()), BACKBONE_MAP)
    assert ours == reference and any(row.method == "ft" for group in ours.groups for row in group.rows)
    clash = r"\['mend', 'unike', 'unike-only-intrin'\] have no paper_name but are named like the paper"
    with pytest.raises(ValueError, match=clash):
        renamed.with_paper_names({"my-ft": "ft"}, paper_method_ids())
