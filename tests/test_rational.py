import torch
from torch.nn import functional as F

from vllm_plugins.adapters.common.rational import RationalActivation


def test_rational_matches_gelu_at_initialisation():
    x = torch.linspace(-3, 3, 2001)
    err = (RationalActivation()(x) - F.gelu(x)).abs().max().item()
    assert err < 0.02


def test_rational_coefficients_are_learnable():
    act = RationalActivation()
    act(torch.linspace(-2, 2, 11)).sum().backward()
    assert act.numerator.grad.abs().sum() > 0
    assert act.denominator.grad.abs().sum() > 0
