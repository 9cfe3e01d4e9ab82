"""Widen a traced model in place, atomically (the graph path of :func:`torch_embed.widen`).

Order of work, as for Sequential MLPs: trace the width groups, plan the embedding,
compute every new tensor, ``.grad`` and optimizer state and every shape attribute
(:mod:`torch_embed.graph.handlers`), then swap them in with the swap machinery of
:mod:`torch_embed.widen` (Parameters keep their identity). Then the model runs again on
the example inputs (eval mode, buffers untouched) and its output is compared with the
narrow output: a forward that fails or differs (a size written into ``forward``)
undoes everything and raises. During that run, forward pre-hooks record what null units
feed their readers: a value other than 0 makes the embedding output-preserving only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from torch_embed.exactness import unit_roundoff
from torch_embed.graph.attention import (
    HEAD_DIM_ATTRIBUTES,
    VALUE_HEAD_DIM_ATTRIBUTES,
    check_shared_head_dim,
)
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.graph.fill import EPS_ATTRIBUTES
from torch_embed.graph.groups import WidthGroups, width_groups
from torch_embed.graph.handlers import Resize, attribute_updates
from torch_embed.graph.hf import norm_offsets, transformers_updates
from torch_embed.graph.layout import AxisLayout
from torch_embed.graph.plan import plan_groups
from torch_embed.graph.trace import check_model
from torch_embed.optim_state import ApproximateStateWarning, map_optimizer_state
from torch_embed.schemes import Scheme

__all__ = ["check_tensors_held", "widen_graph"]

_T = TypeVar("_T", bound=Tensor)


def widen_graph(
    model: nn.Module,
    new_widths: object,
    scheme: Scheme | str,
    *,
    example_inputs: Any,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> GroupEmbedding:
    """Widen ``model``'s width groups in place; see :func:`torch_embed.widen`."""
    from torch_embed.widen import _check_normal_tensors, _install

    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    args = check_model(model, example_inputs, "widen")
    _check_normal_tensors(model)
    groups = width_groups(model, args)
    tensors = {
        n: t.detach()
        for n, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    }
    offsets = norm_offsets(model, [n.module for n in groups.norms])
    embedding = plan_groups(
        groups, new_widths, scheme, generator=generator, tensors=tensors, norm_offsets=offsets
    )
    check_shared_head_dim(model, groups, embedding.sizes)
    _warn_dead_units(model, groups, embedding)
    before = _outputs(model, args)
    named_params = _one_name_each(model.named_parameters(remove_duplicate=False), embedding)
    named_buffers = _one_name_each(model.named_buffers(remove_duplicate=False), embedding)
    every = {**named_params, **named_buffers}
    check_tensors_held(
        embedding,
        every,
        model,
        "widen: the width groups reach",
        " (a tensor attribute or a constant); make them parameters or buffers",
    )
    with torch.no_grad():
        state = {n: every[n].detach() for n in embedding.tensors}
        new_state = embedding.apply(state)
        readers = [f"{t.rpartition('.')[0]}.bias" for t in _readers(model, embedding)]
        grads = {
            n: p.grad
            for n in (*embedding.tensors, *readers)
            if (p := named_params.get(n)) is not None
        }
        new_grads = embedding.map_gradients({n: g for n, g in grads.items() if g is not None})
        new_opt: dict[nn.Parameter, dict[str, Any]] = {}
        if optimizer is not None:
            new_opt = map_optimizer_state(optimizer, named_params, embedding)
    aliases = _aliases(model)
    heads = _head_counts(model, groups, embedding)
    updates: list[tuple[object, dict[str, object]]] = []
    updates.extend(_attribute_updates(model, new_state, embedding, aliases, heads))
    updates.extend(_scale_updates(model, embedding))
    updates.extend(_eps_updates(model, embedding))
    updates.extend(_head_attribute_updates(model, groups, embedding))
    new_shapes = {
        a: tuple(new_state[n].shape) for n in embedding.tensors for a in aliases.get(n, [n])
    }
    hf_updates, config_caveats = transformers_updates(model, new_shapes, updates)
    updates.extend(hf_updates)
    changed = list(embedding.tensors)
    undo = _install(named_params, named_buffers, new_state, changed, new_grads, updates)
    probes: list[_Probe] = []
    try:
        probes.extend(_null_probes(model, embedding))
        after = _outputs(model, args)
        _compare(before, after, values=embedding.preserves_output)
    except BaseException as error:
        undo()
        if isinstance(error, Exception):
            raise ValueError(
                f"widen: after widening {sorted(embedding.sizes)}, the "
                f"{type(model).__name__}'s forward on the example inputs failed the check: "
                f"{error}; the model was left "
                f"unchanged. A size written into forward (x.view(-1, 128)) or a module "
                f"attribute no handler patches can cause this"
                + _MEAN_FILL_HINT
                * any(a.mean for a in embedding.axes)
            ) from error
        raise
    finally:
        for probe in probes:
            probe.handle.remove()
    values = {p.tensor: v for p in probes if (v := p.exact_values(named_params)) is not None}
    if values:  # σ(β) != 0 into readers with a bias: map their columns as for MLPs
        embedding = dataclasses.replace(embedding, null_values=values)
        try:
            with torch.no_grad():
                narrow_grads = {n: g for n, g in grads.items() if g is not None}
                remapped = embedding.map_gradients(narrow_grads)
                if optimizer is not None:
                    new_opt = map_optimizer_state(optimizer, named_params, embedding)
                for name in values:
                    if name in remapped and name in named_params:
                        named_params[name].grad = remapped[name].to(named_params[name].dtype)
        except BaseException:
            undo()
            raise
    caveats = tuple(r for probe in probes if probe.tensor not in values for r in probe.caveats())
    if caveats:
        embedding = dataclasses.replace(embedding, reasons_=embedding.reasons_ + caveats)
    # Net2Net's noise and Null's random fan-in are documented perturbations of a critical
    # map (no warning, as for MLPs); a norm shared by unequal copies, a null unit's
    # nonzero value or RandomPad's random units are not
    caveats = tuple(r for r in embedding.reasons if not r.startswith(_DOCUMENTED))
    if caveats:
        if new_grads or new_opt:
            warnings.warn(
                f"widen: {'; '.join(caveats)}: the mapped .grad and optimizer state are not "
                f"what the wide network would hold",
                ApproximateStateWarning,
                stacklevel=3,
            )
    for caveat in config_caveats:
        warnings.warn(f"widen: {caveat}", UserWarning, stacklevel=3)
    if optimizer is not None:
        for p, st in new_opt.items():
            optimizer.state[p] = st
    return embedding


