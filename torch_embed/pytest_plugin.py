"""A pytest plugin with fixtures for testing widening code.

Installed with the package, pytest loads it through the ``pytest11`` entry point
``torch_embed``; nothing to configure. (Without installing, load it with
``-p torch_embed.pytest_plugin`` or ``pytest_plugins = ["torch_embed.pytest_plugin"]``
in your top-level ``conftest.py``.) Disable it with ``-p no:torch_embed``.

Fixtures:

* ``torch_embed_seed``: the seed, from ``--torch-embed-seed`` (default 0).
* ``torch_embed_generator``: a CPU ``torch.Generator`` seeded with it, fresh per test.
* ``mlp_factory``: builds small ``nn.Sequential`` MLPs with seeded initialisation.
* ``float64``: sets the default dtype to ``torch.float64`` for the test, then restores it.
* ``regression_data``: builds a small seeded regression set ``(x, y)``.

Each fixture that draws random numbers owns its own generator seeded from
``torch_embed_seed``, so adding a call to one does not change what another returns.
Every run prints the seed in the header; rerun a failure with the same
``--torch-embed-seed``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import pytest
import torch
from torch import Tensor, nn

from torch_embed.testing import default_dtype

__all__ = [
    "ACTIVATIONS",
    "MLPFactory",
    "RegressionData",
    "float64",
    "make_mlp",
    "make_regression_data",
    "mlp_factory",
    "regression_data",
    "torch_embed_generator",
    "torch_embed_seed",
]

_OPTION = "--torch-embed-seed"

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
"""Activation names accepted by :func:`make_mlp`."""


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--torch-embed-seed``."""
    group = parser.getgroup("torch_embed", "torch_embed fixtures")
    group.addoption(
        _OPTION,
        action="store",
        type=int,
        default=0,
        dest="torch_embed_seed",
        help="seed of the torch_embed fixtures' generators (default: 0)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Show the seed, so that a failing run can be repeated."""
    return f"torch_embed: {_OPTION}={_seed(config)}"


def _seed(config: pytest.Config) -> int:
    # getoption with a default also works when the fixtures were imported into a
    # conftest without registering this module as a plugin (no option then).
    return int(config.getoption("torch_embed_seed", default=0) or 0)


# ---------------------------------------------------------------------------- builders
def make_mlp(
    widths: Sequence[int],
    activation: str | Callable[[], nn.Module] = "tanh",
    *,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    weight_std: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Build ``Linear, act, Linear, act, ..., Linear`` with the given widths.

    Args:
        widths: ``(in, hidden_1, ..., out)``; at least two entries.
        activation: A name from :data:`ACTIVATIONS` or a zero-argument callable
            returning a module (e.g. ``nn.Tanh`` or ``lambda: nn.Softplus(beta=2)``).
        bias: Whether the Linear layers have biases.
        dtype: The parameters' dtype (default ``float64``, the dtype of exact checks).
        weight_std: ``None`` draws like ``nn.Linear``'s default (uniform on
            ``±1/sqrt(fan_in)``, weights and biases); a number draws weights from
            ``N(0, weight_std²)`` and sets biases to zero (the papers' small inits).
        generator: ``torch.Generator`` for the initialisation (``None``: global RNG).

    Raises:
        ValueError: Fewer than two widths, a width below 1, or an unknown activation.

    Example:
        >>> net = make_mlp([2, 5, 1], "relu", generator=torch.Generator().manual_seed(0))
        >>> net
        Sequential(
          (0): Linear(in_features=2, out_features=5, bias=True)
          (1): ReLU()
          (2): Linear(in_features=5, out_features=1, bias=True)
        )
        >>> net[0].weight.dtype
        torch.float64
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(
            f"widths must be (in, hidden..., out) with at least two entries >= 1, got {widths}"
        )
    if isinstance(activation, str):
        try:
            act = ACTIVATIONS[activation.lower()]
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)} or a "
                f"callable returning an nn.Module"
            ) from None
    elif callable(activation):
        act = activation
    else:
        raise ValueError(f"activation must be a name or a callable, got {activation!r}")
    layers: list[nn.Module] = []
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype)
        with torch.no_grad():
            if weight_std is None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(lin.weight, -bound, bound, generator=generator)
                if lin.bias is not None:
                    nn.init.uniform_(lin.bias, -bound, bound, generator=generator)
            else:
                nn.init.normal_(lin.weight, 0.0, float(weight_std), generator=generator)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        layers.append(lin)
        if k < len(widths) - 2:
            module = act()
            if not isinstance(module, nn.Module):
                raise ValueError(f"activation() returned {type(module).__name__}, not a Module")
            layers.append(module)
    return nn.Sequential(*layers)


