"""The one gather engine: narrow tensors to wide ones, axis by axis.

Both embeddings map tensors here: :class:`torch_embed.Embedding` (an MLP's hidden
layers) and :class:`~torch_embed.graph.embedding.GroupEmbedding` (a traced model's width
groups) describe every tensor axis that changes as an :class:`AxisMap` (wide entry ``j``
reads narrow entry ``source[j]``, times a factor) and call :func:`map_tensors`, which
gathers each tensor once into its final allocation, scales it with the arithmetic of
:func:`_put` (each product rounded once to the tensor's dtype) and writes what an
embedding adds beyond the gather: Net2Net's symmetric noise, null units' fills (biases
``β``, explicit fan-in rows, random initialisations, a LayerNorm's mean), fan-out
offsets, and in gradient mode the ``σ(β)``-scaled bias gradient of null fan-out columns.

Everything is decided on the CPU maps: :func:`map_tensors` reads no value of the
tensors it maps to the host (no device sync; "meta" tensors work), and moves each
distinct index map or factor to the tensors' device once per call (:class:`_Moved`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["AxisMap", "map_tensors"]

_CPU = torch.device("cpu")
_ROLES = ("copy", "split")
_WHATS = ("apply", "grad", "second")
_INITS = ("", "normal", "uniform")
# elements per float64 chunk when a lower-precision tensor is scaled by float64
# coefficients on CPU (2 MiB: in cache; 1 << 18 to 1 << 20 were within 10% of each
# other on a 2-core EPYC, 8192 x 8192 float32)
_CHUNK_MIXED = 1 << 18
# elements of a gather's temporary block (256 KiB of float32): small enough to be reused
# from the allocator's cache instead of paged in afresh, large enough that the number
# of ops stays low. On bench/widen_graph.py's ResNet-50-shaped model, a first apply
# touched the fewest fresh pages with 1 << 16 among 1 << 16, 18, 20, 22 and 26 (about
# 55k page faults against 58k to 64k; the apply's CPU time within noise of each other)
_TEMP = 1 << 16


def _identity_prefix(index: Tensor) -> int:
    """Length of the longest prefix of ``index`` equal to ``0, 1, 2, ...``."""
    ok = index == torch.arange(index.numel(), device=index.device)
    return int(ok.cumprod(0).sum()) if ok.numel() else 0


def _in_dtype(factor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``factor`` (float64, CPU) on ``device``, in ``dtype`` when that is exact.

    A product of two ``dtype`` numbers is rounded once, like the float64 product
    rounded to ``dtype``; otherwise the float64 factor is kept (see :func:`_put`).
    """
    low = factor.to(dtype)
    keep = low if bool((low.to(factor.dtype) == factor).all()) else factor
    return keep.to(device)


