"""The exact change of Hessian inertia caused by a critical embedding (docs/theory.md).

A critical embedding ``θ ↦ Aθ + c`` satisfies ``R_wide(Aθ + c) = R_narrow(θ)`` and
``∇R_wide = B ∇R_narrow`` at every embedded point. Completing ``A`` with *complement
directions* ``C`` whose first-order effect on the network output vanishes on the whole
embedded set gives ``Cᵀ∇R_wide ≡ 0`` there, hence ``AᵀH_wide C = 0`` and

    inertia(H_wide) = inertia(H_narrow) + inertia(D),   D = Cᵀ H_wide C,

exactly (Sylvester's law of inertia), at every embedded point, critical or not. An
embedding in splitting form is a chain of one-step embeddings
(:meth:`Embedding.steps <torch_embed.Embedding.steps>`), each adding one neuron; its
change is the sum of the steps' inertias, each ``D`` evaluated at that step's network.
Per step, ``D`` has one row per added parameter and costs ``O(N·(fan_in + fan_out)²)``
in closed form (``torch_embed._blocks``), or ``dim C`` Hessian-vector products on the
general path; the full Hessian is never built.

The ``method`` argument chooses how each block ``D`` is computed:

* ``"closed-form"``: the closed forms of docs/theory.md, "The exact inertia change of an
  embedding" (Linear + element-wise layers).
* ``"hvp"``: ``D = Cᵀ (H C)`` from Hessian-vector products along the explicit
  complement directions (any layer, including BatchNorm1d in eval mode).
* ``"auto"``: closed form where it applies, ``"hvp"`` for the other steps.

Embeddings with matrix coefficients (JML §5's general form) are not chains of one-step
embeddings; for them ``"auto"``/``"hvp"`` take any basis ``C`` of ``ker Bᵀ`` (which
gives ``AᵀH C = H_narrow BᵀC = 0`` because ``H_wide A = B H_narrow``). That route builds
``B`` densely and costs ``O(P_wide²·P_narrow)``: it is meant for small networks.

Numerical limits:

* Signs are exact (Sylvester), but the zero count depends on a threshold ``tol``. Pass
  one ``tol`` to every count that is to be compared, e.g. the "before" count's
  (``tol=before.tol``, which also skips the estimate below); ``before + change`` then
  equals a full recount at that ``tol`` (up to the factor below). By default the blocks
  are counted by the rule of :func:`~torch_embed.inertia.inertia` applied to their
  eigenvalues: the rounding level of the full wide count
  (:func:`~torch_embed.inertia.default_tolerance` with ``P_wide`` and ``‖H_wide‖``,
  estimated by at most 20 power iterations of Hessian-vector products), moved up into a
  clear gap of the blocks' spectrum below ``10·|∇R_wide|`` at a point that is not
  critical, ``ambiguous`` when there is none.
* The blocks use orthonormal complement directions (their eigenvalues are Rayleigh
  quotients of ``H_wide``, on its scale), but ``T = [A C]`` is not orthogonal: by
  Ostrowski's theorem the k-th eigenvalue of ``diag(H_narrow, D)`` is that of ``H_wide``
  times a factor in ``[σ_min(T)², σ_max(T)²]`` (``O(1)`` for ``α`` in ``[0, 1]``, growing
  like ``α²`` for a large signed split). So counts agree with a full recount whenever
  no eigenvalue lies within such a factor of ``tol``; the result's ``gap`` (over the
  eigenvalues of all blocks together) and ``ambiguous``, and the full count's own gap,
  say when that is in doubt.
* Zero counts mean something only at a polished critical point: away from one,
  structural zeros smear to ``±O(|∇R|)``, and unless a clear gap separates them from
  the rest of the spectrum the zero count is not determined (``ambiguous``).
* Signals are computed in float64 at the embedded point recovered from the model
  (``embedding.restrict``) and pushed through the steps; for a float32 model that
  point differs from the model's own parameters by float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torch_embed._blocks import (
    _check_modes,
    activation_derivatives,
    data_signals,
    full_state,
    null_block,
    null_direction,
    own_parameter_count,
    split_block,
    split_direction,
)
from torch_embed._data import BatchSource, batch_source
from torch_embed._sequential import Layout, read_sequential
from torch_embed.embedding import Embedding
from torch_embed.graph.embedding import GroupEmbedding
from torch_embed.hessian import HessianOperator, _flat_loss
from torch_embed.inertia import (
    DEFAULT_MIN_GAP,
    Inertia,
    _check_symmetric,
    _tolerance_and_gap,
    default_tolerance,
    eigenvalues,
)

__all__ = ["ComplementBlock", "complement_blocks", "inertia_change", "step_blocks"]

Method = Literal["auto", "closed-form", "hvp"]
LossFn = Callable[[Any, Any], Tensor]
_METHODS = ("auto", "closed-form", "hvp")


@dataclass(frozen=True, eq=False)
class ComplementBlock:
    """The complement block of one one-step embedding (or of a whole general embedding).

    Attributes:
        matrix: ``D = Cᵀ H_wide C`` in the coordinates of ``torch_embed._blocks``
            (own parameters, then fan-out), with the unnormalised directions there.
        norms: Euclidean norms of the columns of ``C`` (they are mutually orthogonal),
            so ``matrix / outer(norms, norms)`` is the block for orthonormal directions.
        kind: ``"split"``, ``"null"`` or ``"general"`` (a basis of ``ker Bᵀ``).
        layer: The hidden layer (``-1`` for ``"general"``).
        neuron: The split neuron (``-1`` otherwise).
        alpha: The split's share for the new copy (``nan`` otherwise).
        method: ``"closed-form"`` or ``"hvp"``.
    """

    matrix: Tensor
    norms: Tensor
    kind: str
    layer: int
    neuron: int
    alpha: float
    method: str

    @property
    def normalized(self) -> Tensor:
        """``D`` for orthonormal complement directions (same inertia, ``H``'s scale)."""
        n = self.norms.to(self.matrix)
        return self.matrix / (n[:, None] * n[None, :])


# --------------------------------------------------------------------------- helpers
def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _check_inputs(embedding: Embedding, model: nn.Module) -> Layout:
    if not embedding.is_critical:
        why = "; ".join(embedding.reasons)
        raise ValueError(
            f"the inertia change is only defined for critical embeddings (the Hessian "
            f"congruence needs ∇R_wide = B ∇R_narrow at every embedded point); this "
            f"embedding is {embedding.kind.value}: {why}"
        )
    # Train-mode BatchNorm/Dropout: the Hessian is of another function (batch statistics,
    # a random mask redrawn per Hessian-vector product), and hessian() refuses it too.
    _check_modes(model)
    layout = read_sequential(model)
    if layout.widths != embedding.wide_widths:
        raise ValueError(
            f"the model has widths {layout.widths} but the embedding widens to "
            f"{embedding.wide_widths}; pass the widened model"
        )
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"parameters {frozen} are frozen (requires_grad=False); the inertia change is "
            f"defined for the Hessian over all parameters of the network"
        )
    return layout


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _flat(d: Mapping[str, Tensor], names: list[str], state: Mapping[str, Tensor], k: int) -> Tensor:
    """Flatten a batched direction dict ``{name: (k, *shape)}`` to ``(k, P)``."""
    ref = state[names[0]]
    parts = [
        d[n].reshape(k, -1)
        if n in d
        else torch.zeros(k, state[n].numel(), dtype=ref.dtype, device=ref.device)
        for n in names
    ]
    return torch.cat(parts, dim=1)


