"""Map an optimizer's per-parameter state through an embedding.

The rule (docs/theory.md, "Optimizer state"): after mapping, the state equals the state
the optimizer would hold had it seen the mapped gradients ``B g_t`` at every past step.
Per entry of a reshaped parameter, ``B`` scales the narrow gradient by a factor ``s``
(the copy's error scaling; ``0`` for a null neuron's fan-in; ``σ(β)`` times the next
bias's gradient for a null neuron's fan-out column). Each state entry then maps by how
it depends on ``s``:

* linear in the gradients, mapped to ``s·x`` (exact): ``momentum_buffer`` (SGD),
  ``exp_avg`` (Adam, AdamW, NAdam, RAdam, Adamax), ``grad_avg`` (RMSprop), ``prev``
  (Rprop);
* quadratic, mapped to ``s²·x`` (exact): ``exp_avg_sq``, ``max_exp_avg_sq``,
  ``square_avg`` (RMSprop, Adadelta), ``sum`` (Adagrad, less its initial value);
* ``exp_inf`` (Adamax), ``max_t β₂^(k-t)(|g_t| + ε)``: mapped to ``|s|·x + (1-|s|)·ε``;
* ``step_size`` (Rprop), which depends only on the signs of ``g_t·g_(t-1)``: copied
  (exact), or the initial ``lr`` (clamped to ``step_sizes``) where ``s = 0`` (read from
  the param group: a scheduler that changed ``lr`` since the first step makes it
  differ from the replay's);
* ``acc_delta`` (Adadelta), invariant to the gradient's scale up to ``ε``: copied, or
  ``0`` where ``s = 0``;
* ``ax`` (ASGD), an average of past iterates: mapped like the parameters;
* ``step``, ``mu_product`` (NAdam), ``eta`` and ``mu`` (ASGD), functions of the step
  count only: kept.

``exp_inf``: the wide maximum is attained where the narrow one is when ``|s| ≤ 1`` and
the latest step attains it; in general the map is within ``|1-|s||·ε·(1-β₂^(k-1))``
per entry after ``k`` steps (``|s|·x`` alone would be off by up to ``|1-|s||·ε``), and
exact for ``ε = 0`` or ``|s| ∈ {0, 1}``. ``acc_delta``: Adadelta's update
``sqrt(a+ε)/sqrt(v+ε)·g`` is invariant to scaling ``g`` (then ``v`` scales by ``s²``)
up to the ``ε`` in ``sqrt(v+ε)``, so copying is exact where ``|s| ∈ {0, 1}`` and, for
other ``s``, only in the limit ``ε ≪ s²·v`` at every past step (the replay test uses
``ε = 1e-30``). Where ``s²·v`` is of the order of ``ε`` (Adadelta's default
``ε = 1e-6`` with gradients of order 1e-3), ``acc_delta`` behaves more like a second
moment and no map of the current state is exact: the copy can then be off by a factor
of order 1. Both warn with :class:`ApproximateStateWarning` when some ``|s|`` is
neither 0 nor 1. ``ax``: ASGD's average of past iterates ``Σ_t w_t θ_t`` (torch's
``ax <- ax + μ(θ - ax)``, a copy while ``μ = 1``: weights summing to 1) maps like them,
``A(Σ w_t θ_t) + c = Σ w_t (A θ_t + c)``, so it is the average of the embedded narrow
iterates, Net2Net's noise offsets included (``ax`` equals the parameter itself until
averaging starts at step ``t0``, and still does after widening). Unlike the other
entries it is a function of the iterates, not of the gradients, so its reference is
the average of the embedded iterates, not the ``ax`` of a wide optimizer fed ``B g_t``
(whose own parameters move by ``B g_t``, not to ``A θ_t + c``).

A null neuron's fan-out column takes its state from the next layer's bias (its
gradient is ``σ(β)`` times the bias's), which is exact only when both follow the same
state recursion: where their param groups differ in a hyper-parameter the state
depends on (``_STATE_HYPERPARAMETERS``: momentum, betas, ..., Rprop's initial
``lr``) the map is refused. Adagrad's ``sum`` starts at ``optimizer.defaults``'
``initial_accumulator_value`` in every group (PyTorch ignores a group's own entry).
The maps are checked against replays in tests/test_optim_state.py and
tests/test_properties.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from torch_embed.embedding import Embedding, EmbeddingKind

__all__ = ["SUPPORTED_OPTIMIZERS", "ApproximateStateWarning", "map_optimizer_state"]


class ApproximateStateWarning(UserWarning):
    """Mapped gradients or optimizer state are only close to those of a wide replay.

    Raised (as a warning) for embeddings that change the function (``RandomPad``), for
    coupled weight decay, and for the state entries whose map is exact only up to
    ``ε`` (Adamax's ``exp_inf``, Adadelta's ``acc_delta``). Output-preserving schemes
    (``Net2Net`` with noise, the default; ``Null`` with a fan-in) do not warn: their
    state is mapped by the critical embedding underneath them (the equal split, the
    null units), which is exactly the state of that embedding's replay; the noise acts
    from the next step on. Filter it by class:
    ``warnings.simplefilter("ignore", torch_embed.ApproximateStateWarning)``.
    """


_GRAD_LIKE = frozenset({"momentum_buffer", "exp_avg", "grad_avg", "prev"})
_SQ_LIKE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
_ABS_LIKE = frozenset({"exp_inf"})
_SCALE_FREE = frozenset({"step_size", "acc_delta"})
_PARAM_LIKE = frozenset({"ax"})
_KEPT = frozenset({"step", "mu_product", "eta", "mu"})
_MAPPED = _GRAD_LIKE | _SQ_LIKE | _ABS_LIKE | _SCALE_FREE | _PARAM_LIKE

SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Rprop,
    torch.optim.ASGD,
)

_REFUSED: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.LBFGS: (
        "LBFGS keeps a history of flattened steps and gradient differences over all "
        "parameters together (old_dirs, old_stps, d, prev_flat_grad), whose length is "
        "the total parameter count; it has no per-parameter state to map. Rebuild the "
        "LBFGS optimizer after widening (its history restarts)"
    ),
    torch.optim.SparseAdam: (
        "SparseAdam is for sparse gradients (nn.Embedding with sparse=True); the "
        "Linear layers widen reshapes have dense gradients, which SparseAdam refuses. "
        "Use Adam"
    ),
}


class StateMap(Protocol):
    """What the state maps need of an embedding (an MLP's or a traced model's)."""

    @property
    def kind(self) -> EmbeddingKind: ...

    @property
    def reasons(self) -> tuple[str, ...]: ...

    def apply(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def map_gradients(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def map_second_moments(self, moments: Mapping[str, Tensor]) -> dict[str, Tensor]: ...


def _exact_decay(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> bool:
    """Whether the group's weight decay leaves the state a function of gradients only."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(
        group.get("decoupled_weight_decay", False)
    )


