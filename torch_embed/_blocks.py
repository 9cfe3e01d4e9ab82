"""Per-neuron curvature blocks of one-step embeddings (closed forms, docs/theory.md).

A one-step embedding adds one neuron to hidden layer ``l`` of an MLP. Its *complement
directions* ``C`` — the parameter directions of the wide network that the embedding map
``A`` does not reach and whose first-order effect on the network output is identically
zero on the embedded set — split the wide Hessian exactly:
``[A C]ᵀ H_wide [A C] = diag(H_narrow, D)`` with ``D = Cᵀ H_wide C``, so by Sylvester's
law ``inertia(H_wide) = inertia(H_narrow) + inertia(D)``. This module computes ``D`` in
closed form from a handful of per-sample signals of hidden layer ``l`` and maps
vectors of ``D``'s coordinates back to wide parameter directions.

Conventions (shared with the strict-saddle and escape code built on top of this):

* Hidden layer ``l`` (0-based, as in ``widen``'s ``new_widths``) is fed by the Linear
  ``layout.linears[l]`` and read by ``layout.linears[l + 1]``.
* **Own-parameter coordinates** of a neuron (the ``v`` part of ``D``): its fan-in row
  (``fan_in`` entries), then its Linear bias (if the Linear has one), then — only in
  :func:`split_direction` / :func:`null_direction` and only for a layer with
  BatchNorm1d — its BatchNorm weight and bias (if affine). The closed forms cover
  layers without BatchNorm, where these coordinates match ``h̃ = [f[l-1](x); 1]``.
* **Fan-out coordinates** (the ``c`` part): one per output of the next Linear.
* **Split** of neuron ``s`` with coefficient ``α``: after the step, ``s`` keeps fan-out
  ``(1-α)·w`` and the new neuron (index ``new_index``, appended) gets ``α·w``, ``w``
  being ``s``'s fan-out column before the step. Complement directions:
  ``v``: own parameters of ``s`` ``+= α·v``, of the new neuron ``-= (1-α)·v``;
  ``c``: fan-out column of ``s`` ``+= c``, of the new neuron ``-= c``. Then
  ``D = [[α(1-α)·S, G], [Gᵀ, 0]]`` (:func:`split_block`) with the splitting matrix
  ``S = Σ_i (δ_i·w) σ''(z_i) h̃_i h̃_iᵀ`` and the coupling ``G = Σ_i σ'(z_i) h̃_i δ_iᵀ``
  (``z_i`` the neuron's preactivation, ``δ_i = ∂R/∂(preactivation of layer l+1)``).
* **Null** neuron with bias ``β`` (output ``σ(β)``): ``v``: its own parameters
  ``+= v``; ``c``: its fan-out column ``+= c`` and the next Linear's bias
  ``-= σ(β)·c``. Then ``D = [[0, G'], [G'ᵀ, 0]]`` (:func:`null_block`),
  ``G' = σ'(β) Σ_i h̃_i δ_iᵀ``; its inertia is ``(r, n - 2r, r)``, ``r = rank G'``.

All signals are evaluated at the network the step is applied to (the narrow side of
the step); they are the same at the embedded wide point because the embedding
preserves the function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from torch_embed._data import BatchSource
from torch_embed._sequential import Layout, elementwise_info, read_sequential

__all__ = [
    "LayerSignals",
    "activation_derivatives",
    "data_signals",
    "full_state",
    "layer_signals",
    "null_block",
    "null_coupling",
    "null_direction",
    "own_parameter_count",
    "split_block",
    "split_coupling",
    "split_direction",
    "splitting_matrix",
]

LossFn = Callable[[Any, Any], Tensor]

_TRAIN_MODE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
)


@dataclass(frozen=True)
class LayerSignals:
    """Per-sample signals of one hidden layer, from one forward and one backward pass.

    The rows are the samples of this process (all of them without a process group).
    The closed forms are sums over samples (:func:`splitting_matrix`,
    :func:`split_coupling`, :func:`null_coupling`): with a ``source`` that has a process
    group, each process sums its own rows and the partial sums are all-reduced, so every
    rank gets the same sums, those of the concatenated data, without holding the other
    ranks' samples.

    Attributes:
        h: ``(N, fan_in + 1)`` (or ``(N, fan_in)`` without a bias) augmented inputs
            ``h̃_i = [f[l-1](x_i); 1]`` of the hidden layer's Linear.
        z: ``(N, m)`` preactivations (outputs of the hidden layer's Linear).
        d1: ``(N, m)`` ``σ'(z)`` of the layer's element-wise activation chain.
        d2: ``(N, m)`` ``σ''(z)``, by automatic double differentiation.
        delta: ``(N, m_next)`` ``∂R/∂p_i``, ``p_i`` the outputs of the next Linear for
            sample ``i`` (includes the ``1/N`` of a mean loss).
        fan_out: ``(m_next, m)`` the next Linear's weight.
        has_bias: Whether the hidden layer's Linear has a bias (``h`` has its column
            of ones).
        next_has_bias: Whether the next Linear has a bias (null neurons with
            ``σ(β) ≠ 0`` need it).
        source: The batches the rows come from, whose process group completes every
            sum over samples (``None``: the rows are all the samples).
    """

    h: Tensor
    z: Tensor
    d1: Tensor
    d2: Tensor
    delta: Tensor
    fan_out: Tensor
    has_bias: bool
    next_has_bias: bool = True
    source: BatchSource | None = None

    @property
    def width(self) -> int:
        """Number of neurons ``m`` of the hidden layer."""
        return int(self.z.shape[1])

    def summed(self, partial: Tensor) -> Tensor:
        """A sum over this process's samples completed over the process group (in place).

        Without a group (or without a ``source``), ``partial`` itself: the rows are
        all the samples.
        """
        return partial if self.source is None else self.source.all_reduce_(partial)


def _check_layer(layout: Layout, layer: int) -> None:
    n = len(layout.hidden)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"hidden layer index {layer!r} is out of range: the network has {n}")


def _check_modes(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if module.training and isinstance(module, _TRAIN_MODE_TYPES):
            raise ValueError(
                f"module '{name}' ({type(module).__name__}) is in train mode: the loss "
                f"then depends on batch statistics or a random mask. Call model.eval() "
                f"first."
            )


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype) if t.is_floating_point() else t.detach()


def full_state(
    model: nn.Module,
    state: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """The model's parameters and buffers, overridden by ``state``, floats cast to ``dtype``.

    Example:
        >>> from torch import nn
        >>> sorted(full_state(nn.Linear(1, 1)).items())[0][1].dtype
        torch.float64
    """
    out = {k: _cast(v, dtype) for k, v in model.state_dict().items()}
    if state is not None:
        out.update({k: _cast(v, dtype) for k, v in state.items()})
    return out


def _sub(params: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _derivatives(
    model: nn.Module, params: Mapping[str, Tensor], layout: Layout, layer: int, z: Tensor
) -> tuple[Tensor, Tensor]:
    """σ'(z) and σ''(z) of hidden layer ``layer``'s element-wise chain, by autograd."""
    hidden = layout.hidden[layer]
    for name in hidden.activations:
        act = model.get_submodule(name)
        info = elementwise_info(act)
        if info is not None and not info.twice_differentiable:
            raise ValueError(
                f"hidden layer {layer}: module '{name}' ({type(act).__name__}) has no second "
                f"derivative in PyTorch, so σ'' and the Hessian do not exist through "
                f"autograd. Use a smooth activation (Tanh, Sigmoid, Softplus, SiLU, ...)."
            )
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        a = zz
        for name in hidden.activations:
            a = functional_call(model.get_submodule(name), _sub(params, name), (a,))
        if a is zz or not a.requires_grad:  # identity chain
            return torch.ones_like(z), torch.zeros_like(z)
        (d1,) = torch.autograd.grad(a.sum(), zz, create_graph=True)
        d2: Tensor | None = None
        if d1.requires_grad:
            try:
                (d2,) = torch.autograd.grad(d1.sum(), zz, allow_unused=True)
            except RuntimeError as err:
                raise ValueError(
                    f"hidden layer {layer}: PyTorch cannot differentiate the activation "
                    f"chain {hidden.activations} twice ({err}); σ'' is needed for the "
                    f"closed-form blocks."
                ) from err
    return d1.detach(), (torch.zeros_like(z) if d2 is None else d2.detach())


def activation_derivatives(
    model: nn.Module,
    layer: int,
    z: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    state: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``σ'(z)`` and ``σ''(z)`` of hidden layer ``layer``'s activation chain, elementwise.

    ``σ`` is the composition of the element-wise modules after the layer's Linear (and
    BatchNorm1d, which is not part of ``σ``). Use it for a null neuron's bias slope
    ``σ'(β)`` (:func:`null_block`).

    Raises:
        ValueError: A module of the chain has no second derivative in PyTorch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Sigmoid(), nn.Linear(2, 1))
        >>> d1, d2 = activation_derivatives(net, 0, torch.zeros(1))
        >>> d1.item(), d2.item()
        (0.25, 0.0)
    """
    layout = read_sequential(model)
    _check_layer(layout, layer)
    params = full_state(model, state, dtype=dtype)
    return _derivatives(model, params, layout, layer, _cast(torch.as_tensor(z), dtype))


