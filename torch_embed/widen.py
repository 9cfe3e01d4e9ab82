"""``widen``: rewrite an ``nn.Sequential`` MLP in place by an embedding, atomically.

Order of work: read the network, plan the embedding, compute every new tensor (weights,
biases, BatchNorm statistics, ``.grad``, optimizer state), and only then swap them in.
Parameters keep their Python identity (``.data`` assignment, or
``torch.utils.swap_tensors`` for tensor subclasses that need it), so optimizers, hooks
and EMA copies that hold them stay valid. If anything fails, the swaps done so far are
undone and the module and optimizer are exactly as before.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from torch_embed._sequential import Layout, read_sequential
from torch_embed.embedding import Embedding
from torch_embed.exactness import _autocast_on, unit_roundoff
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.optim_state import map_optimizer_state
from torch_embed.schemes import DEFAULT_SCHEME, Scheme, _null_value, plan

__all__ = ["embed_", "widen"]


@overload
def widen(
    module: nn.Module,
    new_widths: Sequence[int] | Mapping[int, int] | None,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    example_inputs: None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> Embedding: ...


@overload
def widen(
    module: nn.Module,
    new_widths: Sequence[int] | Mapping[int, int] | Mapping[str, int] | float | None,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    example_inputs: Tensor | tuple[Any, ...],
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> Embedding | GroupEmbedding: ...


def widen(
    module: nn.Module,
    new_widths: Sequence[int] | Mapping[int, int] | Mapping[str, int] | float | None,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    example_inputs: Tensor | tuple[Any, ...] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> Embedding | GroupEmbedding:
    """Widen a network in place; every scheme but ``RandomPad`` keeps its function.

    The default scheme is for training on; pass ``"split"`` for the symmetric critical
    split of the Embedding Principle (landscape work). ``Embedding.kind`` says which
    you got.

    Two paths, one entry. An ``nn.Sequential`` MLP (what
    :func:`~torch_embed.read_sequential` accepts) with a list of hidden widths takes
    the path described below, no example input needed. Any other module (a custom
    ``forward``, residual nets, CNNs), or widths given by group name, needs
    ``example_inputs``: the model is traced into width groups
    (:func:`torch_embed.width_groups`), ``new_widths`` is ``{group name or alias:
    width}`` or a factor ``f > 1`` (every growable hidden group × f, rounded up to a
    width its rules allow), and a :class:`~torch_embed.graph.embedding.GroupEmbedding`
    is returned (see docs/guide/any_model.md for what is supported).

    Args:
        module: An ``nn.Sequential`` of ``nn.Linear`` layers (with or without bias)
            separated by element-wise modules (activations, ``nn.Dropout``, types added
            with :func:`torch_embed.register_elementwise`), optionally with an
            ``nn.BatchNorm1d`` right after a hidden Linear.
        new_widths: One int per hidden layer (a list, tuple, 1-D integer tensor or
            numpy array), or ``{hidden_layer_index: width}`` (0-based among hidden
            layers). Widths may stay equal, never shrink.
        scheme: :class:`~torch_embed.Split`, :class:`~torch_embed.Null`,
            :class:`~torch_embed.Net2Net`, :class:`~torch_embed.General`,
            :class:`~torch_embed.RandomPad`, or the name of one. The default,
            :data:`torch_embed.schemes.DEFAULT_SCHEME` (``Net2Net(noise=4.0)``: copies
            of randomly selected neurons with exact symmetric noise on their fan-out),
            is output-preserving, not critical: the function is kept to rounding and
            the copies receive different gradients, so they become different units
            (use it to keep training). ``"split"`` (``Split(alpha=0.5)``) is critical:
            every critical point stays critical, and its copies stay equal under
            training (use it to study the loss landscape).
        optimizer: If given, its state for the reshaped parameters is mapped (see
            :data:`~torch_embed.SUPPORTED_OPTIMIZERS`), so ``optimizer.step()`` works
            right away. The map is the embedding's gradient map ``B``: exact for
            critical embeddings. For output-preserving ones (the default among them)
            ``B`` is that of the critical embedding underneath (the equal split under
            the noise, the null units under a random fan-in): the copies start from
            the equal split's state and the noise acts from the next step on. An
            :class:`~torch_embed.ApproximateStateWarning` is given where the map is
            not even that (``RandomPad``, coupled weight decay, ``ε`` effects).
        generator: ``torch.Generator`` for the scheme's random choices.
        example_inputs: A tensor or a tuple of the forward's positional arguments;
            required for the traced path.

    Returns:
        The :class:`~torch_embed.Embedding` that was applied (not the module: the
        module is changed in place).

    Raises:
        TypeError: ``module`` contains a module that cannot be widened, or the
            optimizer's state cannot be mapped.
        ValueError: Bad ``new_widths`` or scheme arguments, coefficients too large
            for the module's dtype, widths whose parameters exceed the device's
            memory, tied (shared) tensors between layers, a module built under
            ``torch.inference_mode()``, or an optimizer that holds none of the
            module's parameters. Widening inside ``torch.inference_mode()`` works (the
            new tensors are made outside it). Traced path: an unknown group name (the
            message lists the names), a rigid group (with its reason), a width the
            group's rules forbid (naming the norm or conv and the rule), an unsupported
            scheme, a parametrized module, or a widened model whose output on
            ``example_inputs`` fails or differs (everything undone).
        RuntimeError: A live autograd graph, an autocast cache or a
            DistributedDataParallel wrapper still holds a parameter.

    Warns:
        ApproximateStateWarning: Optimizer state is mapped for an embedding that
            changes the function, or by a map that is exact only up to an optimizer's ``eps``
            (see :mod:`torch_embed.optim_state`). ``.grad`` is mapped by the same ``B``
            without a warning (the next backward usually replaces it). Traced path:
            also when null units feed their readers a value other than 0.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64, generator=g)
        >>> before = net(x).detach()  # a live autograd graph would block widening
        >>> emb = torch_embed.widen(net, [7], torch_embed.Split(alpha=0.5), generator=g)
        >>> net[0].weight.shape, emb.kind.value
        (torch.Size([7, 3]), 'critical')
        >>> torch.allclose(net(x), before, rtol=0, atol=1e-14)
        True
    """
    named = isinstance(new_widths, Mapping) and any(isinstance(k, str) for k in new_widths)
    factor = isinstance(new_widths, numbers.Real) and not isinstance(new_widths, bool)
    if example_inputs is None and (
        (named and not _is_sequential_mlp(module))
        or (factor and not isinstance(new_widths, numbers.Integral))
    ):
        raise ValueError(
            f"widen: widths by group name or a factor ({new_widths!r}) trace the model, "
            f"which needs example_inputs=(a tensor or a tuple of forward's arguments)"
        )
    if example_inputs is not None and (named or factor or not _is_sequential_mlp(module)):
        from torch_embed.graph.apply import widen_graph

        with torch.inference_mode(False):
            return widen_graph(
                module,
                new_widths,
                scheme,
                example_inputs=example_inputs,
                optimizer=optimizer,
                generator=generator,
            )
    # inference_mode(False): tensors made inside torch.inference_mode() would become
    # parameters that every later backward (and in-place update) refuses
    if isinstance(module, nn.Module):
        _check_normal_tensors(module)  # before planning: a scheme may read the weights
    with torch.inference_mode(False):
        embedding = plan(module, new_widths, scheme, generator=generator)  # type: ignore[arg-type]
        _embed(module, embedding, optimizer, stacklevel=3)
    return embedding


def _is_sequential_mlp(module: nn.Module) -> bool:
    """Whether ``module`` takes the Sequential-MLP path (``read_sequential`` accepts it)."""
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return False  # a subclass with its own forward is a custom model: trace it
    try:
        read_sequential(module)
    except (TypeError, ValueError):
        return False
    return True


def embed_(
    module: nn.Module,
    embedding: Embedding,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Apply an existing embedding to ``module`` in place (what :func:`widen` does).

    Use it to replay an embedding on another copy of the same network, or to apply one
    built by hand or returned by :func:`torch_embed.landscape.condense`.

    Raises:
        TypeError: ``embedding`` is not an :class:`~torch_embed.Embedding`, or
            ``optimizer`` is not a ``torch.optim.Optimizer`` (or its state cannot be
            mapped).
        ValueError: The embedding was planned for a network of another structure or
            other activations, its coefficients are too large for the module's dtype,
            the module holds inference tensors, or the optimizer holds none of its
            parameters.
    """
    with torch.inference_mode(False):
        _embed(module, embedding, optimizer, stacklevel=3)