def _hvp_block(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    state: Mapping[str, Tensor],
    basis: Tensor,
) -> Tensor:
    """``C H Cᵀ`` for the rows ``C`` of ``basis``, by batched Hessian-vector products.

    The products are :class:`~torch_embed.hessian.HessianOperator`'s at ``state``:
    batched as many at a time as the free memory allows, over every batch of
    ``source`` and summed over its process group.
    """
    op = HessianOperator.of(_flat_loss(model, loss_fn, source, state=state))
    hc = op.matmat(basis.to(op.dtype))
    d = basis @ hc.T
    return (d + d.T) / 2


@dataclass(frozen=True)
class _Step:
    kind: Literal["split", "null", "permutation"]
    layer: int = -1
    neuron: int = -1
    alpha: float = math.nan
    null_bias: float = 0.0
    null_value: float = 0.0


def _describe(step: Embedding) -> _Step:
    narrow = step.narrow_widths[1:-1]
    for l, lm in enumerate(step.layers):
        if lm.wide == narrow[l] + 1:
            src = int(lm.source[-1])
            if src >= 0:
                return _Step("split", l, src, float(lm.coef[-1]))
            return _Step(
                "null", l, null_bias=float(lm.null_bias[-1]), null_value=float(lm.null_value[-1])
            )
    return _Step("permutation")