def check_tensors_held(
    embedding: GroupEmbedding,
    held: Mapping[str, Tensor],
    model: nn.Module,
    lead: str,
    advice: str,
) -> None:
    """Refuse an embedding that maps tensors the model does not hold.

    Args:
        embedding: The embedding.
        held: The model's parameters and buffers by FQN.
        model: The model (named in the message).
        lead: The message's start, naming the caller (``"widen: the width groups reach"``).
        advice: What follows the model's type (from ``"; "`` or ``" ("``): what to do.

    Raises:
        ValueError: Some of ``embedding.tensors`` are not in ``held``.

    Example:
        >>> from torch_embed.graph.embedding import GroupEmbedding
        >>> emb = GroupEmbedding({}, {}, ())
        >>> check_tensors_held(emb, {}, nn.Linear(1, 1), "x: maps", "; pass another")
    """
    missing = [t for t in embedding.tensors if t not in held]
    if missing:
        raise ValueError(
            f"{lead} {missing}, which are not parameters or buffers of the "
            f"{type(model).__name__}{advice}"
        )


_MEAN_FILL_HINT = (
    "; so can a mean-fill under a post-norm LayerNorm: mean-fill is exact only when every "
    "LayerNorm reads the residual stream without writing its output back into it "
    "(pre-norm); grow a post-norm model's residual by uniform copies (Split, a multiple "
    "of the width)"
)
_DOCUMENTED = ("Net2Net noise", "Null fan-in std")


def _warn_dead_units(model: nn.Module, groups: WidthGroups, embedding: GroupEmbedding) -> None:
    """Warn, as the MLP path does, about null units that can never learn.

    A null unit with zero fan-in and a bias ``β <= 0`` feeds a ReLU the value ``β``:
    output and gradient 0 forever.
    """
    if embedding.scheme not in ("Null", "General") or any(a.null_init for a in embedding.axes):
        return
    for g in groups:
        lm = embedding.maps.get(g.name)
        if lm is None or not bool(lm.null_mask.any()):
            continue
        relu = [n for n in g.through if isinstance(model.get_submodule(n), (nn.ReLU, nn.ReLU6))]
        if relu and bool((lm.null_bias[lm.null_mask] <= 0).any()):
            warnings.warn(
                f"width group {g.name!r}: null units with zero fan-in and bias <= 0 under "
                f"ReLU (`{relu[0]}`) have zero output and zero gradient forever (they never "
                f"learn). Use Null(bias>0), Null(fan_in_std>0) or a splitting scheme.",
                UserWarning,
                stacklevel=4,
            )


