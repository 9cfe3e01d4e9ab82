"""The batches a Hessian tool sums over: one batch, a data loader, or a shard per process.

Every Hessian tool of torch_embed (``hessian``, ``hvp``, ``HessianOperator``,
``gradient``, ``hessian_inertia``, ``inertia_change``, ``saddle_certificates``,
``escape``, ``critical_point``, ``check_embedding``) takes either one batch
(``inputs, targets``) or ``data=``, an iterable of ``(inputs, targets)`` batches (a
:class:`torch.utils.data.DataLoader`, a list), and optionally a
``process_group=`` (a :mod:`torch.distributed` process group). This module turns these
arguments into a :class:`BatchSource`: the batches of this process, each with a weight,
such that the loss of the whole data set is

    ``R(θ) = Σ_ranks Σ_b w_b · loss_fn(model_θ(x_b), y_b)``.

Every quantity the tools need before a non-linear step (the loss, the gradient, the
Hessian, Hessian-vector products, the complement blocks ``D``) is linear in the loss, so
it is the same weighted sum of per-batch contributions, all-reduced (summed) over the
process group. The weights honour the loss's reduction:

- ``"sum"``: ``w_b = 1``; the data set's loss is the sum over all samples.
- ``"mean"`` (and ``"batchmean"`` of :class:`torch.nn.KLDivLoss`): ``w_b = n_b / N``,
  ``n_b`` the samples of batch ``b`` (the leading dimension of its targets, or of its
  inputs when the targets are not a tensor) and ``N`` those of all batches on all
  ranks: the mean over the whole data set, not a mean of batch means. For ``"mean"``
  every sample must hold the same number of target elements (a mean over elements of
  batches whose samples differ in size is not the data set's mean; checked on all
  ranks); :class:`~torch.nn.CrossEntropyLoss` / :class:`~torch.nn.NLLLoss` with class
  weights or with targets equal to ``ignore_index`` are refused for the same reason
  (their mean divides by a weight sum, not by ``N``): use ``reduction="sum"`` there.

The reduction is read from ``loss_fn.reduction`` (every ``torch.nn`` loss module has
one). A plain function (``F.mse_loss``, a lambda) does not say how it reduces, so with
``data=`` or ``process_group=`` it needs ``reduction=`` (a :class:`TypeError` otherwise);
with one batch in one process it does not matter (the weight is 1).

**Cost and order.** The batches are read once, in the iterable's order, and kept (a
generator can be read once only; an HVP or a dense Hessian needs every batch for every
pass; a shuffling ``DataLoader`` read twice would change the order). So the data of this
process is held in memory (as the loader yields it, cast to the tools' dtype), but only
one batch's activations at a time: each Hessian-vector product pass runs one forward,
one backward and one batched second backward pass per batch.

**Processes.** With ``process_group=`` every rank passes its own shard (any number of
batches, none included, as long as some rank has one); the sample count ``N`` is
all-reduced first, then every sum. All ranks must call the tool together with the same
arguments apart from the data (the same model, vectors, options), as for any
collective; they then get the same result (one all-reduce per result tensor, which
leaves the same bits on every rank). ``process_group=None`` (the default) never
communicates, even when :mod:`torch.distributed` is initialised; pass
``torch.distributed.group.WORLD`` for the default group. The ranks take their
decisions (tolerances, the steps of ``critical_point`` and ``escape``) each from the
same all-reduced numbers, so they agree when they run the same PyTorch build on the same
kind of device; ``critical_point`` also broadcasts each eigendecomposition that steers
its Newton steps from the first rank. Its ``max_time`` check uses the slowest rank's
clock; its L-BFGS stall window is counted in gradient evaluations, not timed, so it is
the same on every rank.

A :class:`~torch.utils.data.distributed.DistributedSampler` with ``drop_last=False``
pads the shards to equal length by repeating samples when ``num_replicas`` does not
divide the data set's size; those samples would count twice, so a ``DataLoader`` with
such a sampler is refused (a :class:`ValueError` that says how to shard instead).

A train-mode BatchNorm (``allow_train_mode=True``) normalises each batch by its own
statistics: the sum over batches is then not the loss of the concatenated data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["REDUCTIONS", "Batch", "BatchSource", "batch_source"]

LossFn = Callable[[Any, Any], Tensor]

#: Reductions ``reduction=`` accepts (``"batchmean"``: :class:`torch.nn.KLDivLoss`'s).
REDUCTIONS = ("mean", "sum", "batchmean")


@dataclass(frozen=True)
class Batch:
    """One batch of this process and its weight in the data set's loss.

    Attributes:
        inputs: The batch's inputs, as given.
        targets: The batch's targets, as given.
        weight: ``w_b`` (1 for ``"sum"``, ``n_b / N`` for ``"mean"``).
    """

    inputs: Any
    targets: Any
    weight: float

    def loss(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn`` scaled by the weight (``loss_fn`` itself for a weight of 1).

        Example:
            >>> b = Batch(None, None, 0.25)
            >>> float(b.loss(lambda out, y: out.sum())(torch.ones(4), None))
            1.0
        """
        if self.weight == 1.0:
            return loss_fn
        w = self.weight

        def weighted(output: Any, target: Any) -> Tensor:
            return loss_fn(output, target) * w

        return weighted


