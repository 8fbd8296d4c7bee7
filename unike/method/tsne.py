"""Exact t-SNE (van der Maaten and Hinton, 2008) in torch, for Figure 5a (the semantic and
truthfulness spaces in 2-D). sklearn is not in the stack, and exact t-SNE on the figure's
~1,000 points is cheap.

- Affinities: Gaussian conditionals P(j|i) on squared Euclidean distances, each row's
  precision found by bisection so that its perplexity (2^entropy) matches `perplexity`;
  P = (P(j|i) + P(i|j)) / 2n.
- Embedding: Student-t (one degree of freedom) similarities Q; gradient descent on KL(P||Q)
  with momentum (0.5, then 0.8), per-coordinate adaptive gains, and early exaggeration of
  P for the first `exaggeration_iters` steps. Learning rate max(n / exaggeration / 4, 50)
  unless given (the "auto" rate of Belkina et al., 2019).
- Float64, one seeded generator for the initialisation: the same input, seed and thread
  count give the same embedding on the CPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TSNEConfig:
    perplexity: float = 30.0
    n_iter: int = 1000
    early_exaggeration: float = 12.0
    exaggeration_iters: int = 250
    learning_rate: float | None = None  # None: max(n / early_exaggeration / 4, 50)
    seed: int = 0


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)


def conditionals(x: torch.Tensor, perplexity: float, tol: float = 1e-5, max_steps: int = 200) -> torch.Tensor:
    """P(j|i) (n, n): row i a Gaussian around x_i whose perplexity is `perplexity`."""
    n = x.shape[0]
    d = _squared_distances(x)
    off = ~torch.eye(n, dtype=torch.bool)
    # Distances relative to each row's nearest neighbour: the same conditionals, no underflow.
    d = d - d.masked_fill(~off, float("inf")).min(1, keepdim=True).values
    target = math.log(perplexity)
    beta = torch.ones(n, dtype=x.dtype)
    lo = torch.zeros(n, dtype=x.dtype)
    hi = torch.full((n,), float("inf"), dtype=x.dtype)
    for _ in range(max_steps):
        w = torch.exp(-d * beta[:, None]) * off
        p = w / w.sum(1, keepdim=True)
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(1)  # nats
        gap = entropy - target
        if bool((gap.abs() < tol).all()):
            break
        too_flat = gap > 0  # entropy too high: sharpen (raise the precision)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    return p


def affinities(x: torch.Tensor, perplexity: float) -> torch.Tensor:
    """Symmetric joint probabilities P (n, n), summing to 1 (up to the floor that keeps log P finite)."""
    n = x.shape[0]
    p = conditionals(x, perplexity)
    return ((p + p.T) / (2 * n)).clamp(min=1e-12) * ~torch.eye(n, dtype=torch.bool)


def _q_and_kernel(y: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = (1 + _squared_distances(y)).reciprocal() * off
    return kernel / kernel.sum(), kernel


def kl_divergence(p: torch.Tensor, y: torch.Tensor) -> float:
    off = ~torch.eye(p.shape[0], dtype=torch.bool)
    q, _ = _q_and_kernel(y, off)
    return float((p[off] * torch.log(p[off] / q[off].clamp(min=1e-12))).sum())


def tsne(x: torch.Tensor, cfg: TSNEConfig = TSNEConfig()) -> tuple[torch.Tensor, float]:
    """2-D embedding (n, 2) of the rows of `x` and its final KL(P||Q)."""
    x = x.detach().to("cpu", torch.float64)
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    perplexity = min(cfg.perplexity, (n - 1) / 3)  # a perplexity near n leaves nothing to calibrate
    if perplexity < cfg.perplexity:
        log.info("t-SNE: perplexity %.1f lowered to %.1f for %d points", cfg.perplexity, perplexity, n)
    p = affinities(x, perplexity)
    off = ~torch.eye(n, dtype=torch.bool)
    lr = cfg.learning_rate or max(n / cfg.early_exaggeration / 4, 50.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    y = 1e-4 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    for step in range(cfg.n_iter):
        exaggerated = step < cfg.exaggeration_iters
        pe = p * cfg.early_exaggeration if exaggerated else p
        q, kernel = _q_and_kernel(y, off)
        w = (pe - q) * kernel
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)
        # Gains grow while descent keeps its direction (the gradient opposes the last update), shrink on reversal.
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp(min=0.01)
        momentum = 0.5 if exaggerated else 0.8
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    kl = kl_divergence(p, y)
    log.info("t-SNE: %d points, perplexity %.1f, %d iterations, KL %.4f", n, perplexity, cfg.n_iter, kl)
    return y, kl