def layer_signals(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Any,
    layer: int,
    *,
    dtype: torch.dtype = torch.float64,
    state: Mapping[str, Tensor] | None = None,
) -> LayerSignals:
    """Collect the per-sample signals of hidden layer ``layer`` for the closed forms.

    Args:
        model: An ``nn.Sequential`` MLP (not modified; BatchNorm/Dropout in eval mode).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        inputs: The batch of inputs (floating inputs are cast to ``dtype``).
        targets: The batch of targets (floating targets are cast to ``dtype``).
        layer: Hidden-layer index (0-based).
        dtype: Floating dtype of the computation.
        state: Optional parameters/buffers (keyed like ``model.state_dict()``) to
            evaluate at instead of the model's own, through ``functional_call``. Its
            shapes may differ from the model's (e.g. the narrow side of an embedding).

    Returns:
        The :class:`LayerSignals`.

    Raises:
        ValueError: The layer index is out of range; the hidden layer has a BatchNorm1d
            (the closed forms do not cover it: use the Hessian-vector-product path of
            :func:`torch_embed.inertia_change.complement_blocks`); a module is in train
            mode; the activation has no second derivative in PyTorch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
        >>> sig = layer_signals(net, nn.MSELoss(), x, y, 0)
        >>> sig.h.shape, sig.z.shape, sig.delta.shape
        (torch.Size([5, 3]), torch.Size([5, 3]), torch.Size([5, 1]))
        >>> torch.allclose(sig.d1, 1 - torch.tanh(sig.z) ** 2)
        True
    """
    layout = read_sequential(model)
    _check_layer(layout, layer)
    hidden = layout.hidden[layer]
    if hidden.batchnorm is not None:
        raise ValueError(
            f"hidden layer {layer} has a BatchNorm1d (module '{hidden.batchnorm}'); the "
            f"closed-form blocks cover Linear + element-wise layers only. Use the "
            f"Hessian-vector-product path (method='hvp') for this layer."
        )
    _check_modes(model)
    params = full_state(model, state, dtype=dtype)
    lin_in = layout.linears[layer]
    lin_next = layout.linears[layer + 1]
    x: Tensor = _cast(inputs, dtype)
    y = _cast(targets, dtype) if isinstance(targets, Tensor) else targets
    h_in: Tensor | None = None
    z: Tensor | None = None
    p: Tensor | None = None
    with torch.enable_grad():
        for name, child in model.named_children():
            if name == lin_in.name:
                h_in = x.detach()
            x = functional_call(child, _sub(params, name), (x,))
            if name == lin_in.name:
                z = x.detach()
            if name == lin_next.name:
                x = x.detach().requires_grad_(True)
                p = x
        loss = loss_fn(x, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        assert p is not None and z is not None and h_in is not None  # set by the loop
        (delta,) = torch.autograd.grad(loss.reshape(()), p)
    d1, d2 = _derivatives(model, params, layout, layer, z)
    h = h_in
    if lin_in.has_bias:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)
    return LayerSignals(
        h=h,
        z=z,
        d1=d1,
        d2=d2,
        delta=delta.detach(),
        fan_out=params[f"{lin_next.name}.weight"],
        has_bias=lin_in.has_bias,
        next_has_bias=lin_next.has_bias,
    )


