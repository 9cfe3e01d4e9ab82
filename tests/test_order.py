"""Tie-aware ordering (torch_embed/_order.py) and the choices that use it.

Values equal up to rounding must not be ordered by their last bits: those depend on
the CPU's kernels (issue 11 §1). The reference for every check is the rule stated in
the module docstring, evaluated by hand on constructed values.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from torch_embed import Split
from torch_embed._order import ranked, tie_tolerance
from torch_embed.schemes import plan

EPS64 = torch.finfo(torch.float64).eps


def test_tolerance_is_sqrt_eps_of_the_largest_finite_value() -> None:
    assert tie_tolerance([]) == 0.0
    assert tie_tolerance([-3.0, 1.0, math.nan, -math.inf]) == 3.0 * math.sqrt(EPS64)
    eps32 = torch.finfo(torch.float32).eps
    assert tie_tolerance([2.0], torch.float32) == 2.0 * math.sqrt(eps32)


@pytest.mark.parametrize("ulps", [-40, -1, 1, 40])
def test_near_equal_values_keep_key_order_whatever_the_last_bits(ulps: int) -> None:
    base = -0.010420701920121567  # issue 11's certificate
    other = base + ulps * math.ulp(base)
    values = [-0.5, other, base, 0.2]  # index 1 and 2 tie
    tol = tie_tolerance(values)
    assert ranked(values, tol=tol) == [0, 1, 2, 3]
    assert ranked(values, key=lambda i: -i, tol=tol) == [0, 2, 1, 3]  # key decides
    assert ranked(values, tol=tol, descending=True) == [3, 1, 2, 0]


def test_a_real_difference_wins_and_nan_comes_last() -> None:
    values = [1.0 + 1e-6, math.nan, 1.0, -math.inf, math.inf]
    assert ranked(values, tol=tie_tolerance(values)) == [3, 2, 0, 4, 1]
    assert ranked(values, tol=tie_tolerance(values), descending=True) == [4, 0, 2, 3, 1]
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tol must be a finite non-negative number"):
            ranked([1.0], tol=bad)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(finite, max_size=12), st.floats(min_value=0.0, max_value=10.0))
@example([1.0, -2.0382599167903647e-137], 1.0)  # 1 - (-2e-137) rounds to tol: a tie
def test_rule_properties(values: list[float], tol: float) -> None:
    order = ranked(values, tol=tol)
    assert sorted(order) == list(range(len(values)))
    pos = {i: k for k, i in enumerate(order)}
    for i, j in itertools.permutations(range(len(values)), 2):
        if values[j] - values[i] > tol:  # more than tol below (as computed) comes first
            assert pos[i] < pos[j]
    for a, b in itertools.pairwise(order):  # out of value order only within a tie
        if values[a] > values[b]:
            assert values[a] - values[b] <= tol and a < b
    # the order does not depend on the input's order (only on values and keys)
    perm = list(reversed(range(len(values))))
    back = ranked([values[k] for k in perm], key=lambda k: perm[k], tol=tol)
    assert [perm[k] for k in back] == order


def _net_with_fan_out(columns: list[list[float]], dtype: torch.dtype) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(1, len(columns)), nn.Tanh(), nn.Linear(len(columns), 2))
    net = net.to(dtype)
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor(columns, dtype=torch.float64).T)
    return net


@pytest.mark.parametrize(
    ("dtype", "bump"),
    [(torch.float64, 1 + 2**-52), (torch.float64, 1 - 2**-52), (torch.float32, 1 + 2**-23)],
)
def test_select_norm_ties_go_to_the_lower_index(dtype: torch.dtype, bump: float) -> None:
    """Neurons 1 and 2 have equal fan-out norms up to an ulp (as an equal split's copies
    do up to rounding): the lower index is split first, whichever is an ulp larger."""
    net = _net_with_fan_out([[1.0, 0.0], [3.0, 4.0], [3.0 * bump, 4.0 * bump]], dtype)
    norms = net[2].weight.detach().to(torch.float64).norm(dim=0)
    assert float(norms[1]) != float(norms[2])  # the bits differ
    emb = plan(net, [5], Split(select="norm"))
    assert emb.layers[0].source.tolist()[3:] == [1, 2]


def test_select_norm_still_follows_a_real_difference() -> None:
    net = _net_with_fan_out([[1.0, 0.0], [3.0, 4.0], [3.0 + 1e-6, 4.0]], torch.float64)
    emb = plan(net, [5], Split(select="norm"))
    assert emb.layers[0].source.tolist()[3:] == [2, 1]
