"""Output preservation in every dtype, and the floating-point error bound that defines it.

The criterion (torch_embed/exactness.py): a widening preserves the function when
``|wide(x) - narrow(x)| <= forward_error_bound(narrow, x) + forward_error_bound(wide, x)``
elementwise. These tests check it on hundreds of generated networks and schemes, and
check the bound itself: it really bounds low-precision evaluation against float64
evaluation of the same stored weights, and it is not vacuous.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from cases import (
    ACTIVATIONS,
    CONTINUOUS_ACTIVATIONS,
    LOW_PRECISION,
    SCHEME_NAMES,
    Arch,
    archs,
    build_mlp,
    random_inputs,
    random_pad,
    scheme_cases,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_embed._sequential import elementwise_info, register_elementwise
from torch_embed.exactness import forward_error_bound, unit_roundoff
from torch_embed.schemes import Split
from torch_embed.widen import embed_, widen

pytestmark = pytest.mark.usefixtures("single_thread")

DEAD_UNIT = r".*never learn.*"  # Null(bias <= 0) under ReLU warns; expected here


def _widened(net: nn.Module, case, seed: int) -> tuple[nn.Module, object]:
    g = torch.Generator().manual_seed(seed)
    emb = case.plan(net, g)
    wide = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEAD_UNIT, category=UserWarning)
        embed_(wide, emb)
    return wide, emb


def _check_preserved(arch: Arch, case, dtype: torch.dtype, seed: int) -> float:
    """Widen a net of ``arch`` in ``dtype`` and check the criterion; return error/bound."""
    net = build_mlp(arch, seed=seed, dtype=dtype)
    x = random_inputs(arch, 16, seed=seed + 1, dtype=dtype)
    wide, _ = _widened(net, case, seed)
    assert wide[0].weight.dtype == dtype
    with torch.no_grad():
        y_narrow, y_wide = net(x), wide(x)
    assert y_wide.dtype == dtype and y_wide.shape == y_narrow.shape
    diff = (y_wide.double() - y_narrow.double()).abs()
    if all(ACTIVATIONS[a].continuous for a in arch.activation):
        bound = forward_error_bound(net, x) + forward_error_bound(wide, x)
        bad = diff > bound
        assert not bool(bad.any()), (
            f"{int(bad.sum())} outputs off; worst diff {float(diff.max()):.3e}, "
            f"bound there {float(bound.flatten()[int(diff.argmax())]):.3e}"
        )
        return float((diff / bound.clamp(min=1e-300)).max())
    # a discontinuous activation (Hardshrink) has no bound; float64 inputs do not land
    # within rounding distance of its jump, so the copies agree to rounding
    assert dtype == torch.float64
    scale = 1 + float(y_narrow.abs().max())
    assert float(diff.max()) <= 1e-12 * scale
    return 0.0


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@settings(max_examples=20)
@given(data=st.data(), arch=archs())
def test_output_preserved_float64(scheme: str, data, arch: Arch) -> None:
    case, _ = data.draw(scheme_cases(arch, names=[scheme]), label="scheme")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    _check_preserved(arch, case, torch.float64, seed)


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@settings(max_examples=6)
@given(data=st.data(), arch=archs(activations=CONTINUOUS_ACTIVATIONS))
def test_output_preserved_low_precision(dtype: torch.dtype, scheme: str, data, arch: Arch) -> None:
    case, _ = data.draw(scheme_cases(arch, names=[scheme]), label="scheme")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    _check_preserved(arch, case, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("activation", CONTINUOUS_ACTIVATIONS)
def test_every_activation_preserved_in_every_dtype(activation: str, dtype: torch.dtype) -> None:
    arch = Arch(3, (5, 4), 2, batchnorm=(True, False), activation=(activation, activation))
    net = build_mlp(arch, seed=3, dtype=dtype)
    x = random_inputs(arch, 32, seed=4, dtype=dtype)
    wide = copy.deepcopy(net)
    widen(wide, [11, 9], Split(alpha=1 / 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (wide(x).double() - net(x).double()).abs()
    assert bool((diff <= forward_error_bound(net, x) + forward_error_bound(wide, x)).all())


def test_split_is_not_bit_exact_but_within_bound() -> None:
    # the point of a bound: a split changes the summation, so float32 results differ
    arch = Arch(16, (64, 64), 4)
    net = build_mlp(arch, seed=0, dtype=torch.float32)
    x = random_inputs(arch, 256, seed=1, dtype=torch.float32)
    wide = copy.deepcopy(net)
    widen(wide, [128, 128], Split(alpha=1 / 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (wide(x).double() - net(x).double()).abs()
    bound = forward_error_bound(net, x) + forward_error_bound(wide, x)
    assert float(diff.max()) > 0  # not bit-exact
    assert bool((diff <= bound).all())


def test_random_pad_breaks_the_criterion() -> None:
    # the criterion is sharp enough to notice a non-preserving widening
    arch = Arch(3, (4, 4), 2)
    net = build_mlp(arch, seed=0, dtype=torch.float32)
    x = random_inputs(arch, 16, seed=1, dtype=torch.float32)
    emb = random_pad(net, [6, 6], torch.Generator().manual_seed(0))
    wide = copy.deepcopy(net)
    embed_(wide, emb)
    with torch.no_grad():
        diff = (wide(x).double() - net(x).double()).abs()
    assert bool((diff > forward_error_bound(net, x) + forward_error_bound(wide, x)).any())


# ----------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@settings(max_examples=40)
@given(arch=archs(activations=CONTINUOUS_ACTIVATIONS, max_width=12), seed=st.integers(0, 999))
def test_bound_covers_low_precision_evaluation(dtype: torch.dtype, arch: Arch, seed: int) -> None:
    """|net_dtype(x) - exact| <= bound, with exact = float64 evaluation of the same weights."""
    low = build_mlp(arch, seed=seed, dtype=dtype)
    x = random_inputs(arch, 32, seed=seed + 1, dtype=dtype)
    ref_net = copy.deepcopy(low).double()  # the same stored values, exactly
    with torch.no_grad():
        y, ref = low(x).double(), ref_net(x.double())
    bound = forward_error_bound(low, x) + forward_error_bound(ref_net, x.double())
    assert bool(((y - ref).abs() <= bound).all())


@pytest.mark.parametrize("activation", CONTINUOUS_ACTIVATIONS)
def test_bound_is_not_vacuous(activation: str) -> None:
    """On a normal-sized net the bound is far below the output scale.

    (It is a worst-case running bound: it grows with depth and width. On 3 hidden layers
    of 64 it reaches ~5e-3 relative for Hardswish in float32; bench/exactness.py measures
    how far actual errors sit below it.)
    """
    arch = Arch(8, (32, 32), 4, activation=(activation,) * 2)
    for dtype, limit in ((torch.float32, 1e-3), (torch.float64, 1e-11)):
        net = build_mlp(arch, seed=0, dtype=dtype)
        x = random_inputs(arch, 64, seed=1, dtype=dtype)
        with torch.no_grad():
            scale = float(net(x).abs().max())
        bound = forward_error_bound(net, x)
        assert float(bound.max()) < limit * scale, (dtype, float(bound.max()) / scale)
        # and it scales with the unit roundoff (it is a bound of the rounding, not a guess)
        assert float(bound.max()) > unit_roundoff(dtype) * scale * 1e-3


def test_bound_shape_dtype_and_zero_for_exact_cases() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    bound = forward_error_bound(net, x)
    assert bound.shape == (5, 2) and bound.dtype == torch.float64
    assert bool((bound > 0).all())
    # a zero network computes exactly
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    assert float(forward_error_bound(net, x).max()) == 0.0


def test_bound_refuses_train_mode() -> None:
    net = build_mlp(Arch(2, (3,), 1, batchnorm=(True,), dropout=(True,)))
    x = random_inputs(2, 4)
    net.train()
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) is in train mode"):
        forward_error_bound(net, x)
    net[1].eval()
    with pytest.raises(ValueError, match=r"layer 3 \(Dropout\) is in train mode"):
        forward_error_bound(net, x)
    net.eval()
    assert forward_error_bound(net, x).shape == (4, 1)


def test_bound_refuses_discontinuous_and_unknown_elementwise(clean_registry) -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Hardshrink(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"layer 1 \(Hardshrink\) has no Lipschitz constant"):
        forward_error_bound(net, torch.randn(4, 2))

    class Cube(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z**3

    register_elementwise(Cube)
    net = nn.Sequential(nn.Linear(2, 3), Cube(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"layer 1 \(Cube\) has no Lipschitz constant"):
        forward_error_bound(net, torch.randn(4, 2))


def test_hardshrink_jump_defeats_any_lipschitz_bound() -> None:
    """Why Hardshrink has no bound: a one-ulp change of the input jumps the output by λ."""
    lam = 0.5
    z = torch.tensor([lam], dtype=torch.float16)
    up = torch.nextafter(z, torch.tensor([1.0], dtype=torch.float16))
    act = nn.Hardshrink(lam)
    jump = float(act(up) - act(z))
    assert jump >= lam and float(up - z) < 1e-3
    assert jump / float(up - z) > 100  # slope far beyond any Lipschitz constant


def test_bound_refuses_autocast() -> None:
    # under autocast the Linear layers compute in bfloat16 while the parameters are
    # float32: the float32 bound was ~500x too small for a widening measured that way
    net = build_mlp(Arch(8, (32,), 4), seed=0, dtype=torch.float32)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    refused = pytest.raises(ValueError, match=r"inside a torch.autocast region for 'cpu'.*bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16), refused:
        forward_error_bound(net, x)
    assert forward_error_bound(net, x).shape == (16, 4)  # outside the region it works


# ----------------------------------------------------------------------------- the formula
def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def test_bound_is_the_documented_running_error_formula() -> None:
    """On a 1-1-1 float16 net with hand-picked exact weights, the bound is the running
    error analysis written out by hand (Higham §3.1; module docstring): a Linear with n
    inputs adds γ_{n+2}·(|W|(|h| + e) + |b|) and propagates |W|·e; eval BatchNorm with
    scale s adds 6u·(|s|(|h| + e + |mean|) + |β|) and propagates |s|·e; an activation
    with Lipschitz constant L gives L·e + 4u·(|σ(h)| + L·e). Pins every constant, which
    the tests of validity alone cannot (the bound has a wide margin)."""
    net = nn.Sequential(
        nn.Linear(1, 1), nn.BatchNorm1d(1, eps=1.0), nn.Sigmoid(), nn.Linear(1, 1)
    ).half()
    with torch.no_grad():
        net[0].weight.fill_(2.0), net[0].bias.fill_(1.0)
        net[1].running_mean.fill_(0.5), net[1].running_var.fill_(3.0)
        net[1].weight.fill_(4.0), net[1].bias.fill_(-1.0)  # s = 4 / sqrt(3 + 1) = 2
        net[3].weight.fill_(-0.5), net[3].bias.fill_(0.25)
    net.eval()
    u = 2.0**-11  # float16
    g3 = _gamma(3, u)
    e1 = g3 * (2 * 1 + 1)  # x = 1 exact, h1 = 3
    e2 = 2 * e1 + 6 * u * (2 * (3 + e1 + 0.5) + 1)  # h2 = (3 - 0.5) * 2 - 1 = 4
    sig = 1 / (1 + math.exp(-4.0))
    e3 = 0.25 * e2 + 4 * u * (sig + 0.25 * e2)  # Sigmoid: L = 1/4
    e4 = 0.5 * e3 + g3 * (0.5 * (sig + e3) + 0.25)
    bound = forward_error_bound(net, torch.ones(1, 1, dtype=torch.float16))
    assert bound.dtype == torch.float64 and bound.shape == (1, 1)
    assert math.isclose(float(bound), e4, rel_tol=1e-13), (float(bound), e4)


def test_dropout_with_p_zero_is_accepted_in_train_mode() -> None:
    """Dropout(p=0) is the identity even in train mode: no refusal, the same bound."""
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with_drop = nn.Sequential(plain[0], plain[1], nn.Dropout(p=0.0), plain[2]).train()
    x = random_inputs(3, 5)
    torch.testing.assert_close(
        forward_error_bound(with_drop, x), forward_error_bound(plain, x), rtol=0, atol=0
    )


def test_positively_homogeneous_flags_hold_numerically() -> None:
    """σ(c·z) = c·σ(z) for c > 0 wherever the registry says so (condensation merges
    parallel fan-in vectors on that promise); ReLU6 and Hardtanh saturate, so not them."""
    z = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    flagged = []
    for name, case in ACTIVATIONS.items():
        act = case.make().double()
        info = elementwise_info(act)
        assert info is not None, name
        if info.positively_homogeneous:
            flagged.append(type(act).__name__)
            with torch.no_grad():
                for c in (0.25, 0.5, 2.0, 3.0):
                    torch.testing.assert_close(act(c * z), c * act(z), rtol=1e-15, atol=0)
    assert "ReLU" in flagged and "Tanh" not in flagged