def data_signals(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    layer: int,
    *,
    dtype: torch.dtype = torch.float64,
    state: Mapping[str, Tensor] | None = None,
) -> LayerSignals:
    """:func:`layer_signals` of a whole data set: this process's samples, in order.

    The closed forms are sums over samples of terms linear in ``δ``, so the signals of
    each batch of this process (its ``δ`` scaled by the batch's weight,
    :mod:`torch_embed._data`) are concatenated, and the result keeps ``source``: over a
    process group, :func:`splitting_matrix`, :func:`split_coupling` and
    :func:`null_coupling` sum this rank's rows and all-reduce the partial sums (see
    :meth:`LayerSignals.summed`), so every rank gets the sums of the concatenated data
    set while computing only its share of them. The rows hold
    ``N_r·(fan_in + 1 + 3·width + m_next)`` numbers for the ``N_r`` samples of this
    process: the closed forms need the samples of the layer, not the activations of the
    network.

    Args:
        model: As in :func:`layer_signals`.
        loss_fn: As in :func:`layer_signals`.
        source: The batches (:func:`torch_embed._data.batch_source`).
        layer: Hidden-layer index (0-based).
        dtype: Floating dtype of the computation.
        state: As in :func:`layer_signals`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_embed._data import batch_source
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(6, 2, dtype=torch.float64), torch.zeros(6, 1, dtype=torch.float64)
        >>> src = batch_source("demo", nn.MSELoss(), data=[(x[:2], y[:2]), (x[2:], y[2:])])
        >>> sig = data_signals(net, nn.MSELoss(), src, 0)
        >>> torch.allclose(sig.delta, layer_signals(net, nn.MSELoss(), x, y, 0).delta)
        True
    """
    if source.single:
        b = source.batches[0]
        return layer_signals(model, loss_fn, b.inputs, b.targets, layer, dtype=dtype, state=state)
    parts = [
        layer_signals(model, b.loss(loss_fn), b.inputs, b.targets, layer, dtype=dtype, state=state)
        for b in source.batches
    ]
    first = parts[0] if parts else _no_signals(model, layer, dtype, state)

    def joined(field: str) -> Tensor:
        return torch.cat([getattr(p, field) for p in parts]) if parts else getattr(first, field)

    return LayerSignals(
        h=joined("h"),
        z=joined("z"),
        d1=joined("d1"),
        d2=joined("d2"),
        delta=joined("delta"),
        fan_out=first.fan_out,
        has_bias=first.has_bias,
        next_has_bias=first.next_has_bias,
        source=source if source.group is not None else None,
    )


