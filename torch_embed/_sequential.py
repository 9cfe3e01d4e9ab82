"""Read an ``nn.Sequential`` MLP into a :class:`Layout`, and the element-wise registry.

A network torch_embed can widen is an ``nn.Sequential`` of ``nn.Linear`` layers with,
between two of them, an optional ``nn.BatchNorm1d`` right after the first Linear and
any number of element-wise modules (activations, ``nn.Dropout``). Every module that is
not of that form is refused here, with a message that names its index, its type and
what would have been accepted; nothing is ever skipped silently.

The :class:`Layout` is not read by a walk of its own: the Sequential is traced into
width groups like any model (:mod:`torch_embed.graph.groups`), and each hidden group
is read as one link of the MLP chain, so a Layout is a special case of the groups. A
registered module whose forward turns out not to be element-wise pins or constrains
its group, and is refused with the op and module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch_embed.graph.groups import WidthGroups

__all__ = [
    "ElementwiseInfo",
    "HiddenLayer",
    "Layout",
    "LinearLayer",
    "check_wide_size",
    "elementwise_info",
    "read_sequential",
    "register_elementwise",
]


@dataclass(frozen=True)
class ElementwiseInfo:
    """What torch_embed knows about an element-wise module type.

    Attributes:
        lipschitz: A bound on ``|σ'|`` used by the floating-point error bound of
            :func:`torch_embed.forward_error_bound` (its module argument gives the
            instance, so parametrised modules such as ``LeakyReLU`` compute it).
        positively_homogeneous: ``σ(c·z) = c·σ(z)`` for ``c > 0`` (ReLU family);
            condensation may then merge parallel fan-in vectors.
        twice_differentiable: PyTorch can differentiate the module twice, so Hessians
            exist (``False`` for e.g. ``Hardsigmoid``, whose double backward PyTorch
            does not implement).
    """

    lipschitz: Callable[[nn.Module], float]
    positively_homogeneous: bool = False
    twice_differentiable: bool = True


def _const(value: float) -> Callable[[nn.Module], float]:
    return lambda _module: value


def _leaky(module: nn.Module) -> float:
    return max(1.0, abs(float(getattr(module, "negative_slope", 0.01))))


def _elu(module: nn.Module) -> float:
    return max(1.0, abs(float(getattr(module, "alpha", 1.0))))


def _prelu(module: nn.Module) -> float:
    return max(1.0, float(module.weight.detach().abs().max()))  # type: ignore[operator]


def _softplus(module: nn.Module) -> float:
    return 1.0


_REGISTRY: dict[type[nn.Module], ElementwiseInfo] = {
    nn.Identity: ElementwiseInfo(_const(1.0), positively_homogeneous=True),
    nn.Tanh: ElementwiseInfo(_const(1.0)),
    nn.Sigmoid: ElementwiseInfo(_const(0.25)),
    nn.ReLU: ElementwiseInfo(_const(1.0), positively_homogeneous=True),
    nn.ReLU6: ElementwiseInfo(_const(1.0)),
    nn.LeakyReLU: ElementwiseInfo(_leaky, positively_homogeneous=True),
    nn.PReLU: ElementwiseInfo(_prelu, positively_homogeneous=True),
    nn.GELU: ElementwiseInfo(_const(1.13)),
    nn.SiLU: ElementwiseInfo(_const(1.1)),
    nn.Mish: ElementwiseInfo(_const(1.09)),
    nn.Softplus: ElementwiseInfo(_softplus),
    nn.ELU: ElementwiseInfo(_elu),
    nn.CELU: ElementwiseInfo(_elu),
    nn.SELU: ElementwiseInfo(_const(1.0507 * 1.6733)),
    nn.Hardtanh: ElementwiseInfo(_const(1.0)),
    nn.Softsign: ElementwiseInfo(_const(1.0)),
    nn.Tanhshrink: ElementwiseInfo(_const(1.0)),
    nn.LogSigmoid: ElementwiseInfo(_const(1.0)),
    nn.Hardswish: ElementwiseInfo(_const(1.5)),
    nn.Hardsigmoid: ElementwiseInfo(_const(1.0 / 6.0), twice_differentiable=False),
    nn.Softshrink: ElementwiseInfo(_const(1.0)),
    # Hardshrink jumps by λ at |z| = λ: no Lipschitz constant, so no error bound
    nn.Hardshrink: ElementwiseInfo(_const(math.inf)),
    nn.Dropout: ElementwiseInfo(_const(math.inf)),
}
# Dropout is element-wise but random: copies of a neuron get different masks in train
# mode. Its Lipschitz constant 1/(1-p) applies in train mode only; in eval mode it is
# the identity. The error bound refuses train-mode dropout, so inf is never used.


def register_elementwise(
    module_type: type[nn.Module],
    *,
    lipschitz: float | Callable[[nn.Module], float] = math.inf,
    positively_homogeneous: bool = False,
    twice_differentiable: bool = True,
) -> None:
    """Declare a module type as element-wise, so :func:`torch_embed.widen` accepts it.

    The module must apply the same scalar function to every feature independently:
    copies of a neuron then stay copies after it.

    Args:
        module_type: The ``nn.Module`` subclass.
        lipschitz: A bound on the derivative's magnitude (a number, or a function of the
            module instance). Only used by the floating-point error bound; the default
            ``inf`` makes that bound refuse the module instead of guessing.
        positively_homogeneous: ``σ(c z) = c σ(z)`` for ``c > 0``.
        twice_differentiable: PyTorch can take its second derivative.

    Raises:
        TypeError: If ``module_type`` is not an ``nn.Module`` subclass.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> class Cube(nn.Module):
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x**3
        >>> torch_embed.register_elementwise(Cube)
        >>> net = nn.Sequential(nn.Linear(2, 3), Cube(), nn.Linear(3, 1))
        >>> _ = torch_embed.widen(net, [5])
        >>> net[0].out_features
        5
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_elementwise expects an nn.Module subclass, got {module_type!r}")
    lip = lipschitz if callable(lipschitz) else _const(float(lipschitz))
    _REGISTRY[module_type] = ElementwiseInfo(lip, positively_homogeneous, twice_differentiable)


