"""Map an optimizer's per-parameter state through an embedding.

The rule (docs/theory.md, "Optimizer state"): after mapping, the state equals the state
the optimizer would hold had it seen the mapped gradients ``B g_t`` at every past step.
First moments and momenta are linear in the gradients, so they map by ``B``; second
moments map by ``B`` with squared scales; step counters are kept. This is exact for the
optimizers below.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed.embedding import Embedding

__all__ = ["SUPPORTED_OPTIMIZERS", "map_optimizer_state"]

_GRAD_LIKE = frozenset({"momentum_buffer", "exp_avg", "grad_avg"})
_SQ_LIKE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
_KEPT = frozenset({"step"})

SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def _check_supported(optimizer: torch.optim.Optimizer) -> None:
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(t.__name__ for t in SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"cannot map the state of {type(optimizer).__name__}: only {names} are supported. "
            f"Pass optimizer=None and rebuild the optimizer yourself if a reset state is fine."
        )
    if not isinstance(optimizer, torch.optim.AdamW):
        for i, group in enumerate(optimizer.param_groups):
            if group.get("weight_decay", 0) != 0:
                warnings.warn(
                    f"{type(optimizer).__name__} param group {i} uses coupled weight_decay="
                    f"{group['weight_decay']}: its state accumulated g + λθ, and λθ does not map "
                    f"like a gradient, so the mapped state is only approximate (use AdamW's "
                    f"decoupled decay for an exact map)",
                    UserWarning,
                    stacklevel=4,
                )
    if isinstance(optimizer, torch.optim.RMSprop):
        for i, group in enumerate(optimizer.param_groups):
            if group.get("momentum", 0) != 0:
                raise TypeError(
                    f"cannot map RMSprop with momentum={group['momentum']} (param group {i}): "
                    f"its momentum buffer holds g/(sqrt(v)+eps), which no linear map of past "
                    f"gradients reproduces. Use momentum=0, or Adam."
                )


def map_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, nn.Parameter],
    embedding: Embedding,
) -> dict[nn.Parameter, dict[str, Any]]:
    """Compute the mapped state of every parameter the embedding reshapes (pure).

    Args:
        optimizer: One of :data:`SUPPORTED_OPTIMIZERS`.
        named_params: The network's parameters keyed like its ``state_dict``.
        embedding: The embedding about to be applied.

    Returns:
        ``{parameter: new_state}`` for parameters that have state; the optimizer is not
        modified (``widen`` installs the result only once everything has succeeded).

    Raises:
        TypeError: For an unsupported optimizer or a state entry of unknown meaning.
    """
    _check_supported(optimizer)
    # Adagrad's sum starts at initial_accumulator_value, not 0: only the part that the
    # squared gradients added maps; the constant is added back after mapping.
    offset = {
        id(p): float(group.get("initial_accumulator_value", 0.0))
        for group in optimizer.param_groups
        for p in group["params"]
    }
    by_key: dict[str, dict[str, Tensor]] = {}
    for name, p in named_params.items():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if key in _KEPT or value is None:
                continue
            if key not in _GRAD_LIKE | _SQ_LIKE:
                raise TypeError(
                    f"{type(optimizer).__name__} state entry '{key}' of parameter '{name}' has "
                    f"no known mapping; refusing rather than resetting it silently"
                )
            if key == "sum" and offset.get(id(p), 0.0) != 0.0:
                value = value - offset[id(p)]
            by_key.setdefault(key, {})[name] = value
    mapped: dict[str, dict[str, Tensor]] = {}
    for key, tensors in by_key.items():
        if key in _GRAD_LIKE:
            mapped[key] = embedding.map_gradients(tensors)
        else:
            mapped[key] = embedding.map_second_moments(tensors)
    result: dict[nn.Parameter, dict[str, Any]] = {}
    for name, p in named_params.items():
        state = optimizer.state.get(p)
        if not state:
            continue
        new_state: dict[str, Any] = {}
        for key, value in state.items():
            if key in _KEPT or value is None:
                new_state[key] = value
            else:
                new_state[key] = mapped[key][name]
                if key == "sum" and offset.get(id(p), 0.0) != 0.0:
                    new_state[key] = new_state[key] + offset[id(p)]
        result[p] = new_state
    return result