def _put(dst: Tensor, src: Tensor, factor: Tensor | None) -> None:
    """``dst = src * factor``, computed in the wider dtype and rounded once.

    ``dst`` and ``src`` are ``(rows, cols)``; ``factor`` is ``(cols,)``, ``(rows, 1)`` or
    ``(rows, cols)``. A float64 factor with a lower-precision ``dst`` on CPU goes through
    a small float64 scratch, chunk by chunk: three vectorized passes that stay in cache
    are faster than one mixed-dtype multiply (which casts element by element), and give
    the same bits. End to end, ``python bench/widen.py --threads 1,0 --alpha
    0.3333333333333333`` (bench/RESULTS.md) went from 5.2x / 5.8x of the allocate+copy
    bound with the mixed-dtype multiply (at commit 139039f) to 2.08x / 1.98x with the
    scratch (one / two threads).
    """
    if factor is None:
        dst.copy_(src)
    elif factor.dtype == dst.dtype or dst.device.type != "cpu":
        torch.mul(src, factor, out=dst)
    else:
        rows, cols = dst.shape
        step = max(1, _CHUNK_MIXED // max(cols, 1))
        buf = torch.empty(min(step, rows), cols, dtype=factor.dtype, device=dst.device)
        per_row = factor.dim() == 2 and factor.shape[0] == rows
        for i in range(0, rows, step):
            j = min(i + step, rows)
            wide = buf[: j - i]
            wide.copy_(src[i:j])
            wide.mul_(factor[i:j] if per_row else factor)
            dst[i:j].copy_(wide)


class _Moved:
    """CPU-side map tensors on the state's devices, each distinct one moved once per call.

    A blocking host-to-device copy waits for the device, and one map serves several
    tensors (a layer's weight rows, bias and BatchNorm entries, the next weight's
    columns; on a traced model every tensor of a width group): :func:`map_tensors`
    moves its index maps and factors through one of these per call, which keys them by
    value (host work only).
    """

    def __init__(self) -> None:
        self._done: dict[tuple[torch.device, torch.dtype, tuple[int, ...], bytes], Tensor] = {}

    def __call__(self, t: Tensor, device: torch.device) -> Tensor:
        """``t`` (a CPU tensor) on ``device``."""
        if t.device == device:
            return t
        value = t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        key = (device, t.dtype, tuple(t.shape), value)
        if key not in self._done:
            self._done[key] = t.to(device)
        return self._done[key]


def _where(a: AxisMap) -> str:
    return f"AxisMap of {a.tensor!r} axis {a.axis}"


def _check_vector(a: AxisMap, name: str, value: Tensor | None) -> None:
    wide = a.source.numel()
    if value is None:
        return
    if value.dtype != torch.float64 or tuple(value.shape) != (wide,):
        raise ValueError(
            f"{_where(a)}: {name} must be a float64 tensor of shape ({wide},), got "
            f"{value.dtype} {tuple(value.shape)}"
        )


def _check_matrix(a: AxisMap, name: str, value: Tensor, role: str, axis: int) -> None:
    wide = a.source.numel()
    if a.role != role or a.axis != axis or a.groups != 1:
        raise ValueError(
            f"{_where(a)}: {name} (a matrix) is for axis {axis} of a 2-D weight in the role "
            f"{role!r}, not a grouped in-axis; got role {a.role!r}, groups {a.groups}"
        )
    shape = tuple(value.shape)
    ok = shape[0] == wide if role == "copy" else shape[-1] == wide
    if value.dtype != torch.float64 or value.dim() != 2 or not ok:
        want = f"({wide}, wide columns)" if role == "copy" else f"(wide rows, {wide})"
        raise ValueError(
            f"{_where(a)}: {name} must be a float64 tensor of shape {want}, got "
            f"{value.dtype} {shape}"
        )


@dataclass(frozen=True, eq=False)
class AxisMap:
    """How one tensor axis maps: wide entry ``j`` reads narrow entry ``source[j]``.

    Construction checks the fields' types and shapes (``ValueError`` naming the tensor
    and the axis); what they mean for the tensor's other axes is the caller's to keep
    consistent.

    Attributes:
        tensor: The parameter or buffer FQN.
        axis: The axis of that tensor.
        role: ``"copy"`` (producers and per-channel tensors) or ``"split"`` (consumers).
        source: ``int64`` ``(wide,)``: the narrow entry, ``-1`` for a null unit.
        coef: ``float64`` ``(wide,)``: the consumer coefficient of each wide entry (1 on
            entries of groups that do not grow or not split, 0 on null units). A
            consumer (``"split"``) on axis 1 of a 2-D weight may instead hold a matrix
            ``(wide rows, wide)``: one coefficient per wide connection (a general
            compatible embedding, :class:`~torch_embed.LayerMap`), applied once the
            tensor's rows are mapped.
        groups: ``> 1`` for the in-axis of a grouped convolution (one group's share).
        gain: ``float64`` ``(wide,)`` or ``None`` (all 1): a reparametrisation factor
            ``g`` per wide entry: copies are multiplied by ``g``, consumers by ``1/g``
            (an attention head_dim's temperature fix, GROWTH.md §2); gradients map
            by the inverse factors, second moments by their squares.
        mean: ``apply`` sets the null entries to the mean of the narrow entries along
            the axis (a LayerNorm's mean-fill, :mod:`torch_embed.graph.fill`).
        null_fill: ``float64`` ``(wide,)`` or ``None``: what ``apply`` writes at null
            entries (``None``: 0), e.g. the null units' bias ``β``.
        null_init: ``""`` (none), ``"normal"`` (``init_scale·N(0, 1)``) or
            ``"uniform"`` (``U(-b, b)``, ``b = init_scale/sqrt(fan_in)``, ``fan_in`` the
            wide tensor's entries per index of axis 0, as ``nn.Linear`` and ``nn.Conv``
            initialise; ``U(-init_scale, init_scale)`` for a 1-d tensor, RandomPad's
            biases): random values :meth:`GroupEmbedding.apply` writes at the null
            entries of a weight (a tensor of 2 or more axes, whole axis only; a grouped
            in-axis: the rows of each null channel's group) or, uniform only, a bias.
        init_scale: The scale of ``null_init``.
        beta: ``float64`` ``(wide,)`` or ``None``: on a copied axis, the error scaling
            ``β`` of each wide entry: gradients are multiplied by ``β``, second moments
            by ``β²``. ``None``: ``β = coef`` (the splitting form); an MLP with matrix
            coefficients has other scalings (:meth:`torch_embed.Embedding.map_gradients`).
        offset: ``float64`` ``(wide rows, wide)`` or ``None``: on a consumer's axis 1 of
            a 2-D weight, added by ``apply`` once the whole tensor is mapped
            (:attr:`torch_embed.LayerMap.fan_out_offset`).
        null_rows: ``float64`` ``(wide, wide columns)`` or ``None``: on axis 0 of a 2-D
            weight, the rows ``apply`` writes at null entries once the whole tensor is
            mapped (explicit fan-in rows, :attr:`torch_embed.LayerMap.null_fan_in`);
            ``None``: the null rows are zero (or ``null_fill``/``null_init``).
        buffer: Statistics (a BatchNorm's running mean and variance): mapped as by
            ``apply`` (copied, with ``null_fill``) for gradients and second moments too.
        shift: A finite float ``c``: the tensor stores ``γ − c``, not the ``γ`` this map
            is written for (a Gemma RMSNorm computes ``x·(1 + w)``: ``c = 1``). ``apply``
            maps ``t + c`` in float64 (``gain``, ``null_fill``: in ``γ``'s terms) and
            subtracts ``c``, rounding once to the tensor's dtype: ``w' = g·(1 + w) − 1``,
            and a null entry with ``γ = 0`` stores ``−c``. Gradients and second moments
            map as for ``γ`` (``∂L/∂w = ∂L/∂γ``). Only on a copied (``"copy"``) axis, not
            with ``mean``, ``null_init``, ``offset``, ``null_rows`` or ``buffer``; every
            axis of one tensor has the same ``shift``.
    """

    tensor: str
    axis: int
    role: str
    source: Tensor
    coef: Tensor
    groups: int = 1
    gain: Tensor | None = None
    mean: bool = False
    null_fill: Tensor | None = None
    null_init: str = ""
    init_scale: float = 0.0
    beta: Tensor | None = None
    offset: Tensor | None = None
    null_rows: Tensor | None = None
    buffer: bool = False
    shift: float = 0.0
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"{_where(self)}: role must be one of {_ROLES}, got {self.role!r}")
        if self.source.dtype != torch.int64 or self.source.dim() != 1:
            raise ValueError(f"{_where(self)}: source must be a 1-D int64 tensor")
        wide = self.source.numel()
        if self.groups < 1 or wide % self.groups:
            raise ValueError(
                f"{_where(self)}: groups must be a positive divisor of the wide size {wide}, "
                f"got {self.groups}"
            )
        if self.null_init not in _INITS:
            raise ValueError(
                f"{_where(self)}: null_init must be one of {_INITS}, got {self.null_init!r}"
            )
        if self.coef.dim() == 2:
            _check_matrix(self, "coef", self.coef, "split", 1)
        else:
            _check_vector(self, "coef", self.coef)
        for name in ("gain", "null_fill", "beta"):
            _check_vector(self, name, getattr(self, name))
        if self.beta is not None and self.role != "copy":
            raise ValueError(f"{_where(self)}: beta scales copied axes (role 'copy') only")
        if self.offset is not None:
            _check_matrix(self, "offset", self.offset, "split", 1)
        if self.null_rows is not None:
            _check_matrix(self, "null_rows", self.null_rows, "copy", 0)
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)):
            kind = type(self.shift).__name__
            raise TypeError(f"{_where(self)}: shift must be a float, got {kind}")
        if not math.isfinite(self.shift):
            raise ValueError(f"{_where(self)}: shift must be finite, got {self.shift}")
        if self.shift:
            clash = [
                name
                for name, on in (
                    ("role 'split'", self.role != "copy"),
                    ("mean", self.mean),
                    ("null_init", bool(self.null_init)),
                    ("offset", self.offset is not None),
                    ("null_rows", self.null_rows is not None),
                    ("buffer", self.buffer),
                )
                if on
            ]
            if clash:
                raise ValueError(
                    f"{_where(self)}: shift (a stored γ − {self.shift:g}) is for a copied "
                    f"per-channel scale only, not with {', '.join(clash)}"
                )

    def _index(self) -> tuple[int, Tensor]:
        """``(keep, tail)``: the identity prefix's length and the other sources (cached).

        Decided on the CPU map, so that ``apply`` reads no device data to the host (no
        sync; "meta" tensors work); ``tail`` moves to the device through the call's
        :class:`_Moved`.
        """
        if "index" not in self._cache:
            keep = _identity_prefix(self.source)
            self._cache["index"] = (keep, self.source[keep:].clamp(min=0))
        return self._cache["index"]  # type: ignore[no-any-return]

    def _factor(self, what: str, dtype: torch.dtype) -> Tensor | None:
        """:meth:`scale` in ``dtype`` when exact (CPU, cached); ``None``: all 1."""
        key = ("factor", what, dtype)
        if key not in self._cache:
            s = self.scale(what)
            self._cache[key] = None if bool((s == 1).all()) else _in_dtype(s, dtype, _CPU)
        return self._cache[key]  # type: ignore[no-any-return]

    def _grouped(self, what: str, dtype: torch.dtype, share: int) -> tuple[Tensor, Tensor]:
        """A grouped in-axis's ``(g, wide share)`` in-segment sources and its factors.

        ``share`` is the narrow tensor's in-axis size (CPU, cached).
        """
        key = ("grouped", what, dtype, share)
        if key not in self._cache:
            g = self.groups
            src = self.source.view(g, -1)
            local = torch.where(src < 0, 0, src - torch.arange(g).view(g, 1) * share)
            scale = _in_dtype(self.scale(what), dtype, _CPU)  # rounded once, as below
            self._cache[key] = (local, scale)
        return self._cache[key]  # type: ignore[no-any-return]

    def _null(self) -> Tensor:
        """The null entries' positions (CPU, cached)."""
        if "null" not in self._cache:
            self._cache["null"] = (self.source < 0).nonzero().flatten()
        return self._cache["null"]  # type: ignore[no-any-return]

    def _extras(self, what: str, noise: float) -> bool:
        """Whether ``apply`` writes more than the scaled gather right after this axis.

        (``offset`` and ``null_rows`` are written once the whole tensor is mapped.)
        """
        return what == "apply" and (
            self.mean
            or bool(noise and self.role == "split")
            or self.null_fill is not None
            or bool(self.null_init)
        )

    def scale(self, what: str) -> Tensor:
        """The factor of each wide entry for ``what`` in apply/grad/second.

        ``(wide,)``, or ``(wide rows, wide)`` for matrix coefficients in ``apply``.
        """
        null = self.source < 0
        ones = torch.ones(self.source.numel(), dtype=torch.float64)
        copy = self.role == "copy"
        beta = self.beta if self.beta is not None else self.coef
        if what == "apply":
            s = ones if copy else self.coef
        elif what == "grad":
            s = beta if copy else ones
        else:
            s = beta * beta if copy else ones
        if self.gain is not None:
            power = {"apply": 1, "grad": -1}.get(what, -2)
            s = s * self.gain.pow(power if copy else -power)
        return torch.where(null, 0.0, s)


