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

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from torch_embed._sequential import elementwise_info

__all__ = [
    "FlatLoss",
    "HessianOperator",
    "check_model",
    "dense_hessian",
    "flat_loss",
    "gradient",
    "hessian",
    "hvp",
]

LossFn = Callable[[Any, Any], Tensor]

#: Default number of Hessian-vector products per batched pass.
DEFAULT_CHUNK = 128
#: Hessian engines: "auto", "blocks" (dense only), "reverse", "forward".
ENGINES = ("auto", "blocks", "reverse", "forward")

_TRAIN_MODE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class FlatLoss:
    """The loss as a function of one flat parameter vector.

    Attributes:
        fn: Maps a flat parameter vector (``theta``'s shape, dtype and device) to the
            scalar loss.
        theta: The model's current trainable parameters, flattened, in ``dtype``.
        names: Parameter names in ``named_parameters()`` order (trainable ones only).
        shapes: Their shapes.
        param_fn: The same loss as a function of the sequence of parameter tensors
            (``names`` order and ``shapes``); used for the block-wise Hessian.
    """

    fn: Callable[[Tensor], Tensor]
    theta: Tensor
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    param_fn: Callable[[Sequence[Tensor]], Tensor] | None = None

    @property
    def numel(self) -> int:
        """The number of trainable parameters ``P``."""
        return int(self.theta.numel())

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
    inputs: Tensor,
    targets: Any,
    *,
    dtype: torch.dtype = torch.float64,
) -> FlatLoss:
    """Express ``loss_fn(model(inputs), targets)`` as a function of a flat vector.

    The trainable parameters (``requires_grad``) are copied into one flat vector in
    ``dtype``; frozen parameters and floating buffers are passed, cast to ``dtype``, as
    constants (BatchNorm running statistics keep their values; in train mode each
    evaluation updates fresh copies, never the model's own). Floating ``inputs`` and
    ``targets`` are cast to ``dtype``; integer targets (class indices) are kept.

    Args:
        model: The network (not modified).
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The batch of inputs.
        targets: The batch of targets.
        dtype: The floating dtype of the computation.

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
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    names = tuple(n for n, _ in named)
    shapes = tuple(p.shape for _, p in named)
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1).to(dtype) for _, p in named])
    frozen = {
        n: p.detach().to(dtype) if p.is_floating_point() else p.detach()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    buffers = {
        n: b.detach().to(dtype) if b.is_floating_point() else b.detach()
        for n, b in model.named_buffers()
    }
    x = inputs.to(dtype) if isinstance(inputs, Tensor) and inputs.is_floating_point() else inputs
    y = (
        targets.to(dtype)
        if isinstance(targets, Tensor) and targets.is_floating_point()
        else targets
    )

    def param_fn(tensors: Sequence[Tensor]) -> Tensor:
        state: dict[str, Tensor] = dict(zip(names, tensors, strict=True))
        state.update(frozen)
        # fresh buffer copies: a train-mode BatchNorm updates them in place
        state.update({n: b.clone() for n, b in buffers.items()})
        out = loss_fn(functional_call(model, state, (x,)), y)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out.reshape(())

    def fn(vec: Tensor) -> Tensor:
        chunks = torch.split(vec, sizes)
        return param_fn([c.view(s) for c, s in zip(chunks, shapes, strict=True)])

    return FlatLoss(fn, theta, names, shapes, param_fn)


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Any,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The flat gradient of the loss in ``dtype`` (``named_parameters()`` order).

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(1, 1)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(2.0), lin.bias.fill_(0.0)
        >>> gradient(lin, nn.MSELoss(), torch.ones(1, 1), torch.zeros(1, 1))  # 2·(2x)·x
        tensor([4., 4.], dtype=torch.float64)
    """
    fl = flat_loss(model, loss_fn, inputs, targets, dtype=dtype)
    out: Tensor = grad(fl.fn)(fl.theta)
    return out.detach()


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


