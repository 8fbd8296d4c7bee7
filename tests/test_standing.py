"""benchmarks/standing.py: per-backbone one-step scores on a hand-computed case."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from standing import standing  # noqa: E402

from reports.results import COLUMNS, Results  # noqa: E402
from reports.stats import Sample  # noqa: E402


def _cell(rows: list[dict]) -> Sample:
    values = np.array([[r.get(c, 0.0) for c in COLUMNS] for r in rows])
    return Sample.of_rows("k", values, [0] * len(rows), [f"f{i}" for i in range(len(rows))],
                          [("r", i) for i in range(len(rows))])


def test_scores_are_table5s_weighting_and_partial_methods_are_not_ranked():
    # UniKE: E-VQA rows (rel 100, gens 80/60, locs 90/70) and (rel 50, gens 40/20, locs 100/100);
    # E-IC one row (rel 70, gens 70/70, locs 100/80). Task means: rel 75 and 70 -> 72.5;
    # gen (60+40)/2 = 50 and 70 -> 60; loc (80+100)/2 = 90 and 90 -> 90; mean (72.5+60+90)/3.
    vqa = [dict(rel=100, t_gen=80, m_gen=60, t_loc=90, m_loc=70, rel_em=100),
           dict(rel=50, t_gen=40, m_gen=20, t_loc=100, m_loc=100, rel_em=0)]
    ic = [dict(rel=70, t_gen=70, m_gen=70, t_loc=100, m_loc=80, rel_em=0)]
    cells = {("tiny-a", "unike", "e-vqa", "one-step"): _cell(vqa), ("tiny-a", "unike", "e-ic", "one-step"): _cell(ic),
             ("tiny-a", "ft", "e-vqa", "one-step"): _cell(ic), ("tiny-a", "ft", "e-ic", "one-step"): _cell(ic),
             # a Figure 4 sweep: one task only, and a sequential cell that standing ignores
             ("tiny-a", "fig4-x", "e-vqa", "one-step"): _cell(vqa), ("tiny-a", "ft", "e-ic", "seq-10"): _cell(vqa)}
    figures = standing(Results(cells), {"unike": "unike", "ft": "ft"})
    rows = {r["method"]: r for r in figures["by_backbone"]["tiny-a"]}
    assert [r["method"] for r in figures["by_backbone"]["tiny-a"]] == ["ft", "unike"]  # the paper's order
    assert figures["partial"] == {"tiny-a": ["fig4-x"]}
    s = rows["unike"]["scores"]
    assert s["reliability"][0] == pytest.approx(72.5)
    assert s["generality"][0] == pytest.approx(60.0)
    assert s["locality"][0] == pytest.approx(90.0)
    assert s["mean"][0] == pytest.approx((72.5 + 60 + 90) / 3, abs=0.01)
    assert s["reliability_em"][0] == pytest.approx(25.0)  # E-VQA 50, E-IC 0
    # Two facts in E-VQA: the interval is real (resampling them moves rel), one fact in E-IC adds none.
    assert s["reliability"][1] < 72.5 < s["reliability"][2]
    assert rows["ft"]["scores"]["reliability"] == [70.0, 70.0, 70.0]  # one fact per task: no spread
