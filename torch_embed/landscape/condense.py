"""Condensation: the inverse of widening.

:func:`~torch_embed.landscape.condense` rewrites an ``nn.Sequential`` MLP in place into
the narrowest network it can prove computes the same function, and returns the
:class:`~torch_embed.Embedding` that maps the condensed network back:

* **merge** neurons of a hidden layer whose fan-in weights, bias (and BatchNorm
  parameters and statistics, if any) agree within ``atol``: one neuron stays, its
  fan-out column becomes the sum of the group's columns (the inverse of a split);
* **drop** neurons whose fan-out column is zero within ``atol`` (the inverse of a null
  embedding; they contribute nothing whatever their fan-in);
* **fold** neurons with a zero fan-in row (a constant output ``σ(bias)``) into the next
  layer's bias, ``b_next += σ(bias)·column``, when that Linear has a bias (or drop them
  when ``σ(bias) = 0``); not done in a layer with BatchNorm, whose output of a constant
  depends on train/eval mode;
* with ``cos``, and only for positively homogeneous activations (ReLU family, see
  ``torch_embed._sequential.elementwise_info``), also **merge** neurons whose fan-in
  vectors ``u = [weights; bias]`` are parallel with a positive ratio (cosine ``≥ cos``,
  the computed cosine given ``(n + 4)·eps`` of slack for its rounding, ``n`` the length
  of ``u``: with ``cos=1`` exactly parallel rows merge on every CPU):
  ``σ(c·u·x) = c·σ(u·x)`` for ``c > 0``, so the kept neuron's fan-out becomes
  ``Σ c_j·column_j`` with ``c_j = ⟨u_j, u⟩/‖u‖²``.

Passes over the hidden layers (left to right) repeat until no width changes, because a
merge in layer ``l`` sums columns of layer ``l+1``'s weights and can make two of its rows
equal. A group whose fan-out columns cancel (sum zero, members non-zero) is left
unmerged: no embedding with a non-zero fan-out on a null neuron exists to map it back.

The returned embedding maps the condensed network back to one with the original widths
and the original function: ``embed_(condensed, result.embedding)`` gives the original
weights up to ``atol`` for equal-merges, drops and null neurons (copies get the kept
neuron's fan-in row; fan-out columns are ``coef·column + offset``, with the offsets
omitted when they are below tolerance, as for an exact split, so the embedding is then
critical). A dropped neuron comes back as a null neuron with its original fan-in and
bias; a folded constant comes back as a null neuron with zero fan-out, the constant
staying in the next bias. Copies that were merged only after the previous layer was
(rows that differ in how they spread over the copies of an earlier neuron) come back
with the first copy's row: the same function, not the same weights. For ``cos``-merges
the original weights are not reachable by any compatible embedding (copies have equal
fan-in rows), so the returned embedding reproduces the function, not the weights: copy
``j`` gets the kept row ``u`` and the fan-out column ``c_j·column_j``.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torch_embed._sequential import Layout, elementwise_info, read_sequential
from torch_embed.embedding import Embedding, LayerMap
from torch_embed.schemes import _null_value
from torch_embed.widen import _like, _swap

__all__ = ["CondenseResult", "condense", "effective_widths"]

_DEFAULT_ATOL = 1e-8


@dataclass(frozen=True)
class CondenseResult:
    """What :func:`condense` did.

    Attributes:
        embedding: The embedding of the condensed network into one with the original
            widths and the original function (``embed_(module, embedding)`` undoes the
            condensation); ``embedding.kind`` says whether it is critical.
        widths: The effective (condensed) hidden widths.
        original_widths: The hidden widths before condensing.
        merged: Number of neurons removed by merging into another neuron.
        dropped: Number of neurons removed because their fan-out is zero or their
            constant output was folded into the next bias.
    """

    embedding: Embedding
    widths: tuple[int, ...]
    original_widths: tuple[int, ...]
    merged: int
    dropped: int


@dataclass
class _State:
    """Float64 working copy of the network and the bookkeeping of the passes."""

    weights: list[Tensor]  # per Linear, (out, in)
    biases: list[Tensor | None]
    bn: list[dict[str, Tensor] | None]  # per hidden layer: BatchNorm tensors
    cur: list[Tensor]  # per hidden layer: original neuron -> current index or -1
    kappa: list[Tensor]  # per hidden layer: original output = κ · current output
    contrib: list[Tensor]  # per hidden layer: (current next width, original width)
    merged: int = 0
    dropped: int = 0


def _check_cos(module: nn.Module, layout: Layout, cos: float | None) -> None:
    if cos is None:
        return
    if not 0.0 < cos <= 1.0:
        raise ValueError(f"cos must lie in (0, 1], got {cos!r}")
    for l, hidden in enumerate(layout.hidden):
        if hidden.batchnorm is not None:
            raise ValueError(
                f"cos-merging needs a positively homogeneous hidden layer, but hidden layer "
                f"{l} has BatchNorm1d (layer {hidden.batchnorm}), which is not; use cos=None"
            )
        for name in hidden.activations:
            act = module.get_submodule(name)
            info = elementwise_info(act)
            if info is None or not info.positively_homogeneous:
                raise ValueError(
                    f"cos-merging needs positively homogeneous activations (σ(c·z) = c·σ(z) "
                    f"for c > 0: ReLU, LeakyReLU, PReLU, Identity), but layer {name} "
                    f"({type(act).__name__}) of hidden layer {l} is not; use cos=None"
                )


def _read_state(module: nn.Module, layout: Layout) -> _State:
    weights: list[Tensor] = []
    biases: list[Tensor | None] = []
    for lin in layout.linears:
        m = module.get_submodule(lin.name)
        assert isinstance(m, nn.Linear)  # guaranteed by read_sequential
        weights.append(m.weight.detach().to(device="cpu", dtype=torch.float64).clone())
        biases.append(None if m.bias is None else m.bias.detach().to("cpu", torch.float64).clone())
    bns: list[dict[str, Tensor] | None] = []
    for hidden in layout.hidden:
        if hidden.batchnorm is None:
            bns.append(None)
            continue
        bn = module.get_submodule(hidden.batchnorm)
        tensors = {}
        for key in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, key, None)
            if isinstance(t, Tensor):
                tensors[key] = t.detach().to("cpu", torch.float64).clone()
        bns.append(tensors)
    widths = layout.hidden_widths
    return _State(
        weights=weights,
        biases=biases,
        bn=bns,
        cur=[torch.arange(m) for m in widths],
        kappa=[torch.ones(m, dtype=torch.float64) for m in widths],
        contrib=[weights[l + 1].clone() for l in range(len(widths))],
    )


def _constant_value(module: nn.Module, layout: Layout, layer: int, bias: float) -> float:
    """σ(bias) through the hidden layer's activation chain (Dropout as identity)."""
    value = _null_value(module, layout, layer, torch.tensor([bias], dtype=torch.float64))
    return float(value[0])