@dataclass(frozen=True)
class BatchSource:
    """The weighted batches of this process, and the process group that sums them.

    Attributes:
        batches: This process's batches, in the order they were given.
        group: The :mod:`torch.distributed` process group, or ``None`` (one process).
        samples: Samples of all batches on all ranks (``N``; counted for every
            reduction).
        reduction: ``"mean"``, ``"sum"``, ``"batchmean"``, or ``None`` when one batch
            in one process makes it irrelevant.
    """

    batches: tuple[Batch, ...]
    group: Any = None
    samples: int = 0
    reduction: str | None = None

    @property
    def single(self) -> bool:
        """One batch of weight 1 in one process: the tools' original one-batch case."""
        return self.group is None and len(self.batches) == 1 and self.batches[0].weight == 1.0

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the process group in place (nothing without a group)."""
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Overwrite ``tensor`` with the group's first rank's, in place (nothing alone).

        For decisions that must agree bit for bit on every rank even where a kernel's
        rounding might not (e.g. an eigendecomposition that steers an iteration).
        """
        if self.group is not None:
            import torch.distributed as dist

            src = dist.get_global_rank(self.group, 0)
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def sum(self, value: float) -> float:
        """A Python number summed over the process group (itself without one)."""
        return self._reduce(value, "sum")

    def max(self, value: float) -> float:
        """The largest of a Python number over the process group (itself without one)."""
        return self._reduce(value, "max")

    def _reduce(self, value: float, op: str) -> float:
        if self.group is None:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=_comm_device(self.group, None))
        kind = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(t, op=kind, group=self.group)
        return float(t[0])

    def owns(self, index: int) -> bool:
        """Whether this rank does item ``index`` of work dealt round-robin over the group.

        For work that is not a sum over samples but must not be repeated on every rank
        (e.g. one eigendecomposition per block): the owner computes the item, the other
        ranks contribute zeros, and one :meth:`all_reduce_` shares it (adding zeros is
        exact, so every rank gets the owner's bits). Every item without a group.
        """
        if self.group is None:
            return True
        import torch.distributed as dist

        return index % dist.get_world_size(self.group) == dist.get_rank(self.group)


def _comm_device(group: Any, like: Tensor | None) -> torch.device:
    """Where a small bookkeeping tensor of ``group``'s collectives lives."""
    if like is not None:
        return like.device
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _detect_reduction(caller: str, loss_fn: Any, reduction: str | None) -> str | None:
    """The loss's reduction: ``loss_fn.reduction`` of a ``torch.nn`` loss, or ``reduction``."""
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"{caller}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    found = getattr(loss_fn, "reduction", None) if isinstance(loss_fn, nn.Module) else None
    if found is None:
        return reduction
    if found not in REDUCTIONS:
        raise ValueError(
            f"{caller}: loss_fn ({type(loss_fn).__name__}) has reduction={found!r}; the "
            f"Hessian tools need a scalar loss, reduced by one of {REDUCTIONS}"
        )
    if reduction is not None and reduction != found:
        raise ValueError(
            f"{caller}: reduction={reduction!r} contradicts loss_fn "
            f"({type(loss_fn).__name__}) whose reduction is {found!r}; omit reduction="
        )
    return str(found)