def _check_supported(optimizer: torch.optim.Optimizer) -> None:
    if type(optimizer) in _REFUSED:
        raise TypeError(
            f"cannot map the state of {type(optimizer).__name__}: "
            f"{_REFUSED[type(optimizer)]}. Pass optimizer=None."
        )
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        names = ", ".join(t.__name__ for t in SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"cannot map the state of {type(optimizer).__name__}: only {names} are supported. "
            f"Pass optimizer=None and rebuild the optimizer yourself if a reset state is fine."
        )
    for i, group in enumerate(optimizer.param_groups):
        if group.get("weight_decay", 0) != 0 and not _exact_decay(optimizer, group):
            warnings.warn(
                f"{type(optimizer).__name__} param group {i} uses coupled weight_decay="
                f"{group['weight_decay']}: its state accumulated g + λθ, and λθ does not map "
                f"like a gradient, so the mapped state is only approximate (use AdamW's "
                f"decoupled decay, or decoupled_weight_decay=True, for an exact map)",
                ApproximateStateWarning,
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


# The hyper-parameters a state entry's recursion depends on (besides the gradients), per
# optimizer: where a null neuron's fan-out column takes its state from the next layer's
# bias, both must have evolved under the same values. Learning rates, lr_decay, foreach
# and decoupled weight decay do not enter these states, except Rprop's lr: it is the
# initial step_size. Adagrad's sum (from optimizer.defaults, see below) and ASGD (no
# gradient state; ax maps like the parameters) depend on none.
_STATE_HYPERPARAMETERS: dict[type[torch.optim.Optimizer], tuple[str, ...]] = {
    torch.optim.SGD: ("momentum", "dampening", "maximize"),
    torch.optim.Adam: ("betas", "amsgrad", "maximize"),
    torch.optim.AdamW: ("betas", "amsgrad", "maximize"),
    torch.optim.NAdam: ("betas", "maximize"),
    torch.optim.RAdam: ("betas", "maximize"),
    torch.optim.Adamax: ("betas", "eps", "maximize"),
    torch.optim.RMSprop: ("alpha", "centered", "maximize"),
    torch.optim.Adagrad: (),
    torch.optim.Adadelta: ("rho", "eps", "maximize"),
    torch.optim.Rprop: ("lr", "etas", "step_sizes", "maximize"),
    torch.optim.ASGD: (),
}


def _check_null_fan_out_groups(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, nn.Parameter],
    embedding: StateMap,
) -> None:
    """Refuse when a null fan-out column's state would come from a bias under other rules.

    A null neuron with ``σ(β) ≠ 0`` gives its fan-out column the gradient ``σ(β)·∂R/∂b``
    of the next layer's bias ``b``, so the column's replay state is the bias's state
    scaled, *if* both recursions use the same hyper-parameters. With the bias in a param
    group with other ones (momentum, betas, ...) the column's replay state depends on the
    whole gradient history, which the current states do not determine: no exact map.
    """
    keys = _STATE_HYPERPARAMETERS.get(type(optimizer), ())
    if not keys:
        return
    readers: list[tuple[str, str, str]] = []  # (weight, bias, whose null units)
    if isinstance(embedding, Embedding):
        linears = embedding.layout.linears
        for k in range(1, len(linears)):
            cols = embedding.layers[k - 1]
            if bool((cols.null_value[cols.null_mask] != 0).any()):
                name = linears[k].name
                readers.append((f"{name}.weight", f"{name}.bias", f"hidden layer {k - 1}"))
    else:  # a traced model's GroupEmbedding: the Linear readers whose σ(β) it measured
        for wname in getattr(embedding, "null_values", {}):
            owner = wname.rpartition(".")[0]
            readers.append((wname, f"{owner}.bias", f"the layer `{owner}` reads"))
    index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    groups = optimizer.param_groups
    for wname, bname, whose in readers:
        w, b = named_params.get(wname), named_params.get(bname)
        if w is None or b is None or id(w) not in index or id(b) not in index:
            continue  # a frozen or absent bias: the embedding's own warning says so
        if not optimizer.state.get(w):
            continue
        gw, gb = index[id(w)], index[id(b)]
        for key in keys:
            vw, vb = groups[gw].get(key), groups[gb].get(key)
            if vw != vb:
                raise ValueError(
                    f"cannot map the {type(optimizer).__name__} state of '{wname}': the "
                    f"fan-out columns of the null neurons of {whose} take their "
                    f"state from the next bias '{bname}' (their gradient is σ(β) times its "
                    f"gradient), but '{bname}' is in param group {gb} with {key}={vb!r} and "
                    f"'{wname}' in param group {gw} with {key}={vw!r}, so their states evolve "
                    f"differently and no map of the current state is exact. Put both in "
                    f"param groups with the same {key}, use a scheme without null neurons "
                    f"(or with σ(β) = 0), or pass optimizer=None and rebuild the optimizer"
                )