def make_regression_data(
    n: int = 64,
    in_features: int = 1,
    out_features: int = 1,
    *,
    noise: float = 0.0,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A small smooth regression set ``(x, y)`` of shapes ``(n, in)`` and ``(n, out)``.

    With one input, ``x`` is uniform on ``[-15, 15]`` and ``y`` is a staircase of three
    shifted tanh steps (the spirit of the Embedding Principle paper's 1-D data). With
    more inputs, ``x ~ N(0, I)`` and ``y`` is a fixed random width-3 tanh teacher. The
    targets are centred (mean 0 per output); ``noise`` adds ``N(0, noise²)``.

    Example:
        >>> x, y = make_regression_data(32, 3, 2, generator=torch.Generator().manual_seed(0))
        >>> x.shape, y.shape, bool(y.mean(0).abs().max() < 1e-12)
        (torch.Size([32, 3]), torch.Size([32, 2]), True)
    """
    if n < 1 or in_features < 1 or out_features < 1:
        raise ValueError(
            f"n, in_features and out_features must be >= 1, got {n}, {in_features}, {out_features}"
        )

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if in_features == 1:
        x = 30 * torch.rand(n, 1, generator=generator, dtype=torch.float64) - 15
        steps = torch.tanh(x - 8) + torch.tanh(x) + torch.tanh(x + 8)
        scale = torch.linspace(1.0, 0.5, out_features, dtype=torch.float64)
        y = steps * scale
    else:
        x = draw(n, in_features)
        w1, w2 = draw(in_features, 3), draw(3, out_features)
        y = torch.tanh(x @ w1) @ w2
    if noise:
        y = y + noise * draw(*y.shape)
    y = y - y.mean(0, keepdim=True)
    return x.to(dtype), y.to(dtype)


# ---------------------------------------------------------------------------- fixtures
class MLPFactory(Protocol):
    """Type of the ``mlp_factory`` fixture: :func:`make_mlp` with a default generator."""

    def __call__(
        self,
        widths: Sequence[int],
        activation: str | Callable[[], nn.Module] = ...,
        *,
        bias: bool = ...,
        dtype: torch.dtype = ...,
        weight_std: float | None = ...,
        seed: int | None = ...,
    ) -> nn.Sequential:
        """Build an MLP (see :func:`make_mlp`); ``seed`` overrides the fixture's stream."""


class RegressionData(Protocol):
    """Type of the ``regression_data`` fixture: :func:`make_regression_data`, seeded."""

    def __call__(
        self,
        n: int = ...,
        in_features: int = ...,
        out_features: int = ...,
        *,
        noise: float = ...,
        dtype: torch.dtype = ...,
        seed: int | None = ...,
    ) -> tuple[Tensor, Tensor]:
        """Build a data set (see :func:`make_regression_data`)."""


@pytest.fixture(scope="session")
def torch_embed_seed(pytestconfig: pytest.Config) -> int:
    """The seed of the torch_embed fixtures (``--torch-embed-seed``, default 0)."""
    return _seed(pytestconfig)


@pytest.fixture
def torch_embed_generator(torch_embed_seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``torch_embed_seed``, fresh for each test."""
    return torch.Generator().manual_seed(torch_embed_seed)


@pytest.fixture
def mlp_factory(torch_embed_seed: int) -> MLPFactory:
    """A callable building seeded ``nn.Sequential`` MLPs (arguments of :func:`make_mlp`).

    Successive calls in one test draw from one generator seeded with
    ``torch_embed_seed`` (so two calls give different networks, the same in every run);
    ``seed=`` gives a network that depends on that seed alone.
    """
    stream = torch.Generator().manual_seed(torch_embed_seed)

    def build(
        widths: Sequence[int],
        activation: str | Callable[[], nn.Module] = "tanh",
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.float64,
        weight_std: float | None = None,
        seed: int | None = None,
    ) -> nn.Sequential:
        gen = stream if seed is None else torch.Generator().manual_seed(seed)
        return make_mlp(
            widths, activation, bias=bias, dtype=dtype, weight_std=weight_std, generator=gen
        )

    return build


@pytest.fixture
def regression_data(torch_embed_seed: int) -> RegressionData:
    """A callable building seeded regression sets (arguments of :func:`make_regression_data`).

    ``x, y = regression_data()`` gives 64 points of a 1-D staircase; pass ``n``,
    ``in_features``, ``out_features``, ``noise``, ``dtype`` or ``seed`` for others.
    """
    stream = torch.Generator().manual_seed(torch_embed_seed + 1)

    def build(
        n: int = 64,
        in_features: int = 1,
        out_features: int = 1,
        *,
        noise: float = 0.0,
        dtype: torch.dtype = torch.float64,
        seed: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        gen = stream if seed is None else torch.Generator().manual_seed(seed)
        return make_regression_data(
            n, in_features, out_features, noise=noise, dtype=dtype, generator=gen
        )

    return build


@pytest.fixture
def float64() -> Iterator[torch.dtype]:
    """Make ``torch.float64`` the default dtype during the test; restore it afterwards."""
    with default_dtype(torch.float64) as dtype:
        yield dtype
