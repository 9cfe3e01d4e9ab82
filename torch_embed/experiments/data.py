"""Built-in data sets of the experiments; nothing is downloaded.

* :func:`staircase`: a smooth 1D staircase, the sum of three shifted ``tanh`` steps of
  decreasing height on ``[-15, 15]`` (the papers give no formula for their 1D data;
  this one is in their spirit and is what every 1D experiment here uses). The unequal
  heights make a small-initialisation gradient descent learn the steps one after the
  other, with a loss plateau in between (Fig. 1); with three equal steps, a width-100
  run stayed on the width-1 plateau for the paper's whole training time
  (lr x steps = 0.005 x 300k).
* :func:`iris` and :func:`digits`: scikit-learn's bundled copies (no network access;
  scikit-learn is the optional ``data`` extra). ``digits`` stands in for MNIST, which
  cannot be downloaded here.

All loaders return ``(inputs, targets)`` in the requested dtype and device; class
labels come one-hot, for the mean-squared-error loss the papers use.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

__all__ = ["STAIRCASE_FORMULA", "digits", "iris", "one_hot", "staircase"]

STAIRCASE_FORMULA = "y = tanh(x + 7.5) + tanh(x) / 2 + tanh(x - 7.5) / 4,  x in [-15, 15]"
"""The 1D target, as printed in the experiments' output."""

_STEPS = ((1.0, -7.5), (0.5, 0.0), (0.25, 7.5))  # (height, centre) of each tanh step


def staircase(
    n: int = 50,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The 1D staircase: ``n`` equally spaced points on ``[-15, 15]`` and their targets.

    ``y = tanh(x + 7.5) + tanh(x)/2 + tanh(x - 7.5)/4`` (see :data:`STAIRCASE_FORMULA`).

    Args:
        n: Number of points (the papers use 50).
        dtype: Floating dtype of the tensors.
        device: Device of the tensors.

    Returns:
        ``inputs`` of shape ``(n, 1)`` and ``targets`` of shape ``(n, 1)``.

    Example:
        >>> x, y = staircase(5)
        >>> x.flatten().tolist()
        [-15.0, -7.5, 0.0, 7.5, 15.0]
        >>> round(y[2].item(), 6), y.shape  # tanh(7.5) - tanh(7.5)/4 at x = 0
        (0.75, torch.Size([5, 1]))
    """
    if n < 2:
        raise ValueError(f"staircase needs n >= 2 points, got {n}")
    x = torch.linspace(-15.0, 15.0, n, dtype=torch.float64)[:, None]
    y = torch.zeros_like(x)
    for height, centre in _STEPS:
        y += height * torch.tanh(x - centre)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot ``float64`` rows for integer ``labels``.

    Example:
        >>> one_hot(torch.tensor([0, 2]), 3).tolist()
        [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)


def _sklearn_datasets() -> ModuleType:
    try:
        import sklearn.datasets as datasets  # type: ignore[import-untyped]
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this experiment needs scikit-learn's bundled data sets (Iris, digits); "
            "install them with: pip install 'torch-embed[data]'"
        ) from err
    module: ModuleType = datasets
    return module


def iris(
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The Iris data set (150 flowers, 4 features, 3 classes), features standardised.

    Each feature is shifted and scaled to mean 0 and standard deviation 1; targets are
    one-hot. Needs scikit-learn (``pip install 'torch-embed[data]'``).

    Returns:
        ``inputs`` ``(150, 4)`` and one-hot ``targets`` ``(150, 3)``.

    Example:
        >>> x, y = iris()
        >>> tuple(x.shape), tuple(y.shape), y.sum().item()
        ((150, 4), (150, 3), 150.0)
    """
    bunch = _sklearn_datasets().load_iris()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = one_hot(torch.as_tensor(bunch.target), 3)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def digits(
    n: int = 1000,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The first ``n`` of scikit-learn's 1797 bundled 8x8 digits (an offline MNIST).

    Pixels are scaled from ``0..16`` to ``[0, 1]``; targets are one-hot over 10
    classes. Needs scikit-learn (``pip install 'torch-embed[data]'``).

    Args:
        n: Number of samples (at most 1797; the paper uses 1000 MNIST images).
        dtype: Floating dtype of the tensors.
        device: Device of the tensors.

    Returns:
        ``inputs`` ``(n, 64)`` and one-hot ``targets`` ``(n, 10)``.

    Example:
        >>> x, y = digits(100)
        >>> tuple(x.shape), tuple(y.shape), float(x.max())
        ((100, 64), (100, 10), 1.0)
    """
    bunch = _sklearn_datasets().load_digits()
    total = len(bunch.target)
    if not 1 <= n <= total:
        raise ValueError(f"digits has {total} samples; n must be in 1..{total}, got {n}")
    x = torch.as_tensor(bunch.data[:n], dtype=torch.float64) / 16.0
    y = one_hot(torch.as_tensor(bunch.target[:n]), 10)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