def _check_holds_parameters(
    optimizer: torch.optim.Optimizer, named_params: Mapping[str, nn.Parameter]
) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if named_params and not any(id(p) in held for p in named_params.values()):
        raise ValueError(
            f"the optimizer ({type(optimizer).__name__}, {len(held)} parameters) holds "
            f"none of the module's {len(named_params)} parameters, so its steps would not "
            f"train the widened module (and an optimizer built on a copy would crash on "
            f"the new shapes); pass the optimizer built on this module's parameters, or "
            f"optimizer=None"
        )


def _approximate_message(embedding: StateMap) -> str | None:
    """Why the state mapped by ``embedding`` means little (``None``: it is meaningful).

    A critical embedding's ``B`` is the wide network's gradient map: exact. An
    output-preserving one (Net2Net noise, Null with a fan-in) is a critical embedding
    plus a perturbation that keeps the function; its ``B`` is the critical part's, so
    the state is the exact state of that critical embedding, documented and not
    warned about (it is the default's case). An embedding that changes the function
    (``RandomPad``) has no such meaning: warn.
    """
    if embedding.kind is not EmbeddingKind.NONE:
        return None
    return (
        f"the embedding changes the function ({'; '.join(embedding.reasons)}): the "
        f"mapped optimizer state of its new units is not the state of any replay. Use "
        f"an exact scheme (the default, Split, Null, Net2Net) or reset the state of the "
        f"reshaped parameters"
    )


def _scale_free(
    embedding: StateMap, tensors: dict[str, Tensor], fill: Callable[[str], float]
) -> tuple[dict[str, Tensor], bool]:
    """Copy each entry to the wide entries whose gradient it scales; ``fill`` where ``s = 0``.

    Computed as ``B²x / B²1`` in float64 (the factors ``s²`` cancel); also returns whether
    some ``|s|`` is neither 0 nor 1.
    """
    wide = embedding.map_second_moments({n: t.to(torch.float64) for n, t in tensors.items()})
    ones = embedding.map_second_moments(
        {n: torch.ones_like(t, dtype=torch.float64) for n, t in tensors.items()}
    )
    out: dict[str, Tensor] = {}
    other_scale = False
    for name, t in tensors.items():
        sq = ones[name]
        zero = sq == 0
        other_scale |= bool(((sq - 1).abs() > 1e-12).logical_and(~zero).any())
        value = torch.where(zero, fill(name), wide[name] / torch.where(zero, 1.0, sq))
        out[name] = value.to(t.dtype)
    return out, other_scale


