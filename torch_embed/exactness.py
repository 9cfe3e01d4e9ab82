"""A dtype-aware bound on floating-point error, to state what "output preserved" means.

A splitting embedding is exact in real arithmetic, but not bit-exact in floating point:
the next layer's matmul now sums a split column's shares as separate terms, in an order
the BLAS chooses, and a coefficient such as 1/3 is rounded when it scales a weight.
:func:`~torch_embed.forward_error_bound` gives, per output element, a rigorous first-order
bound on ``|computed - exact|`` for evaluating the network in its own dtype; a widening
is then correct when ``|wide(x) - narrow(x)| <= bound(narrow, x) + bound(wide, x)``.

The bound is the classical running error analysis (Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1): with unit roundoff ``u`` of the dtype and
``γ_n = n·u / (1 - n·u)``, a Linear layer with ``n`` inputs adds
``γ_{n+2}·(|W|·|h| + |b|)`` (the ``+2`` covers the bias and one rounding of each
weight, e.g. ``fl(w/3)``), propagates ``|W|·e``, and an element-wise activation with
Lipschitz constant ``L`` maps the error to ``L·e + 4u·(|σ(h)| + L·e)``. An eval-mode
BatchNorm1d, ``y = s·(h - μ) + β`` with ``s = γ/sqrt(var + eps)``, maps it to
``|s|·e + 6u·(|s|·(|h| + e + |μ|) + |β|)``. It is conservative:
the largest error measured by ``python bench/exactness.py`` is 0.56% of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torch_embed._sequential import elementwise_info, read_sequential

__all__ = ["forward_error_bound", "unit_roundoff"]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of ``dtype`` (the largest relative rounding error).

    Example:
        >>> unit_roundoff(torch.float32) == 2.0**-24
        True
    """
    return float(torch.finfo(dtype).eps) / 2


def _autocast_on(device_type: str) -> bool:
    """Whether a ``torch.autocast`` region is active for ``device_type``."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        return False


def _gamma(n: int, u: float) -> float:
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1 - nu)


def forward_error_bound(module: nn.Module, inputs: Tensor) -> Tensor:
    """Bound ``|module(inputs) - exact|`` elementwise for evaluation in the module's dtype.

    "Exact" means the same stored weights evaluated in real arithmetic. The module must
    be an MLP :func:`torch_embed.widen` accepts, in eval mode if it has BatchNorm or
    Dropout.

    Args:
        module: The ``nn.Sequential`` MLP.
        inputs: A batch of inputs (any dtype; treated as exact values).

    Returns:
        A ``float64`` tensor of the output's shape.

    Raises:
        ValueError: A BatchNorm or Dropout module is in train mode, an element-wise
            module was registered without a Lipschitz constant, or a ``torch.autocast``
            region is active (the network would not compute in its own dtype).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x = torch.randn(16, 4, generator=g)
        >>> exact = net.double()(x.double())
        >>> bound = forward_error_bound(net.float(), x)
        >>> bool(((net(x).double() - exact).abs() <= bound).all())
        True
    """
    read_sequential(module)  # same acceptance rules as widen
    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else inputs.dtype
    for device_type in {inputs.device.type, *(p.device.type for p in params)}:
        if _autocast_on(device_type):
            raise ValueError(
                f"forward_error_bound was called inside a torch.autocast region for "
                f"{device_type!r}: the network then computes in "
                f"{torch.get_autocast_dtype(device_type)}, not in its own dtype {dtype}, and "
                f"the bound does not cover that. Evaluate outside autocast, or cast the "
                f"module (module.to(dtype)) to bound evaluation in a lower precision."
            )
    u = unit_roundoff(dtype)
    v = inputs.detach().to(torch.float64)
    e = torch.zeros_like(v)
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            w = child.weight.detach().to(torch.float64).to(v.device)
            b = (
                child.bias.detach().to(torch.float64).to(v.device)
                if child.bias is not None
                else None
            )
            aw = w.abs()
            mag = (v.abs() + e) @ aw.T
            if b is not None:
                mag = mag + b.abs()
            e = e @ aw.T + _gamma(child.in_features + 2, u) * mag
            v = v @ w.T + (b if b is not None else 0.0)
        elif isinstance(child, nn.BatchNorm1d):
            if child.training:
                raise ValueError(
                    f"layer {name} (BatchNorm1d) is in train mode; the bound is for eval "
                    f"mode (call module.eval())"
                )
            mean = child.running_mean.detach().to(torch.float64)  # type: ignore[union-attr]
            var = child.running_var.detach().to(torch.float64)  # type: ignore[union-attr]
            gamma = (
                child.weight.detach().to(torch.float64)
                if child.weight is not None
                else torch.ones_like(mean)
            )
            beta = (
                child.bias.detach().to(torch.float64)
                if child.bias is not None
                else torch.zeros_like(mean)
            )
            s = gamma / torch.sqrt(var + child.eps)
            e = s.abs() * e + 6 * u * (s.abs() * (v.abs() + e + mean.abs()) + beta.abs())
            v = (v - mean) * s + beta
        else:
            info = elementwise_info(child)
            if isinstance(child, nn.Dropout):
                if child.training and child.p > 0:
                    raise ValueError(
                        f"layer {name} (Dropout) is in train mode; the bound is for eval mode"
                    )
                continue
            assert info is not None  # read_sequential accepted it
            lip = info.lipschitz(child)
            if not math.isfinite(lip):
                raise ValueError(
                    f"layer {name} ({type(child).__name__}) has no Lipschitz constant; pass "
                    f"lipschitz= to torch_embed.register_elementwise"
                )
            with torch.no_grad():
                own = {k: t.detach().to(torch.float64) for k, t in child.named_parameters()}
                v = torch.func.functional_call(child, own, (v,))
            e = lip * e + 4 * u * (v.abs() + lip * e)
    return e