def _embed(
    module: nn.Module,
    embedding: Embedding,
    optimizer: torch.optim.Optimizer | None,
    *,
    stacklevel: int,
) -> None:
    if not isinstance(embedding, Embedding):
        raise TypeError(
            f"embed_ takes an Embedding (from torch_embed.plan, widen or condense), got "
            f"{type(embedding).__name__} {embedding!r:.60}; to widen a "
            f"{type(module).__name__} to new widths, call "
            f"torch_embed.widen(module, new_widths, scheme)"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    layout = read_sequential(module)
    _check_layout(layout, embedding.layout)
    _check_normal_tensors(module)
    _check_null_values(module, embedding)
    _check_coefficients(module, embedding)
    named_params = dict(module.named_parameters())
    named_buffers = dict(module.named_buffers())
    # every warning of the maps below once, although .grad, exp_avg and exp_avg_sq
    # each meet the same cause
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_dead_units(module, embedding)
        with torch.no_grad():
            state = {n: t.detach() for n, t in {**named_params, **named_buffers}.items()}
            new_state = embedding.apply(state)
            changed = [n for n in new_state if new_state[n] is not state[n]]
            grads = {n: p.grad for n, p in named_params.items() if p.grad is not None}
            new_grads = embedding.map_gradients(grads) if grads else {}
            new_opt: dict[nn.Parameter, dict[str, Any]] = {}
            if optimizer is not None:
                new_opt = map_optimizer_state(optimizer, named_params, embedding)
    seen: set[tuple[type[Warning], str]] = set()
    for w in caught:
        if (w.category, str(w.message)) not in seen:
            seen.add((w.category, str(w.message)))
            warnings.warn(w.message, stacklevel=stacklevel)
    _swap_in(module, embedding, named_params, named_buffers, new_state, changed, new_grads)
    if optimizer is not None:
        for p, st in new_opt.items():
            optimizer.state[p] = st


def _check_layout(actual: Layout, planned: Layout) -> None:
    if actual != planned:
        raise ValueError(
            f"the embedding was planned for a network with widths {planned.widths} and "
            f"layers {[lin.name for lin in planned.linears]}, but the module has widths "
            f"{actual.widths} and layers {[lin.name for lin in actual.linears]}"
        )
    for l, (a, p) in enumerate(zip(actual.hidden, planned.hidden)):
        if p.activation_types and a.activation_types != p.activation_types:
            names = [t.__name__ for t in p.activation_types]
            found = [t.__name__ for t in a.activation_types]
            raise ValueError(
                f"hidden layer {l}: the embedding was planned on activations {names} "
                f"(layers {list(p.activations)}), but the module has {found}; a null "
                f"neuron's output σ(β) and the optimizer state mapped with it depend on "
                f"the activation. Plan the embedding on this module instead "
                f"(torch_embed.plan or widen)"
            )


def _check_null_values(module: nn.Module, embedding: Embedding) -> None:
    """Refuse when the module's activations give null neurons another ``σ(β)``.

    Same types with other parameters (a ``LeakyReLU`` slope, a ``Softplus`` beta) change
    the constant a null neuron outputs, hence the gradient map of its fan-out column.
    The tolerance allows for an embedding planned in another floating-point dtype.
    """
    for l, lm in enumerate(embedding.layers):
        null = lm.null_mask
        if not bool(null.any()):
            continue
        weight = module.get_submodule(embedding.layout.hidden[l].linear).get_parameter("weight")
        if weight.is_meta:
            continue
        value = _null_value(module, embedding.layout, l, lm.null_bias[null])
        planned = lm.null_value[null]
        u = max(unit_roundoff(weight.dtype), unit_roundoff(torch.float32))
        tol = 8 * u * planned.abs().clamp(min=1)
        if bool(((value - planned).abs() > tol).any()):
            i = int(((value - planned).abs() > tol).nonzero()[0])
            raise ValueError(
                f"hidden layer {l}: the embedding's null neurons output σ(β) = "
                f"{float(planned[i])!r}, but this module's activations "
                f"{list(embedding.layout.hidden[l].activations)} give "
                f"{float(value[i])!r} for β = {float(lm.null_bias[null][i])!r}; the "
                f"embedding was planned on other activation parameters. Plan it on this "
                f"module instead (torch_embed.plan or widen)"
            )


def _inference_tensor(t: Tensor) -> bool:
    """Whether ``t`` was made under ``torch.inference_mode()``.

    ``is_inference()`` alone misses a Parameter whose ``.data`` was replaced by a normal
    tensor: the Parameter object itself still has no version counter, so every view of
    it (and every backward through it) fails.
    """
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018
    except RuntimeError:
        return True
    return False


def _check_normal_tensors(module: nn.Module) -> None:
    """Refuse inference tensors (a module built under ``torch.inference_mode()``)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, t in tensors:
        if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
            continue  # a lazy module: read_sequential refuses it with its own message
        if _inference_tensor(t):
            raise ValueError(
                f"'{name}' of the {type(module).__name__} is an inference tensor (it was "
                f"built or loaded under torch.inference_mode()); no later backward or "
                f"optimizer step can use it, widened or not. Build the module outside "
                f"inference mode, or make a normal copy outside it, `net = "
                f"copy.deepcopy(net)`, and build the optimizer on the copy (`p.data = "
                f"p.data.clone()` is not enough: the Parameter object keeps no version "
                f"counter)"
            )


def _check_coefficients(module: nn.Module, embedding: Embedding) -> None:
    """Refuse coefficients that the module's dtype cannot carry.

    A wide neuron's fan-out is ``c_j·w``; the copies of a narrow neuron contribute
    ``Σ_j c_j·w·h`` with rounding error up to ``u·Σ_j|c_j|·|w·h|``, so the sum of
    magnitudes ``A = Σ_j|c_j|`` (1 for a split with α in [0, 1]) multiplies the
    rounding error of the narrow network. Refused: ``A·u > sqrt(u)`` (more than half
    of the dtype's significant digits lost: ``A`` up to 9.5e7 in float64, 4096 in
    float32, 45 in float16, 16 in bfloat16; :class:`~torch_embed.Embedding` caps it at
    1e6 for every dtype), and any written value (``c·w``, offsets, null fan-ins and
    biases) beyond the dtype's largest finite number.
    """
    widths = embedding.layout.hidden_widths
    nexts = [
        module.get_submodule(embedding.layout.linears[l + 1].name).get_parameter("weight")
        for l in range(len(embedding.layers))
    ]
    w_maxima = _abs_maxima(nexts)
    for l, lm in enumerate(embedding.layers):
        nxt = nexts[l]
        dtype = nxt.dtype
        u = unit_roundoff(dtype)
        src = lm.source
        mags = torch.where(src >= 0, lm.coef.abs(), 0.0)
        amp_shape = (widths[l],) if lm.is_vector else (lm.coef.shape[0], widths[l])
        amp = torch.zeros(amp_shape, dtype=torch.float64).index_add_(-1, src.clamp(min=0), mags)
        worst = float(amp.max()) if amp.numel() else 0.0
        if worst * u > math.sqrt(u):
            raise ValueError(
                f"hidden layer {l}: the fan-out coefficients of one narrow neuron's copies "
                f"have magnitudes summing to {worst:.3g} (for a split, |1 - α| + |α|), which "
                f"multiplies the rounding error of {dtype} (u = {u:.3g}) to {worst * u:.3g} "
                f"relative, more than half its digits; use |α| closer to [0, 1] or a wider "
                f"dtype (accepted for {dtype}: a sum up to {math.sqrt(u) / u:.3g})"
            )
        if nxt.is_meta:
            continue
        big = float(torch.finfo(dtype).max)
        w_max = w_maxima[l]
        written = float(lm.coef.abs().max()) * w_max
        for extra in (lm.fan_out_offset, lm.null_fan_in, lm.null_bias):
            if extra is not None and extra.numel():
                written = max(written, float(extra.abs().max()))
        if written > big:
            raise ValueError(
                f"hidden layer {l}: the embedding would write values up to {written:.3g} "
                f"into {dtype} weights, whose largest finite number is {big:.3g}; use "
                f"smaller coefficients or a wider dtype"
            )


def _abs_maxima(tensors: Sequence[Tensor]) -> list[float]:
    """``max |t|`` of each tensor (0 when empty or "meta"), one host read per device.

    Reading a device tensor's value waits for the device; the per-layer checks read
    all their maxima at once.
    """
    out = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() and not t.is_meta:
            by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        maxima = torch.stack([tensors[i].detach().abs().max().double() for i in idx])
        for i, v in zip(idx, maxima.tolist()):
            out[i] = v
    return out


def _warn_dead_units(module: nn.Module, embedding: Embedding) -> None:
    for l, lm in enumerate(embedding.layers):
        null = lm.null_mask
        if not bool(null.any()):
            continue
        if lm.null_fan_in is not None and bool((lm.null_fan_in[null] != 0).any()):
            continue
        acts = [module.get_submodule(a) for a in embedding.layout.hidden[l].activations]
        if any(isinstance(a, (nn.ReLU, nn.ReLU6)) for a in acts) and bool(
            (lm.null_bias[null] <= 0).any()
        ):
            warnings.warn(
                f"hidden layer {l}: null neurons with zero fan-in and bias <= 0 under ReLU "
                f"have zero output and zero gradient forever (they never learn). Use "
                f"Null(bias>0), Null(fan_in_std>0) or a splitting scheme.",
                UserWarning,
                stacklevel=3,
            )


def _like(new: Tensor, old: Tensor) -> Tensor:
    """Give ``new`` the memory layout of ``old`` (column-major stays column-major)."""
    if old.dim() == 2 and not old.is_contiguous() and old.t().is_contiguous():
        return new.t().contiguous().t()
    return new.contiguous()


_LIVE_GRAPH = (
    "a computation graph built before widening still uses this parameter (for "
    "example an output tensor that requires grad is still alive); backward "
    "through it and through new graphs cannot both work once shapes change. "
    "Free it (del the tensor, or compute it under torch.no_grad()) and widen "
    "again. The module and optimizer were left unchanged."
)


_DDP = (
    "a torch.distributed process group is initialized: if this module is wrapped by "
    "DistributedDataParallel, the DDP object holds its parameters (its reducer keeps "
    "gradient hooks and buckets of the narrow shapes). Widen the bare module after "
    "dropping the wrapper, then wrap it again: `module = ddp.module; del ddp; "
    "widen(module, ...); ddp = DistributedDataParallel(module, ...)` (the optimizer "
    "can stay; pass optimizer= to widen), or call torch_embed.distributed.widen_ddp(ddp, "
    "...), which does this on every rank with the same random draws. Otherwise, "
)


def _held_message() -> str:
    """Why a parameter is still in use, with DDP first when it can be the holder."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _DDP + _LIVE_GRAPH
    return _LIVE_GRAPH


def _check_not_in_graph(name: str, t: Tensor) -> None:
    """Refuse before any swap if a live autograd graph holds ``t``.

    ``swap_tensors`` would refuse too, but only after poisoning the AccumulateGrad
    nodes of the parameters swapped before it, so the user's graph could no longer
    run backward although the module was restored.
    """
    use_count = getattr(t, "_use_count", None)
    if use_count is not None and use_count() > 1:
        if _autocast_on(t.device.type):
            raise RuntimeError(
                f"{name}: widen was called inside a torch.autocast region that has cached a "
                f"lower-precision copy of this parameter; after widening that cache would be "
                f"stale (narrow). Call widen outside the autocast context. The module and "
                f"optimizer were left unchanged."
            )
        raise RuntimeError(f"{name}: {_held_message()}")


def _swap(target: Tensor, new: Tensor) -> tuple[Tensor, bool]:
    """Swap ``new``'s contents into ``target``; return what undoes it.

    ``.data`` assignment first: it keeps everything attached to the object
    (attributes, tensor hooks such as ``register_hook`` and
    ``register_post_accumulate_grad_hook``, and their handles), which
    ``torch.utils.swap_tensors`` would move to the discarded tensor along with the
    class. ``swap_tensors`` is the fallback for tensor subclasses whose ``.data``
    cannot be replaced; the new tensor then gets the target's class and attributes.
    """
    try:
        old = target.data
        target.data = new.data
        return old, False
    except (RuntimeError, TypeError):
        pass
    if isinstance(target, nn.Parameter) and type(new) is not type(target):
        new = nn.Parameter.__new__(type(target), new.detach(), target.requires_grad)
    new.__dict__.update(target.__dict__)
    try:
        torch.utils.swap_tensors(target, new)
        return new, True  # ``new`` now holds the old contents
    except RuntimeError as err:
        if "AccumulateGrad" in str(err):
            raise RuntimeError(_held_message()) from err
        raise


def _unswap(target: Tensor, undo: Tensor, swapped: bool) -> None:
    if swapped:
        torch.utils.swap_tensors(target, undo)
    else:
        target.data = undo


def _swap_in(
    module: nn.Module,
    embedding: Embedding,
    named_params: dict[str, nn.Parameter],
    named_buffers: dict[str, Tensor],
    new_state: dict[str, Tensor],
    changed: list[str],
    new_grads: dict[str, Tensor],
) -> None:
    wide = embedding.wide_layout
    updates: list[tuple[nn.Module, Mapping[str, object]]] = []
    for lin in wide.linears:
        m = module.get_submodule(lin.name)
        updates.append((m, {"in_features": lin.in_features, "out_features": lin.out_features}))
    for l, hidden in enumerate(wide.hidden):
        if hidden.batchnorm is not None:
            updates.append(
                (module.get_submodule(hidden.batchnorm), {"num_features": wide.widths[l + 1]})
            )
    _install(named_params, named_buffers, new_state, changed, new_grads, updates)


_ABSENT = object()  # an attribute _install adds (removed again on undo)


def _install(
    named_params: Mapping[str, nn.Parameter],
    named_buffers: Mapping[str, Tensor],
    new_state: Mapping[str, Tensor],
    changed: Sequence[str],
    new_grads: Mapping[str, Tensor],
    updates: Sequence[tuple[object, Mapping[str, object]]],
) -> Callable[[], None]:
    """Swap the new tensors and ``.grad`` in, set the attributes; return the undo.

    Parameters keep their identity (see :func:`_swap`). If anything fails, what was done
    is undone before the error propagates; the returned function undoes a success (the
    graph path calls it when the widened model's output differs).
    """
    done: list[tuple[Tensor, tuple[Tensor, bool], Tensor | None]] = []  # target, undo, grad
    attrs: list[tuple[object, str, Any]] = []  # modules, or a model's config

    def undo() -> None:
        for m, attr, value in reversed(attrs):
            if value is _ABSENT:  # a config field the model reads with a default
                delattr(m, attr)
            else:
                setattr(m, attr, value)
        for target, (old, swapped), old_grad in reversed(done):
            _unswap(target, old, swapped)
            if isinstance(target, nn.Parameter):
                target.grad = old_grad

    for name in changed:
        tensor = named_params[name] if name in named_params else named_buffers[name]
        _check_not_in_graph(name, tensor)
    try:
        for name in changed:
            if name in named_params:
                p = named_params[name]
                old_grad = p.grad
                fresh = nn.Parameter(_like(new_state[name], p), requires_grad=p.requires_grad)
                done.append((p, _swap(p, fresh), old_grad))
                p.grad = _like(new_grads[name], p) if name in new_grads else None
            else:
                b = named_buffers[name]
                done.append((b, _swap(b, _like(new_state[name], b)), None))
        for m, values in updates:
            for attr, value in values.items():
                attrs.append((m, attr, getattr(m, attr, _ABSENT)))  # restored on failure
                setattr(m, attr, value)
    except BaseException:
        undo()
        raise
    return undo