def _no_signals(
    model: nn.Module, layer: int, dtype: torch.dtype, state: Mapping[str, Tensor] | None
) -> LayerSignals:
    """The signals of no sample (a rank without data), shaped as :func:`layer_signals`'s."""
    layout = read_sequential(model)
    _check_layer(layout, layer)
    params = full_state(model, state, dtype=dtype)
    lin_in, lin_next = layout.linears[layer], layout.linears[layer + 1]
    fan_in = params[f"{lin_in.name}.weight"]
    fan_out = params[f"{lin_next.name}.weight"]
    m, m_next = int(fan_out.shape[1]), int(fan_out.shape[0])
    n_v = int(fan_in.shape[1]) + int(lin_in.has_bias)

    def empty(cols: int) -> Tensor:
        return torch.zeros(0, cols, dtype=fan_out.dtype, device=fan_out.device)

    return LayerSignals(
        h=empty(n_v),
        z=empty(m),
        d1=empty(m),
        d2=empty(m),
        delta=empty(m_next),
        fan_out=fan_out,
        has_bias=lin_in.has_bias,
        next_has_bias=lin_next.has_bias,
    )


def _check_neuron(signals: LayerSignals, neuron: int) -> None:
    if not 0 <= neuron < signals.width:
        raise ValueError(f"neuron {neuron} is out of range for a layer of width {signals.width}")


def splitting_matrix(signals: LayerSignals, neuron: int) -> Tensor:
    """The splitting matrix ``S = Σ_i (δ_i·w) σ''(z_i) h̃_i h̃_iᵀ`` of one neuron.

    ``w`` is the neuron's current fan-out column. ``S`` is Liu et al.'s (2019) splitting
    matrix: splitting with ``α`` adds ``α(1-α)·S`` as the curvature along the
    ``v``-directions.

    Returns:
        ``(n_v, n_v)`` symmetric, ``n_v = fan_in (+1 with a bias)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
        >>> S = splitting_matrix(layer_signals(net, nn.MSELoss(), x, y, 0), 1)
        >>> S.shape, bool(torch.equal(S, S.T))
        (torch.Size([3, 3]), True)
    """
    _check_neuron(signals, neuron)
    weight = (signals.delta @ signals.fan_out[:, neuron]) * signals.d2[:, neuron]
    s = signals.summed(signals.h.T @ (weight[:, None] * signals.h))
    return (s + s.T) / 2