def map_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, nn.Parameter],
    embedding: StateMap,
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
        TypeError: For an unsupported optimizer (LBFGS and SparseAdam say why) or a
            state entry of unknown meaning.
        ValueError: The optimizer holds none of ``named_params``, or a null neuron's
            fan-out column would take its state from a next-layer bias in a param group
            whose state hyper-parameters (momentum, dampening, betas, Rprop's initial
            ``lr``, ...) differ from the column's group's: no exact map exists.

    Warns:
        ApproximateStateWarning: The map is not exact (an embedding that changes the
            function, coupled weight decay, Adamax's ``exp_inf`` or Adadelta's
            ``acc_delta`` under a scaling other than 0 or ±1).
    """
    _check_supported(optimizer)
    _check_holds_parameters(optimizer, named_params)
    _check_null_fan_out_groups(optimizer, named_params, embedding)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    # Adagrad's sum starts at initial_accumulator_value, not 0: only the part that the
    # squared gradients added maps; the constant is added back after mapping. PyTorch
    # starts every group's sum at the constructor's value (optimizer.defaults), ignoring
    # a param group's own "initial_accumulator_value" entry.
    v0 = float(optimizer.defaults.get("initial_accumulator_value", 0.0))
    offset = {i: v0 for i in group_of}
    by_key: dict[str, dict[str, Tensor]] = {}
    for name, p in named_params.items():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if key in _KEPT or value is None:
                continue
            if key not in _MAPPED:
                raise TypeError(
                    f"{type(optimizer).__name__} state entry '{key}' of parameter '{name}' has "
                    f"no known mapping; refusing rather than resetting it silently"
                )
            if key == "sum" and offset.get(id(p), 0.0) != 0.0:
                value = value - offset[id(p)]
            by_key.setdefault(key, {})[name] = value
    if by_key and (message := _approximate_message(embedding)) is not None:
        warnings.warn(message, ApproximateStateWarning, stacklevel=2)
    params = dict(named_params)

    def eps(name: str) -> float:
        return float(group_of[id(params[name])].get("eps", 0.0))

    def initial_step_size(name: str) -> float:
        group = group_of[id(params[name])]
        low, high = (float(v) for v in group["step_sizes"])
        return min(max(float(group["lr"]), low), high)

    mapped: dict[str, dict[str, Tensor]] = {}
    inexact: list[str] = []
    for key, tensors in by_key.items():
        if key in _GRAD_LIKE:
            mapped[key] = embedding.map_gradients(tensors)
        elif key in _SQ_LIKE:
            mapped[key] = embedding.map_second_moments(tensors)
        elif key in _PARAM_LIKE:
            mapped[key] = embedding.apply(tensors)
        elif key in _ABS_LIKE:  # |s|·x + (1 - |s|)·ε, as sqrt(B²x²) + (1 - sqrt(B²1))·ε
            x64 = {n: t.to(torch.float64) for n, t in tensors.items()}
            sq = embedding.map_second_moments({n: t * t for n, t in x64.items()})
            ones = embedding.map_second_moments({n: torch.ones_like(t) for n, t in x64.items()})
            mapped[key] = {
                n: (sq[n].sqrt() + (1 - ones[n].sqrt()) * eps(n)).to(t.dtype)
                for n, t in tensors.items()
            }
            if any(eps(n) != 0 for n in tensors) and any(
                bool(((o - 1).abs() > 1e-12).logical_and(o != 0).any()) for o in ones.values()
            ):
                inexact.append(
                    "Adamax's exp_inf is within |1 - |s||·eps·(1 - beta2^(steps-1)) of the "
                    "replay (exact for eps=0 or |s| in {0, 1})"
                )
        else:
            fill = initial_step_size if key == "step_size" else (lambda _name: 0.0)
            mapped[key], other = _scale_free(embedding, tensors, fill)
            if key == "acc_delta" and other:
                inexact.append(
                    "Adadelta's acc_delta is copied, which is exact only while eps << "
                    "s²·square_avg (its update is then invariant to the gradient's scale); "
                    "with eps of the order of s²·square_avg (the default eps=1e-6 with "
                    "gradients of order 1e-3) it can be off by a factor of order 1: pass "
                    "optimizer=None and rebuild Adadelta if that matters"
                )
    if inexact:
        warnings.warn(
            f"{type(optimizer).__name__}: the embedding scales some gradients by factors "
            f"s other than 0 and ±1, and " + "; ".join(inexact),
            ApproximateStateWarning,
            stacklevel=2,
        )
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