def elementwise_info(module: nn.Module) -> ElementwiseInfo | None:
    """Return the registry entry for ``module``'s exact type, or ``None``."""
    info = _REGISTRY.get(type(module))
    if info is None:
        return None
    if isinstance(module, nn.PReLU) and module.num_parameters != 1:
        return None  # one slope per channel is not one scalar function
    return info


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the network, named by its key in the Sequential."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool


@dataclass(frozen=True)
class HiddenLayer:
    """A hidden layer: the Linear that feeds it, optional BatchNorm1d, activations.

    ``activation_types`` holds the types of the ``activations`` modules, as read; it is
    left out of ``==`` (layouts built by hand may omit it) and compared explicitly by
    :func:`torch_embed.embed_`, which refuses to replay an embedding planned on other
    activations (a null neuron's constant output ``σ(β)`` depends on them).
    """

    linear: str
    batchnorm: str | None
    activations: tuple[str, ...]
    activation_types: tuple[type[nn.Module], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Layout:
    """The structure of an MLP, as read from an ``nn.Sequential``.

    ``linears[l]`` is the Linear of layer ``l + 1`` in the papers' numbering; hidden
    layer ``l`` (0-based, as in ``widen``'s ``new_widths``) is fed by ``linears[l]`` and
    read by ``linears[l + 1]``.
    """

    linears: tuple[LinearLayer, ...]
    hidden: tuple[HiddenLayer, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        """``(m_0, m_1, ..., m_L)``: input, hidden and output widths."""
        return (self.linears[0].in_features, *(lin.out_features for lin in self.linears))

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """The widths of the hidden layers only."""
        return self.widths[1:-1]


_ACCEPTED = (
    "nn.Linear, nn.BatchNorm1d (right after a Linear), element-wise modules "
    "(activations such as Tanh, ReLU, GELU, ..., nn.Dropout, or types added with "
    "torch_embed.register_elementwise)"
)


def _refuse(index: str, module: nn.Module, why: str) -> TypeError:
    return TypeError(
        f"layer {index} ({type(module).__name__}) cannot be widened: {why}. Accepted: {_ACCEPTED}."
    )


# the tensors widen maps; anything else on these modules would be left narrow
_OWN_TENSORS: dict[type[nn.Module], tuple[frozenset[str], frozenset[str]]] = {
    nn.Linear: (frozenset({"weight", "bias"}), frozenset()),
    nn.BatchNorm1d: (
        frozenset({"weight", "bias"}),
        frozenset({"running_mean", "running_var", "num_batches_tracked"}),
    ),
}


def _check_own_tensors(name: str, child: nn.Module) -> None:
    """Refuse a Linear or BatchNorm1d whose tensors are not the ones ``widen`` maps.

    Hook-based reparametrizations (``torch.nn.utils.weight_norm``, ``spectral_norm``,
    ``torch.nn.utils.prune``) replace the ``weight`` Parameter by others (``weight_g``
    and ``weight_v``, ``weight_orig`` and ``weight_mask``, ...) and recompute ``weight``
    in a forward pre-hook: widening the remaining tensors would leave those narrow.
    """
    expected = _OWN_TENSORS.get(type(child))
    if expected is None:
        return
    params, buffers = expected
    shapes: dict[str, tuple[int, ...]]
    if isinstance(child, nn.Linear):
        shapes = {"weight": (child.out_features, child.in_features), "bias": (child.out_features,)}
        what = f"in_features={child.in_features}, out_features={child.out_features}"
    else:
        assert isinstance(child, nn.BatchNorm1d)  # the only other key of _OWN_TENSORS
        n = child.num_features
        shapes = dict.fromkeys(params | buffers - {"num_batches_tracked"}, (n,))
        what = f"num_features={n}"
    for key, shape in shapes.items():
        t = getattr(child, key, None)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
            raise ValueError(
                f"layer {name} ({type(child).__name__}) has {key} of shape {tuple(t.shape)} "
                f"but {what} (the attributes were not updated when the tensor was replaced); "
                f"widen reads the attributes, so set them to match its tensors"
            )
    extra = sorted((set(child._parameters) - params) | (set(child._buffers) - buffers))
    no_weight = type(child) is nn.Linear and child._parameters.get("weight") is None
    if extra or no_weight:
        kind = type(child).__name__
        found = ", ".join(repr(n) for n in extra) or "no 'weight' Parameter"
        raise ValueError(
            f"layer {name} ({kind}) holds tensors widen does not map ({found}), typically from "
            f"a hook-based reparametrization such as torch.nn.utils.weight_norm, "
            f"spectral_norm or torch.nn.utils.prune; widening would leave them narrow. "
            f"Remove it first (torch.nn.utils.remove_weight_norm, remove_spectral_norm, "
            f"prune.remove); a {kind} with only {sorted(params | buffers)} is accepted."
        )


def read_sequential(module: nn.Module) -> Layout:
    """Read an ``nn.Sequential`` MLP into a :class:`Layout`, refusing what cannot be widened.

    The Layout is the MLP view of the model's width groups: the Sequential is traced by
    the tracer every model goes through (:func:`torch_embed.width_groups`), and each
    hidden group must be a link of a chain (one Linear writes it, optionally one
    BatchNorm1d scales it, element-wise modules pass it on, one Linear reads it). Before
    tracing, every module is checked on its own (its type, its tensors, its place), so
    that a refusal names the layer.

    The result is cached per structure (the names, types and tensor shapes of the
    modules, for ``torch.nn`` modules whose forward is the class's own), so repeated
    calls cost a walk over the modules, not a trace.

    Raises:
        TypeError: ``module`` is not an ``nn.Sequential``, or contains a module of a
            type that is not accepted.
        ValueError: The structure is wrong although the types are accepted (fewer than
            two Linear layers, mismatched features, a module or parameter that appears
            twice, a parametrized or lazy module, a Linear or BatchNorm1d holding other
            tensors than its own, BatchNorm1d not right after a Linear), or a hidden
            width group is pinned or constrained by an op (the reason names it).
    """
    return _read(module)[0]


def _read(module: nn.Module) -> tuple[Layout, WidthGroups]:
    """:func:`read_sequential`'s Layout and the width groups it was derived from."""
    _check_container(module)
    assert isinstance(module, nn.Sequential)  # _check_container refuses the rest
    # not named_children(): it drops repeated modules, which Sequential.forward still runs
    children = [(n, c) for n, c in module._modules.items() if c is not None]
    _check_children(module, children)
    key = _fingerprint(children)
    cached = _CACHE.get(key) if key is not None else None
    if cached is not None:
        return cached
    result = _from_groups(module, children)
    if key is not None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = result
    return result


def _check_container(module: nn.Module) -> None:
    """Refuse wrappers, non-Sequentials and Sequentials with their own forward."""
    if not isinstance(module, nn.Sequential) and isinstance(
        getattr(module, "_orig_mod", None), nn.Sequential
    ):
        raise TypeError(
            f"widen got a {type(module).__name__} (a torch.compile wrapper); pass the "
            f"underlying module `compiled._orig_mod` (the compiled wrapper recompiles on "
            f"the next call)"
        )
    if not isinstance(module, nn.Sequential) and isinstance(
        getattr(module, "module", None), nn.Sequential
    ):
        raise TypeError(
            f"widen got a {type(module).__name__} that wraps an nn.Sequential; pass the "
            f"wrapped module `.module` (a DataParallel / DistributedDataParallel wrapper must "
            f"be rebuilt after widening; an AveragedModel holds its own copy: apply the same "
            f"embedding to it with embed_(averaged.module, embedding))"
        )
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"widen expects an nn.Sequential of Linear layers and element-wise modules, "
            f"got {type(module).__name__}"
        )
    if type(module).forward is not nn.Sequential.forward:
        raise TypeError(
            f"widen got a {type(module).__name__}, a subclass of nn.Sequential that overrides "
            f"forward; widen reads the layers in order and would not see what that forward "
            f"does (a skip connection, a reused layer). torch_embed.width_groups(model, "
            f"example_inputs) traces its real forward"
        )


def _check_children(module: nn.Sequential, children: list[tuple[str, nn.Module]]) -> None:
    """The checks one module at a time (or against its neighbour), before any trace.

    Types, tensors and identities are the module's own business: a refusal here names
    the layer, its type and what is accepted. Features that do not chain would make
    the trace fail with a shape error; they are refused here with both layers named.
    """
    seen_modules: dict[int, str] = {}
    seen_params: dict[int, str] = {}
    previous: str | None = None  # kind of the previous module: "linear", "bn", "elementwise"
    last: tuple[str, nn.Linear] | None = None  # the last Linear so far
    for pos, (name, child) in enumerate(children):
        if id(child) in seen_modules:
            raise ValueError(
                f"layer {name} ({type(child).__name__}) is the same module object as layer "
                f"{seen_modules[id(child)]}; a module that appears twice cannot be widened "
                f"consistently. Use separate modules."
            )
        seen_modules[id(child)] = name
        tensors: list[tuple[str, str, torch.Tensor]] = [
            ("parameter", n, t) for n, t in child.named_parameters()
        ]
        tensors += [("buffer", n, t) for n, t in child.named_buffers()]
        for what, pname, p in tensors:
            if id(p) in seen_params:
                tie = "weight tying" if what == "parameter" else "a shared buffer"
                raise ValueError(
                    f"layer {name} ({type(child).__name__}) shares its {what} '{pname}' "
                    f"with {seen_params[id(p)]} ({tie}); tied tensors cannot be widened "
                    f"independently. Untie them first."
                )
            seen_params[id(p)] = f"layer {name}"
        if torch.nn.utils.parametrize.is_parametrized(child):
            raise ValueError(
                f"layer {name} ({type(child).__name__}) is parametrized; remove the "
                f"parametrization (torch.nn.utils.parametrize.remove_parametrizations) "
                f"before widening."
            )
        if isinstance(child, nn.modules.lazy.LazyModuleMixin):
            raise ValueError(
                f"layer {name} ({type(child).__name__}) is a lazy module whose shape is not "
                f"known yet; run one forward pass first."
            )
        _check_own_tensors(name, child)
        if type(child) is nn.Linear:
            if child.in_features == 0 or child.out_features == 0:
                raise ValueError(
                    f"layer {name} (Linear) has in_features={child.in_features}, "
                    f"out_features={child.out_features}: a layer of width 0 has no neuron to "
                    f"copy or connect; widen accepts Linear layers of width >= 1 (rebuild the "
                    f"layer with out_features >= 1)"
                )
            if last is not None and last[1].out_features != child.in_features:
                raise ValueError(
                    f"layer {name} (Linear) has in_features={child.in_features} but the "
                    f"previous Linear (layer {last[0]}) has "
                    f"out_features={last[1].out_features}"
                )
            last, previous = (name, child), "linear"
        elif type(child) is nn.BatchNorm1d:
            if last is not None and previous != "linear":
                raise ValueError(
                    f"layer {name} (BatchNorm1d) must come right after a Linear layer "
                    f"(it follows a {previous} module); only one BatchNorm1d per hidden "
                    f"layer, between the Linear and its activation, is accepted"
                )
            if last is not None and child.num_features != last[1].out_features:
                raise ValueError(
                    f"layer {name} (BatchNorm1d) has num_features={child.num_features} but "
                    f"the Linear before it has out_features={last[1].out_features}"
                )
            previous = "bn"
        elif elementwise_info(child) is not None:
            previous = "elementwise"
        elif isinstance(child, nn.PReLU):
            raise _refuse(
                name,
                child,
                f"PReLU with num_parameters={child.num_parameters} is not one scalar "
                f"function for every feature (use num_parameters=1)",
            )
        elif isinstance(child, nn.Sequential):
            raise _refuse(name, child, "nested Sequential containers are not read; flatten it")
        elif isinstance(child, (nn.Linear, nn.BatchNorm1d)):
            base = "Linear" if isinstance(child, nn.Linear) else "BatchNorm1d"
            raise _refuse(
                name,
                child,
                f"it is a subclass of nn.{base}, whose forward may differ; only nn.{base} "
                f"itself is read",
            )
        else:
            why = "it is not a known element-wise module"
            if last is None:
                why += (
                    f" (it comes before the first Linear: `widen(module[{pos + 1}:], ...)` "
                    f"widens the rest in place, the slice shares its modules)"
                )
            elif not any(type(c) is nn.Linear for _, c in children[pos + 1 :]):
                why += (
                    f" (it comes after the last Linear: `widen(module[:{pos}], ...)` widens "
                    f"the rest in place, the slice shares its modules)"
                )
            raise _refuse(name, child, why)
    count = sum(type(c) is nn.Linear for _, c in children)
    if count < 2:
        raise ValueError(
            f"widen needs at least two nn.Linear layers (one hidden layer), found "
            f"{count} in a Sequential of {len(module)} modules"
        )


# Layouts (and the groups they come from) by structure; see _fingerprint
_CACHE: dict[tuple[Any, ...], tuple[Layout, WidthGroups]] = {}
_CACHE_SIZE = 512


def _fingerprint(children: list[tuple[str, nn.Module]]) -> tuple[Any, ...] | None:
    """What the trace of ``children`` depends on, or ``None`` where that is not known.

    A ``torch.nn`` module whose forward is its class's own computes the same ops for
    the same tensor shapes, so names, types and the shapes of every parameter and
    buffer determine the groups. A module of another type (a registered element-wise
    module) or with a forward set on the instance may branch on anything: not cached.
    """
    key: list[Any] = []
    for name, child in children:
        if not type(child).__module__.startswith("torch.nn") or "forward" in vars(child):
            return None
        tensors = (*child._parameters.items(), *child._buffers.items())
        shapes = tuple((k, None if t is None else tuple(t.shape)) for k, t in tensors)
        key.append((name, type(child), shapes))
    return tuple(key)


def _from_groups(
    module: nn.Sequential, children: list[tuple[str, nn.Module]]
) -> tuple[Layout, WidthGroups]:
    """Trace ``module`` and read each hidden width group as a link of the MLP chain."""
    from torch_embed.graph.groups import traced_groups

    first = next(c for _, c in children if type(c) is nn.Linear)
    weight = first.weight
    # two rows: BatchNorm1d in train mode needs more than one value per channel; the
    # fx tracer (exact for Sequential.forward, which has no control flow) is the cheap one
    x = torch.zeros(2, first.in_features, dtype=weight.dtype, device=weight.device)
    # a module built under torch.inference_mode() holds inference tensors, which a
    # train-mode BatchNorm could not update (and restore) outside it; widen refuses such
    # a module with its own message, other readers (Hessians, reports) accept it
    inference = any(t.is_inference() for t in (*module.parameters(), *module.buffers()))
    with torch.inference_mode(inference):
        groups = traced_groups(module, (x,), "fx")
    position = {name: pos for pos, (name, _) in enumerate(children)}
    kinds = {name: type(c) for name, c in children}
    hidden_groups = [
        g for g in groups if g.hidden and any(u.role == "producer" for u in g.producers)
    ]
    linears: list[LinearLayer] = []
    hidden: list[HiddenLayer] = []
    reader: str | None = None  # the Linear that reads the previous hidden layer
    for k, g in enumerate(hidden_groups):
        where = f"hidden layer {k} (fed by layer {g.name})"
        if not g.growable:
            raise ValueError(f"{where} cannot be widened: {g.reason}")
        if g.constraints:
            c = g.constraints[0]
            raise ValueError(
                f"{where} cannot be widened as an MLP layer: {c.op} constrains it "
                f"({c.rule}); between two Linear layers only element-wise modules and "
                f"one BatchNorm1d are accepted"
            )
        writers = {u.module for u in g.producers if u.role == "producer"}
        scalers = {u.module for u in g.producers if u.role == "per-channel"}
        readers = [(u.module, u.tensor, u.axis) for u in g.consumers]
        nxt = readers[0][0] if len(readers) == 1 else None
        bn = next(iter(scalers)) if len(scalers) == 1 else None
        if (
            writers != {g.name}
            or kinds.get(g.name) is not nn.Linear
            or nxt is None
            or kinds.get(nxt) is not nn.Linear
            or readers[0][1:] != (f"{nxt}.weight", 1)
            or len(scalers) > 1
            or (bn is not None and kinds.get(bn) is not nn.BatchNorm1d)
        ):
            raise ValueError(
                f"{where} is not one link of an MLP chain: written by {sorted(writers)}, "
                f"scaled by {sorted(scalers)}, read by {[r[1] for r in readers]}; widen "
                f"accepts one Linear writing it, optionally one BatchNorm1d right after, "
                f"and one Linear reading it"
            )
        start = position[bn if bn is not None else g.name] + 1
        between = tuple(name for name, _ in children[start : position[nxt]])
        if bn is None and between and kinds[between[0]] is nn.BatchNorm1d:
            # without affine parameters and running statistics it shows no tensor in the
            # trace; it still has a num_features to update
            bn, between = between[0], between[1:]
        outside = [m for m in g.through if m not in between]
        if outside:
            raise ValueError(
                f"{where} flows through {outside}, which do not lie between its Linear "
                f"and the next one"
            )
        if reader is not None and reader != g.name:
            raise ValueError(f"{where}: the previous hidden layer is read by layer {reader}")
        reader = nxt
        types = tuple(kinds[a] for a in between)
        linears.append(_linear_layer(module, g.name))
        hidden.append(HiddenLayer(g.name, bn, between, types))
        if k == len(hidden_groups) - 1:
            linears.append(_linear_layer(module, nxt))
    return Layout(tuple(linears), tuple(hidden)), groups


def _linear_layer(module: nn.Sequential, name: str) -> LinearLayer:
    lin = module._modules[name]
    assert isinstance(lin, nn.Linear)  # checked by _from_groups
    return LinearLayer(name, lin.in_features, lin.out_features, lin.bias is not None)


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes, or ``None`` where it is not known."""
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def check_wide_size(module: nn.Module, layout: Layout, widths: Sequence[int]) -> None:
    """Refuse hidden ``widths`` whose wide parameters alone exceed the device's memory.

    Checked before anything is allocated, so that a typo such as ``10**12`` gives a
    message with the size instead of a bare ``MemoryError`` (or an allocation that
    swaps the machine to a halt). Only the parameters and BatchNorm buffers of the wide
    network are counted; widening also needs the narrow ones, gradients and optimizer
    state, so passing this check does not guarantee that the allocation succeeds.
    Devices whose memory size is not known (``meta``, or CPU without ``sysconf``) are
    not checked.

    Raises:
        ValueError: The wide parameters need more bytes than the device has.
    """
    wide = (layout.widths[0], *widths, layout.widths[-1])
    total = 0
    device: torch.device | None = None
    for k, lin in enumerate(layout.linears):
        weight = module.get_submodule(lin.name).get_parameter("weight")
        device = weight.device if device is None else device
        per_neuron = wide[k] + int(lin.has_bias)
        if k < len(widths) and layout.hidden[k].batchnorm is not None:
            per_neuron += 4  # weight, bias, running_mean, running_var
        total += wide[k + 1] * per_neuron * weight.element_size()
    if device is None or device.type == "meta":
        return
    memory = _device_memory(device)
    if memory is not None and total > memory:
        raise ValueError(
            f"widening to hidden widths {tuple(widths)} needs {total:,} bytes "
            f"({total / 2**30:,.1f} GiB) for the wide parameters alone, more than the "
            f"{memory:,} bytes of memory of device '{device}'; choose smaller widths"
        )
