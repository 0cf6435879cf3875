"""Learnable rational activation (Padé activation unit).

    R(x) = (a_0 + a_1 x + ... + a_m x^m) / (1 + |b_1 x + ... + b_n x^n|)

as used by RAFT, IAPT and MiLoRA (MiLoRA: m = 6, n = 5). The absolute value in the
denominator keeps it away from zero, so R has no poles. Coefficients start at a fit of GeLU
on [-4, 4], so an untrained R behaves like GeLU (max error below 0.02 on [-3, 3]). The
coefficients are trained jointly with the rest of the adapter (the papers' bi-level
optimisation is not used; see docs/methods.md).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F


def rational(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Evaluate R(x) with numerator coefficients ``num`` (a_0..a_m), ``den`` (b_1..b_n)."""
    p = torch.zeros_like(x)
    for a in num.flip(0):  # Horner
        p = p * x + a
    q = torch.zeros_like(x)
    for b in den.flip(0):
        q = (q + b) * x
    return p / (1.0 + q.abs())


@functools.lru_cache(maxsize=None)
def gelu_fit(m: int = 6, n: int = 5) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Numerator and denominator coefficients of a rational fit of GeLU on [-4, 4].

    A linear least-squares solve of P(x) - GeLU(x) * Q'(x) = GeLU(x) (Q' the denominator
    without its constant and absolute value) gives a start; a few L-BFGS steps on the true
    form then fit it. Deterministic, and run once per process (grad enabled even when the
    caller, a vLLM worker say, runs under inference mode).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(m, n)


def _fit(m: int, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = torch.linspace(-4.0, 4.0, 2001, dtype=torch.float64)
    y = F.gelu(x)
    cols = [x**i for i in range(m + 1)] + [-y * x**j for j in range(1, n + 1)]
    sol = torch.linalg.lstsq(torch.stack(cols, 1), y.unsqueeze(1)).solution.squeeze(1)
    num = sol[: m + 1].clone().requires_grad_(True)
    den = sol[m + 1 :].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([num, den], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (rational(x, num, den) - y).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(num.detach().tolist()), tuple(den.detach().tolist())


class RationalActivation(nn.Module):
    """One learnable rational function, applied element-wise, initialised to GeLU."""

    def __init__(self, m: int = 6, n: int = 5):
        super().__init__()
        num, den = gelu_fit(m, n)
        self.numerator = nn.Parameter(torch.tensor(num, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(den, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator.to(x.dtype), self.denominator.to(x.dtype))