def _one_step_block(
    step: Embedding,
    info: _Step,
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    state: dict[str, Tensor],
    method: str,
) -> ComplementBlock:
    """``D`` of one step, evaluated at ``state`` (the step's narrow network)."""
    l = info.layer
    wide_layout = step.wide_layout
    bn = wide_layout.hidden[l].batchnorm
    bn_affine = bn is None or f"{bn}.weight" in state
    n_v = own_parameter_count(wide_layout, l, bn_affine=bn_affine)
    m_next = wide_layout.linears[l + 1].out_features
    new_index = wide_layout.hidden_widths[l] - 1
    dtype = state[next(iter(state))].dtype
    if info.kind == "split":
        a = info.alpha
        v_norm = math.sqrt(a * a + (1 - a) * (1 - a))
        c_norm = math.sqrt(2.0)
    else:
        v_norm = 1.0
        c_norm = math.sqrt(1.0 + info.null_value**2)
    use_closed = method == "closed-form" or (method == "auto" and bn is None)
    if use_closed:
        if bn is not None:
            raise ValueError(
                f"hidden layer {l} has a BatchNorm1d (module '{bn}'): the closed form does "
                f"not cover it; use method='hvp' or 'auto'"
            )
        sig = data_signals(model, loss_fn, source, l, state=state)
        if info.kind == "split":
            d = split_block(sig, info.neuron, info.alpha)
        else:
            beta = torch.tensor([info.null_bias], dtype=sig.z.dtype, device=sig.z.device)
            slope = float(activation_derivatives(model, l, beta, state=state)[0])
            d = null_block(sig, slope)
    else:
        wide_state = full_state(model, step.apply(state))
        k = n_v + m_next
        eye = torch.eye(k, dtype=dtype, device=state[next(iter(state))].device)
        if info.kind == "split":
            dirs = split_direction(
                wide_layout,
                l,
                info.neuron,
                new_index,
                info.alpha,
                eye[:, :n_v],
                eye[:, n_v:],
                bn_affine=bn_affine,
            )
        else:
            dirs = null_direction(
                wide_layout,
                l,
                new_index,
                info.null_value,
                eye[:, :n_v],
                eye[:, n_v:],
                bn_affine=bn_affine,
            )
        basis = _flat(dirs, _param_names(model), wide_state, k)
        d = _hvp_block(model, loss_fn, source, wide_state, basis)
    if info.kind == "null" and info.null_value == 0.0:
        c_norm = 1.0
    norms = torch.cat(
        [torch.full((n_v,), v_norm, dtype=dtype), torch.full((m_next,), c_norm, dtype=dtype)]
    )
    return ComplementBlock(
        matrix=d,
        norms=norms,
        kind=info.kind,
        layer=l,
        neuron=info.neuron,
        alpha=info.alpha,
        method="closed-form" if use_closed else "hvp",
    )


def _check_embedded(final: Mapping[str, Tensor], model: nn.Module) -> None:
    """Refuse a model that is not (up to rounding) at the embedded point."""
    for name, p in model.named_parameters():
        target = p.detach().to(torch.float64)
        got = final[name].to(target.device)
        if got.shape != target.shape:
            raise ValueError(f"parameter {name}: shape {tuple(got.shape)} ≠ {tuple(target.shape)}")
        eps = torch.finfo(p.dtype).eps if p.is_floating_point() else 0.0
        scale = float(target.abs().max()) if target.numel() else 0.0
        err = float((got - target).abs().max()) if target.numel() else 0.0
        if err > math.sqrt(eps) * max(scale, 1.0):
            raise ValueError(
                f"the model is not at a point of this embedding: parameter '{name}' differs "
                f"from its embedded value by {err:.3g} (was it trained or modified after "
                f"widening?). The inertia change holds on the embedded set only."
            )