def split_coupling(signals: LayerSignals, neuron: int) -> Tensor:
    """The coupling ``G = Σ_i σ'(z_i) h̃_i δ_iᵀ`` between ``v``- and ``c``-directions.

    ``G`` is the Jacobian of the neuron's fan-in gradient with respect to its fan-out
    column, and ``G w`` is the neuron's fan-in gradient (zero at a critical point).

    Returns:
        ``(n_v, m_next)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
        >>> loss = nn.MSELoss()(net(x), y)
        >>> g_row, g_bias = torch.autograd.grad(loss, [net[0].weight, net[0].bias])
        >>> sig = layer_signals(net, nn.MSELoss(), x, y, 0)
        >>> G = split_coupling(sig, 2)
        >>> torch.allclose(G @ sig.fan_out[:, 2], torch.cat([g_row[2], g_bias[2:]]))
        True
    """
    _check_neuron(signals, neuron)
    return signals.summed(signals.h.T @ (signals.d1[:, neuron, None] * signals.delta))


def split_block(signals: LayerSignals, neuron: int, alpha: float) -> Tensor:
    """``D = [[α(1-α)·S, G], [Gᵀ, 0]]``: the complement block of splitting ``neuron``.

    Rows and columns: the neuron's own-parameter coordinates (fan-in row, then bias),
    then one fan-out coordinate per output of the next Linear; see the module docstring
    for the directions they stand for and :func:`split_direction` to map them back.

    Args:
        signals: From :func:`layer_signals` at the network the split is applied to.
        neuron: The neuron being split.
        alpha: The share the new copy receives (any real number).

    Returns:
        ``(n_v + m_next, n_v + m_next)`` symmetric.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> x, y = torch.randn(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
        >>> D = split_block(layer_signals(net, nn.MSELoss(), x, y, 0), 0, 0.5)
        >>> D.shape, float(D[-1, -1])
        (torch.Size([3, 3]), 0.0)
    """
    s = splitting_matrix(signals, neuron)
    g = split_coupling(signals, neuron)
    return _assemble(float(alpha) * (1.0 - float(alpha)) * s, g)


def null_coupling(signals: LayerSignals, bias_slope: float) -> Tensor:
    """``G' = σ'(β) Σ_i h̃_i δ_iᵀ``: the coupling of a null neuron (GradMax's matrix).

    Args:
        signals: From :func:`layer_signals` at the network the null neuron is added to.
        bias_slope: ``σ'(β)``, the activation's slope at the null neuron's bias.

    Returns:
        ``(n_v, m_next)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
        >>> null_coupling(layer_signals(net, nn.MSELoss(), x, y, 0), 1.0).shape
        torch.Size([3, 1])
    """
    return float(bias_slope) * signals.summed(signals.h.T @ signals.delta)


def null_block(signals: LayerSignals, bias_slope: float) -> Tensor:
    """``D = [[0, G'], [G'ᵀ, 0]]``: the complement block of adding one null neuron.

    Coordinates as in :func:`split_block`; map them back with :func:`null_direction`.
    Its inertia is ``(r, n - 2r, r)`` with ``r = rank G'``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.ones(5, 1, dtype=torch.float64)
        >>> ev = torch.linalg.eigvalsh(null_block(layer_signals(net, nn.MSELoss(), x, y, 0), 1.0))
        >>> int((ev < -1e-12).sum()), int((ev > 1e-12).sum())
        (1, 1)
    """
    g = null_coupling(signals, bias_slope)
    return _assemble(torch.zeros(g.shape[0], g.shape[0], dtype=g.dtype, device=g.device), g)


def _assemble(top_left: Tensor, g: Tensor) -> Tensor:
    nv, nc = g.shape
    out = torch.zeros(nv + nc, nv + nc, dtype=g.dtype, device=g.device)
    out[:nv, :nv] = top_left
    out[:nv, nv:] = g
    out[nv:, :nv] = g.T
    return out


