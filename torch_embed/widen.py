"""``widen``: rewrite an ``nn.Sequential`` MLP in place by an embedding, atomically.

Order of work: read the network, plan the embedding, compute every new tensor (weights,
biases, BatchNorm statistics, ``.grad``, optimizer state), and only then swap them in.
Parameters keep their Python identity (``.data`` assignment, or
``torch.utils.swap_tensors`` for tensor subclasses that need it), so optimizers, hooks
and EMA copies that hold them stay valid. If anything fails, the swaps done so far are
undone and the module and optimizer are exactly as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed._sequential import Layout, read_sequential
from torch_embed.embedding import Embedding
from torch_embed.exactness import _autocast_on
from torch_embed.optim_state import map_optimizer_state
from torch_embed.schemes import DEFAULT_SCHEME, Scheme, plan

__all__ = ["embed_", "widen"]


def widen(
    module: nn.Module,
    new_widths: Sequence[int] | Mapping[int, int] | None,
    scheme: Scheme | str = DEFAULT_SCHEME,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> Embedding:
    """Widen an ``nn.Sequential`` MLP in place; every scheme but ``RandomPad`` keeps its function.

    The default scheme is for training on; pass ``"split"`` for the symmetric critical
    split of the Embedding Principle (landscape work). ``Embedding.kind`` says which
    you got.

    Args:
        module: An ``nn.Sequential`` of ``nn.Linear`` layers (with or without bias)
            separated by element-wise modules (activations, ``nn.Dropout``, types added
            with :func:`torch_embed.register_elementwise`), optionally with an
            ``nn.BatchNorm1d`` right after a hidden Linear.
        new_widths: One int per hidden layer, or ``{hidden_layer_index: width}``
            (0-based among hidden layers). Widths may stay equal, never shrink.
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
        optimizer: If given, its state for the reshaped parameters is mapped exactly
            (SGD with momentum, Adam, AdamW incl. amsgrad, RMSprop without momentum,
            Adagrad), so ``optimizer.step()`` works right away. For output-preserving
            schemes, the default among them, the map does not see the noise: the
            copies start from the equal split's state.
        generator: ``torch.Generator`` for the scheme's random choices.

    Returns:
        The :class:`~torch_embed.Embedding` that was applied (not the module: the
        module is changed in place).

    Raises:
        TypeError: ``module`` contains a module that cannot be widened, or the
            optimizer's state cannot be mapped.
        ValueError: Bad ``new_widths`` or scheme arguments.

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
    embedding = plan(module, new_widths, scheme, generator=generator)
    embed_(module, embedding, optimizer=optimizer)
    return embedding


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
        ValueError: The embedding was planned for a network of another structure.
    """
    layout = read_sequential(module)
    _check_layout(layout, embedding.layout)
    _warn_dead_units(module, embedding)
    named_params = dict(module.named_parameters())
    named_buffers = dict(module.named_buffers())
    with torch.no_grad():
        state = {n: t.detach() for n, t in {**named_params, **named_buffers}.items()}
        new_state = embedding.apply(state)
        changed = [n for n in new_state if new_state[n] is not state[n]]
        grads = {n: p.grad for n, p in named_params.items() if p.grad is not None}
        new_grads = embedding.map_gradients(grads) if grads else {}
        new_opt: dict[nn.Parameter, dict[str, Any]] = {}
        if optimizer is not None:
            new_opt = map_optimizer_state(optimizer, named_params, embedding)
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
        raise RuntimeError(f"{name}: {_LIVE_GRAPH}")


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
            raise RuntimeError(_LIVE_GRAPH) from err
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
    done: list[tuple[Tensor, tuple[Tensor, bool], Tensor | None]] = []  # target, undo, grad
    attrs: list[tuple[nn.Module, str, Any]] = []
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
        wide = embedding.wide_layout
        for lin in wide.linears:
            m = module.get_submodule(lin.name)
            for attr, value in (
                ("in_features", lin.in_features),
                ("out_features", lin.out_features),
            ):
                attrs.append((m, attr, getattr(m, attr)))  # ints, restored on failure
                setattr(m, attr, value)
        for l, hidden in enumerate(wide.hidden):
            if hidden.batchnorm is not None:
                bn = module.get_submodule(hidden.batchnorm)
                attrs.append((bn, "num_features", bn.num_features))
                setattr(bn, "num_features", wide.widths[l + 1])  # noqa: B010
    except BaseException:
        for m, attr, value in reversed(attrs):
            setattr(m, attr, value)
        for target, (undo, swapped), old_grad in reversed(done):
            _unswap(target, undo, swapped)
            if isinstance(target, nn.Parameter):
                target.grad = old_grad
        raise
