"""Dense Hessians, Hessian-vector products and a Hessian linear operator (torch.func).

The loss is ``R(θ) = loss_fn(model(inputs), targets)`` as a function of the flat vector
``θ`` of the model's trainable parameters, in ``named_parameters()`` order and in
``dtype`` (``float64`` by default: inertia counts are meaningless in float32, see
docs/guide/inertia.md, "Tolerance, gap ratio, ambiguity"). The model itself is never
modified: the parameters are copied, cast and passed through
:func:`torch.func.functional_call`.

Three engines:

- ``"blocks"`` (dense Hessians, the default of :func:`hessian`): for each parameter
  tensor, its gradient is recorded as a function of that tensor and the ones after it
  only, and the block's rows are batched vector-Jacobian products of it; the blocks
  below the diagonal are filled by symmetry. Autograd prunes the graph to what each
  block needs: in ``python bench/inertia.py --part 1`` (bench/RESULTS.md; float64 tanh
  MLP 8-w-w-2, N = 256, P = 990, 4062 and 8066, CPU, one thread) it took 2.4-3.7x less
  wall time than the flat ``"reverse"`` engine and 2.5-3.7x less than
  ``torch.func.hessian``, with 6.1-11.9x less peak memory than ``torch.func.hessian``.
  Using ``torch.func`` for the second pass matters: ``torch.autograd.grad(...,
  is_grads_batched=True)`` falls back to a per-vector loop for ``tanh_backward``'s
  derivative, which made it slower.
- ``"reverse"``: reverse-over-reverse on the flat vector, ``vjp(grad(R))`` — the
  forward and first backward pass are recorded once and every product is one batched
  second backward pass. It works for every loss PyTorch can differentiate twice
  (including ``nn.MSELoss``, where forward-over-reverse raises "ZeroTensors are
  immutable"); the default of :func:`hvp` and :class:`HessianOperator`.
- ``"forward"``: forward-over-reverse, ``jvp(grad(R))``, only when asked for: it was
  slower in every measurement on CPU and fails for ``nn.MSELoss``.

A model whose element-wise modules PyTorch cannot differentiate twice (``Hardsigmoid``)
is refused with the layer named, and so is a model with BatchNorm or Dropout in train
mode (its loss is not a function of the parameters alone) unless
``allow_train_mode=True``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torch_embed._data import BatchSource, batch_source
from torch_embed._sequential import elementwise_info

__all__ = [
    "FlatLoss",
    "FlatTerm",
    "HessianOperator",
    "check_model",
    "dense_hessian",
    "flat_loss",
    "gradient",
    "hessian",
    "hvp",
]

LossFn = Callable[[Any, Any], Tensor]

#: Most Hessian-vector products per batched pass (fewer where memory is short).
DEFAULT_CHUNK = 128
#: Share of the free memory that one batched pass of products may plan to use.
MEMORY_FRACTION = 0.5
#: Hessian engines: "auto", "blocks" (dense only), "reverse", "forward".
ENGINES = ("auto", "blocks", "reverse", "forward")

_TRAIN_MODE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class FlatTerm:
    """One batch's weighted share of the loss, as a function of the flat vector.

    Attributes:
        fn: Maps a flat parameter vector to ``w_b · loss_fn(model(x_b), y_b)``.
        param_fn: The same as a function of the sequence of parameter tensors.
    """

    fn: Callable[[Tensor], Tensor]
    param_fn: Callable[[Sequence[Tensor]], Tensor] | None = None


@dataclass(frozen=True)
class FlatLoss:
    """The loss as a function of one flat parameter vector.

    Attributes:
        fn: Maps a flat parameter vector (``theta``'s shape, dtype and device) to the
            scalar loss: with several batches, the weighted sum over this process's
            batches (see ``terms``), which is the whole loss only without a process
            group (:meth:`value_and_grad` sums over the group).
        theta: The model's current trainable parameters, flattened, in ``dtype``.
        names: Parameter names in ``named_parameters()`` order (trainable ones only).
        shapes: Their shapes.
        param_fn: The same loss as a function of the sequence of parameter tensors
            (``names`` order and ``shapes``); used for the block-wise Hessian.
        terms: The loss batch by batch (each weighted, :mod:`torch_embed._data`): what
            the Hessian engines iterate, one batch's activations at a time. ``None``:
            one term, ``(fn, param_fn)``; empty on a rank without data.
        source: The batches and the process group whose sum the loss is (``None``: one
            batch in one process).
    """

    fn: Callable[[Tensor], Tensor]
    theta: Tensor
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    param_fn: Callable[[Sequence[Tensor]], Tensor] | None = None
    terms: tuple[FlatTerm, ...] | None = None
    source: BatchSource | None = None

    @property
    def numel(self) -> int:
        """The number of trainable parameters ``P``."""
        return int(self.theta.numel())

    @property
    def parts(self) -> tuple[FlatTerm, ...]:
        """The terms whose sum (over the process group, too) is the loss."""
        return (FlatTerm(self.fn, self.param_fn),) if self.terms is None else self.terms

    def reduce_(self, tensor: Tensor) -> Tensor:
        """Sum a per-process partial result over the process group, in place."""
        return tensor if self.source is None else self.source.all_reduce_(tensor)

    def value_and_grad(self, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The loss and its gradient at ``theta`` (default :attr:`theta`), all batches.

        Summed over every batch and every process of the group.

        Example:
            >>> from torch import nn
            >>> fl = flat_loss(nn.Linear(1, 1, bias=False), nn.MSELoss(reduction="sum"),
            ...                data=[(torch.ones(1, 1), torch.zeros(1, 1))] * 3)
            >>> value, g = fl.value_and_grad(torch.tensor([2.0], dtype=torch.float64))
            >>> float(value), g.tolist()  # 3 batches of w² at w = 2, and 3·2w
            (12.0, [12.0])
        """
        theta = self.theta if theta is None else theta
        value = torch.zeros((), dtype=theta.dtype, device=theta.device)
        total = torch.zeros_like(theta)
        for term in self.parts:
            g, v = torch.func.grad_and_value(term.fn)(theta)
            total += g.detach()
            value += v.detach()
        both = self.reduce_(torch.cat([total, value.reshape(1)]))
        return both[-1], both[:-1]

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(P,)`` vector into a ``{name: tensor}`` dict of parameter shapes.

        Example:
            >>> from torch import nn
            >>> fl = flat_loss(nn.Linear(2, 3), nn.MSELoss(), torch.ones(1, 2), torch.ones(1, 3))
            >>> {k: tuple(v.shape) for k, v in fl.unflatten(fl.theta).items()}
            {'weight': (3, 2), 'bias': (3,)}
        """
        if vec.shape != (self.numel,):
            raise ValueError(
                f"expected a flat vector of shape ({self.numel},), got {tuple(vec.shape)}"
            )
        sizes = [math.prod(s) for s in self.shapes]
        return {
            n: c.view(s)
            for n, c, s in zip(self.names, torch.split(vec, sizes), self.shapes, strict=True)
        }


def check_model(model: nn.Module, *, allow_train_mode: bool = False) -> None:
    """Refuse models whose Hessian torch_embed cannot compute or that is not well defined.

    Args:
        model: The network.
        allow_train_mode: Accept BatchNorm/Dropout/InstanceNorm in train mode (the loss
            then depends on the batch statistics / the dropout mask drawn once).

    Raises:
        ValueError: A module in train mode whose output is random or depends on running
            statistics, or an element-wise module PyTorch cannot differentiate twice
            (e.g. ``nn.Hardsigmoid``); the message names the module and its type.

    Example:
        >>> from torch import nn
        >>> check_model(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
        Traceback (most recent call last):
        ...
        ValueError: module '1' (Dropout) is in train mode...
    """
    for name, module in model.named_modules():
        label = f"module '{name or '<root>'}' ({type(module).__name__})"
        info = elementwise_info(module)
        if info is not None and not info.twice_differentiable:
            raise ValueError(
                f"{label} has no second derivative in PyTorch (its double backward is not "
                f"implemented), so the Hessian does not exist through autograd. Replace it "
                f"with a smooth activation (e.g. nn.Sigmoid, nn.Tanh, nn.SiLU)."
            )
        if module.training and isinstance(module, _TRAIN_MODE_TYPES) and not allow_train_mode:
            raise ValueError(
                f"{label} is in train mode: its output depends on batch statistics or a "
                f"random mask, and BatchNorm would update its running statistics. Call "
                f"model.eval() first, or pass allow_train_mode=True to differentiate the "
                f"train-mode loss with the batch statistics / one fixed dropout mask."
            )


def flat_loss(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    dtype: torch.dtype = torch.float64,
    state: Mapping[str, Tensor] | None = None,
) -> FlatLoss:
    """Express ``loss_fn(model(inputs), targets)`` as a function of a flat vector.

    The trainable parameters (``requires_grad``) are copied into one flat vector in
    ``dtype``; frozen parameters and floating buffers are passed, cast to ``dtype``, as
    constants (BatchNorm running statistics keep their values; in train mode each
    evaluation updates fresh copies, never the model's own). Floating tensors in
    ``inputs`` and ``targets`` are cast to ``dtype``, also inside dicts (any mapping),
    lists and tuples; integer tensors (class indices) and other objects are kept.

    With ``data=`` the loss is the data set's (:mod:`torch_embed._data`: weighted by the
    loss's reduction, one :class:`FlatTerm` per batch, summed over ``process_group``).

    Args:
        model: The network (not modified).
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``),
            read once, instead of ``inputs, targets``.
        reduction: ``"mean"``, ``"sum"`` or ``"batchmean"``: how ``loss_fn`` reduces
            over a batch; needed with ``data``/``process_group`` when ``loss_fn`` is a
            plain function (a ``torch.nn`` loss says it itself).
        process_group: A :mod:`torch.distributed` process group; each rank passes its
            shard of the data and sums run over the group (``None``: this process only).
        dtype: The floating dtype of the computation.
        state: Parameters and buffers (keyed like ``model.state_dict()``; shapes may
            differ from the model's) to evaluate at instead of the model's own.

    Returns:
        A :class:`FlatLoss`.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1)
        >>> fl = flat_loss(lin, nn.MSELoss(), torch.zeros(3, 2), torch.zeros(3, 1))
        >>> fl.names, fl.theta.dtype
        (('weight', 'bias'), torch.float64)
        >>> bool(fl.fn(fl.theta) == lin.bias.double().pow(2).sum())
        True
    """
    source = batch_source(
        "flat_loss",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    return _flat_loss(model, loss_fn, source, dtype=dtype, state=state)


def _flat_loss(
    model: nn.Module,
    loss_fn: LossFn,
    source: BatchSource,
    *,
    dtype: torch.dtype = torch.float64,
    state: Mapping[str, Tensor] | None = None,
) -> FlatLoss:
    """:func:`flat_loss` for a :class:`~torch_embed._data.BatchSource`."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")

    def value(name: str, tensor: Tensor) -> Tensor:
        return tensor if state is None else state[name]

    named = [(n, value(n, p)) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    names = tuple(n for n, _ in named)
    shapes = tuple(p.shape for _, p in named)
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1).to(dtype) for _, p in named])
    constants = [(n, value(n, p)) for n, p in model.named_parameters() if not p.requires_grad]
    constants += [(n, value(n, b)) for n, b in model.named_buffers()]
    if state is not None:  # buffers the state has beyond the model's (e.g. a wide one's)
        known = {n for n, _ in model.named_parameters()} | {n for n, _ in constants}
        constants += [(n, t) for n, t in state.items() if n not in known]
    fixed = {n: t.detach().to(dtype) if t.is_floating_point() else t.detach() for n, t in constants}

    def term(x: Any, y: Any, loss: LossFn) -> FlatTerm:
        def param_fn(tensors: Sequence[Tensor]) -> Tensor:
            params: dict[str, Tensor] = dict(zip(names, tensors, strict=True))
            # fresh buffer copies: a train-mode BatchNorm updates them in place
            params.update({n: t.clone() for n, t in fixed.items()})
            out = loss(functional_call(model, params, (x,)), y)
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise ValueError(
                    f"loss_fn must return a scalar tensor, got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                )
            return out.reshape(())

        def fn(vec: Tensor) -> Tensor:
            chunks = torch.split(vec, sizes)
            return param_fn([c.view(s) for c, s in zip(chunks, shapes, strict=True)])

        return FlatTerm(fn, param_fn)

    terms = tuple(
        term(_cast_floating(b.inputs, dtype), _cast_floating(b.targets, dtype), b.loss(loss_fn))
        for b in source.batches
    )
    if source.single:
        return FlatLoss(terms[0].fn, theta, names, shapes, terms[0].param_fn)

    def total(vec: Tensor) -> Tensor:
        out = torch.zeros((), dtype=vec.dtype, device=vec.device)
        for t in terms:
            out = out + t.fn(vec)
        return out

    return FlatLoss(total, theta, names, shapes, None, terms, source)


def _cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with its floating tensors cast to ``dtype``, through mappings/lists/tuples."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        items = {k: _cast_floating(v, dtype) for k, v in obj.items()}
        try:  # keep the mapping's own type (OrderedDict, a tokenizer's batch, ...)
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_cast_floating(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floating(v, dtype) for v in obj)
    return obj


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The flat gradient of the loss in ``dtype`` (``named_parameters()`` order).

    ``data``, ``reduction`` and ``process_group`` as in :func:`flat_loss` (the gradient
    of the whole data set's loss, the same on every rank of the group).

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(1, 1)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(2.0), lin.bias.fill_(0.0)
        >>> gradient(lin, nn.MSELoss(), torch.ones(1, 1), torch.zeros(1, 1))  # 2·(2x)·x
        tensor([4., 4.], dtype=torch.float64)
    """
    source = batch_source(
        "gradient", loss_fn, inputs, targets, data, reduction=reduction, process_group=process_group
    )
    fl = _flat_loss(model, loss_fn, source, dtype=dtype)
    if fl.terms is None:
        out: Tensor = grad(fl.fn)(fl.theta)
        return out.detach()
    return fl.value_and_grad()[1]


HVP = Callable[[Tensor], Tensor]


def _load_forward_ad() -> None:
    """Trigger PyTorch's one-time forward-AD setup, hiding its internal warning.

    The first ``jvp`` loads decompositions through ``torch.jit.script``, which warns
    ``DeprecationWarning`` in torch 2.13; that is PyTorch's business, not the user's.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=DeprecationWarning)
        one = torch.ones(1)
        jvp(torch.sin, (one,), (one,))


def _make_hvp(fn: Callable[[Tensor], Tensor], theta: Tensor, engine: str) -> HVP:
    """A function ``V (k, P) -> V @ H (k, P)`` (``H`` is symmetric) for one engine."""
    if engine == "forward":
        _load_forward_ad()
        g = grad(fn)

        def one(v: Tensor) -> Tensor:
            out: Tensor = jvp(g, (theta,), (v,))[1]
            return out

        return vmap(one)  # type: ignore[no-any-return]
    vjp_fn = vjp(grad(fn), theta)[1]

    def one_rev(v: Tensor) -> Tensor:
        out: Tensor = vjp_fn(v)[0]
        return out

    return vmap(one_rev)  # type: ignore[no-any-return]


def _check_forward(fn: Callable[[Tensor], Tensor], theta: Tensor) -> None:
    """Evaluate the loss once, outside the second-derivative engines.

    An error of the model or the loss itself (a shape or dtype mismatch) then reaches
    the user unchanged instead of being reworded as a missing second derivative. The
    random-number state is restored (a train-mode Dropout draws here).
    """
    with torch.random.fork_rng(devices=_rng_devices(theta)), torch.no_grad():
        fn(theta.detach())


def _rng_devices(theta: Tensor) -> list[torch.device]:
    """Devices whose RNG ``fork_rng`` saves besides the CPU's: ``theta``'s, if CUDA."""
    return [theta.device] if theta.device.type == "cuda" else []


def _is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's error."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _returns_alias(func: Any) -> bool:
    """Whether an operator's results share their inputs' memory (views, in-place, out=)."""
    schema = getattr(func, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


class _AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of the tensors that the operations run under it allocate.

    Results of views, in-place and ``out=`` operators share their inputs' memory and
    are not counted (read from the operator's schema; no storage is inspected). Memory
    freed along the way is not subtracted, so the sum is an upper bound of the extra
    memory those operations held at their peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not _returns_alias(func):
            for t in tree_leaves(out):
                if isinstance(t, Tensor) and t.layout == torch.strided:
                    self.total += t.numel() * t.element_size()
        return out


class _Products:
    """Batched Hessian-vector products ``V -> V @ H`` of one flat loss by one engine.

    Construction records what every product reuses (``"reverse"``: the forward and the
    first backward pass, once); nothing is probed. A failure is diagnosed where it
    happens: an error of the model or loss itself is raised unchanged (the loss is
    evaluated once more, only then), a missing second derivative becomes a
    ``ValueError``, an allocation failure a ``MemoryError``. In the reverse engine, the
    first time several vectors come, the first of them runs alone and measures the
    memory one product allocates (:attr:`vector_bytes`, see :class:`_AllocatedBytes`),
    from which :meth:`chunk` sizes the batches. The forward engine is not measured:
    under a dispatch mode its forward-mode AD crashed the interpreter (torch 2.13,
    segmentation fault in the test suite), so its batches are sized from ``2·P``
    numbers per vector. Every product runs from the random-number state of
    construction (a train-mode Dropout keeps one mask, also in the forward engine,
    which reruns the forward pass), and the caller's state is left as it was.
    """

    def __init__(
        self, fns: Sequence[Callable[[Tensor], Tensor]], theta: Tensor, engine: str
    ) -> None:
        if engine not in ("auto", "reverse", "forward"):
            raise ValueError(f"engine must be 'auto', 'reverse' or 'forward', got {engine!r}")
        self.fns, self.theta = tuple(fns), theta.detach()
        self.engine = "forward" if engine == "forward" else "reverse"  # auto: the fastest
        self.vector_bytes: int | None = None  # measured by the first reverse product
        self._measure = self.engine == "reverse"
        self._devices = _rng_devices(self.theta)
        # One batch: its forward and first backward pass are recorded once, here. Several:
        # recorded again for every pass, one batch at a time (the graphs of all batches
        # together would hold the activations of the whole data set).
        self._hv: HVP | None = None
        with torch.random.fork_rng(devices=self._devices):
            self._rng = torch.get_rng_state()
            self._cuda_rng = [torch.cuda.get_rng_state(d) for d in self._devices]
            if len(self.fns) == 1:
                try:
                    self._hv = _make_hvp(self.fns[0], self.theta, self.engine)
                except RuntimeError as err:
                    raise self._failure(err) from err

    def __call__(self, rows: Tensor, *, measure: bool = False) -> Tensor:
        """``rows @ H`` for ``(k, P)`` rows in ``theta``'s dtype and device, one pass.

        With ``measure`` (one row, reverse engine) it also sets :attr:`vector_bytes`
        (with several batches: of the first batch, its recording included).
        """
        counter = _AllocatedBytes() if measure and self._measure and len(rows) == 1 else None
        recorded = self._hv
        # one recorded batch, or every batch recorded in turn (none on a rank without data)
        products = [recorded] if recorded is not None else [None] * len(self.fns)
        out = torch.zeros_like(rows) if recorded is None else None
        with torch.random.fork_rng(devices=self._devices):
            for i, hv in enumerate(products):
                torch.set_rng_state(self._rng)
                for dev, state in zip(self._devices, self._cuda_rng, strict=True):
                    torch.cuda.set_rng_state(state, dev)
                try:
                    with counter if counter is not None and i == 0 else contextlib.nullcontext():
                        if hv is None:
                            hv = _make_hvp(self.fns[i], self.theta, self.engine)
                        part = hv(rows).detach()
                except RuntimeError as err:
                    raise self._failure(err) from err
                out = part if out is None else out.add_(part)
        if counter is not None:
            self.vector_bytes = counter.total
        return rows.new_zeros(rows.shape) if out is None else out

    def _failure(self, err: RuntimeError) -> Exception:
        p = self.theta.numel()
        if _is_out_of_memory(err):
            return MemoryError(
                f"Hessian-vector products of P={p} parameters ran out of memory ({err}); "
                f"pass a smaller chunk_size (vectors per batched pass) or fewer inputs"
            )
        for fn in self.fns:
            _check_forward(fn, self.theta)  # the model's or loss's own error, unchanged
        return ValueError(
            f"PyTorch cannot compute Hessian-vector products of this loss ({self.engine} "
            f"mode): {err}. Every module and the loss must be twice differentiable in PyTorch"
            + (
                "; forward-over-reverse fails for F.mse_loss/nn.MSELoss, use engine='auto'"
                if self.engine == "forward"
                else ""
            )
        )

    def chunk(self, count: int, budget: int) -> int:
        """Vectors per pass for ``count`` vectors in ``budget`` bytes (:func:`_batch_size`)."""
        row = 2 * self.theta.numel() * self.theta.element_size()
        return _batch_size(max(self.vector_bytes or 0, row), budget, count)

    def into_(
        self,
        out: Tensor,
        rows: Callable[[int, int], Tensor],
        chunk_size: int | None,
        budget: int,
    ) -> None:
        """``out[i:j] = rows(i, j) @ H`` for every row of ``out``, one batch at a time.

        ``chunk_size`` rows per batch, or (``None``) as many as :meth:`chunk` allows in
        ``budget`` bytes. Before the first measurement, the first of several rows runs
        alone and is measured (a single row needs no sizing and is not measured: the
        dispatch mode costs Python time per operation).
        """
        k = out.shape[0]
        start = 0
        if chunk_size is None and self._measure and self.vector_bytes is None and k > 1:
            out[:1] = self(rows(0, 1), measure=True)
            start = 1
        chunk = self.chunk(k - start, budget) if chunk_size is None else chunk_size
        for i in range(start, k, chunk):
            j = min(i + chunk, k)
            out[i:j] = self(rows(i, j))


def _batch_size(vector_bytes: int, budget: int, count: int) -> int:
    """Vectors per batched pass: as many as fit in ``MEMORY_FRACTION`` of ``budget`` bytes.

    Each vector is taken to need ``vector_bytes``; the result is at least 1 and at most
    ``DEFAULT_CHUNK`` and ``count``.
    """
    fit = int(MEMORY_FRACTION * max(budget, 0)) // max(vector_bytes, 1)
    return max(1, min(DEFAULT_CHUNK, count, fit))


def _available_bytes(device: torch.device) -> int:
    """Bytes the process can still allocate on ``device``.

    CUDA: the free memory of the device. CPU: the smallest of the system's available
    memory (``MemAvailable``), what the process's address-space limit (``ulimit -v``,
    ``RLIMIT_AS``) leaves beside its current address space, and what a cgroup v2 memory
    limit leaves (``memory.max - memory.current``); a limit that is not set is ignored.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    found = [
        b for b in (_meminfo_available(), _rlimit_available(), _cgroup_available()) if b is not None
    ]
    return max(min(found), 0) if found else 2**62


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _rlimit_available() -> int | None:
    """``RLIMIT_AS`` minus the current address space (``VmSize``); ``None`` if unlimited."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(soft) - int(line.split()[1]) * 1024
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


#: Where a cgroup v2 hierarchy's files for this process are read (its root in a container).
_CGROUP_DIR = "/sys/fs/cgroup"


def _cgroup_available() -> int | None:
    """``memory.max - memory.current`` of cgroup v2; ``None`` without a limit."""
    try:
        with open(os.path.join(_CGROUP_DIR, "memory.max")) as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(_CGROUP_DIR, "memory.current")) as fh:
            return int(limit) - int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _size(nbytes: int) -> str:
    """``nbytes`` in a readable unit (``"1.50 GiB"``, ``"912 B"``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _default_chunk(p: int) -> int:
    return max(1, min(p, DEFAULT_CHUNK))


def dense_hessian(
    fn: Callable[[Tensor], Tensor] | FlatLoss,
    theta: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
    engine: str = "auto",
) -> Tensor:
    """The dense symmetric Hessian of a scalar function of one flat vector.

    The engine behind :func:`hessian` (see there). ``fn`` is either a :class:`FlatLoss`
    (then ``theta`` defaults to its ``theta``, and ``engine="auto"`` uses the faster
    block-wise engine) or any function of one flat vector (``engine="auto"`` is then
    ``"reverse"``). ``theta``'s dtype and device are used.

    Example:
        >>> dense_hessian(lambda t: (t[0] * t[1]) ** 2, torch.tensor([1.0, 2.0]))
        tensor([[8., 8.],
                [8., 2.]])
    """
    fl = fn if isinstance(fn, FlatLoss) else None
    flat_fn = fn.fn if isinstance(fn, FlatLoss) else fn
    if theta is None:
        if fl is None:
            raise ValueError("theta is required unless fn is a FlatLoss")
        theta = fl.theta
    if theta.ndim != 1:
        raise ValueError(f"theta must be a flat (P,) vector, got shape {tuple(theta.shape)}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    blockwise = fl is not None and all(t.param_fn is not None for t in fl.parts)
    if engine == "auto":
        engine = "blocks" if blockwise else "reverse"
    if engine == "blocks" and not blockwise:
        raise ValueError("engine='blocks' needs a FlatLoss (per-parameter loss function)")
    p = theta.numel()
    dtype, device = theta.dtype, theta.device
    chunk = _default_chunk(p) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    chunk = min(chunk, p)
    itemsize = theta.element_size()
    need = p * p * itemsize + 2 * chunk * p * itemsize
    budget = _available_bytes(device) if max_bytes is None else int(max_bytes)
    if need > budget:
        raise MemoryError(
            f"the dense Hessian of P={p} parameters needs {need / 2**30:.2f} GiB in {dtype} "
            f"but only {budget / 2**30:.2f} GiB are available; use hvp(...) or "
            f"HessianOperator(...) (matrix-free products, e.g. with scipy's eigsh via "
            f".to_scipy()), a smaller model, or pass max_bytes= to override"
        )
    theta = theta.detach()
    out = torch.empty(p, p, dtype=dtype, device=device)
    if engine == "blocks":
        assert fl is not None  # checked above
        parts = fl.parts
        for part in parts:
            _check_forward(part.fn, theta)
        if len(parts) != 1:
            out.zero_()  # the batches' Hessians are added into it
        try:
            _fill_blockwise_(
                out,
                [t.param_fn for t in parts if t.param_fn is not None],
                theta,
                fl.shapes,
                None if chunk_size is None else chunk,
                budget - p * p * itemsize,
            )
        except RuntimeError as err:
            if _is_out_of_memory(err):
                raise MemoryError(
                    f"the Hessian's rows of P={p} parameters ran out of memory ({err}); pass "
                    f"a smaller chunk_size (rows per batched pass) or fewer inputs"
                ) from err
            raise ValueError(
                f"PyTorch cannot compute second derivatives of this loss: {err}. Every "
                f"module and the loss must be twice differentiable in PyTorch"
            ) from err
        return fl.reduce_(out)
    products = _Products([t.fn for t in fl.parts] if fl is not None else [flat_fn], theta, engine)

    def basis(start: int, stop: int) -> Tensor:
        rows = torch.zeros(stop - start, p, dtype=dtype, device=device)
        rows[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        return rows

    products.into_(out, basis, None if chunk_size is None else chunk, budget - p * p * itemsize)
    _symmetrize_(out, chunk)
    return out if fl is None else fl.reduce_(out)


def _fill_blockwise_(
    out: Tensor,
    param_fns: Sequence[Callable[[Sequence[Tensor]], Tensor]],
    theta: Tensor,
    shapes: Sequence[torch.Size],
    chunk: int | None,
    budget: int,
) -> None:
    """Fill ``out`` with the Hessian one parameter tensor (block row) at a time.

    With several ``param_fns`` (one per batch) their Hessians are added into ``out``
    (zeroed by the caller), one batch's graphs at a time.

    For block ``l`` the gradient ``∂R/∂θ_l`` is recorded as a function of the blocks
    ``l, l+1, ...`` only (earlier blocks are constants, so autograd prunes the graph),
    and its rows are batched vector-Jacobian products (``vmap`` over ``vjp``, the
    forward and first backward pass recorded once per block). The blocks left of the
    diagonal are copied from their transposes (``H_kl = H_lkᵀ``), so the result is
    exactly symmetric. The random-number state is reset before each block, so a
    train-mode Dropout draws the same mask for every block. ``chunk=None`` sizes the
    batches from ``budget`` bytes: the first row of the first block (whose graph spans
    every later block, so it costs the most) runs alone and is measured
    (:class:`_AllocatedBytes`), and every block uses the batch size this gives.
    """
    sizes = [math.prod(s) for s in shapes]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    leaves = [c.view(s) for c, s in zip(torch.split(theta, sizes), shapes, strict=True)]
    devices = _rng_devices(theta)
    with torch.random.fork_rng(devices=devices):
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(theta.device) if devices else None
        add = len(param_fns) != 1
        for param_fn in param_fns:
            for l in range(len(leaves)):
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, theta.device)
                chunk = _fill_block_row_(out, param_fn, leaves, l, offs, chunk, budget, add)


def _fill_block_row_(
    out: Tensor,
    param_fn: Callable[[Sequence[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    l: int,
    offs: Sequence[int],
    chunk: int | None,
    budget: int,
    add: bool = False,
) -> int:
    """Rows of parameter block ``l``, against blocks ``l, l+1, ...``, and their mirror.

    ``add``: add the rows to ``out`` instead of writing them. Returns the batch size
    used (measured and chosen here when ``chunk`` is ``None``).
    """
    lo, hi = offs[l], offs[l + 1]
    head = list(leaves[:l])

    def block_grad(*later: Tensor) -> Tensor:
        def loss_of_block(p: Tensor) -> Tensor:
            return param_fn([*head, p, *later[1:]])

        g: Tensor = grad(loss_of_block)(later[0])
        return g

    vjp_fn = vjp(block_grad, *leaves[l:])[1]
    shape = leaves[l].shape
    p = out.shape[1]

    def fill(s: int, e: int, counter: _AllocatedBytes | None = None) -> None:
        k = e - s
        basis = torch.zeros(k, hi - lo, dtype=out.dtype, device=out.device)
        basis[torch.arange(k), torch.arange(s, e)] = 1.0
        if counter is None:
            rows = vmap(vjp_fn)(basis.view(k, *shape))
        else:
            with counter:
                rows = vmap(vjp_fn)(basis.view(k, *shape))
        for j, r in enumerate(rows, start=l):
            blk = out[lo + s : lo + e, offs[j] : offs[j + 1]]
            if add:
                blk.add_(r.detach().reshape(k, -1))
            else:
                blk.copy_(r.detach().reshape(k, -1))
            if j != l:
                out[offs[j] : offs[j + 1], lo + s : lo + e] = blk.T

    start = 0
    if chunk is None:
        counter = _AllocatedBytes()
        fill(0, 1, counter)
        start = 1
        row = 2 * p * out.element_size()
        chunk = _batch_size(max(counter.total, row), budget, p)
    for s in range(start, hi - lo, chunk):
        fill(s, min(s + chunk, hi - lo))
    _symmetrize_(out[lo:hi, lo:hi], _default_chunk(p))
    return chunk


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
    allow_train_mode: bool = False,
    max_bytes: int | None = None,
    engine: str = "auto",
) -> Tensor:
    """The dense, symmetric Hessian of the loss in ``named_parameters()`` order.

    Rows are filled chunk by chunk (``chunk_size`` Hessian-vector products at a time,
    batched) into one preallocated ``(P, P)`` matrix; blocks below the diagonal are
    copied from above (``"blocks"`` engine) or the result is symmetrized in place as
    ``(H + Hᵀ)/2`` block by block (flat engines), so the result is exactly symmetric
    and peak memory is one ``P×P`` matrix plus one chunk's work.

    Args:
        model: The network (not modified). In eval mode if it has BatchNorm/Dropout.
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``, e.g.
            ``nn.MSELoss()``, ``nn.CrossEntropyLoss()``, ``F.mse_loss``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``),
            instead of ``inputs, targets``: the result is the whole data set's, its
            batches read once and kept (see :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss's ``reduction`` otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data, the result is summed over the group and the same on
            every rank (``None``: this process only).
        dtype: Floating dtype of the computation and of the result.
        chunk_size: Hessian-vector products per batched pass (default: sized from the
            memory left beside the matrix, as in :class:`HessianOperator`: the first
            row runs alone and is measured, at most ``DEFAULT_CHUNK``).
        allow_train_mode: Differentiate a train-mode BatchNorm/Dropout model (batch
            statistics; one dropout mask, drawn once, for all products).
        max_bytes: Memory the result may use (default: the available memory of the
            device); a larger ``P×P`` matrix raises :class:`MemoryError` before any
            allocation.
        engine: ``"auto"`` (= ``"blocks"``), ``"blocks"``, ``"reverse"`` or
            ``"forward"`` (forward-over-reverse; fails for ``nn.MSELoss`` in current
            PyTorch); see the module docstring.

    Returns:
        ``(P, P)`` tensor in ``dtype`` on the parameters' device.

    Raises:
        ValueError: Train-mode BatchNorm/Dropout without ``allow_train_mode``, or a
            module with no second derivative (named).
        MemoryError: The matrix would not fit; use :func:`hvp` or
            :class:`HessianOperator` instead.

    Example:
        Least squares ``R(w) = mean((Xw - y)²)`` has Hessian ``2 XᵀX / N``:

        >>> from torch import nn
        >>> lin = nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 1)
        >>> H = hessian(lin, nn.MSELoss(), x, y)
        >>> X = x.double()
        >>> torch.allclose(H, 2 * X.T @ X / 8)
        True
    """
    check_model(model, allow_train_mode=allow_train_mode)
    source = batch_source(
        "hessian", loss_fn, inputs, targets, data, reduction=reduction, process_group=process_group
    )
    fl = _flat_loss(model, loss_fn, source, dtype=dtype)
    return dense_hessian(fl, chunk_size=chunk_size, max_bytes=max_bytes, engine=engine)


def _symmetrize_(mat: Tensor, block: int) -> None:
    """``mat <- (mat + matᵀ)/2`` in place, one block pair at a time."""
    p = mat.shape[0]
    for i in range(0, p, block):
        i2 = min(i + block, p)
        diag = mat[i:i2, i:i2]
        diag.copy_((diag + diag.T) / 2)
        for j in range(i2, p, block):
            j2 = min(j + block, p)
            avg = (mat[i:i2, j:j2] + mat[j:j2, i:i2].T) / 2
            mat[i:i2, j:j2] = avg
            mat[j:j2, i:i2] = avg.T


Vectors = Tensor | Mapping[str, Tensor]


@overload
def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = ...,
    targets: Any = ...,
    vectors: Tensor = ...,
    *,
    data: Iterable[Any] | None = ...,
    reduction: str | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype = ...,
    allow_train_mode: bool = ...,
    engine: str = ...,
    chunk_size: int | None = ...,
    max_bytes: int | None = ...,
) -> Tensor: ...


@overload
def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = ...,
    targets: Any = ...,
    vectors: Mapping[str, Tensor] = ...,
    *,
    data: Iterable[Any] | None = ...,
    reduction: str | None = ...,
    process_group: Any = ...,
    dtype: torch.dtype = ...,
    allow_train_mode: bool = ...,
    engine: str = ...,
    chunk_size: int | None = ...,
    max_bytes: int | None = ...,
) -> dict[str, Tensor]: ...


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any = None,
    targets: Any = None,
    vectors: Vectors | None = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    dtype: torch.dtype = torch.float64,
    allow_train_mode: bool = False,
    engine: str = "auto",
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> Tensor | dict[str, Tensor]:
    """Hessian-vector products ``H v`` without forming ``H``.

    One call costs one forward and one backward pass (recorded once) and one batched
    second backward pass per chunk of vectors (:meth:`HessianOperator.matmat`); for
    many calls at the same point, build one :class:`HessianOperator` instead. With
    ``data``, every chunk of vectors costs a forward, a backward and a batched second
    backward pass per batch.

    Args:
        model: The network (not modified).
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        vectors: ``(P,)`` or ``(k, P)`` (rows are vectors), in ``named_parameters()``
            order, or a ``{name: tensor}`` mapping with one entry per trainable
            parameter, each of the parameter's shape or with a leading ``k``. Cast to
            ``dtype``. Required (a keyword with ``data``: ``hvp(model, loss,
            vectors=v, data=loader)``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``),
            instead of ``inputs, targets``: the result is the whole data set's, its
            batches read once and kept (see :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss's ``reduction`` otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data, the result is summed over the group and the same on
            every rank (``None``: this process only).
        dtype: Floating dtype of the computation and of the result.
        allow_train_mode: As in :func:`hessian`.
        engine: As in :func:`hessian`.
        chunk_size: As in :class:`HessianOperator`.
        max_bytes: As in :class:`HessianOperator`.

    Returns:
        ``H v`` with the shape of ``vectors`` (a ``{name: tensor}`` dict for a
        mapping), in ``dtype``.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> x = torch.eye(2)
        >>> loss, y = nn.MSELoss(reduction="sum"), torch.zeros(2, 1)
        >>> hvp(lin, loss, x, y, torch.tensor([1.0, 0.0]))
        tensor([2., 0.], dtype=torch.float64)
        >>> hvp(lin, loss, x, y, {"weight": torch.ones(1, 2)})  # float32 in, cast
        {'weight': tensor([[2., 2.]], dtype=torch.float64)}
    """
    if vectors is None:
        raise TypeError("hvp: vectors is required (a (P,) or (k, P) tensor, or a mapping)")
    op = HessianOperator(
        model,
        loss_fn,
        inputs,
        targets,
        data=data,
        reduction=reduction,
        process_group=process_group,
        dtype=dtype,
        allow_train_mode=allow_train_mode,
        engine=engine,
        chunk_size=chunk_size,
        max_bytes=max_bytes,
    )
    return op.matmat(vectors)


def _check_sizes(chunk_size: int | None, max_bytes: int | None) -> None:
    for name, value in (("chunk_size", chunk_size), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"HessianOperator: {name} must be an int or None, got {value!r}")
        if value is not None and value < 1:
            raise ValueError(f"HessianOperator: {name} must be >= 1 or None, got {value}")


class HessianOperator:
    """The Hessian as a matrix-free linear operator (``H @ v``, ``H @ V``).

    The forward and first backward pass are recorded once at construction (reverse
    engine); every product is then one batched second backward pass. Use it when ``P``
    is too large for :func:`hessian`, e.g. with :func:`scipy.sparse.linalg.eigsh` via
    :meth:`to_scipy`. Nothing is probed at construction: an error of the model or the
    loss is raised there, a loss PyTorch cannot differentiate twice is reported at the
    first product.

    Products run in batches of ``chunk_size`` vectors. By default the batch is sized
    from the free memory of the device (``/proc/meminfo``'s ``MemAvailable``, or
    ``torch.cuda.mem_get_info``; ``max_bytes`` if given), as :func:`hessian` does: the
    result is allocated first, then each batch may plan to use ``MEMORY_FRACTION`` of
    what is left, at most ``DEFAULT_CHUNK`` vectors. What one vector costs is measured
    the first time several vectors come, on the first of them, which runs alone: the
    bytes of every tensor the second backward pass allocates, summed (an upper bound
    of its peak; the activations of the batch, not ``P``, dominate it). A fixed batch
    of 128 vectors of an 8-1000-1000-1 MLP (``P ≈ 10⁶``, ``N = 1024`` samples) once
    asked for one 9.4 GB allocation. The ``"forward"`` engine is not measured (PyTorch
    crashed when forward-mode AD ran under the measuring dispatch mode); it counts
    ``2·P`` numbers per vector.

    Args:
        model: The network (not modified; later changes to it are not seen).
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The batch of inputs (omit with ``data``).
        targets: The batch of targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``),
            instead of ``inputs, targets``: products are the whole data set's
            Hessian's; the batches are read once and kept, and every batched pass runs
            a forward, a backward and a second backward pass per batch (see
            :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss's ``reduction`` otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard of the data, the result is summed over the group and the same on
            every rank (``None``: this process only).
        dtype: Floating dtype of the computation.
        allow_train_mode: As in :func:`hessian`.
        engine: As in :func:`hessian`.
        chunk_size: Products per batched pass in :meth:`matmat` (default: sized from
            the free memory, see above).
        max_bytes: Memory the products may use (default: the available memory of the
            device, read at each :meth:`matmat`).

    Raises:
        ValueError: As :func:`hessian`, or ``chunk_size``/``max_bytes`` below 1.
        TypeError: ``chunk_size``/``max_bytes`` not an int.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> op = HessianOperator(lin, nn.MSELoss(reduction="sum"), torch.eye(2), torch.zeros(2, 1))
        >>> op.shape
        (2, 2)
        >>> op @ torch.ones(2, dtype=torch.float64)
        tensor([2., 2.], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any = None,
        targets: Any = None,
        *,
        data: Iterable[Any] | None = None,
        reduction: str | None = None,
        process_group: Any = None,
        dtype: torch.dtype = torch.float64,
        allow_train_mode: bool = False,
        engine: str = "auto",
        chunk_size: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        _check_sizes(chunk_size, max_bytes)
        check_model(model, allow_train_mode=allow_train_mode)
        source = batch_source(
            "HessianOperator",
            loss_fn,
            inputs,
            targets,
            data,
            reduction=reduction,
            process_group=process_group,
        )
        flat = _flat_loss(model, loss_fn, source, dtype=dtype)
        self._setup(flat, engine, chunk_size, max_bytes)

    def _setup(
        self, flat: FlatLoss, engine: str, chunk_size: int | None, max_bytes: int | None
    ) -> None:
        self.flat = flat
        self._products = _Products([t.fn for t in flat.parts], flat.theta, engine)
        self.engine = self._products.engine
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes

    @classmethod
    def of(
        cls,
        flat: FlatLoss,
        *,
        engine: str = "auto",
        chunk_size: int | None = None,
        max_bytes: int | None = None,
    ) -> HessianOperator:
        """The operator of a :class:`FlatLoss` (e.g. :func:`flat_loss` at a given ``state``).

        Example:
            >>> from torch import nn
            >>> fl = flat_loss(nn.Linear(2, 1, bias=False), nn.MSELoss(reduction="sum"),
            ...                torch.eye(2), torch.zeros(2, 1))
            >>> HessianOperator.of(fl) @ torch.ones(2, dtype=torch.float64)
            tensor([2., 2.], dtype=torch.float64)
        """
        _check_sizes(chunk_size, max_bytes)
        op = cls.__new__(cls)
        op._setup(flat, engine, chunk_size, max_bytes)
        return op

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        return (self.flat.numel, self.flat.numel)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the products."""
        return self.flat.theta.dtype

    @property
    def device(self) -> torch.device:
        """The device of the products."""
        return self.flat.theta.device

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a ``(P,)`` vector."""
        if v.ndim != 1:
            raise ValueError(f"matvec expects a (P,) vector, got shape {tuple(v.shape)}")
        return self.matmat(v)

    def top_eigenvalues(
        self,
        k: int,
        *,
        max_iter: int | None = None,
        tol: float = 1e-10,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The ``k`` algebraically largest eigenvalues, descending (float64 operators).

        Delegates to :func:`torch_embed.spectrum.extreme_eigenvalues` (Lanczos with
        full reorthogonalisation), which also gives the smallest ones.
        """
        # Imported here: torch_embed.spectrum imports this module.
        from torch_embed.spectrum import extreme_eigenvalues

        return extreme_eigenvalues(
            self, k, "largest", max_iter=max_iter, tol=tol, generator=generator
        )

    @overload
    def matmat(self, vectors: Tensor) -> Tensor: ...

    @overload
    def matmat(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def matmat(self, vectors: Vectors) -> Tensor | dict[str, Tensor]:
        """``H v`` for ``(P,)`` or row-stacked ``(k, P)`` vectors; same shape back.

        ``vectors`` may also be a ``{name: tensor}`` mapping (see :func:`hvp`); the
        result is then a dict of the same shapes. Vectors are cast to :attr:`dtype` and
        moved to :attr:`device` one batch at a time.

        Raises:
            ValueError: Vectors of the wrong shape, or a mapping whose names are not the
                trainable parameters'.
            TypeError: A mapping entry that is not a tensor.
            MemoryError: The ``(k, P)`` result alone would not fit (pass fewer vectors).
        """
        if isinstance(vectors, Mapping):
            mat, single = self._flatten(vectors)
            return self._unflatten(self._rows_times_h(mat), single)
        p = self.flat.numel
        single = vectors.ndim == 1
        mat = vectors.reshape(1, -1) if single else vectors
        if mat.ndim != 2 or mat.shape[1] != p:
            raise ValueError(
                f"expected vectors of shape ({p},) or (k, {p}), got {tuple(vectors.shape)}"
            )
        out = self._rows_times_h(mat)
        return out.reshape(p) if single else out

    def _rows_times_h(self, mat: Tensor) -> Tensor:
        """``mat @ H`` for ``(k, P)`` rows, batched as the class docstring says."""
        k, p = mat.shape
        need = k * p * self.flat.theta.element_size()
        budget = _available_bytes(self.device) if self.max_bytes is None else int(self.max_bytes)
        if need > budget:
            raise MemoryError(
                f"the products of {k} vectors of P={p} parameters need {_size(need)} in "
                f"{self.dtype} for the result alone, but only {_size(budget)} are "
                f"available; pass fewer vectors per call (or max_bytes= to override)"
            )
        out = torch.empty(k, p, dtype=self.dtype, device=self.device)

        def rows(start: int, stop: int) -> Tensor:
            return mat[start:stop].to(dtype=self.dtype, device=self.device)

        self._products.into_(out, rows, self.chunk_size, budget - need)
        return self.flat.reduce_(out)

    def _flatten(self, vectors: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
        """``(k, P)`` rows from a ``{name: tensor}`` mapping, and whether it held one vector."""
        names, shapes = self.flat.names, self.flat.shapes
        missing = [n for n in names if n not in vectors]
        unknown = [n for n in vectors if n not in names]
        if missing or unknown:
            raise ValueError(
                f"vectors given as a mapping need one entry per trainable parameter "
                f"{list(names)}; missing {missing}, unknown {unknown}"
            )
        parts: list[Tensor] = []
        single, k = True, 1
        for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
            v = vectors[name]
            if not isinstance(v, Tensor):
                raise TypeError(f"vectors[{name!r}] must be a tensor, got {type(v).__name__}")
            if i == 0:
                single = v.ndim == len(shape)
                k = 1 if single or v.ndim == 0 else int(v.shape[0])
            want = tuple(shape) if single else (k, *shape)
            if tuple(v.shape) != want:
                raise ValueError(
                    f"vectors[{name!r}] has shape {tuple(v.shape)}, expected {want} (the "
                    f"parameter's shape{'' if single else ', after a leading k'})"
                )
            parts.append(v.to(dtype=self.dtype, device=self.device).reshape(k, -1))
        return torch.cat(parts, dim=1), single

    def _unflatten(self, out: Tensor, single: bool) -> dict[str, Tensor]:
        """The inverse of :meth:`_flatten`."""
        sizes = [math.prod(s) for s in self.flat.shapes]
        cols = torch.split(out, sizes, dim=1)
        return {
            n: c.reshape(s) if single else c.reshape(-1, *s)
            for n, c, s in zip(self.flat.names, cols, self.flat.shapes, strict=True)
        }

    def __matmul__(self, other: Tensor) -> Tensor:
        """``H @ v`` (``(P,)``) or ``H @ M`` (``(P, k)``, columns are vectors)."""
        if other.ndim == 1:
            return self.matvec(other)
        return self.matmat(other.T).T

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` in float64 (needs scipy)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator  # type: ignore[import-untyped]

        def mv(x: Any) -> Any:
            v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).cpu().to(torch.float64).numpy()

        def mm(x: Any) -> Any:
            m = torch.as_tensor(np.asarray(x, dtype=np.float64))
            return (self @ m).cpu().to(torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)