def _general_block(
    embedding: Embedding,
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    wide_state: dict[str, Tensor],
) -> ComplementBlock:
    """``D`` for any critical embedding: ``C`` an orthonormal basis of ``ker Bᵀ``."""
    names = _param_names(model)
    narrow_state = embedding.restrict(wide_state)
    sizes = [narrow_state[n].numel() for n in names]
    dtype = wide_state[names[0]].dtype
    p_n = sum(sizes)
    cols = []
    zero = {n: torch.zeros_like(narrow_state[n]) for n in names}
    for j in range(p_n):
        e = torch.zeros(p_n, dtype=dtype, device=wide_state[names[0]].device)
        e[j] = 1.0
        chunks = torch.split(e, sizes)
        g = {**zero, **{n: c.view(narrow_state[n].shape) for n, c in zip(names, chunks)}}
        mapped = embedding.map_gradients(g)
        cols.append(torch.cat([mapped[n].reshape(-1).to(dtype) for n in names]))
    b = torch.stack(cols, dim=1)  # (P_wide, P_narrow)
    q, _ = torch.linalg.qr(b, mode="complete")
    c = q[:, p_n:].T.contiguous()  # (P_wide - P_narrow, P_wide), orthonormal rows
    d = _hvp_block(model, loss_fn, source, wide_state, c)
    return ComplementBlock(
        matrix=d,
        norms=torch.ones(d.shape[0], dtype=dtype),
        kind="general",
        layer=-1,
        neuron=-1,
        alpha=math.nan,
        method="hvp",
    )


def _blocks(
    embedding: Embedding,
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    method: str,
) -> tuple[list[ComplementBlock], dict[str, Tensor]]:
    _check_method(method)
    _check_inputs(embedding, model)
    wide_state = full_state(model)
    try:
        steps = embedding.steps()
    except ValueError:
        if method == "closed-form":
            raise ValueError(
                "this embedding (matrix coefficients) is not a chain of one-step splits "
                "and null neurons, so the closed form does not apply; use method='auto' "
                "or 'hvp'"
            ) from None
        _check_embedded(embedding.apply(embedding.restrict(wide_state)), model)
        return [_general_block(embedding, model, loss_fn, source, wide_state)], wide_state
    state = embedding.restrict(wide_state)
    blocks: list[ComplementBlock] = []
    for step in steps:
        info = _describe(step)
        if info.kind != "permutation":
            blocks.append(_one_step_block(step, info, model, loss_fn, source, state, method))
        state = step.apply(state)
    _check_embedded(state, model)
    return blocks, wide_state


