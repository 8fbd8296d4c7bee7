"""Means and percentile-bootstrap confidence intervals of per-edit scores.

A *cell* is the set of per-edit rows behind one table cell (one backbone, method,
run task and regime). Its rows are grouped into resampling units: an edit case in
one-step editing, a whole edit sequence otherwise (the cases of one sequence are
scored on the same edited model, so they are not independent).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

RESAMPLES = 1000
SEED = 2024
LEVEL = 0.95
_PERCENTILES = (100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2)


@dataclass(frozen=True)
class Estimate:
    """A mean (percent) with its 95% percentile-bootstrap interval."""

    mean: float
    lo: float
    hi: float


@dataclass(frozen=True, eq=False)
class Sample:
    """The per-edit scores of one cell.

    ``values`` is (rows, scores) in percent; ``units`` gives each row's resampling unit
    (0..U-1). ``key`` names the cell: it seeds the cell's resampling, so a cell gets the
    same interval in every table and figure, and renders are deterministic regardless
    of the order cells are computed in.
    """

    key: str
    values: np.ndarray
    units: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1

    @cached_property
    def means(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @cached_property
    def replicates(self) -> np.ndarray:
        """(RESAMPLES, scores) bootstrap means: units drawn with replacement, rows pooled."""
        n_units = self.n_units
        sums = np.zeros((n_units, self.values.shape[1]))
        np.add.at(sums, self.units, self.values)
        counts = np.bincount(self.units, minlength=n_units).astype(float)
        rng = np.random.default_rng([SEED, zlib.crc32(self.key.encode())])
        # How often each unit is drawn in each resample: same law as drawing U units with replacement.
        draws = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=RESAMPLES).astype(float)
        return (draws @ sums) / (draws @ counts)[:, None]


def estimate(samples: list[Sample], weights: np.ndarray) -> Estimate | None:
    """Equal-weight mean over cells of a weighted sum of the scores (e.g. generality =
    ½ T-Gen + ½ M-Gen), with a CI from resampling within each cell independently."""
    if not samples:
        return None
    point = float(np.mean([s.means @ weights for s in samples]))
    reps = np.mean([s.replicates @ weights for s in samples], axis=0)
    lo, hi = np.percentile(reps, _PERCENTILES)
    return Estimate(point, float(lo), float(hi))
