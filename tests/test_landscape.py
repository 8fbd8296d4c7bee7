"""benchmarks/landscape.py: Kendall's tau-b on hand-computed cases and a constructed cell."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from landscape import BASELINES, kendall_tau_b, landscape  # noqa: E402

from reports.paper import paper_tables  # noqa: E402
from reports.results import COLUMNS, Results  # noqa: E402
from reports.stats import Sample  # noqa: E402


def test_tau_b_by_hand():
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 concordant, 1 discordant
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))  # one tie in x


def test_a_landscape_ordered_as_the_papers_agrees_everywhere():
    """Our cell built from the paper's own Table 1 numbers: tau 1 in every metric where the
    paper's values are not all tied."""
    paper = paper_tables()
    cells = {}
    for method in BASELINES:
        printed = paper[("table1", "blip2-opt", "e-vqa", "one-step", method)]
        row = [printed[m] for m in ("rel", "t_gen", "m_gen", "t_loc", "m_loc")] + [0.0] * (len(COLUMNS) - 5)
        cells[("tiny-blip2-opt", method, "e-vqa", "one-step")] = Sample.of_rows(
            method, np.array([row]), [0], ["f"], [("r", 0)])
    figures = landscape(Results(cells), {"tiny-blip2-opt": "blip2-opt"})
    (cell,) = figures["cells"]
    assert cell["methods"] == sorted(BASELINES)
    assert all(t == pytest.approx(1.0) for t in cell["tau"].values())
    assert figures["agree"] == 5 and figures["disagree"] == 0
