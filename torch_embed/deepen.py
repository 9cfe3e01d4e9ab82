"""``deepen``: insert residual blocks (or identity layers) into a model, in place, exactly.

Order of work: check the request, run the model once on ``example_inputs`` while
recording the template blocks (:mod:`torch_embed._residual`: residual branches and
their writers), build every new block (a deep copy of its template, zeroed), then swap
the containers' contents, shift ``layer_idx`` attributes and config fields, add the new
parameters to the optimizer, and run the model again: its outputs must equal the old
ones, and for ``"null"`` the new blocks' parameters (writer biases aside, see
:class:`~torch_embed.depth.DepthEmbedding`) must get an exactly zero gradient for a
random output cotangent. Any failure undoes everything: the existing parameters are
never written, so undoing is putting back the containers, attributes, config fields
and optimizer groups.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from torch_embed._residual import BlockRoles, analyse_block, record_blocks
from torch_embed.depth import DepthEmbedding, Inserted
from torch_embed.graph.apply import _compare, _outputs
from torch_embed.graph.trace import check_model

__all__ = ["IDEMPOTENT_ACTIVATIONS", "deepen"]

Mode = Literal["null", "zero_out", "identity"]
_MODES = ("null", "zero_out", "identity")

#: Activations with ``σ(σ(x)) = σ(x)`` (clamps), after which ``Linear(I)`` followed by
#: a copy of the activation is the identity on the activation's output.
IDEMPOTENT_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def deepen(
    model: nn.Module,
    where: Mapping[str, Sequence[int]],
    mode: Mode = "null",
    *,
    example_inputs: Tensor | tuple[Any, ...],
    optimizer: torch.optim.Optimizer | None = None,
) -> DepthEmbedding:
    """Insert blocks into ``nn.ModuleList`` / ``nn.Sequential`` containers, keeping the function.

    Three modes (GROWTH.md §3):

    * ``"null"``: a deep copy of the block at the index, with every affine map of it
      zero (the matrix weights of its residual branches' readers and writers and their
      biases; norms keep the template's parameters). A critical embedding: at a critical
      point of the old model the new parameters get zero gradient, so gradient descent
      alone never moves them (add noise or use ``"zero_out"`` to train them). The
      Hessian change is :meth:`DepthEmbedding.inertia_change`.
    * ``"zero_out"``: a copy with only the writers zeroed (the last affine map of each
      branch: ``o_proj``, ``down_proj``, ``out_proj``, ``c_proj``, ``fc2``, ``linear2``,
      with their biases). Output-preserving, not critical: the writers get gradients
      and the block trains at once.
    * ``"identity"``: in a non-residual ``nn.Sequential``, after an idempotent
      activation (:data:`IDEMPOTENT_ACTIVATIONS`: ``ReLU``, ``ReLU6``, ``Hardtanh``),
      insert ``nn.Linear(n, n)`` with weight ``I`` and bias 0 and a copy of the
      activation: ``σ(I·σ(h)) = σ(h)``. After GELU, SiLU, tanh, LeakyReLU it would not
      be exact, and it is refused.

    Blocks must be pre-norm residual blocks ``y = x + b₁(x) + b₂(…)`` whose branches end
    in an affine map; post-norm blocks (``LN(x + f(x))``: BERT, ``norm_first=False``)
    are refused, since a zero branch does not make them the identity.

    Indices: every module in the container's blocks with an integer ``layer_idx``
    attribute (Hugging Face attention, KV cache) is shifted by the number of blocks
    inserted before it; a config (any module's ``.config``) whose ``num_hidden_layers``,
    ``n_layer``, ``num_layers`` or ``n_layers`` equals the container's old length
    grows with it, and its ``layer_types`` list gets the template's entry at each new
    position; so does the container's parent's ``num_layers`` (``nn.TransformerEncoder``).
    Other per-layer settings are not updated.

    Args:
        model: The model (changed in place).
        where: ``{container FQN: [index, ...]}``: for each index ``i`` (of the old
            container; negative counts from the end), one new block is inserted right
            after block ``i``, copied from it. An index given twice inserts two. ``""``
            is the model itself.
        mode: ``"null"``, ``"zero_out"`` or ``"identity"``.
        example_inputs: A tensor or tuple of the forward's positional arguments, run
            before (to find the branches) and after (to check the outputs).
        optimizer: If given, each new parameter joins the param group of the template
            parameter it was copied from (``"identity"``: of the preceding Linear's), so
            it gets that group's hyper-parameters; its state starts empty. The state of
            the existing parameters is not touched.

    Returns:
        The :class:`~torch_embed.depth.DepthEmbedding` that was applied.

    Raises:
        TypeError: Bad argument types, a container that is not an ``nn.ModuleList`` or
            ``nn.Sequential``, a wrapper model (DDP, compiled).
        ValueError: An unknown container or index, a block that is not residual
            (with the op that leaves the stream), a branch without an affine writer,
            a block that shares parameters with the rest of the model, a template not
            run by the example forward, an activation that is not idempotent, a
            ``"null"`` block whose parameters would get a gradient (a branch with a
            single affine map), or outputs that changed. The model and optimizer are
            then as before.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> class Block(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x + self.down(torch.tanh(self.up(x)))
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(Block(), Block(), nn.Linear(4, 1)).double()
        >>> x = torch.randn(5, 4, dtype=torch.float64)
        >>> before = net(x).detach()
        >>> emb = torch_embed.deepen(net, {"": [1]}, "zero_out", example_inputs=x)
        >>> emb.inserted, len(net)
        (('2',), 4)
        >>> bool((net(x) == before).all())
        True
    """
    if mode not in _MODES:
        raise ValueError(f"deepen: mode must be one of {_MODES}, got {mode!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"deepen: optimizer must be a torch.optim.Optimizer or None, got "
            f"{type(optimizer).__name__}"
        )
    args = check_model(model, example_inputs, "deepen")
    requests = _requests(model, where)
    templates = {
        f"{_join(c, str(i))}": container[i]
        for c, (container, idx) in requests.items()
        for i in sorted(set(idx))
    }
    _check_not_shared(model, templates)
    before = _outputs(model, args)
    with torch.inference_mode(False):
        roles, shapes = _record(model, args, templates, mode)
        plan = _build(model, requests, roles, shapes, mode)
        undo = _install(model, requests, plan, optimizer)
        try:
            after = _outputs(model, args)
            _compare(before, after)
            if mode == "null":
                _check_critical(model, args, plan)
        except BaseException as error:
            undo()
            if isinstance(error, Exception):
                raise ValueError(
                    f"deepen: after inserting {[n for n, _ in plan.new]}, the "
                    f"{type(model).__name__} failed the check: {error}; the model and "
                    f"optimizer were left unchanged"
                ) from error
            raise
    return plan.embedding


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _requests(
    model: nn.Module, where: object
) -> dict[str, tuple[nn.Sequential | nn.ModuleList, list[int]]]:
    if not isinstance(where, Mapping) or not where:
        raise TypeError(
            f"deepen: where must be a non-empty mapping {{container FQN: [index, ...]}}, "
            f"got {where!r:.80}"
        )
    out: dict[str, tuple[nn.Sequential | nn.ModuleList, list[int]]] = {}
    for fqn, idx in where.items():
        if not isinstance(fqn, str):
            raise TypeError(f"deepen: where's keys are container FQNs (str), got {fqn!r}")
        try:
            container = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(
                f"deepen: the {type(model).__name__} has no submodule `{fqn}`"
            ) from None
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                f"deepen: `{fqn}` is a {type(container).__name__}; blocks are inserted into "
                f"an nn.ModuleList or nn.Sequential"
            )
        keys = list(container._modules)
        if keys != [str(k) for k in range(len(keys))]:
            raise ValueError(
                f"deepen: `{fqn}` ({type(container).__name__}) names its children {keys}; "
                f"only containers indexed 0..n-1 are supported"
            )
        if isinstance(idx, (str, bytes)) or not isinstance(idx, Sequence) or not idx:
            raise TypeError(
                f"deepen: where[{fqn!r}] must be a non-empty list of block indices, got {idx!r}"
            )
        n = len(container)
        norm: list[int] = []
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"deepen: where[{fqn!r}] holds {i!r}; indices are ints")
            if not -n <= i < n:
                raise ValueError(
                    f"deepen: index {i} out of range for `{fqn}` ({type(container).__name__} "
                    f"of {n})"
                )
            norm.append(i % n)
        out[fqn] = (container, sorted(norm))
    return out


def _check_not_shared(model: nn.Module, templates: Mapping[str, nn.Module]) -> None:
    owners: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name)
    for fqn, block in templates.items():
        for name, p in block.named_parameters(remove_duplicate=False):
            outside = [o for o in owners[id(p)] if not o.startswith(f"{fqn}.")]
            if outside:
                raise ValueError(
                    f"deepen: parameter `{_join(fqn, name)}` of block `{fqn}` "
                    f"({type(block).__name__}) is shared with `{outside[0]}`; copying a "
                    f"block with tied parameters would untie or zero them"
                )


class _Plan:
    def __init__(self) -> None:
        # per container: its new ordered children
        self.children: dict[str, OrderedDict[str, nn.Module]] = {}
        self.new: list[tuple[str, nn.Module]] = []
        # new parameter -> template parameter (for the optimizer)
        self.param_template: list[tuple[Tensor, Tensor]] = []
        # (object, attribute, new value): layer_idx, config fields, num_layers
        self.attributes: list[tuple[object, str, object]] = []
        self.must_vanish: list[tuple[str, nn.Parameter]] = []
        self.embedding: DepthEmbedding


def _record(
    model: nn.Module,
    args: tuple[Any, ...],
    templates: Mapping[str, nn.Module],
    mode: str,
) -> tuple[dict[str, BlockRoles], dict[str, tuple[int, ...]]]:
    """Run the model once (eval mode, buffers untouched) recording the templates."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        model.eval()
        # grad enabled: fused inference fast paths (nn.TransformerEncoderLayer) would
        # hide the block's structure in one op
        with torch.enable_grad(), record_blocks(templates) as records:
            functional_call(model, buffers, args, strict=False)
    finally:
        for m, flag in flags:
            m.training = flag
    missing = [f for f in templates if f not in records]
    if missing:
        raise ValueError(
            f"deepen: block `{missing[0]}` did not run in the forward on example_inputs; "
            f"a block that is not run cannot be checked"
        )
    roles: dict[str, BlockRoles] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for fqn, block in templates.items():
        where = f"`{fqn}` ({type(block).__name__})"
        if mode == "identity":
            out = [t for t in tree_leaves(records[fqn].output) if isinstance(t, Tensor)]
            shapes[fqn] = tuple(out[0].shape) if out else ()
        else:
            roles[fqn] = analyse_block(block, records[fqn], where)
    return roles, shapes


def _shared_objects(model: nn.Module) -> dict[int, object]:
    """Objects a deep copy of a block must share, not copy: configs."""
    memo: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and not isinstance(cfg, (nn.Module, Tensor)):
            memo[id(cfg)] = cfg
    return memo


def _build(
    model: nn.Module,
    requests: Mapping[str, tuple[nn.Sequential | nn.ModuleList, list[int]]],
    roles: Mapping[str, BlockRoles],
    shapes: Mapping[str, tuple[int, ...]],
    mode: str,
) -> _Plan:
    plan = _Plan()
    inserted: list[Inserted] = []
    renames: dict[str, str] = {}
    configs = _shared_objects(model)
    for fqn, (container, idx) in requests.items():
        old = list(container)
        children: OrderedDict[str, nn.Module] = OrderedDict()
        shift = 0
        for i, block in enumerate(old):
            new_pos = i + shift
            renames[_join(fqn, str(i))] = _join(fqn, str(new_pos))
            children[str(new_pos)] = block
            for m in block.modules():
                value = getattr(m, "layer_idx", None)
                if isinstance(value, int) and not isinstance(value, bool) and shift:
                    plan.attributes.append((m, "layer_idx", value + shift))
            for _ in range(idx.count(i)):
                tname = _join(fqn, str(i))
                if mode == "identity":
                    mods = _identity_layers(fqn, old, i, shapes[tname])
                else:
                    mods = [_copy_block(block, configs, roles[tname], mode)]
                for mod in mods:
                    shift += 1
                    pos = i + shift
                    name = _join(fqn, str(pos))
                    children[str(pos)] = mod
                    plan.new.append((name, mod))
                    if mode != "identity":
                        _template_params(plan, mod, block)
                        for m in mod.modules():
                            value = getattr(m, "layer_idx", None)
                            if isinstance(value, int) and not isinstance(value, bool):
                                plan.attributes.append((m, "layer_idx", value + shift))
                    else:
                        _identity_params(plan, mod, old, i)
                    inserted.append(_describe(name, tname, mod, roles.get(tname), mode))
                    if mode == "null":
                        vanish = set(roles[tname].writer_biases)
                        plan.must_vanish.extend(
                            (_join(name, n), p)
                            for n, p in mod.named_parameters()
                            if n not in vanish and p.requires_grad
                        )
        plan.children[fqn] = children
        _config_updates(plan, model, fqn, container, idx, configs)
    plan.embedding = DepthEmbedding(
        kind=mode, blocks=tuple(inserted), renames=renames, containers=tuple(requests)
    )
    return plan


def _describe(
    name: str, template: str, module: nn.Module, roles: BlockRoles | None, mode: str
) -> Inserted:
    """The :class:`Inserted` record of one new module."""
    if roles is None:  # identity: a fixed Linear(I) or a parameter-free activation
        constant = {n: t.detach().clone() for n, t in module.state_dict().items()}
        return Inserted(name=name, template=template, zeroed=(), constant=constant)
    if mode != "null":
        return Inserted(name=name, template=template, zeroed=_zeroed_names(roles, mode))
    return Inserted(
        name=name,
        template=template,
        zeroed=_zeroed_names(roles, mode),
        writer_biases=tuple(b for b in roles.writer_biases if b is not None),
        last_writer_bias=roles.writer_biases[-1],
    )


def _zeroed_names(roles: BlockRoles, mode: str) -> tuple[str, ...]:
    if mode == "null":
        return roles.affine
    return tuple(
        n for pair in zip(roles.writers, roles.writer_biases) for n in pair if n is not None
    )


def _copy_block(
    block: nn.Module, configs: Mapping[int, object], roles: BlockRoles, mode: str
) -> nn.Module:
    new = copy.deepcopy(block, dict(configs))
    params = dict(new.named_parameters())
    with torch.no_grad():
        for n in _zeroed_names(roles, mode):
            params[n].zero_()
    for p in new.parameters():
        p.grad = None
    return new


def _template_params(plan: _Plan, new: nn.Module, template: nn.Module) -> None:
    old = dict(template.named_parameters())
    for n, p in new.named_parameters():
        plan.param_template.append((p, old[n]))


def _identity_layers(
    fqn: str, old: list[nn.Module], i: int, shape: tuple[int, ...]
) -> list[nn.Module]:
    act = old[i]
    where = f"`{_join(fqn, str(i))}` ({type(act).__name__})"
    if not isinstance(act, IDEMPOTENT_ACTIVATIONS):
        raise ValueError(
            f"deepen: identity insertion after {where} is not exact: Linear(I) followed by "
            f"a copy of the activation is the identity only after an idempotent activation "
            f"σ(σ(x)) = σ(x) ({', '.join(t.__name__ for t in IDEMPOTENT_ACTIVATIONS)}); "
            f"GELU/SiLU/tanh/LeakyReLU break it (GROWTH.md §3)"
        )
    if len(shape) != 2:
        raise ValueError(
            f"deepen: identity insertion after {where} needs a (batch, features) output, "
            f"got shape {shape}"
        )
    ref = next((p for m in old for p in m.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    lin = nn.Linear(shape[1], shape[1], device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(shape[1], dtype=dtype, device=device))
        lin.bias.zero_()
    probe = torch.linspace(-8, 8, 33, dtype=dtype, device=device)
    with torch.no_grad():
        if not torch.equal(act(act(probe)), act(probe)):
            raise ValueError(f"deepen: the activation {where} is not idempotent on [-8, 8]")
    return [lin, copy.deepcopy(act)]


def _identity_params(plan: _Plan, new: nn.Module, old: list[nn.Module], i: int) -> None:
    prev = [m for m in old[: i + 1] if isinstance(m, nn.Linear)]
    ref = prev[-1] if prev else next((m for m in old if isinstance(m, nn.Linear)), None)
    if ref is None:
        return
    for n, p in new.named_parameters():
        template = getattr(ref, n, None)
        if not isinstance(template, nn.Parameter):
            template = ref.weight
        plan.param_template.append((p, template))


def _config_updates(
    plan: _Plan,
    model: nn.Module,
    fqn: str,
    container: nn.Sequential | nn.ModuleList,
    idx: list[int],
    configs: Mapping[int, object],
) -> None:
    n, added = len(container), len(idx)
    for cfg in configs.values():
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            new_types = list(types)
            for i in sorted(idx, reverse=True):
                new_types.insert(i + 1, types[i])
            plan.attributes.append((cfg, "layer_types", new_types))
        for name in _LAYER_COUNTS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == n:
                plan.attributes.append((cfg, name, value + added))
    parent = model.get_submodule(fqn.rpartition(".")[0]) if fqn else None
    if parent is not None and getattr(parent, "num_layers", None) == n:
        plan.attributes.append((parent, "num_layers", n + added))


def _install(
    model: nn.Module,
    requests: Mapping[str, tuple[nn.Sequential | nn.ModuleList, list[int]]],
    plan: _Plan,
    optimizer: torch.optim.Optimizer | None,
) -> Any:
    saved_children = {fqn: c._modules for fqn, (c, _) in requests.items()}
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in plan.attributes]
    saved_groups = (
        [list(g["params"]) for g in optimizer.param_groups] if optimizer is not None else []
    )

    def undo() -> None:
        for fqn, (c, _) in requests.items():
            c._modules = saved_children[fqn]
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)
        if optimizer is not None:
            for g, params in zip(optimizer.param_groups, saved_groups):
                g["params"] = params

    try:
        for fqn, (c, _) in requests.items():
            c._modules = plan.children[fqn]  # type: ignore[assignment]
        for obj, name, new in plan.attributes:
            setattr(obj, name, new)
        if optimizer is not None:
            _join_optimizer(optimizer, plan)
    except BaseException:
        undo()
        raise
    return undo


def _join_optimizer(optimizer: torch.optim.Optimizer, plan: _Plan) -> None:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if plan.param_template and not any(id(t) in group_of for _, t in plan.param_template):
        raise ValueError(
            "deepen: the optimizer holds none of the template blocks' parameters; pass "
            "the optimizer that trains the model"
        )
    for g in optimizer.param_groups:
        g["params"] = list(g["params"])
    for new, template in plan.param_template:
        group = group_of.get(id(template))
        if group is not None:
            group["params"].append(new)


def _check_critical(model: nn.Module, args: tuple[Any, ...], plan: _Plan) -> None:
    """A "null" block's parameters must get exactly zero gradient for any cotangent."""
    if not plan.must_vanish:
        return
    flags = [(m, m.training) for m in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    try:
        model.eval()
        with torch.enable_grad():
            out = functional_call(model, buffers, args, strict=False)
            leaves = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
            total = sum(
                (t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum()
                for t in leaves
            )
            if not isinstance(total, Tensor):
                return
            params = [p for _, p in plan.must_vanish]
            grads = torch.autograd.grad(total, params, allow_unused=True)
    finally:
        for m, flag in flags:
            m.training = flag
    for (name, _), g in zip(plan.must_vanish, grads):
        if g is not None and not math.isclose(float(g.abs().max()), 0.0, abs_tol=0.0):
            raise ValueError(
                f"the null block's parameter `{name}` gets a gradient (max "
                f"{float(g.abs().max()):.3g}): a residual branch with a single affine "
                f"map (or σ(0) ≠ 0) is not a critical embedding; use mode='zero_out'"
            )