def step_blocks(
    embedding: Embedding,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    method: Method = "auto",
) -> list[ComplementBlock]:
    """The complement block of every one-step piece of ``embedding``, with its metadata.

    Args:
        embedding: A critical embedding (e.g. returned by :func:`torch_embed.widen`).
        model: The WIDENED model, at the embedded point (in eval mode if it has
            BatchNorm/Dropout).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
            instead of ``inputs, targets``: the blocks of the whole data set's loss
            (see :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data and gets the same result (each rank sums the closed forms
            over its own samples and the partial sums are all-reduced, as are the
            products).
        method: ``"auto"``, ``"closed-form"`` or ``"hvp"`` (see the module docstring).

    Returns:
        One :class:`ComplementBlock` per added neuron, in the order of
        :meth:`Embedding.steps <torch_embed.Embedding.steps>` (one block for a
        matrix-coefficient embedding).

    Raises:
        ValueError: A non-critical embedding, a model of other widths or not at the
            embedded point, ``method="closed-form"`` for a layer it does not cover.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> emb = torch_embed.widen(net, [5], "split")
        >>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64)
        >>> [(b.kind, tuple(b.matrix.shape)) for b in step_blocks(emb, net, nn.MSELoss(), x, y)]
        [('split', (4, 4)), ('split', (4, 4))]
    """
    source = batch_source(
        "step_blocks",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    return _blocks(embedding, model, loss_fn, source, method)[0]


def complement_blocks(
    embedding: Embedding,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    method: Method = "auto",
) -> list[Tensor]:
    """The complement block ``D = Cᵀ H_wide C`` of every one-step piece of ``embedding``.

    In the coordinates of ``torch_embed._blocks`` (own parameters, then fan-out), with
    the directions defined there, e.g. ``[[α(1-α)·S, G], [Gᵀ, 0]]`` for a split. Use
    :func:`step_blocks` for each block's kind, layer, neuron and column norms.

    Args:
        embedding: A critical embedding (e.g. returned by :func:`torch_embed.widen`).
        model: The WIDENED model, at the embedded point (in eval mode if it has
            BatchNorm/Dropout).
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
            instead of ``inputs, targets``: the blocks of the whole data set's loss
            (see :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data and gets the same result (each rank sums the closed forms
            over its own samples and the partial sums are all-reduced, as are the
            products).
        method: ``"auto"``, ``"closed-form"`` or ``"hvp"`` (see the module docstring).

    Returns:
        One symmetric float64 matrix per added neuron, in the order of
        :meth:`Embedding.steps <torch_embed.Embedding.steps>` (one matrix for a
        matrix-coefficient embedding).

    Raises:
        ValueError: A non-critical embedding, a model of other widths or not at the
            embedded point, ``method="closed-form"`` for a layer it does not cover.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> emb = torch_embed.widen(net, [3], torch_embed.Null(bias=0.0))
        >>> x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
        >>> (D,) = complement_blocks(emb, net, nn.MSELoss(), x, x**2)
        >>> D.shape, bool((D[:2, :2] == 0).all()), bool((D[2:, 2:] == 0).all())
        (torch.Size([3, 3]), True, True)
    """
    source = batch_source(
        "complement_blocks",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    blocks = _blocks(embedding, model, loss_fn, source, method)[0]
    return [b.matrix for b in blocks]


def _spectra(blocks: list[ComplementBlock], source: BatchSource) -> list[Tensor]:
    """The eigenvalues of every block's normalized matrix, each computed on one rank.

    Over a process group the blocks are dealt round-robin (:meth:`BatchSource.owns
    <torch_embed._data.BatchSource.owns>`): each rank decomposes its share, and one
    all-reduce of the spectra (zeros where a rank does not own a block) gives every
    rank the owners' bits. Every rank checks every block (finite, symmetric), so a
    refusal happens on all ranks; a failed decomposition is raised on all ranks too.
    Without a group, every block here.
    """
    if source.group is None:
        return [eigenvalues(b.normalized) for b in blocks]
    sizes = [int(b.matrix.shape[0]) for b in blocks]
    device = blocks[0].matrix.device if blocks else torch.device("cpu")
    flat = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
    start = 0
    for i, (b, n) in enumerate(zip(blocks, sizes, strict=True)):
        mat = b.normalized
        _check_symmetric(mat.to(torch.float64), mat.dtype)  # the same on every rank
        if source.owns(i):
            try:
                flat[start : start + n] = eigenvalues(mat)
            except RuntimeError:  # torch.linalg.LinAlgError: raised on every rank below
                flat[start : start + n] = math.nan
        start += n
    source.all_reduce_(flat)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(
            "inertia_change: the eigendecomposition of a complement block did not "
            "converge (on the rank that owned it)"
        )
    return list(flat.split(sizes))


def _scale_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    state: Mapping[str, Tensor],
    iterations: int = 20,
) -> tuple[float, float, int]:
    """(‖∇R‖, an estimate of ‖H‖₂ by power iteration, P) at ``state``."""
    fl = _flat_loss(model, loss_fn, source, state=state)
    g = fl.value_and_grad()[1]
    op = HessianOperator.of(fl)
    theta = fl.theta
    gen = torch.Generator(device=theta.device).manual_seed(0)
    v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype, device=theta.device)
    v = v / v.norm()
    est = 0.0
    for _ in range(iterations):
        hv = op.matvec(v)
        new = float(hv.norm())
        if new == 0.0:
            break
        v = hv / new
        if abs(new - est) <= 1e-2 * new:
            est = new
            break
        est = new
    return float(g.norm()), est, int(theta.numel())