def _as_pair(caller: str, index: int, batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    what = type(batch).__name__ + (
        f" of length {len(batch)}" if isinstance(batch, Sequence) else ""
    )
    raise TypeError(
        f"{caller}: data must yield (inputs, targets) pairs (tuples or lists of 2, as a "
        f"DataLoader over a TensorDataset does); batch {index} is a {what}"
    )


def _samples(caller: str, index: int, inputs: Any, targets: Any) -> tuple[int, tuple[int, ...]]:
    """``(n_b, per-sample shape)`` of a batch: the leading dimension of its targets/inputs."""
    for t in (targets, inputs):
        if isinstance(t, Tensor) and t.ndim >= 1:
            return int(t.shape[0]), tuple(t.shape[1:])
    raise TypeError(
        f"{caller}: cannot count the samples of batch {index}: neither its targets "
        f"({type(targets).__name__}) nor its inputs ({type(inputs).__name__}) is a tensor "
        f"with a leading batch dimension; a mean over the data set needs the count (use a "
        f"loss with reduction='sum' and scale it yourself)"
    )


def _check_mean_loss(caller: str, loss_fn: Any, index: int, targets: Any) -> None:
    """Refuse class-weighted / ignore_index means: they do not divide by the sample count."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return
    name = type(loss_fn).__name__
    if loss_fn.weight is not None:
        raise ValueError(
            f"{caller}: {name} with class weights and reduction='mean' divides by the "
            f"summed weights of each batch, so batch losses cannot be combined into the "
            f"data set's loss by sample counts; use reduction='sum' (and divide by the "
            f"summed weights yourself)"
        )
    if isinstance(targets, Tensor) and not targets.is_floating_point():
        if bool((targets == loss_fn.ignore_index).any()):
            raise ValueError(
                f"{caller}: batch {index} has targets equal to {name}'s ignore_index "
                f"({loss_fn.ignore_index}); its mean then divides by the targets kept, not "
                f"by the samples; use reduction='sum' (and divide by the count yourself)"
            )


def batch_source(
    caller: str,
    loss_fn: Any,
    inputs: Any = None,
    targets: Any = None,
    data: Iterable[Any] | None = None,
    *,
    reduction: str | None = None,
    process_group: Any = None,
) -> BatchSource:
    """Turn a tool's ``inputs, targets`` / ``data=`` / ``process_group=`` into batches.

    Args:
        caller: The public function's name, for messages.
        loss_fn: The loss; its ``reduction`` attribute is read if it is an ``nn.Module``.
        inputs: One batch's inputs (``None`` with ``data``).
        targets: One batch's targets (``None`` with ``data``).
        data: An iterable of ``(inputs, targets)`` batches, read once.
        reduction: ``"mean"``, ``"sum"`` or ``"batchmean"`` when ``loss_fn`` does not
            say (a plain function); must agree with ``loss_fn.reduction`` otherwise.
        process_group: A :mod:`torch.distributed` process group: this rank's batches
            are its shard, and sums run over the group.

    Returns:
        A :class:`BatchSource`.

    Raises:
        TypeError: Both or neither of ``inputs`` and ``data``; ``data`` a tensor or
            not iterable, or a batch that is not an ``(inputs, targets)`` pair; a
            plain-function loss without ``reduction=`` where it matters; a batch whose
            samples cannot be counted; ``process_group`` not a process group.
        ValueError: No batch at all (on any rank); an unknown or contradictory
            reduction; a mean over samples of different sizes or a class-weighted /
            ``ignore_index`` mean; a ``DataLoader`` whose ``DistributedSampler`` pads
            its shards with repeated samples (``drop_last=False`` and a data set size
            that ``num_replicas`` does not divide).

    Example:
        >>> x, y = torch.ones(10, 2), torch.zeros(10, 1)
        >>> src = batch_source("demo", nn.MSELoss(), data=[(x[:4], y[:4]), (x[4:], y[4:])])
        >>> [b.weight for b in src.batches], src.samples, src.reduction
        ([0.4, 0.6], 10, 'mean')
        >>> batch_source("demo", nn.MSELoss(), x, y).single
        True
    """
    if data is not None and (inputs is not None or targets is not None):
        raise TypeError(
            f"{caller}: pass either one batch (inputs, targets) or data= (an iterable of "
            f"(inputs, targets) batches), not both"
        )
    if data is None and inputs is None:
        raise TypeError(
            f"{caller}: needs the data: one batch (inputs, targets), or data= an iterable "
            f"of (inputs, targets) batches such as a DataLoader"
        )
    group = _check_group(caller, process_group)
    if data is None:
        pairs = [(inputs, targets)]
    else:
        if isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                f"{caller}: data must be an iterable of (inputs, targets) batches (a "
                f"DataLoader, a list of pairs), got {type(data).__name__}"
            )
        _check_sampler(caller, data)
        pairs = [_as_pair(caller, i, b) for i, b in enumerate(data)]
    red = _detect_reduction(caller, loss_fn, reduction)
    weighted = data is not None or group is not None
    if weighted and red is None:
        raise TypeError(
            f"{caller}: loss_fn ({getattr(loss_fn, '__name__', type(loss_fn).__name__)}) "
            f"does not say how it reduces over the samples of a batch, which decides how "
            f"batches add up; pass reduction='mean' (e.g. F.mse_loss's default) or "
            f"reduction='sum' (or pass a torch.nn loss module)"
        )
    if not weighted:
        return BatchSource((Batch(inputs, targets, 1.0),), None, _count(inputs, targets), red)
    counts: list[int] = []
    shapes: set[tuple[int, ...]] = set()
    for i, (x, y) in enumerate(pairs):
        if red == "sum":  # weights 1: the count is informative only
            counts.append(_count(x, y))
            continue
        n, shape = _samples(caller, i, x, y)
        counts.append(n)
        shapes.add(shape)
        if red == "mean":
            _check_mean_loss(caller, loss_fn, i, y)
    local = sum(counts)
    total_batches, total = len(pairs), local
    if group is not None:
        stats = torch.tensor(
            [float(len(pairs)), float(local)],
            dtype=torch.float64,
            device=_comm_device(group, None),
        )
        import torch.distributed as dist

        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        total_batches, total = int(stats[0]), int(stats[1])
    if total_batches == 0:
        raise ValueError(
            f"{caller}: data is empty" + (" on every rank" if group is not None else "")
        )
    if red == "mean":
        _check_sample_shapes(caller, shapes, group)
    if red != "sum" and total == 0:
        raise ValueError(f"{caller}: the batches hold no samples; a mean over none is undefined")
    batches = tuple(
        Batch(x, y, 1.0 if red == "sum" else n / total)
        for (x, y), n in zip(pairs, counts, strict=True)
    )
    return BatchSource(batches, group, total, red)


def _check_sampler(caller: str, data: Iterable[Any]) -> None:
    """Refuse a DataLoader whose DistributedSampler pads its shards with repeated samples.

    A :class:`~torch.utils.data.distributed.DistributedSampler` with ``drop_last=False``
    over ``n`` samples for ``k`` replicas gives every rank ``ceil(n / k)`` indices,
    repeating ``k·ceil(n / k) - n`` samples when ``k`` does not divide ``n``: they would
    count twice in the data set's loss, silently. Checked on the loader's ``sampler``
    and on its ``batch_sampler``'s (a ``BatchSampler`` around a ``DistributedSampler``).
    """
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(data, DataLoader):
        return
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            continue
        n, k = len(sampler.dataset), int(sampler.num_replicas)  # type: ignore[arg-type]
        if n % k == 0:
            continue
        repeated = k * math.ceil(n / k) - n
        raise ValueError(
            f"{caller}: data is a DataLoader whose sampler, a {type(sampler).__name__} "
            f"with drop_last=False, splits {n} samples over num_replicas={k}: it pads the "
            f"shards to {math.ceil(n / k)} samples each by repeating {repeated}, which "
            f"would count twice in the data set's loss. Use DistributedSampler(..., "
            f"drop_last=True) (it leaves out {n % k} samples), a data set whose size "
            f"num_replicas divides, or a sampler that does not pad (e.g. each rank's own "
            f"slice of the indices)"
        )


def _count(inputs: Any, targets: Any) -> int:
    """The leading dimension of the targets (or inputs) if a tensor has one, else 0."""
    for t in (targets, inputs):
        if isinstance(t, Tensor) and t.ndim >= 1:
            return int(t.shape[0])
    return 0


def _check_sample_shapes(caller: str, shapes: set[tuple[int, ...]], group: Any) -> None:
    """One per-sample element count in every batch of every rank (for an element mean)."""
    sizes = {int(torch.Size(s).numel()) for s in shapes}
    lo, hi = (min(sizes), max(sizes)) if sizes else (None, None)
    if group is not None:
        import torch.distributed as dist

        big = float(2**62)
        t = torch.tensor(
            [-(lo if lo is not None else big), hi if hi is not None else -big],
            dtype=torch.float64,
            device=_comm_device(group, None),
        )
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        lo, hi = int(-t[0]), int(t[1])
    if lo is not None and hi is not None and lo != hi:
        raise ValueError(
            f"{caller}: with reduction='mean' every sample must have the same number of "
            f"target elements (the loss is a mean over elements), but batches have "
            f"{lo} and {hi} per sample; pad them, or use reduction='sum'"
        )


def _check_group(caller: str, group: Any) -> Any:
    """``group`` if it is a live process group (``None`` stays ``None``: one process)."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{caller}: process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD or dist.new_group(...)), got "
            f"{type(group).__name__}"
        )
    if not dist.is_initialized():
        raise ValueError(
            f"{caller}: process_group was given but torch.distributed is not initialised "
            f"(any more); call torch.distributed.init_process_group first"
        )
    return group
