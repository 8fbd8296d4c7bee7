"""benchmarks/unike_gate.py's figures on hand-computed cases."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # scripts import each other by name
from unike_gate import auc, gate_figures  # noqa: E402


def test_auc_counts_wins_and_half_ties():
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    # pairs (0.5 vs 0.5) tie, (0.5 vs 0.2) win, (0.1 vs 0.5) lose, (0.1 vs 0.2) lose: (0.5 + 1) / 4
    assert auc([0.5, 0.1], [0.5, 0.2]) == pytest.approx(0.375)


def test_gate_figures_pool_the_related_rows_against_each_locality_row():
    rows = {"rel": [0.6], "t_gen": [0.4], "m_gen": [0.5], "t_loc": [0.45, 0.45], "m_loc": [0.0, 0.2]}
    figures = gate_figures({"after_edit": rows})["after_edit"]
    assert figures["mean_alpha"] == pytest.approx({"rel": 0.6, "t_gen": 0.4, "m_gen": 0.5, "t_loc": 0.45, "m_loc": 0.1})
    assert figures["auc"]["m_loc"] == 1.0
    assert figures["auc"]["t_loc"] == pytest.approx(2 / 3)  # 0.6 and 0.5 above 0.45, 0.4 below