def map_tensors(
    axes: tuple[AxisMap, ...],
    tensors: Mapping[str, Tensor],
    what: str,
    *,
    noise: float = 0.0,
    seed: int = 0,
    null_values: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The wide tensors of narrow ``tensors`` under ``axes`` (others passed through).

    Per tensor, its plain axes are gathered in one pass into one allocation and scaled
    axis by axis (each product rounded once); an axis with more to write (noise, null
    fills, a mean-fill) ends a pass, so that the following axes copy what it wrote;
    a grouped in-axis comes last; ``offset`` and ``null_rows`` are written once the
    tensor is complete.

    Args:
        axes: Every axis that changes, in the order their tensors are mapped.
        tensors: ``{FQN: tensor}``: parameters (``what="apply"``), gradients or first
            moments (``"grad"``), or second moments (``"second"``).
        what: ``"apply"``, ``"grad"`` or ``"second"``.
        noise: Net2Net's symmetric noise (``apply`` only): the copies of one narrow unit
            are paired in index order, and the columns of each pair get ``+N`` and
            ``-N``, ``N = noise · column · ε``, ``ε ~ N(0, 1)`` per entry, drawn on the
            host from ``seed`` and the tensor's name and axis (repeatable); an odd copy
            stays noise-free.
        seed: The seed of that noise and of ``null_init``'s draws.
        null_values: ``{weight FQN: float64 (wide columns,)}``: the constant ``σ(β)``
            each null unit feeds that weight (0 elsewhere); for gradients and second
            moments its null columns get ``σ(β)`` (``σ(β)²``) times the mapped gradient
            (second moment) of the bias next to it, when that is among ``tensors``.

    Returns:
        A new dictionary; the input tensors are not modified.

    Example:
        >>> w = torch.arange(6.0).view(2, 3)
        >>> cols = AxisMap("w", 1, "split", torch.tensor([0, 1, 2, 0]),
        ...                torch.tensor([0.5, 1.0, 1.0, 0.5], dtype=torch.float64))
        >>> map_tensors((cols,), {"w": w}, "apply")["w"].tolist()
        [[0.0, 1.0, 2.0, 0.0], [1.5, 4.0, 5.0, 1.5]]
        >>> map_tensors((cols,), {"w": w}, "grad")["w"].tolist()
        [[0.0, 1.0, 2.0, 0.0], [3.0, 4.0, 5.0, 3.0]]
    """
    if what not in _WHATS:
        raise ValueError(f"what must be one of {_WHATS}, got {what!r}")
    out = dict(tensors)
    moved = _Moved()
    by_tensor: dict[str, list[AxisMap]] = {}
    for a in axes:
        by_tensor.setdefault(a.tensor, []).append(a)
    for name, group in by_tensor.items():
        if name not in tensors:
            continue
        how = "apply" if all(a.buffer for a in group) else what
        t = tensors[name]
        shifts = {a.shift for a in group}
        if len(shifts) > 1:
            raise ValueError(
                f"AxisMaps of {name!r} give different shifts {sorted(shifts)}: one tensor "
                f"stores one γ − shift"
            )
        shift = shifts.pop() if how == "apply" else 0.0
        dtype = t.dtype
        if shift:  # map γ = t + shift in float64, subtract the shift, round once
            t = t.to(torch.float64) + shift
        # plain axes first: a grouped in-axis reads the (new) output segments
        todo = sorted(group, key=lambda a: a.groups > 1)
        while todo:
            # plain axes up to one with more to write are gathered in one pass into
            # one allocation: the same bits as one gather per axis (gathers copy;
            # each axis's factor is then applied in turn, rounded as before)
            run = [todo.pop(0)]
            while (
                run[-1].groups == 1
                and not run[-1]._extras(how, noise)
                and todo
                and todo[0].groups == 1
                and not todo[0].mean
            ):
                run.append(todo.pop(0))
            a = run[-1]
            narrow = t
            t = _gather(t, run, how, moved)
            if how == "apply" and a.mean:
                null = moved(a._null(), t.device)
                fill = narrow.mean(a.axis, keepdim=True).expand_as(t.index_select(a.axis, null))
                t = t.index_copy(a.axis, null, fill.contiguous())
            if how == "apply" and noise and a.role == "split":
                t = _add_noise(t, a, noise, seed, moved)
            if how == "apply" and (a.null_fill is not None or a.null_init):
                t = _fill_null(t, a, seed, moved)
        if how == "apply":
            for a in group:
                if a.offset is not None:
                    # in place with a float64 offset: computed in float64, rounded once
                    t.add_(moved(a.offset, t.device))
            for a in group:
                if a.null_rows is not None and a._null().numel():
                    null = a._null()
                    rows = moved(a.null_rows[null], t.device).to(t.dtype)
                    t.index_copy_(0, moved(null, t.device), rows)
        if shift:
            t = (t - shift).to(dtype)
        out[name] = t
    if what != "apply":
        for name, value in (null_values or {}).items():
            if name in out and (bias := f"{name.rpartition('.')[0]}.bias") in out:
                out[name] = _null_columns(out[name], out[bias], value, what, moved)
    return out


def _add_noise(t: Tensor, a: AxisMap, noise: float, seed: int, moved: _Moved) -> Tensor:
    """Add ``±noise · column · ε`` to pairs of consumer columns that read copies.

    The pairs and ``ε`` (one draw per pair, in pair order, from a CPU generator: the
    same numbers on every device) are made on the host; the columns are updated in
    one batch on ``t``'s device (the pairs are disjoint, so the bits are those of one
    update per pair).
    """
    order = torch.argsort(a.source, stable=True)
    src = a.source[order]
    firsts, counts = torch.unique_consecutive(src, return_counts=True)
    gen = torch.Generator().manual_seed(
        (seed ^ zlib.crc32(f"{a.tensor}:{a.axis}".encode())) % 2**63
    )
    start = 0
    pairs: list[tuple[int, int]] = []
    for e, c in zip(firsts.tolist(), counts.tolist()):
        if e >= 0:
            idx = order[start : start + c].tolist()
            pairs.extend((idx[k], idx[k + 1]) for k in range(0, c - 1, 2))
        start += c
    if not pairs:
        return t
    first = torch.tensor([j for j, _ in pairs])
    second = torch.tensor([k for _, k in pairs])
    if a.groups == 1:
        view = t.movedim(a.axis, 0)  # column j is view[j]
        at_j: tuple[Tensor | slice, ...] = (moved(first, t.device),)
        at_k: tuple[Tensor | slice, ...] = (moved(second, t.device),)
    else:  # a grouped conv's in-axis: column j is w[j // share, :, j % share]
        share = a.source.numel() // a.groups
        view = t.view(a.groups, t.shape[0] // a.groups, share, *t.shape[2:])
        full = slice(None)
        at_j = (moved(first // share, t.device), full, moved(first % share, t.device))
        at_k = (moved(second // share, t.device), full, moved(second % share, t.device))
    cols = view[at_j]  # (pairs, *column shape)
    eps = torch.stack(
        [torch.randn(cols.shape[1:], generator=gen, dtype=torch.float64) for _ in pairs]
    )
    offset = (noise * cols.to(torch.float64) * eps.to(t.device)).to(t.dtype)
    view[at_j] = cols + offset
    view[at_k] = view[at_k] - offset
    return t


def _null_columns(w: Tensor, bias: Tensor, value: Tensor, what: str, moved: _Moved) -> Tensor:
    """A reader's null columns: ``σ(β)`` times its bias gradient.

    ``σ(β)²`` times its second moment, as :meth:`torch_embed.Embedding.map_gradients`
    maps them for MLPs. A conv reader (``(out, in/g, *kernel)``, ``g`` groups, read off
    ``value``'s wide size) gets it at every tap (unpadded: every tap reads the constant
    at every output position), in the rows of the null channel's group only.
    """
    cols = value.nonzero().flatten()
    v = value[cols] if what == "grad" else value[cols] * value[cols]
    g = value.numel() // w.shape[1]
    b = bias.to(torch.float64).view(g, -1)  # the biases of each group's output channels
    q, c = moved(cols // w.shape[1], w.device), moved(cols % w.shape[1], w.device)
    fill = b[q] * moved(v, w.device)[:, None]  # (null columns, out/g), then every tap
    fill = fill.view(*fill.shape, *[1] * (w.dim() - 2)).to(w.dtype)
    w = w.clone(memory_format=torch.contiguous_format)
    view = w.view(g, -1, *w.shape[1:])
    view[q, :, c] = fill.expand(*fill.shape[:2], *w.shape[2:])
    return w


def _fill_null(t: Tensor, a: AxisMap, seed: int, moved: _Moved) -> Tensor:
    """Write ``a.null_fill`` or random ``a.null_init`` values at the null entries."""
    null = a._null()
    if not null.numel():
        return t
    idx = moved(null, t.device)
    if a.null_fill is not None and a.groups == 1:
        fill = moved(a.null_fill[null], t.device).to(t.dtype)
        shape = [1] * t.dim()
        shape[a.axis] = -1
        size = list(t.shape)
        size[a.axis] = null.numel()
        t.index_copy_(a.axis, idx, fill.view(shape).expand(size).contiguous())
    if a.null_init and (t.dim() >= 2 or a.null_init == "uniform"):  # 1-d: RandomPad's bias
        gen = torch.Generator().manual_seed(
            (seed ^ zlib.crc32(f"{a.tensor}:{a.axis}:init".encode())) % 2**63
        )
        size = list(t.shape)
        size[a.axis] = null.numel()
        if a.groups > 1:  # wide channel j: column j % share of group j // share's rows
            size = [null.numel(), t.shape[0] // a.groups, *t.shape[2:]]
        if a.null_init == "normal":
            values = a.init_scale * torch.randn(size, generator=gen, dtype=torch.float64)
        else:
            bound = a.init_scale / math.sqrt(max(t.numel() // max(t.shape[0], 1), 1))
            values = (2 * torch.rand(size, generator=gen, dtype=torch.float64) - 1) * bound
        values = values.to(device=t.device, dtype=t.dtype)  # one use
        if a.groups > 1:
            q, c = moved(null // t.shape[1], t.device), moved(null % t.shape[1], t.device)
            t.view(a.groups, -1, *t.shape[1:])[q, :, c] = values
        else:
            t.index_copy_(a.axis, idx, values)
    return t


def _scale_axis(out: Tensor, axis: int, factor: Tensor) -> None:
    """``out *= factor`` along ``axis``, each product rounded once.

    ``factor`` comes from :meth:`AxisMap._factor`: float64 unless exact in ``out``'s
    dtype, and each product is rounded once (:func:`_put`), for float32 and α = 1/3
    too. ``out`` (contiguous, fresh from the gather) is viewed as a matrix whose rows or
    columns the factor scales, whichever needs the smaller expanded factor:
    ``(outer, size·inner)`` with the factor repeated over ``inner`` (columns), or
    ``(outer·size, inner)`` with one factor per row (rows: a weight's axis 0 needs only
    ``size`` factors, not one per entry). A ``(rows, columns)`` factor (matrix
    coefficients, ``axis`` 1 of a 2-D ``out``) scales it entry by entry.
    """
    outer = math.prod(out.shape[:axis])
    size = out.shape[axis]
    inner = math.prod(out.shape[axis + 1 :])
    if factor.dim() == 1 and inner > 1 and outer < inner:
        per_row = factor.repeat(outer) if outer > 1 else factor
        view = out.view(outer * size, inner)
        _put(view, view, per_row.view(-1, 1))
        return
    if inner > 1:
        factor = factor.repeat_interleave(inner)
    view = out.view(outer, -1)
    _put(view, view, factor)


def _gather_into(dst: Tensor, src: Tensor, index: list[tuple[int, int, Tensor]]) -> None:
    """``dst = src`` gathered along every ``(axis, keep, tail)`` of ``index`` (by axis).

    The first ``keep`` entries of ``axis`` stay in place (sliced, not gathered), the
    others read ``tail``; every entry of ``dst`` is written once. Gathers that cannot
    write into ``dst`` directly go through temporaries of at most :data:`_TEMP`
    elements, so that no large block is allocated (and paged in) besides ``dst``.
    """
    if not index:
        dst.copy_(src)
        return
    (axis, keep, tail), rest = index[0], index[1:]
    if keep:
        _gather_into(dst.narrow(axis, 0, keep), src.narrow(axis, 0, keep), rest)
    n = tail.numel()
    if not n:
        return
    part = dst.narrow(axis, keep, n)
    if not rest and part.is_contiguous():
        torch.index_select(src, axis, tail, out=part)
        return
    # (index_select into a strided block is several times slower than a copy)
    if axis == 0:  # blocks of gathered rows; the later axes gather within each
        step = max(1, _TEMP // max(part[0].numel(), 1))
        for i in range(0, n, step):
            m = min(step, n - i)
            _gather_into(part.narrow(0, i, m), src.index_select(0, tail[i : i + m]), rest)
        return
    step = max(1, _TEMP // max(part[0].numel(), 1))  # blocks of axis 0 (never gathered)
    for i in range(0, part.shape[0], step):
        m = min(step, part.shape[0] - i)
        block = src.narrow(0, i, m).index_select(axis, tail)
        _gather_into(part.narrow(0, i, m), block, rest)


def _gather(t: Tensor, run: list[AxisMap], what: str, moved: _Moved) -> Tensor:
    """``t`` gathered along every axis of ``run`` and scaled for ``what``.

    ``run`` is plain axes (one allocation, one write per entry) or one grouped in-axis.
    """
    dev = t.device
    a = run[0]
    if a.groups == 1:
        index = []
        for b in sorted(run, key=lambda b: b.axis):
            keep, tail = b._index()
            index.append((b.axis, keep, moved(tail, dev)))
        shape = list(t.shape)
        for b in run:
            shape[b.axis] = b.source.numel()
        out = torch.empty(shape, dtype=t.dtype, device=dev)
        _gather_into(out, t, index)
        if out.is_floating_point():
            for b in run:
                factor = b._factor(what, t.dtype)
                if factor is not None:
                    _scale_axis(out, b.axis, moved(factor, dev))  # ``out`` is fresh: scale in place
        return out
    # the in-axis of a grouped conv weight (out, in/g, *kernel): rows in g segments
    g = a.groups
    rows, share = t.shape[0], t.shape[1]
    local, scale = (moved(x, dev) for x in a._grouped(what, t.dtype, share))
    wide_share = local.shape[1]
    w = t.reshape(g, rows // g, share, *t.shape[2:])
    idx = local.view(g, 1, wide_share, *([1] * (t.dim() - 2)))
    idx = idx.expand(g, rows // g, wide_share, *t.shape[2:])
    out = torch.gather(w, 2, idx).mul_(scale.view(g, 1, wide_share, *([1] * (t.dim() - 2))))
    return out.reshape(rows, wide_share, *t.shape[2:])
