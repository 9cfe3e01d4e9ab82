"""A before/after report of one widening: function, gradient and Hessian inertia.

:func:`check_embedding` compares the narrow and the widened model on a batch: the
largest output difference, the gradient norms, the full Hessian inertia before, the
full inertia after (optional: it costs ``O(P³)``) and the inertia after predicted as
``before + inertia_change`` (cheap, :mod:`torch_embed.inertia_change`), with the time
each took, whether every count was non-decreasing (JML 2022 Thm 6.2) and whether the
prediction matches the full recount.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_embed._blocks import full_state
from torch_embed._data import batch_source
from torch_embed._sequential import read_sequential
from torch_embed.embedding import Embedding
from torch_embed.hessian import gradient
from torch_embed.inertia import Inertia, hessian_inertia
from torch_embed.inertia_change import _check_embedded, _check_inputs, inertia_change

__all__ = ["EmbeddingReport", "check_embedding"]

LossFn = Callable[[Any, Any], Tensor]


@dataclass(frozen=True)
class EmbeddingReport:
    """What one widening did to the function, the gradient and the Hessian inertia.

    Attributes:
        output_max_abs_diff: ``max |f_wide(x) - f_narrow(x)|`` over the batch, in the
            models' own dtype (a few ulps for a function-preserving embedding).
        grad_norm_before: ``|∇R|`` of the narrow model (float64).
        grad_norm_after: ``|∇R|`` of the wide model (float64).
        before: Full Hessian inertia of the narrow model.
        after: Full Hessian inertia of the wide model (``None`` if ``full=False``).
        change: The structured change, :func:`~torch_embed.inertia_change.inertia_change`.
        predicted: ``before + change``: the inertia after, without the wide Hessian.
        time_before: Seconds for ``before``.
        time_after: Seconds for ``after`` (``None`` if not computed).
        time_change: Seconds for ``change``.
        nondecreasing: ``(negative, zero, positive)``: whether each count did not
            decrease (compared on ``after`` if computed, else on ``predicted``).
        matches: ``predicted`` equals ``after`` in all three counts (``None`` without
            ``after``).
        description: The embedding, e.g. ``Embedding(hidden widths 3→5, kind=critical)``.
    """

    output_max_abs_diff: float
    grad_norm_before: float
    grad_norm_after: float
    before: Inertia
    after: Inertia | None
    change: Inertia
    predicted: Inertia
    time_before: float
    time_after: float | None
    time_change: float
    nondecreasing: tuple[bool, bool, bool]
    matches: bool | None
    description: str = ""

    @property
    def speedup(self) -> float | None:
        """``time_after / time_change``: how much faster the structured count was."""
        if self.time_after is None or self.time_change <= 0:
            return None
        return self.time_after / self.time_change

    def __str__(self) -> str:
        """A small table; see :func:`check_embedding` for an example."""

        def row(label: str, inert: Inertia | None, secs: float | None) -> str:
            if inert is None:
                return f"{label:<17}{'—':>9}{'—':>6}{'—':>10}"
            t = f"{secs:9.3g} s" if secs is not None else ""
            flag = " (ambiguous)" if inert.ambiguous else ""
            return (
                f"{label:<17}{inert.negative:>9}{inert.zero:>6}{inert.positive:>10}"
                f"{inert.tol:>10.2g}{t}{flag}"
            )

        yes = {True: "yes", False: "NO", None: "—"}
        lines = [
            self.description or "EmbeddingReport",
            f"{'':<17}{'negative':>9}{'zero':>6}{'positive':>10}{'tol':>10}{'time':>11}",
            row("before (full)", self.before, self.time_before),
            row("after (full)", self.after, self.time_after),
            row("before + change", self.predicted, self.time_change),
            f"{'non-decreasing':<17}"
            + "".join(f"{yes[v]:>{w}}" for v, w in zip(self.nondecreasing, (9, 6, 10))),
            f"output max |Δ| = {self.output_max_abs_diff:.2g}; |∇R| before "
            f"{self.grad_norm_before:.2g}, after {self.grad_norm_after:.2g}; "
            f"prediction matches: {yes[self.matches]}"
            + (f"; {self.speedup:.0f}x faster" if self.speedup is not None else ""),
        ]
        return "\n".join(lines)


def _check_models(narrow_model: nn.Module, wide_model: nn.Module, embedding: Embedding) -> None:
    """Refuse a pair that is not ``wide = embedding(narrow)``, before any Hessian is built.

    Catches the usual slips: widening without keeping a copy (``narrow_model`` is the
    widened model itself), a narrow copy taken at another time, either model trained
    after the widening, or a non-critical embedding.
    """
    _check_inputs(embedding, wide_model)  # critical, wide widths, no frozen / train mode
    narrow_widths = read_sequential(narrow_model).widths
    if narrow_widths != embedding.narrow_widths:
        raise ValueError(
            f"narrow_model has widths {narrow_widths} but the embedding starts from "
            f"{embedding.narrow_widths}; pass the model before widening (widen works in "
            f"place: keep a copy.deepcopy of the model before calling it)"
        )
    pulled = embedding.restrict(full_state(wide_model))
    for name, p in narrow_model.named_parameters():
        target = p.detach().to(torch.float64)
        got = pulled[name].to(target.device)
        eps = torch.finfo(p.dtype).eps if p.is_floating_point() else 0.0
        scale = float(target.abs().max()) if target.numel() else 0.0
        err = float((got - target).abs().max()) if target.numel() else 0.0
        if got.shape != target.shape or err > math.sqrt(eps) * max(scale, 1.0):
            raise ValueError(
                f"wide_model is not this embedding's image of narrow_model: parameter "
                f"'{name}' of narrow_model differs from the wide model's pulled-back value "
                f"by {err:.3g} (a copy taken at another time, or a model changed after "
                f"widening?)"
            )
    _check_embedded(embedding.apply(pulled), wide_model)


def _timed(fn: Callable[[], Inertia]) -> tuple[Inertia, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def check_embedding(
    narrow_model: nn.Module,
    wide_model: nn.Module,
    embedding: Embedding,
    loss_fn: LossFn,
    inputs: Tensor | None = None,
    targets: Any = None,
    *,
    data: Iterable[Any] | None = None,
    reduction: str | None = None,
    process_group: Any = None,
    full: bool = True,
    tol: float | None = None,
) -> EmbeddingReport:
    """Compare a narrow model with its widened copy: function, gradient and inertia.

    Args:
        narrow_model: The model before widening (keep a ``copy.deepcopy``).
        wide_model: The widened model, at the embedded point.
        embedding: The critical embedding that maps one to the other.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        inputs: The batch (full batch: the loss is over exactly these samples).
            Omit with ``data``.
        targets: The targets (omit with ``data``).
        data: An iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``),
            read once, instead of ``inputs, targets``: every count is of the whole
            data set's loss (see :mod:`torch_embed._data`).
        reduction: How ``loss_fn`` reduces over a batch (``"mean"``, ``"sum"``,
            ``"batchmean"``); needed with ``data``/``process_group`` for a plain
            function, read from a ``torch.nn`` loss otherwise.
        process_group: A :mod:`torch.distributed` process group: each rank passes its
            shard; every count, norm and the output difference are over all ranks.
        full: Also recount the wide Hessian's inertia in full (``O(P³)``), to check
            the prediction and to time it.
        tol: One zero threshold for every count (before, after and change), so that
            ``before + change`` and the full recount compare like with like. Default:
            the one the "before" count picks by the rule of
            :func:`~torch_embed.inertia.hessian_inertia` (the rounding level, moved up
            into a clear gap below ``10·|∇R|`` away from a critical point), then used
            for the other two.

    Returns:
        An :class:`EmbeddingReport`; ``print(report)`` shows a small table.

    Raises:
        ValueError: The embedding is not critical, or ``wide_model`` is not its image of
            ``narrow_model`` (other widths, e.g. the widened model passed twice; or
            parameters that differ, e.g. a copy trained after widening). Checked before
            any Hessian is built.

    Example:
        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> import torch_embed
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
        >>> wide = copy.deepcopy(net)
        >>> emb = torch_embed.widen(wide, [4], torch_embed.Split(alpha=0.5))
        >>> x = torch.linspace(-2, 2, 16, dtype=torch.float64)[:, None]
        >>> rep = check_embedding(net, wide, emb, nn.MSELoss(), x, torch.sin(x), tol=1e-9)
        >>> rep.matches, rep.nondecreasing, rep.predicted.as_tuple()
        (True, (True, True, True), (4, 0, 9))
        >>> print(rep)  # doctest: +SKIP
        Embedding(hidden widths 2→4, kind=critical)
                          negative  zero  positive       tol       time
        before (full)            2     0         5     1e-09   0.0433 s
        after (full)             4     0         9     1e-09   0.0244 s
        before + change          4     0         9     1e-09   0.0304 s
        non-decreasing         yes   yes       yes
        output max |Δ| = 2.8e-17; |∇R| before 0.71, after 0.92; prediction matches: yes; 1x faster

        (Times vary; at this size the full recount is as cheap as the blocks. See
        ``bench/inertia.py --part 3`` for P ≈ 4000.)
    """
    _check_models(narrow_model, wide_model, embedding)
    source = batch_source(
        "check_embedding",
        loss_fn,
        inputs,
        targets,
        data,
        reduction=reduction,
        process_group=process_group,
    )
    # every tool below reads the batches again: pass the ones read here (a generator
    # or a shuffling loader would give none or others)
    batches = [(b.inputs, b.targets) for b in source.batches]
    how: dict[str, Any] = {"reduction": reduction, "process_group": process_group}
    if data is not None:
        how["data"] = batches
    else:
        how.update(inputs=inputs, targets=targets)
    out_diff = 0.0
    with torch.no_grad():
        for x, _ in batches:
            diff = (wide_model(x) - narrow_model(x)).abs()
            out_diff = max(out_diff, float(diff.max()) if diff.numel() else 0.0)
    out_diff = source.max(out_diff)
    g_before = float(gradient(narrow_model, loss_fn, **how).norm())
    g_after = float(gradient(wide_model, loss_fn, **how).norm())
    before, t_before = _timed(lambda: hessian_inertia(narrow_model, loss_fn, **how, tol=tol))
    common = before.tol
    after: Inertia | None = None
    t_after: float | None = None
    if full:
        after, t_after = _timed(lambda: hessian_inertia(wide_model, loss_fn, **how, tol=common))
    change, t_change = _timed(
        lambda: inertia_change(embedding, wide_model, loss_fn, **how, tol=common)
    )
    predicted = before + change
    reference = after if after is not None else predicted
    nondecreasing = (
        reference.negative >= before.negative,
        reference.zero >= before.zero,
        reference.positive >= before.positive,
    )
    matches = None if after is None else after.as_tuple() == predicted.as_tuple()
    return EmbeddingReport(
        output_max_abs_diff=out_diff,
        grad_norm_before=g_before,
        grad_norm_after=g_after,
        before=before,
        after=after,
        change=change,
        predicted=predicted,
        time_before=t_before,
        time_after=t_after,
        time_change=t_change,
        nondecreasing=nondecreasing,
        matches=matches,
        description=repr(embedding),
    )