def _padding(module: nn.Module) -> object | None:
    """A conv reader's padding when nonzero (its border taps read it), else ``None``."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    pad = module.padding
    if isinstance(pad, str):  # "valid", or "same": dilation·(kernel - 1) per side pair
        taps = zip(module.dilation, module.kernel_size, strict=True)
        return pad if pad == "same" and any(d * (k - 1) for d, k in taps) else None
    return pad if any(pad) else None


def _maps_null_columns(module: nn.Module) -> bool:
    """Whether a constant input ``v`` on channel ``c`` makes ``∂R/∂w[:, c] = v·∂R/∂b``.

    A Linear with a bias; an unpadded (any stride, dilation, groups), non-transposed
    conv with a bias, at every tap: each reads the input at every output position.
    """
    if isinstance(module, nn.Linear):
        return module.bias is not None
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and module.bias is not None
        and _padding(module) is None
    )


class _Probe:
    """Records the largest |value| that null units feed a reader module.

    A null unit has zero fan-in and zero fan-out: the output is kept whatever it holds,
    but its fan-out columns get the gradient ``δ·value``, which the gradient map takes
    to be 0 (true for σ(0) = 0: ReLU, tanh, GELU, SiLU; not for a sigmoid) unless the
    value is a constant and the reader's bias carries it (:func:`_maps_null_columns`).
    """

    def __init__(self, module: nn.Module, tensor: str, index: Tensor, dim: int | None):
        self.tensor, self.index, self.dim = tensor, index, dim
        self.cls = type(module).__name__
        self.largest = 0.0
        self.mappable = _maps_null_columns(module)
        self.padding = _padding(module)
        self.wide = 0
        self.values: Tensor | None = None  # the constant each null unit feeds, if constant
        self.constant = True
        self.handle = module.register_forward_pre_hook(self.record)

    def record(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0] if inputs else None
        if self.dim is None or not isinstance(x, Tensor):
            return
        values = x.detach().index_select(self.dim, self.index.to(x.device))
        if values.numel():
            self.largest = max(self.largest, float(values.abs().max()))
            rows = values.movedim(self.dim, -1).reshape(-1, self.index.numel()).double().cpu()
            if self.values is None:
                self.values, self.wide = rows[0], x.shape[self.dim]
            self.constant = self.constant and bool((rows == self.values).all())

    def exact_values(self, params: Mapping[str, nn.Parameter]) -> Tensor | None:
        """``(wide_in,)`` values of a reader whose bias maps the null columns."""
        bias = f"{self.tensor.rpartition('.')[0]}.bias"
        if not (self.mappable and self.constant and self.largest != 0.0 and bias in params):
            return None
        if self.values is None:
            return None
        out = torch.zeros(self.wide, dtype=torch.float64)
        out[self.index] = self.values
        return out

    def caveats(self) -> list[str]:
        where = f"the null units read by `{self.tensor}` ({self.cls})"
        if self.dim is None:
            return [
                f"{where} are not probed: their value, hence the gradient of their fan-out, "
                f"is not checked"
            ]
        if self.largest != 0.0:
            why = ""
            if self.padding is not None:
                why = (
                    f"; `{self.tensor.rpartition('.')[0]}` has padding {self.padding!r}: its "
                    f"border taps read the padding, not σ(β), so no bias gradient gives them"
                )
            return [
                f"{where} hold {self.largest:.3g}, not 0 (an activation with "
                f"σ(0) != 0): their fan-out columns get gradients the map sets to 0{why}"
            ]
        return []


def _readers(model: nn.Module, embedding: GroupEmbedding) -> list[str]:
    """The weights that read null units and whose biases map the null columns."""
    out = []
    for a in embedding.axes:
        if a.role == "split" and a.axis == 1 and bool((a.source < 0).any()):
            owner = a.tensor.rpartition(".")[0]
            if _maps_null_columns(model.get_submodule(owner)):
                out.append(a.tensor)
    return out


def _null_probes(model: nn.Module, embedding: GroupEmbedding) -> list[_Probe]:
    probes = []
    for a in embedding.axes:
        null = (a.source < 0).nonzero().flatten()
        if a.role != "split" or not null.numel():
            continue
        owner = a.tensor.rpartition(".")[0]
        module = model.get_submodule(owner)
        dim: int | None = None
        if isinstance(module, nn.Linear) and a.axis == 1:
            dim = -1
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and a.axis == 1:
            dim = 1  # a grouped conv's map covers its whole input axis too
        probes.append(_Probe(module, a.tensor, null, dim))
    return probes


def _one_name_each(named: Iterator[tuple[str, _T]], embedding: GroupEmbedding) -> dict[str, _T]:
    """One name per tensor (tied tensors have several): the one the embedding uses."""
    first: dict[int, tuple[str, _T]] = {}
    for name, t in named:
        if id(t) not in first or name in embedding.tensors:
            if id(t) in first and first[id(t)][0] in embedding.tensors:
                continue
            first[id(t)] = (name, t)
    return dict(first.values())


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every FQN of each tensor, keyed by each of its FQNs (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(t), []).append(name)
    return {n: ns for ns in names.values() for n in ns}


def _attribute_updates(
    model: nn.Module,
    new_state: dict[str, Tensor],
    embedding: GroupEmbedding,
    aliases: dict[str, list[str]],
    heads: dict[str, int],
) -> list[tuple[nn.Module, dict[str, object]]]:
    by_module: dict[str, dict[str, tuple[int, ...]]] = {}
    for name in embedding.tensors:
        for alias in aliases.get(name, [name]):  # every module that owns a tied tensor
            owner, _, local = alias.rpartition(".")
            by_module.setdefault(owner, {})[local] = tuple(new_state[name].shape)
    out: list[tuple[nn.Module, dict[str, object]]] = []
    for owner, shapes in by_module.items():
        module = model.get_submodule(owner)
        groups = None
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            if module.groups == module.in_channels and "weight" in shapes:  # depthwise
                per = module.out_channels // module.groups
                if shapes["weight"][0 if not module.transposed else 1] % per:
                    raise ValueError(f"`{owner}`: a depthwise conv's channels grow unevenly")
                groups = shapes["weight"][0] // per if not module.transposed else None
            else:
                groups = module.groups
        groups = heads.get(owner, groups)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            updates = attribute_updates(module, Resize(shapes, None, groups), name=owner)
        out.append((module, updates))
    return out


def _head_counts(
    model: nn.Module, groups: WidthGroups, embedding: GroupEmbedding
) -> dict[str, int]:
    """The new ``num_heads`` of every ``nn.MultiheadAttention``: its q rows are (…, H, d)."""
    widths = {name: wide for name, (_, wide) in embedding.sizes.items()}
    out: dict[str, int] = {}
    for owner, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        name = "in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight"
        layout = groups.layouts.get((f"{owner}.{name}" if owner else name, 0))
        if layout is None:
            continue
        factors = _factors(layout.resized(widths))
        out[owner] = factors[-2] if module.num_heads > 1 and len(factors) >= 2 else 1
    return out


def _factors(layout: AxisLayout) -> list[int]:
    """The sizes of the factors of an axis (of its first part, for a split q/kv axis)."""
    if layout.kind == "prod":
        return [f for p in layout.parts for f in _factors(p)]
    if layout.kind == "sum":
        return _factors(layout.parts[0])
    return [layout.size] if layout.size != 1 else []


_HEAD_ATTRIBUTES = {
    "q_heads": ("n_head", "n_heads", "num_heads", "num_attention_heads"),
    "kv_heads": ("n_kv_head", "n_kv_heads", "num_kv_heads", "num_key_value_heads"),
    "rep": ("n_rep", "num_key_value_groups"),
    "head_dim": HEAD_DIM_ATTRIBUTES,
    "value_dim": VALUE_HEAD_DIM_ATTRIBUTES,
}


def _head_attribute_updates(
    model: nn.Module, groups: WidthGroups, embedding: GroupEmbedding
) -> list[tuple[nn.Module, dict[str, object]]]:
    """Head counts and head_dim held as int attributes by the module running an attention.

    For a module other than ``nn.MultiheadAttention`` (its handler does it) that runs an
    attention: an int attribute named as in ``_HEAD_ATTRIBUTES`` holding the old number
    of query heads, kv heads, query heads per kv head, head_dim or value head_dim
    (``v_head_dim``) is set to the new one.
    The re-check after widening confirms the forward computes with them.
    """
    widths = {name: wide for name, (_, wide) in embedding.sizes.items()}

    def sizes(names: tuple[str, ...]) -> tuple[int, int]:
        old = math.prod(groups.find(n).size for n in names)
        return old, math.prod(widths.get(n, groups.find(n).size) for n in names)

    updates: dict[str, dict[str, object]] = {}
    for att in groups.attentions:
        module = model.get_submodule(att.module)
        if isinstance(module, nn.MultiheadAttention):
            continue
        (qo, qn), (ko, kn), (do, dn) = (
            sizes(att.q_heads), sizes(att.kv_heads), sizes(att.head_dim)
        )  # fmt: skip
        counts = {"q_heads": (qo, qn), "kv_heads": (ko, kn), "head_dim": (do, dn)}
        counts["value_dim"] = sizes(att.value_dim)
        if att.kv_heads and qo % ko == 0 and qn % kn == 0:
            counts["rep"] = (qo // ko, qn // kn)
        for what, (old, new) in counts.items():
            if old == new:
                continue
            for attr in _HEAD_ATTRIBUTES[what]:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value == old:
                    updates.setdefault(att.module, {})[attr] = new
    return [(model.get_submodule(m), u) for m, u in updates.items()]


def _eps_updates(
    model: nn.Module, embedding: GroupEmbedding
) -> list[tuple[nn.Module, dict[str, object]]]:
    """The eps of every norm over a zero- or mean-filled group, × D/D' (graph/fill.py)."""
    out: list[tuple[nn.Module, dict[str, object]]] = []
    for owner, old, factor in embedding.eps:
        module = model.get_submodule(owner)
        found = None
        for attr in EPS_ATTRIBUTES:
            if not hasattr(module, attr):
                continue
            value = getattr(module, attr)
            if value is None and old is None:  # nn.RMSNorm(eps=None): the dtype's eps
                weight = getattr(module, "weight", None)
                dtype = weight.dtype if isinstance(weight, Tensor) else torch.get_default_dtype()
                found = (attr, torch.finfo(dtype).eps * factor)
            elif isinstance(value, float) and old is not None and math.isclose(value, old):
                found = (attr, value * factor)
            if found:
                break
        if found is None:
            raise ValueError(
                f"widen: the norm at `{owner}` ({type(module).__name__}) reads the filled "
                f"group, but no attribute {list(EPS_ATTRIBUTES)} holds its eps {old}: its eps "
                f"must become eps × {factor:.6g} to keep the output; make it an attribute"
            )
        out.append((module, {found[0]: found[1]}))
    return out