def _group(
    rows: Tensor, bn_rows: Tensor | None, atol: float, cos: float | None
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy grouping of the rows: equal within ``atol`` first, then parallel (``cos``)."""
    reps: list[int] = []
    groups: list[list[int]] = []
    factors: list[list[float]] = []
    norms = rows.norm(dim=1)
    # the computed cosine of parallel rows is 1 ± a few ulps, by the kernels' rounding
    slack = (rows.shape[1] + 4) * torch.finfo(rows.dtype).eps
    for j in range(rows.shape[0]):
        placed = False
        for g, r in enumerate(reps):
            same = bool((rows[j] - rows[r]).abs().max() <= atol)
            if same and bn_rows is not None:
                same = bool((bn_rows[j] - bn_rows[r]).abs().max() <= atol)
            if same:
                groups[g].append(j)
                factors[g].append(1.0)
                placed = True
                break
        if not placed and cos is not None and float(norms[j]) > atol:
            for g, r in enumerate(reps):
                if float(norms[r]) <= atol:
                    continue
                dot = float(rows[j] @ rows[r])
                if dot / (float(norms[j]) * float(norms[r])) >= cos - slack and dot > 0:
                    groups[g].append(j)
                    factors[g].append(dot / float(norms[r]) ** 2)
                    placed = True
                    break
        if not placed:
            reps.append(j)
            groups.append([j])
            factors.append([1.0])
    return groups, factors


def _condense_layer(
    module: nn.Module, layout: Layout, st: _State, l: int, atol: float, cos: float | None
) -> bool:
    """One pass over hidden layer ``l``; returns whether its width changed."""
    w_in, w_out = st.weights[l], st.weights[l + 1]
    b_in = st.biases[l]
    m = w_in.shape[0]
    bias_col = b_in[:, None] if b_in is not None else torch.zeros(m, 1, dtype=torch.float64)
    rows = torch.cat([w_in, bias_col], dim=1)
    bn = st.bn[l]
    bn_rows = torch.stack(list(bn.values()), dim=1) if bn else None
    groups, factors = _group(rows, bn_rows, atol, cos)
    # (members, factors, summed fan-out column, constant to fold into the next bias)
    survivors: list[tuple[list[int], list[float], Tensor]] = []
    dropped: list[tuple[list[int], list[float], Tensor, float | None]] = []
    for members, fac in zip(groups, factors):
        column = torch.zeros(w_out.shape[0], dtype=torch.float64)
        for j, c in zip(members, fac):
            column += c * w_out[:, j]
        if bool(column.abs().max() <= atol):
            if len(members) > 1 and any(bool(w_out[:, j].abs().max() > atol) for j in members):
                # the columns cancel: no embedding maps a merge of them back; keep them
                survivors.extend(([j], [1.0], w_out[:, j].clone()) for j in members)
            else:
                dropped.append((members, fac, column, None))
            continue
        if bn is None and bool(w_in[members[0]].abs().max() <= atol):
            value = _constant_value(module, layout, l, float(bias_col[members[0], 0]))
            if st.biases[l + 1] is not None or value == 0.0:
                dropped.append((members, fac, column, value))
                continue
        survivors.append((members, fac, column))
    if not survivors:  # keep one neuron: a layer of width 0 is not a network
        members, fac, column, _ = dropped.pop(0)
        survivors.append((members, fac, column))
    if len(survivors) == m:
        return False
    survivors.sort(key=lambda item: item[0][0])
    next_bias = st.biases[l + 1]
    for _, _, col, const in dropped:
        if const is not None and next_bias is not None:
            next_bias += const * col
    dropped_groups = [item[0] for item in dropped]
    st.merged += sum(len(mem) - 1 for mem, _, _ in survivors)
    st.dropped += sum(len(mem) for mem in dropped_groups)
    reps = torch.tensor([mem[0] for mem, _, _ in survivors])
    new_index = torch.full((m,), -1, dtype=torch.int64)
    factor = torch.ones(m, dtype=torch.float64)
    for g, (members, fac, _) in enumerate(survivors):
        for j, c in zip(members, fac):
            new_index[j] = g
            factor[j] = c
    old = st.cur[l]
    valid = old >= 0
    st.kappa[l] = torch.where(valid, st.kappa[l] * factor[old.clamp(min=0)], st.kappa[l])
    st.cur[l] = torch.where(valid, new_index[old.clamp(min=0)], old)
    st.weights[l] = w_in[reps]
    if b_in is not None:
        st.biases[l] = b_in[reps]
    if bn:
        st.bn[l] = {k: v[reps] for k, v in bn.items()}
    st.weights[l + 1] = torch.stack([col for _, _, col in survivors], dim=1)
    if l > 0:  # rows of the previous layer's contributions follow this layer's neurons
        st.contrib[l - 1] = st.contrib[l - 1][reps]
    return True


def _embedding(
    module: nn.Module, original: _State, st: _State, layout: Layout, atol: float
) -> Embedding:
    """The embedding of the condensed network (``layout``) back to the original widths."""
    n = len(st.cur)
    layers = []
    for l in range(n):
        cur, kappa = st.cur[l], st.kappa[l]
        m_orig = cur.numel()
        null = cur < 0
        w_new = st.weights[l + 1]  # (current next, current)
        target = st.contrib[l] * kappa[None, :]  # (current next, original)
        counts = torch.bincount(cur[~null], minlength=w_new.shape[1])
        coef = torch.zeros(m_orig, dtype=torch.float64)
        for j in range(m_orig):
            s = int(cur[j])
            if s < 0:
                continue
            if int(counts[s]) == 1:
                coef[j] = 1.0
            else:
                col = w_new[:, s]
                coef[j] = float(target[:, j] @ col) / float(col @ col)
        # offsets, in rows of the original next layer
        next_cur = st.cur[l + 1] if l + 1 < n else torch.arange(w_new.shape[0])
        rows = next_cur.clamp(min=0)
        offset = target[rows] - coef[None, :] * w_new[rows][:, cur.clamp(min=0)]
        offset[:, null] = 0
        offset[next_cur < 0] = 0
        for s in range(w_new.shape[1]):  # make the offsets cancel exactly over copies
            copies = (cur == s).nonzero().flatten()
            if copies.numel() > 1:
                offset[:, copies[-1]] = -offset[:, copies[:-1]].sum(dim=1)
        scale = max(float(original.weights[l + 1].abs().max()), 1.0)
        eps = float(torch.finfo(_dtype(module, layout)).eps)
        tol = max(atol, 64 * eps * scale)
        fan_out_offset = offset if bool(offset.abs().max() > tol) else None
        # null neurons: original bias and fan-in row
        has_bn = original.bn[l] is not None
        b_orig = original.biases[l]
        bn_orig = original.bn[l]
        if has_bn and bn_orig is not None and "bias" in bn_orig:
            beta_all = bn_orig["bias"]
        elif b_orig is not None and not has_bn:
            beta_all = b_orig
        else:
            beta_all = torch.zeros(m_orig, dtype=torch.float64)
        null_bias = torch.where(null, beta_all, 0.0)
        null_value = torch.zeros(m_orig, dtype=torch.float64)
        if bool(null.any()):
            null_value[null] = _null_value(module, layout, l, null_bias[null])
        fan_in_rows = torch.where(null[:, None], original.weights[l], 0.0)
        null_fan_in = fan_in_rows if bool((fan_in_rows != 0).any()) else None
        layers.append(
            LayerMap(cur.clone(), coef, null_bias, null_value, null_fan_in, fan_out_offset)
        )
    return Embedding(layout, tuple(layers))


def _dtype(module: nn.Module, layout: Layout) -> torch.dtype:
    lin = module.get_submodule(layout.linears[0].name)
    assert isinstance(lin, nn.Linear)  # guaranteed by read_sequential
    return lin.weight.dtype


def _write_back(module: nn.Module, layout: Layout, st: _State) -> None:
    """Swap the condensed tensors into the module (parameter identity kept)."""
    with torch.no_grad():
        for k, lin in enumerate(layout.linears):
            m = module.get_submodule(lin.name)
            assert isinstance(m, nn.Linear)
            new_w = st.weights[k]
            _replace(m.weight, new_w)
            m.out_features, m.in_features = int(new_w.shape[0]), int(new_w.shape[1])
            bias = st.biases[k]
            if m.bias is not None and bias is not None:
                _replace(m.bias, bias)
        for l, hidden in enumerate(layout.hidden):
            if hidden.batchnorm is None:
                continue
            bn = module.get_submodule(hidden.batchnorm)
            tensors = st.bn[l]
            assert tensors is not None
            for key, value in tensors.items():
                _replace(getattr(bn, key), value)
            bn.num_features = int(st.weights[l].shape[0])  # type: ignore[assignment]


def _replace(target: Tensor, value: Tensor) -> None:
    new = _like(value.to(device=target.device, dtype=target.dtype), target)
    if isinstance(target, nn.Parameter):
        target.grad = None
        _swap(target, nn.Parameter(new, requires_grad=target.requires_grad))
    else:
        _swap(target, new)


def condense(
    module: nn.Module, *, atol: float = _DEFAULT_ATOL, cos: float | None = None
) -> CondenseResult:
    """Condense an ``nn.Sequential`` MLP in place: merge copies, drop dead neurons.

    See the module docstring for the rules. The module keeps its parameter objects
    (their shapes change), device and dtype; ``.grad`` of reshaped parameters is
    cleared. There is no optimizer argument: rebuild the optimizer (or its state) for
    the condensed parameters.

    Args:
        module: An ``nn.Sequential`` MLP that :func:`torch_embed.widen` accepts.
        atol: Absolute tolerance for "equal" fan-in rows (weights, bias, BatchNorm
            entries) and for "zero" fan-in rows and fan-out columns.
        cos: If given (in ``(0, 1]``), also merge neurons whose fan-in vectors
            ``[weights; bias]`` have cosine ``≥ cos`` with a positive ratio. Only for
            positively homogeneous activations and layers without BatchNorm.

    Returns:
        A :class:`CondenseResult` with the embedding back to the original widths and
        function, and the effective widths.

    Raises:
        TypeError: The module is not an MLP torch_embed can read, or ``atol`` is not a
            real number.
        ValueError: ``cos`` is out of range or used with an activation that is not
            positively homogeneous (or with BatchNorm); ``atol`` is negative or not
            finite.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> from torch_embed.landscape.condense import condense
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64, generator=g)
        >>> before = net(x).detach()
        >>> _ = torch_embed.widen(net, [6], torch_embed.Split(alpha=0.3), generator=g)
        >>> result = condense(net)
        >>> result.widths, net[0].weight.shape
        ((3,), torch.Size([3, 2]))
        >>> torch.allclose(net(x), before, rtol=0, atol=1e-14)
        True
        >>> torch_embed.embed_(net, result.embedding)  # back to width 6
        >>> net[0].out_features, result.embedding.kind.value
        (6, 'critical')
    """
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real):
        raise TypeError(f"atol must be a real number >= 0, got {type(atol).__name__} {atol!r}")
    if not (math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    layout = read_sequential(module)
    _check_cos(module, layout, cos)
    st = _read_state(module, layout)
    original = copy.deepcopy(st)
    changed = True
    while changed:
        changed = False
        for l in range(len(layout.hidden)):
            changed |= _condense_layer(module, layout, st, l, atol, cos)
    _write_back(module, layout, st)
    new_layout = read_sequential(module)
    embedding = _embedding(module, original, st, new_layout, atol)
    return CondenseResult(
        embedding=embedding,
        widths=new_layout.hidden_widths,
        original_widths=layout.hidden_widths,
        merged=st.merged,
        dropped=st.dropped,
    )


def effective_widths(
    module: nn.Module, *, atol: float = _DEFAULT_ATOL, cos: float | None = None
) -> tuple[int, ...]:
    """The hidden widths :func:`condense` would leave, without changing ``module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> from torch_embed.landscape.condense import effective_widths
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> _ = torch_embed.widen(net, [5], torch_embed.Null(bias=0.5))
        >>> effective_widths(net), net[0].out_features
        ((3,), 5)
    """
    return condense(copy.deepcopy(module), atol=atol, cos=cos).widths