def _select_hvp(fn: Callable[[Tensor], Tensor], theta: Tensor, engine: str) -> tuple[HVP, str]:
    """The requested engine ("auto" = reverse, the fastest measured), checked by a probe."""
    if engine not in ("auto", "reverse", "forward"):
        raise ValueError(f"engine must be 'auto', 'reverse' or 'forward', got {engine!r}")
    _check_forward(fn, theta)
    choice = "forward" if engine == "forward" else "reverse"
    try:
        # a train-mode Dropout draws its one mask here; the caller's RNG is left as it was
        with torch.random.fork_rng(devices=_rng_devices(theta)):
            hv = _make_hvp(fn, theta, choice)
            probe = torch.zeros(1, theta.numel(), dtype=theta.dtype, device=theta.device)
            probe[0, 0] = 1.0
            hv(probe)
    except RuntimeError as err:
        raise ValueError(
            f"PyTorch cannot compute Hessian-vector products of this loss ({choice} mode): "
            f"{err}. Every module and the loss must be twice differentiable in PyTorch"
            + (
                "; forward-over-reverse fails for F.mse_loss/nn.MSELoss, use engine='auto'"
                if choice == "forward"
                else ""
            )
        ) from err
    return hv, choice


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**62


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
    if engine == "auto":
        engine = "blocks" if fl is not None and fl.param_fn is not None else "reverse"
    if engine == "blocks" and (fl is None or fl.param_fn is None):
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
        assert fl is not None and fl.param_fn is not None  # checked above
        _check_forward(flat_fn, theta)
        try:
            _fill_blockwise_(out, fl.param_fn, theta, fl.shapes, chunk)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            raise ValueError(
                f"PyTorch cannot compute second derivatives of this loss: {err}. Every "
                f"module and the loss must be twice differentiable in PyTorch"
            ) from err
        return out
    hv, _engine = _select_hvp(flat_fn, theta, engine)
    for start in range(0, p, chunk):
        stop = min(start + chunk, p)
        basis = torch.zeros(stop - start, p, dtype=dtype, device=device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        out[start:stop] = hv(basis).detach()
        del basis
    _symmetrize_(out, chunk)
    return out


def _fill_blockwise_(
    out: Tensor,
    param_fn: Callable[[Sequence[Tensor]], Tensor],
    theta: Tensor,
    shapes: Sequence[torch.Size],
    chunk: int,
) -> None:
    """Fill ``out`` with the Hessian one parameter tensor (block row) at a time.

    For block ``l`` the gradient ``∂R/∂θ_l`` is recorded as a function of the blocks
    ``l, l+1, ...`` only (earlier blocks are constants, so autograd prunes the graph),
    and its rows are batched vector-Jacobian products (``vmap`` over ``vjp``, the
    forward and first backward pass recorded once per block). The blocks left of the
    diagonal are copied from their transposes (``H_kl = H_lkᵀ``), so the result is
    exactly symmetric. The random-number state is reset before each block, so a
    train-mode Dropout draws the same mask for every block.
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
        for l in range(len(leaves)):
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, theta.device)
            _fill_block_row_(out, param_fn, leaves, l, offs, chunk)


def _fill_block_row_(
    out: Tensor,
    param_fn: Callable[[Sequence[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    l: int,
    offs: Sequence[int],
    chunk: int,
) -> None:
    """Rows of parameter block ``l``, against blocks ``l, l+1, ...``, and their mirror."""
    lo, hi = offs[l], offs[l + 1]
    head = list(leaves[:l])

    def block_grad(*later: Tensor) -> Tensor:
        def loss_of_block(p: Tensor) -> Tensor:
            return param_fn([*head, p, *later[1:]])

        g: Tensor = grad(loss_of_block)(later[0])
        return g

    vjp_fn = vjp(block_grad, *leaves[l:])[1]
    shape = leaves[l].shape
    for s in range(0, hi - lo, chunk):
        e = min(s + chunk, hi - lo)
        k = e - s
        basis = torch.zeros(k, hi - lo, dtype=out.dtype, device=out.device)
        basis[torch.arange(k), torch.arange(s, e)] = 1.0
        rows = vmap(vjp_fn)(basis.view(k, *shape))
        for j, r in enumerate(rows, start=l):
            blk = out[lo + s : lo + e, offs[j] : offs[j + 1]]
            blk.copy_(r.detach().reshape(k, -1))
            if j != l:
                out[offs[j] : offs[j + 1], lo + s : lo + e] = blk.T
        del rows, basis
    _symmetrize_(out[lo:hi, lo:hi], chunk)


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Any,
    *,
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
        inputs: The batch of inputs.
        targets: The batch of targets.
        dtype: Floating dtype of the computation and of the result.
        chunk_size: Hessian-vector products per batched pass (default
            ``min(P, DEFAULT_CHUNK)``).
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
    fl = flat_loss(model, loss_fn, inputs, targets, dtype=dtype)
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


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Any,
    vectors: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    allow_train_mode: bool = False,
    engine: str = "auto",
) -> Tensor:
    """Hessian-vector products ``H v`` without forming ``H``.

    Args:
        model: The network (not modified).
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The batch of inputs.
        targets: The batch of targets.
        vectors: ``(P,)`` or ``(k, P)`` (rows are vectors), in ``named_parameters()``
            order.
        dtype: Floating dtype of the computation and of the result.
        allow_train_mode: As in :func:`hessian`.
        engine: As in :func:`hessian`.

    Returns:
        ``H v`` with the shape of ``vectors``, in ``dtype``.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> x = torch.eye(2)
        >>> hvp(lin, nn.MSELoss(reduction="sum"), x, torch.zeros(2, 1), torch.tensor([1.0, 0.0]))
        tensor([2., 0.], dtype=torch.float64)
    """
    return HessianOperator(
        model,
        loss_fn,
        inputs,
        targets,
        dtype=dtype,
        allow_train_mode=allow_train_mode,
        engine=engine,
    ).matmat(vectors)


class HessianOperator:
    """The Hessian as a matrix-free linear operator (``H @ v``, ``H @ V``).

    The forward and first backward pass are recorded once at construction (reverse
    engine); every product is then one batched second backward pass. Use it when ``P``
    is too large for :func:`hessian`, e.g. with :func:`scipy.sparse.linalg.eigsh` via
    :meth:`to_scipy`.

    Args:
        model: The network (not modified; later changes to it are not seen).
        loss_fn: Any callable ``loss_fn(output, target) -> scalar``.
        inputs: The batch of inputs.
        targets: The batch of targets.
        dtype: Floating dtype of the computation.
        allow_train_mode: As in :func:`hessian`.
        engine: As in :func:`hessian`.
        chunk_size: Products per batched pass in :meth:`matmat` (default 256).

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
        inputs: Tensor,
        targets: Any,
        *,
        dtype: torch.dtype = torch.float64,
        allow_train_mode: bool = False,
        engine: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        check_model(model, allow_train_mode=allow_train_mode)
        self.flat = flat_loss(model, loss_fn, inputs, targets, dtype=dtype)
        self._hv, self.engine = _select_hvp(self.flat.fn, self.flat.theta, engine)
        self.chunk_size = _default_chunk(self.flat.numel) if chunk_size is None else chunk_size

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

    def matmat(self, vectors: Tensor) -> Tensor:
        """``H v`` for ``(P,)`` or row-stacked ``(k, P)`` vectors; same shape back."""
        p = self.flat.numel
        single = vectors.ndim == 1
        mat = vectors.reshape(1, -1) if single else vectors
        if mat.ndim != 2 or mat.shape[1] != p:
            raise ValueError(
                f"expected vectors of shape ({p},) or (k, {p}), got {tuple(vectors.shape)}"
            )
        mat = mat.to(dtype=self.dtype, device=self.device)
        rows = [
            self._hv(mat[i : i + self.chunk_size]).detach()
            for i in range(0, mat.shape[0], self.chunk_size)
        ]
        out = torch.cat(rows) if rows else mat.clone()
        return out.reshape(p) if single else out

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