# --------------------------------------------------------------------------- directions
def own_parameter_count(layout: Layout, layer: int, *, bn_affine: bool = True) -> int:
    """Number of own-parameter (``v``) coordinates of a neuron of hidden layer ``layer``.

    ``fan_in`` + 1 for a Linear bias + 2 for an affine BatchNorm1d.

    Example:
        >>> from torch import nn
        >>> from torch_embed._sequential import read_sequential
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2))
        >>> own_parameter_count(read_sequential(net), 0)
        7
    """
    _check_layer(layout, layer)
    lin = layout.linears[layer]
    n = lin.in_features + int(lin.has_bias)
    if layout.hidden[layer].batchnorm is not None and bn_affine:
        n += 2
    return n


def _own_pieces(layout: Layout, layer: int, bn_affine: bool) -> list[tuple[str, slice | int]]:
    """(key, where in the row) for each own-parameter block, in coordinate order."""
    lin = layout.linears[layer]
    pieces: list[tuple[str, slice | int]] = [(f"{lin.name}.weight", slice(0, lin.in_features))]
    if lin.has_bias:
        pieces.append((f"{lin.name}.bias", 0))
    bn = layout.hidden[layer].batchnorm
    if bn is not None and bn_affine:
        pieces += [(f"{bn}.weight", 0), (f"{bn}.bias", 0)]
    return pieces


def _shapes(layout: Layout, layer: int, bn_affine: bool) -> dict[str, tuple[int, ...]]:
    lin, nxt = layout.linears[layer], layout.linears[layer + 1]
    shapes: dict[str, tuple[int, ...]] = {f"{lin.name}.weight": (lin.out_features, lin.in_features)}
    if lin.has_bias:
        shapes[f"{lin.name}.bias"] = (lin.out_features,)
    bn = layout.hidden[layer].batchnorm
    if bn is not None and bn_affine:
        shapes[f"{bn}.weight"] = (lin.out_features,)
        shapes[f"{bn}.bias"] = (lin.out_features,)
    shapes[f"{nxt.name}.weight"] = (nxt.out_features, nxt.in_features)
    if nxt.has_bias:
        shapes[f"{nxt.name}.bias"] = (nxt.out_features,)
    return shapes


def _prepare(
    layout: Layout, layer: int, v: Tensor, c: Tensor, bn_affine: bool
) -> tuple[Tensor, Tensor, dict[str, Tensor], tuple[int, ...]]:
    _check_layer(layout, layer)
    n_v = own_parameter_count(layout, layer, bn_affine=bn_affine)
    m_next = layout.linears[layer + 1].out_features
    v = torch.as_tensor(v)
    c = torch.as_tensor(c, dtype=v.dtype, device=v.device)
    if v.shape[-1:] != (n_v,) or c.shape[-1:] != (m_next,) or v.shape[:-1] != c.shape[:-1]:
        raise ValueError(
            f"hidden layer {layer}: v must end in {n_v} own-parameter coordinates and c in "
            f"{m_next} fan-out coordinates with the same leading shape; got "
            f"{tuple(v.shape)} and {tuple(c.shape)}"
        )
    batch = tuple(v.shape[:-1])
    out = {
        k: torch.zeros(*batch, *s, dtype=v.dtype, device=v.device)
        for k, s in _shapes(layout, layer, bn_affine).items()
    }
    return v, c, out, batch


def _put_own(
    out: dict[str, Tensor],
    layout: Layout,
    layer: int,
    row: int,
    v: Tensor,
    scale: float,
    bn_affine: bool,
) -> None:
    pos = 0
    for key, where in _own_pieces(layout, layer, bn_affine):
        if isinstance(where, slice):
            n = where.stop - where.start
            out[key][..., row, :] += scale * v[..., pos : pos + n]
            pos += n
        else:
            out[key][..., row] += scale * v[..., pos]
            pos += 1


