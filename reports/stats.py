"""Means and percentile-bootstrap confidence intervals of per-edit scores.

A *cell* is the set of per-edit rows behind one table cell (one backbone, method, run
task and regime), possibly from several seeds (each seed has its own world, backbones
and edit cases).

Resampling units. A bootstrap is only as wide as its units are independent, so rows
that are not independent are drawn together:

- rows that edit the same fact (several images or phrasings of one edit share a
  ``fact_id``; real MMEdit records are each their own fact) within one seed;
- rows of the same edit sequence of a run: the cases of one sequence are scored on the
  same edited model. A one-step sequence holds one case, so there only facts link rows.

A unit is a connected component of rows under these two links: one-step editing
resamples facts, sequential and cross-task editing resample sequences, merged where
sequences share a fact. Resampling cases instead would treat the images of one fact as
independent evidence and give intervals that are too narrow.

Seeds. With one seed the estimate is the mean over rows and the bootstrap draws units
with replacement. With several, the estimate is the mean of the seeds' means (each seed
a replicate of the whole experiment, whatever its number of cases), and the bootstrap is
two-stage: draw seeds with replacement, then units with replacement within each drawn
seed. Case resampling alone would leave out the variation between worlds, backbones and
edit sets, which is what seeds exist to show. Resampling seeds alone would give at most
10 distinct means with 3 seeds (and a zero-width interval where seeds agree); the
second stage keeps each seed's own uncertainty. The two-stage bootstrap counts the
within-seed variance about twice, so with few seeds it errs on the wide side (Davison &
Hinkley 1997, Bootstrap Methods and their Application, section 3.8): the conservative
side for a claim that two methods differ.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence
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


def components(links: Sequence[Sequence[Hashable]]) -> np.ndarray:
    """Each row's connected component, numbered 0..U-1 in order of its first row: two rows
    are in one component when a chain of rows, each sharing a link key with the next,
    joins them. ``links[i]`` are row i's keys."""
    parent = list(range(len(links)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}
    for i, keys in enumerate(links):
        for key in keys:
            a, b = root(i), root(first.setdefault(key, i))
            # The smaller row index becomes the root, so a root is its component's first row.
            parent[max(a, b)] = min(a, b)
    _, numbered = np.unique([root(i) for i in range(len(links))], return_inverse=True)
    return numbered.astype(np.int64).reshape(-1)


@dataclass(frozen=True, eq=False)
class Sample:
    """The per-edit scores of one cell.

    ``values`` is (rows, scores) in percent; ``units`` gives each row's resampling unit
    (0..U-1) and ``seeds`` its seed; a unit lies within one seed. ``key`` names the cell:
    it seeds the cell's resampling, so a cell gets the same interval in every table and
    figure, and renders are deterministic regardless of the order cells are computed in.
    """

    key: str
    values: np.ndarray
    units: np.ndarray
    seeds: np.ndarray

    @classmethod
    def of_rows(cls, key: str, values: np.ndarray, seeds: Sequence[int], facts: Sequence[Hashable],
                sequences: Sequence[Hashable]) -> Sample:
        """A cell from its rows: each row's seed, fact and edit sequence (a key unique to its
        run, e.g. (run_id, sequence_id)); the units follow the module docstring."""
        units = components([(("fact", s, f), ("sequence", q)) for s, f, q in zip(seeds, facts, sequences)])
        return cls(key, values, units, np.asarray(seeds, dtype=np.int64))

    def __post_init__(self) -> None:
        if len(self.values) != len(self.units) or len(self.units) != len(self.seeds):
            raise ValueError(f"{self.key}: values, units and seeds differ in length")
        spans = np.unique(np.stack([self.units, self.seeds]), axis=1)[0]
        if len(spans) != len(np.unique(spans)):
            raise ValueError(f"{self.key}: a resampling unit spans several seeds")

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1

    @cached_property
    def seed_values(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.unique(self.seeds))

    @property
    def n_seeds(self) -> int:
        return len(self.seed_values)

    @cached_property
    def means(self) -> np.ndarray:
        """The mean over seeds of each seed's mean over rows (one seed: the mean over rows)."""
        return np.mean([self.values[self.seeds == s].mean(axis=0) for s in self.seed_values], axis=0)

    @cached_property
    def replicates(self) -> np.ndarray:
        """(RESAMPLES, scores) bootstrap means: seeds, then units within each seed, drawn with
        replacement (one seed: units only); rows pooled within a seed, seeds weighted equally."""
        n_units = self.n_units
        sums = np.zeros((n_units, self.values.shape[1]))
        np.add.at(sums, self.units, self.values)
        counts = np.bincount(self.units, minlength=n_units).astype(float)
        unit_seed = np.zeros(n_units, dtype=np.int64)
        unit_seed[self.units] = np.searchsorted(self.seed_values, self.seeds)
        rng = np.random.default_rng([SEED, zlib.crc32(self.key.encode())])

        def within(seed: int, size: int) -> np.ndarray:
            """``size`` resample means of one seed's units."""
            mine = unit_seed == seed
            n = int(mine.sum())
            # How often each unit is drawn in each resample: same law as drawing n units with replacement.
            draws = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)
            return (draws @ sums[mine]) / (draws @ counts[mine])[:, None]

        n_seeds = self.n_seeds
        if n_seeds == 1:
            return within(0, RESAMPLES)
        reps = np.zeros((RESAMPLES, self.values.shape[1]))
        for _ in range(n_seeds):  # one slot per seed of a resample
            drawn = rng.integers(n_seeds, size=RESAMPLES)
            for seed in range(n_seeds):
                # A seed drawn into several slots gets a fresh resample of its units in each.
                reps[drawn == seed] += within(seed, int((drawn == seed).sum()))
        return reps / n_seeds


def estimate(samples: list[Sample], weights: np.ndarray) -> Estimate | None:
    """Equal-weight mean over cells of a weighted sum of the scores (e.g. generality =
    ½ T-Gen + ½ M-Gen), with a CI from resampling within each cell independently."""
    if not samples:
        return None
    point = float(np.mean([s.means @ weights for s in samples]))
    reps = np.mean([s.replicates @ weights for s in samples], axis=0)
    lo, hi = np.percentile(reps, _PERCENTILES)
    return Estimate(point, float(lo), float(hi))