def inertia_change(
    embedding: Embedding | GroupEmbedding,
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    tol: float | None = None,
    method: Method = "auto",
    min_gap: float = DEFAULT_MIN_GAP,
) -> Inertia:
    """The exact change of Hessian inertia, ``inertia(H_wide) - inertia(H_narrow)``.

    Sum over the one-step pieces of ``inertia(D)`` (module docstring), so that
    ``after = before + inertia_change(...)`` without forming the wide Hessian.

    Args:
        embedding: A critical embedding; a traced model's
            :class:`~torch_embed.graph.embedding.GroupEmbedding` goes to
            :func:`torch_embed.graph.analysis.inertia_change` (Hessian-vector products).
        model: The WIDENED model, at the embedded point.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``)
            instead of ``inputs, targets``: the blocks of the whole data set's loss
            (see :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data and gets the same result (each rank sums the closed forms
            over its own samples and the partial sums are all-reduced, as are the
            products; each block's eigenvalues are computed on one rank and shared).
        tol: Eigenvalue threshold for the zero count; the result records it. Pass the
            ``tol`` of the "before" :class:`~torch_embed.inertia.Inertia` to count
            consistently with it (and to skip the estimate of ``‖H_wide‖``): then
            ``before + change`` equals the full wide count at that ``tol``. Default: the
            rule of :func:`~torch_embed.inertia.inertia` on the blocks' eigenvalues, with
            the rounding level ``P_wide·eps·‖H_wide‖`` (``‖H_wide‖`` by power iteration)
            and ``|∇R_wide|``.
        method: ``"auto"`` (closed form where possible), ``"closed-form"`` or ``"hvp"``.
        min_gap: Gap ratio under which the result is ``ambiguous`` (and the smallest gap
            the default tolerance moves into).

    Returns:
        An :class:`~torch_embed.inertia.Inertia` (negative, zero, positive added), whose
        ``gap`` is that of the blocks' eigenvalues together around ``tol``.

    Raises:
        ValueError: As :func:`complement_blocks`; a negative or non-finite ``tol``.

    Example:
        Splitting a neuron of a 1-D tanh net with ``α = 1/2`` adds one parameter per
        fan-in weight, bias and fan-out weight, here 3 eigenvalues:

        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> emb = torch_embed.widen(net, [3], torch_embed.Split(select=[0]))
        >>> x = torch.linspace(-2, 2, 16, dtype=torch.float64)[:, None]
        >>> change = inertia_change(emb, net, nn.MSELoss(), x, torch.sin(x))
        >>> sum(change)
        3
    """
    if isinstance(embedding, GroupEmbedding):  # a traced model: the HVP path of graph/
        from torch_embed.graph.analysis import inertia_change as group_change

        return group_change(
            embedding,
            model,
            loss_fn,
            inputs,
            targets,
            data=data,
            reduction=reduction,
            process_group=process_group,
            tol=tol,
            method=method,
            min_gap=min_gap,
        )
    if tol is not None and (not math.isfinite(tol) or tol < 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    source = batch_source(
        "inertia_change",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    blocks, wide_state = _blocks(embedding, model, loss_fn, source, method)
    spectra = _spectra(blocks, source)
    dtype = torch.float64
    mags = torch.cat([torch.zeros(0, dtype=dtype)] + [lam.abs().cpu() for lam in spectra])
    mags = mags.sort().values
    scale = float(mags[-1]) if mags.numel() else 0.0  # a lower bound on ‖H_wide‖
    gnorm: float | None = None
    if tol is None:
        gnorm, power, p = _scale_estimate(model, loss_fn, source, wide_state)
        scale = max(scale, power)
    else:
        p = sum(v.numel() for v in model.parameters())
    rounding = default_tolerance(scale, p, dtype)
    tol, gap = _tolerance_and_gap(mags, rounding, tol, gnorm, min_gap)
    neg = pos = 0
    for lam in spectra:
        neg += int((lam < -tol).sum())
        pos += int((lam > tol).sum())
    methods = "+".join(dict.fromkeys(b.method for b in blocks))
    zero = mags.numel() - neg - pos
    return Inertia(neg, zero, pos, float(tol), gap, gap < min_gap, methods)