def split_direction(
    layout: Layout,
    layer: int,
    neuron: int,
    new_index: int,
    alpha: float,
    v: Tensor,
    c: Tensor,
    *,
    bn_affine: bool = True,
) -> dict[str, Tensor]:
    """Map ``D``-coordinates ``(v, c)`` of a split to a direction in the wide parameters.

    ``v``: neuron's own parameters ``+= α·v``, the new neuron's ``-= (1-α)·v``;
    ``c``: fan-out column of ``neuron`` ``+= c``, of ``new_index`` ``-= c``. An
    eigenvector ``u`` of :func:`split_block` with eigenvalue ``λ < 0`` gives
    ``d = split_direction(..., u[:n_v], u[n_v:])`` with ``dᵀ H_wide d = uᵀ D u = λ|u|²``:
    a direction of negative curvature whose first-order effect on the output is zero.

    Args:
        layout: The WIDE network's layout (after the split).
        layer: The hidden layer.
        neuron: The neuron that was split (``s``).
        new_index: The index of its new copy in the wide layer.
        alpha: The copy's share of the fan-out.
        v: ``(..., n_v)`` own-parameter coordinates (:func:`own_parameter_count`);
            leading dimensions are batch dimensions.
        c: ``(..., m_next)`` fan-out coordinates.
        bn_affine: Whether the layer's BatchNorm1d (if any) has weight and bias.

    Returns:
        ``{state_dict key: tensor of shape (..., *parameter shape)}`` for the touched
        parameters; keys that are absent are zero.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_embed._sequential import read_sequential
        >>> wide = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> d = split_direction(read_sequential(wide), 0, 0, 2, 0.25,
        ...                     torch.tensor([1.0, 0.0]), torch.tensor([1.0]))
        >>> d["0.weight"].flatten().tolist(), d["2.weight"].flatten().tolist()
        ([0.25, 0.0, -0.75], [1.0, 0.0, -1.0])
    """
    v, c, out, _ = _prepare(layout, layer, v, c, bn_affine)
    a = float(alpha)
    _put_own(out, layout, layer, neuron, v, a, bn_affine)
    _put_own(out, layout, layer, new_index, v, -(1.0 - a), bn_affine)
    w = f"{layout.linears[layer + 1].name}.weight"
    out[w][..., :, neuron] += c
    out[w][..., :, new_index] -= c
    return out


def null_direction(
    layout: Layout,
    layer: int,
    new_index: int,
    null_value: float,
    v: Tensor,
    c: Tensor,
    *,
    bn_affine: bool = True,
) -> dict[str, Tensor]:
    """Map ``D``-coordinates ``(v, c)`` of a null neuron to a wide parameter direction.

    ``v``: the null neuron's own parameters ``+= v``; ``c``: its fan-out column
    ``+= c`` and the next Linear's bias ``-= σ(β)·c``.

    Args:
        layout: The WIDE network's layout (after adding the neuron).
        layer: The hidden layer.
        new_index: The null neuron's index.
        null_value: ``σ(β)``, the constant the null neuron outputs.
        v: ``(..., n_v)`` own-parameter coordinates.
        c: ``(..., m_next)`` fan-out coordinates.
        bn_affine: Whether the layer's BatchNorm1d (if any) has weight and bias.

    Returns:
        ``{state_dict key: tensor}`` as in :func:`split_direction`.

    Raises:
        ValueError: ``σ(β) ≠ 0`` and the next Linear has no bias to compensate with.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch_embed._sequential import read_sequential
        >>> wide = nn.Sequential(nn.Linear(1, 2), nn.Sigmoid(), nn.Linear(2, 1))
        >>> d = null_direction(read_sequential(wide), 0, 1, 0.5,
        ...                    torch.zeros(2), torch.tensor([1.0]))
        >>> d["2.weight"].flatten().tolist(), d["2.bias"].tolist()
        ([0.0, 1.0], [-0.5])
    """
    v, c, out, _ = _prepare(layout, layer, v, c, bn_affine)
    _put_own(out, layout, layer, new_index, v, 1.0, bn_affine)
    nxt = layout.linears[layer + 1]
    out[f"{nxt.name}.weight"][..., :, new_index] += c
    if float(null_value) != 0.0:
        if not nxt.has_bias:
            raise ValueError(
                f"hidden layer {layer}: the null neuron outputs σ(β) = {float(null_value)!r} "
                f"≠ 0 but the next Linear (layer {nxt.name}) has no bias to compensate its "
                f"fan-out; such a null embedding is not critical"
            )
        out[f"{nxt.name}.bias"] -= float(null_value) * c
    return out