def _scale_updates(
    model: nn.Module, embedding: GroupEmbedding
) -> list[tuple[nn.Module, dict[str, object]]]:
    """Explicit softmax scales ``1/√head_dim`` held by module attributes, set to ``1/√d'``."""
    out: list[tuple[nn.Module, dict[str, object]]] = []
    for owner, old, new in embedding.scales:
        module = model.get_submodule(owner)
        for attr in ("scale", "scaling", "softmax_scale"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and math.isclose(value, old, rel_tol=1e-12):
                out.append((module, {attr: new}))
    return out


def _outputs(model: nn.Module, args: tuple[Any, ...]) -> list[Tensor]:
    """The model's output tensors in eval mode; flags and buffers are left as they were."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        model.eval()
        with torch.no_grad():
            out = functional_call(model, buffers, args, strict=False)
    finally:
        for m, flag in flags:
            m.training = flag
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def _compare(before: list[Tensor], after: list[Tensor], *, values: bool = True) -> None:
    """Refuse other outputs; ``values=False`` (the function may change): shapes only."""
    if len(before) != len(after):
        raise ValueError(f"returns {len(after)} tensors instead of {len(before)}")
    for k, (a, b) in enumerate(zip(before, after)):
        if a.shape != b.shape:
            raise ValueError(f"output {k} has shape {tuple(b.shape)} instead of {tuple(a.shape)}")
        if not values or not a.is_floating_point() or a.numel() == 0:
            continue
        u = unit_roundoff(a.dtype)
        scale = float(a.abs().max())
        err = float((a - b).abs().max())
        if not err <= math.sqrt(u) * max(scale, 1.0):
            raise ValueError(
                f"output {k} changed by {err:.3g} (max |output| {scale:.3g}), more than the "
                f"rounding allowance {math.sqrt(u):.3g} relative"
            )
